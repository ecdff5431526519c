"""Compile the fused expert kernels (and the flash attention kernel) for a GPU without one: Triton's own compiler
(and the cuobjdump it ships), the full-size model's tile shapes. What the CPU interpreter cannot check: that each
kernel compiles for the target, its registers, spills and shared memory, and that one program of each fits an SM.

    python tools/compile_kernels.py [--arch 90] [--batch-shapes 2x2,4x2] [--batch-k-step 64] [--batch-whole-k]
                                                  # exit 1 if a kernel fails to compile or cannot fit an SM

Besides batch 1's kernels it compiles the GEMMs for batches in the KernelConfig's batch shape (R batch rows x T
column tiles per program), or in each of --batch-shapes (to choose that default: registers, spills, shared memory),
each as it launches on Hopper: fitted to its shared memory (fewer stages, tiles, rows; the label says what ran).

Runs with TRITON_INTERPRET unset (the kernels must be real JIT functions). test/engine/test_kernels_compile.py
runs it in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default until 3.10, as the kernels run today

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi05_ros.engine.config import PRESETS  # noqa: E402
from pi05_ros.engine.fast.kernels import attention, expert, geglu  # noqa: E402
from pi05_ros.engine.fast.kernels.expert import KernelConfig, gemm_configs  # noqa: E402

SHARED_PER_SM = 227 * 1024  # Hopper's largest shared memory per block (opt-in)
BF, F32, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"
FP8 = "*fp8e4nv"
# Pointer arguments Triton may assume 16-byte aligned (as it specializes them at launch for these tensors).
ALIGNED = ("ptr", "w_qkv", "w_o", "w_gu", "w_dn", "ws_", "count_")


def build(fn, types: dict[str, str], consts: dict, arch: int, num_warps: int = 4, num_stages: int | None = None):
    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    aligned = [i for i, name in enumerate(fn.arg_names)
               if types.get(name, "").startswith("*") and any(a in name for a in ALIGNED)
               and name != "n_valid_ptr"]
    # Strides are multiples of 16 at full size, and Triton specializes such integer arguments at launch.
    aligned += [i for i, name in enumerate(fn.arg_names) if name.endswith("stride") and name not in consts]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})})


def resource_usage(kernel) -> tuple[int, int]:
    """(registers, spill bytes) of the compiled kernel, read from its cubin by the cuobjdump that ships with Triton."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else 0


