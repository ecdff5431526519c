"""The persistent denoise step (KernelConfig.persistent) against the six kernels a layer, on the GPU, each case in
a process of its own: a kernel that faults leaves the CUDA context unusable, and the cases after it must still run.

    PYTHONPATH=. python3 tools/persistent_step_gpu.py [--sanitize[=TOOL] | --cpu] [CASE ...]

A case is SIZE:PROGRAMS:WARPS[:CHANGE], e.g. full:0:8 or mid:1:8:whole-k (PROGRAMS 0: one per SM).
- SIZE small: the CPU tests' expert (width 128, 2 heads of 64, 2 layers; horizon 10, so no Hopper wgmma), whole-K
  tiles, or `small-split` with split-K GEMMs; mid: the full-size expert (width 1024, 8 heads of 256, MLP 4096),
  2 layers, behind a small vision tower and VLM (a cheap prefix); mid1: the same with 1 layer, which also compares
  every work buffer of the two paths (q, the attention partials, attn, h, x: the first that differs names
  the task kind at fault); full: the whole model.
- CHANGE: no-pdl, no-prefetch (GEMM tasks load their weights after their waits), stagesN (1: no pipelining),
  whole-k (o and down without split K), packed (dependency counters side by side), kindsN (mid1 only: the
  persistent kernel holds and runs only the first N task kinds of qkv, attention, combine, o, gate_up, down),
  wgmma (the step compiled with Hopper's wgmma, KernelConfig.persistent_wgmma; by default it runs on mma.sync).
Prints one line per case: the largest difference from the six kernels (bf16, 1 step), whether the output is
finite, and whether the counters came back to zero; or how the process ended. --sanitize runs each case under
compute-sanitizer (TOOL: memcheck by default, or racecheck for shared-memory hazards, synccheck, initcheck),
persistent step only; --cpu runs the cases on Triton's CPU interpreter in float32
(to check this tool without a GPU: slow beyond `small`). With no cases, a default set (docs/benchmarks.md §59).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_CASES = ("small:0:8", "small-split:1:8", "small-split:0:8", "mid1:1:8", "mid1:1:4", "mid:1:8",
                 "mid:1:8:no-prefetch", "mid:1:8:whole-k", "mid:1:4", "mid:0:8", "full:1:8", "full:0:8")

def sanitizer() -> str:
    """compute-sanitizer: on PATH, or in a CUDA toolkit under /usr/local (the GPU machine's: cuda-13.0)."""
    import glob
    import shutil

    found = shutil.which("compute-sanitizer") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))),
                                                      None)
    if found is None:
        raise SystemExit("compute-sanitizer not found (CUDA toolkit)")
    return found