def gemm_types(out: str) -> dict[str, str]:
    return dict(a_ptr=BF, a_stride="i32", a_bstride="i32", w_ptr=BF, w_scale_ptr=F32, ws_ptr=F32, count_ptr=I32,
                ssp_in_ptr=F32, ss_tiles="i32", ss_bstride="i32", bias_ptr=F32, gate_ptr=F32, out_ptr=out,
                out_stride="i32", out_bstride="i32", next_mod_ptr=F32, xm_ptr=BF, xm_bstride="i32", ssp_out_ptr=F32,
                k_ptr=BF, v_ptr=BF, kv_bstride="i32", cos_ptr=F32, sin_ptr=F32, n_valid_ptr=I64, cache_row0="i32",
                batch="i32", M="i32", K="i32", N="i32", eps="fp32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--batch-shapes", help="RxT[,RxT...]: batch GEMM shapes to compile (default: the config's)")
    parser.add_argument("--batch-k-step", type=int, default=0, help="KernelConfig.batch_k_step for the batch shapes")
    parser.add_argument("--batch-whole-k", action="store_true", help="KernelConfig.batch_split_k=False for them")
    args = parser.parse_args()
    arch, pdl = args.arch, args.arch >= 90
    e = PRESETS["pi05"].expert
    c = KernelConfig()
    shapes = ([tuple(int(n) for n in shape.split("x")) for shape in args.batch_shapes.split(",")]
              if args.batch_shapes else [(c.batch_rows, c.batch_tiles)])
    bm = max(16, triton.next_power_of_2(PRESETS["pi05"].action_horizon))
    fitted = gemm_configs(c, e.width, e.num_heads, e.head_dim, e.mlp_dim)
    cfgs = {"qkv": (fitted["qkv"], expert.EPI_QKV, e.width, BF),
            "o": (fitted["o"], expert.EPI_RESIDUAL, e.num_heads * e.head_dim, F32),
            "gate_up": (fitted["gate_up"], expert.EPI_GEGLU, e.width, BF),
            "down": (fitted["down"], expert.EPI_RESIDUAL, e.mlp_dim, F32)}
    common = dict(HEADS=e.num_heads, HEAD_DIM=e.head_dim, MLP=e.mlp_dim, DT=tl.bfloat16, BM=bm)

    n_out = {"qkv": (e.num_heads + 2) * e.head_dim // 2, "o": e.width, "gate_up": e.mlp_dim, "down": e.width}

    def gemm_jobs(batch: int, config: KernelConfig) -> list:
        jobs = []
        for name, (cfg, epilogue, k, out) in cfgs.items():
            per_tile = cfg.block_n // 2 if epilogue != expert.EPI_RESIDUAL else cfg.block_n
            # as launched on a Hopper GPU: fitted to its shared memory
            shape = expert.launch_shape(config, cfg, n_out[name] // per_tile, epilogue, e.head_dim, batch, bm,
                                        shared_limit=SHARED_PER_SM, splits=-(-k // cfg.k_chunk))
            rows, tiles, warps, stages = shape.rows, shape.tiles, shape.warps, shape.stages
            consts = dict(common, EPILOGUE=epilogue, NEXT=name in ("o", "down"), W_FP8=False, BN=cfg.block_n,
                          KC=shape.k_chunk, BK=shape.k_step, S=shape.splits, R=rows, T=tiles, STAGES=stages,
                          PREFETCH=cfg.prefetch, USE_PDL=pdl)
            label = (f"gemm {name}" if batch == 1
                     else f"gemm {name} batch {rows}x{tiles}, {warps} warps, {stages} stages")
            if batch > 1 and (config.batch_k_step or not config.batch_split_k):
                label += f", BK {shape.k_step}, {shape.splits} K split(s)"
            need = expert.shared_bytes(cfg, rows, tiles, stages, epilogue, bm, shape.k_step)
            jobs.append((label, expert._expert_gemm_kernel, gemm_types(out), consts, warps, need))
        return jobs

    jobs = gemm_jobs(1, c)
    attend = dict(q_ptr=BF, q_bstride="i32", k_ptr=BF, v_ptr=BF, kv_bstride="i32", n_valid_ptr=I64, acc_ptr=F32,
                  m_ptr=F32, l_ptr=F32, rows="i32", keys_total="i32", horizon="i32", scale="fp32")
    jobs.append(("attend", expert._attend_kernel, attend,
                 dict(S_K=c.key_splits, D=e.head_dim, BM=bm, KB=c.key_block, DT=tl.bfloat16, USE_PDL=pdl),
                 c.attend_warps, 0))
    combine = dict(acc_ptr=F32, m_ptr=F32, l_ptr=F32, out_ptr=BF, out_stride="i32", out_bstride="i32", rows="i32",
                   heads="i32")
    bd = min(c.combine_cols, e.head_dim)
    jobs.append(("combine", expert._combine_kernel, combine,
                 dict(S_K=c.key_splits, D=e.head_dim, BM=bm, BR=c.combine_rows, BD=bd, DT=tl.bfloat16, USE_PDL=pdl),
                 4, 0))
    # the flash attention of batched prefills (kernels/attention.py) at its default tiles, one split and several
    flash_kernel, flash_combine = attention._kernels()
    flash = dict(q_ptr=BF, k_ptr=BF, v_ptr=BF, mask_ptr="*u8", out_ptr=BF, acc_ptr=F32, m_ptr=F32, l_ptr=F32,
                 q_rows="i32", keys="i32", q_bstride="i32", kv_bstride="i32", kv_rstride="i32", mask_bstride="i32",
                 out_bstride="i32", scale="fp32", blocks_per_split="i32")
    d = PRESETS["pi05"].vlm.head_dim
    # the target's key walk (attention.key_walk: "runs" on Hopper) with one split and several, and the other of
    # "skip" and "runs" with several
    default_walk = attention.KEY_WALK or attention.walk_for(arch // 10)
    other_walk = "skip" if default_walk == "runs" else "runs"
    walks = [(default_walk, 1), (default_walk, 4), (other_walk, 4)]
    for walk, splits in walks:
        jobs.append((f"flash attention, {'one split' if splits == 1 else f'{splits} key splits'}, {walk} walk"
                     f"{'' if walk == default_walk else ' (option)'}", flash_kernel,
                     flash, dict(D=d, BM=attention.BLOCK_ROWS, KB=attention.KEY_BLOCK, SPLITS=splits, DT=tl.bfloat16,
                                 WALK=attention.KEY_WALKS.index(walk), PRECISION="tf32",
                                 KEYS_P2=1024 if walk == "runs" else 1),  # as flash_gqa_attention passes it
                     attention.WARPS, 0))
    jobs.append(("flash combine", flash_combine,
                 dict(acc_ptr=F32, m_ptr=F32, l_ptr=F32, out_ptr=BF, q_rows="i32", out_bstride="i32"),
                 dict(D=d, BM=attention.BLOCK_ROWS, BR=16, BD=min(64, d), SPLITS=4, DT=tl.bfloat16), 4, 0))
    # the prefix MLP's FP8 gate_up + GeGLU kernel (kernels/geglu.py) in its two tile configs (Gemma's K = 2048)
    geglu_types = dict(x_ptr=FP8, w_ptr=FP8, bias_ptr=F32, out_ptr=FP8, scale_ptr=F32, out_inv_scale_ptr=F32,
                       M="i32", K="i32", F="i32", x_stride="i32", w_stride="i32", out_stride="i32")
    for g in (geglu.DEFAULT_CONFIG, geglu.DEFAULT_CONFIG._replace(precise=not geglu.DEFAULT_CONFIG.precise)):
        jobs.append((f"fp8 gate_up + GeGLU, tiles {g.block_m}x{g.block_n}x{g.block_k}, {g.warps} warps, "
                     f"{g.stages} stages, {'float32 sums per K step' if g.precise else 'MMA accumulation'}"
                     f"{'' if g == geglu.DEFAULT_CONFIG else ' (option)'}",
                     geglu._kernel(), geglu_types,
                     dict(BM=g.block_m, BN=g.block_n, BK=g.block_k, GROUP_M=g.group_m, EVEN_K=True, OUT_FP8=True,
                          PRECISE=g.precise, GATED=True),
                     (g.warps, g.stages), g.stages * (g.block_m + 2 * g.block_n) * g.block_k))
    # its GELU form, SigLIP's fc1 (K = 1152, a bf16 bias)
    g = geglu.GELU_CONFIG
    jobs.append((f"fp8 fc1 + bias + GELU, tiles {g.block_m}x{g.block_n}x{g.block_k}, {g.warps} warps, {g.stages} "
                 "stages", geglu._kernel(), {**geglu_types, "bias_ptr": BF},
                 dict(BM=g.block_m, BN=g.block_n, BK=g.block_k, GROUP_M=g.group_m, EVEN_K=True, OUT_FP8=True,
                      PRECISE=g.precise, GATED=False),
                 (g.warps, g.stages), g.stages * (g.block_m + g.block_n) * g.block_k))
    for rows, tiles in shapes:
        jobs += gemm_jobs(8, dataclasses.replace(c, batch_rows=rows, batch_tiles=tiles, batch_k_step=args.batch_k_step,
                                                 batch_split_k=not args.batch_whole_k))

    failed = False
    print(f"triton {triton.__version__}, sm_{arch}, full-size expert, default tiles")
    # This compile's shared memory came out at half of what the same GEMMs asked at launch on an H100 (Triton 3.6,
    # docs/benchmarks.md §48); expert.shared_bytes matched those launches, so a kernel must fit by both.
    print("| kernel | registers | stack bytes (spills) | shared KiB | at launch (est.) KiB | fits one program per SM |")
    print("|---|---|---|---|---|---|")
    for label, fn, types, consts, warps, need in jobs:
        try:
            warps, stages = warps if isinstance(warps, tuple) else (warps, None)
            kernel = build(fn, types, consts, arch, warps, stages)
        except Exception as exc:  # report every kernel, then fail
            print(f"| {label} | FAILED: {type(exc).__name__}: {str(exc)[:300]} | | | | |")
            failed = True
            continue
        regs, spills = resource_usage(kernel)
        shared = kernel.metadata.shared
        fits = max(shared, need) <= SHARED_PER_SM and 0 < regs <= 255
        failed |= not fits
        estimate = f"{need / 1024:.0f}" if need else "-"
        print(f"| {label} | {regs} | {spills} | {shared / 1024:.0f} | {estimate} | {'yes' if fits else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