def run_case(case: str, only_persistent: bool, cpu: bool) -> None:
    import torch

    from pi05_ros.engine.config import PRESETS, TINY, GemmaConfig, VisionConfig
    from pi05_ros.engine.demo import random_model
    from pi05_ros.engine.fast.blocks import FastModel, prefill_eager
    from pi05_ros.engine.fast.kernels.expert import ExpertKernels, GemmConfig, KernelConfig

    size, programs, warps, *change = case.split(":")
    full = PRESETS["pi05"]
    if size.startswith("small"):
        cfg = TINY.replace(
            expert=GemmaConfig(width=128, depth=2, mlp_dim=256, num_heads=2, num_kv_heads=1, head_dim=64),
            vlm=GemmaConfig(width=96, depth=2, mlp_dim=192, num_heads=2, num_kv_heads=1, head_dim=64))
        base = (KernelConfig(qkv=GemmConfig(32, 64, k_step=32), o=GemmConfig(32, 64), key_block=16, key_splits=3,
                             gate_up=GemmConfig(64, 64, k_step=32), down=GemmConfig(32, 128, k_step=64))
                if size == "small-split" else
                KernelConfig(qkv=GemmConfig(32, 128, k_step=32), o=GemmConfig(32, 128, k_step=64),
                             gate_up=GemmConfig(64, 128, k_step=32), down=GemmConfig(32, 256, k_step=64),
                             key_block=32, key_splits=5))
        text = 9
    elif size in ("mid", "mid1"):
        depth = 2 if size == "mid" else 1
        cfg = full.replace(vision=VisionConfig(width=64, depth=1, num_heads=4, mlp_dim=112),
                           vlm=dataclasses.replace(full.vlm, depth=depth, width=256, mlp_dim=512),
                           expert=dataclasses.replace(full.expert, depth=depth))
        base, text = KernelConfig(), 48
    else:
        cfg, base, text = full, KernelConfig(), 48
    options = {"persistent_programs": int(programs), "persistent_warps": int(warps)}
    kinds = 6
    for name in change:
        if name == "no-pdl":
            options["pdl"] = False
        elif name == "no-prefetch":
            options["persistent_prefetch"] = False
        elif name.startswith("stages"):  # stages1: no software pipelining of the K loops
            options.update({k: dataclasses.replace(getattr(base, k), stages=int(name[6:]))
                            for k in ("qkv", "o", "gate_up", "down")})
        elif name == "whole-k":
            width = cfg.expert.num_heads * cfg.expert.head_dim
            options.update(o=dataclasses.replace(base.o, k_chunk=width),
                           down=dataclasses.replace(base.down, k_chunk=cfg.expert.mlp_dim))
        elif name.startswith("kinds"):  # kinds1: the persistent kernel runs (and compiles) the qkv tasks only
            kinds = int(name[5:])
        elif name == "wgmma":  # Hopper's wgmma in the step (Triton 3.6 miscompiles it: §60)
            options["persistent_wgmma"] = True
        elif name == "packed":
            options["persistent_counter_bytes"] = 4
        else:
            raise SystemExit(f"unknown change {name}")
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    model = random_model(cfg, seed=0, device=device, dtype=dtype)
    fast = FastModel(model, dtype, release_reference=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8, generator=gen)
    prefix = prefill_eager(fast, images, fast.token_table[torch.randint(4, 1000, (text,), generator=gen)])
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=gen).to(device)
    outs, buffers, caches = {}, {}, {}
    for persistent in (True,) if only_persistent else (False, True):
        kernels = ExpertKernels(fast, dataclasses.replace(base, persistent=persistent, **options),
                                allow_unverified_persistent=True)
        kernels.persistent_task_kinds = kinds
        x = noise.clone()
        caches[persistent] = ([k.clone() for k in prefix.keys], [v.clone() for v in prefix.values])
        kernels.denoise(x, prefix.n_valid, *caches[persistent], kernels.schedule(fast.step_schedule(1)))
        if not cpu:
            torch.cuda.synchronize()
        outs[persistent] = x
        buffers[persistent] = kernels
        counters = int(kernels.deps.abs().sum()) + int(kernels.queue.abs().sum())
    line = f"{case}: finite {bool(torch.isfinite(outs[True]).all())}, counters left {counters}"
    if not only_persistent:
        diff = float((outs[True] - outs[False]).norm() / outs[False].norm())
        line += f", rel. difference from the six kernels {diff:.2e}"
        if cfg.expert.depth == 1:  # one layer: every work buffer holds that layer's values on both paths
            # (not xm: after the last layer the persistent step leaves x * its own mod there, unread, where the six
            # kernels leave the gate_up input)
            for name in ("q", "part_m", "part_l", "part_acc", "attn", "h", "x_step"):
                a, b = getattr(buffers[True], name).float(), getattr(buffers[False], name).float()
                ok = torch.isfinite(a) & torch.isfinite(b)
                worst = float((a - b).abs()[ok].max()) if ok.any() else float("nan")
                print(f"  buffer {name}: non-finite {int((~torch.isfinite(a)).sum())} (six kernels "
                      f"{int((~torch.isfinite(b)).sum())}), largest difference {worst:.2e}", flush=True)
            # where q and the new K/V rows differ: per head, and per 16 of head 0's pair columns (j and j + D/2)
            rows, half = cfg.action_horizon, cfg.expert.head_dim // 2
            q_diff = (buffers[True].q.float() - buffers[False].q.float())[0, :, :rows].abs().nan_to_num(1e30)
            print("  q by head:", " ".join(f"{float(d):.1e}" for d in q_diff.amax(dim=(1, 2))), flush=True)
            col = q_diff[0].amax(dim=0)
            print("  q head 0 by 16 columns:", " ".join(f"{float(col[c:c + 16].max()):.1e}"
                                                       for c in range(0, 2 * half, 16)), flush=True)
            print("  q head 0 by 16 rows:", " ".join(f"{float(q_diff[0, r:r + 16].max()):.1e}"
                                                    for r in range(0, rows, 16)), flush=True)
            for name, index in (("K", 0), ("V", 1)):
                a, b = (caches[p][index][0].reshape(-1, cfg.expert.head_dim)[-rows:].float() for p in (True, False))
                print(f"  new {name} rows: largest difference {float((a - b).abs().nan_to_num(1e30).max()):.2e}",
                      flush=True)
    print("CASE", line, flush=True)


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--case" in sys.argv:  # the child
        run_case(args[0], "--only-persistent" in sys.argv, "--cpu" in sys.argv)
        return 0
    tools = [a.partition("=")[2] or "memcheck" for a in sys.argv if a.startswith("--sanitize")]
    sanitize = bool(tools)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if "--cpu" in sys.argv:
        env["TRITON_INTERPRET"] = "1"
    failed = 0
    for case in args or DEFAULT_CASES:
        cmd = [sys.executable, __file__, "--case", case, *(["--cpu"] if "--cpu" in sys.argv else [])]
        if sanitize:
            cmd = [sanitizer(), "--tool", tools[0], "--print-limit", "4", *cmd, "--only-persistent"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=300 if sanitize or "--cpu" in sys.argv else 120)
        except subprocess.TimeoutExpired:
            print(f"CASE {case}: TIMED OUT (a wait that never ends?)", flush=True)
            failed += 1
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith(("CASE", "  "))]
        if lines and done.returncode == 0:
            print(*lines, sep="\n", flush=True)
        else:
            failed += 1
            tail = (done.stdout + done.stderr).strip().splitlines()
            errors = [line for line in tail if "Error" in line or "=====" in line][:12] or tail[-3:]
            print(f"CASE {case}: FAILED (rc {done.returncode})", *errors, sep="\n    ", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
