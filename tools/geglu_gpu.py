"""The prefix MLP's first half at the pipeline's shapes: the torch path (FP8 gate_up GEMM to bf16, then inductor's
GeGLU-and-quantize kernel) and cuBLAS's FP8 GEMM alone (the ceiling) against kernels/geglu.py's one kernel, over tile
configs; each in a CUDA graph of `--calls` calls, p50 of `--iters` replays, per call.

    PYTHONPATH=. python3 tools/geglu_gpu.py [--rows 528,1056,4224] [--iters 50] [--calls 17]
    PYTHONPATH=. python3 tools/geglu_gpu.py --gelu [--rows 512,4096] [--calls 27]

--gelu times SigLIP's whole MLP instead (K = 1152, F = 4304; 512 rows: 2 views, 4096: a batch of 8): the bf16 path
(fc1 with its GELU in the cuBLASLt epilogue, then fc2: the default), the FP8 two-GEMM path (`fp8_vision`), and the
FP8 path with fc1's bias, GELU and fc2's input quantization in kernels/geglu.py's GELU form, over tile configs;
error as relative L2 against float32 from the same bf16 input. Writes $OUT/geglu_gelu.json.

Rows: the prefix tokens of batches of 1, 2 and 8 (2 views, the tools' short prompt: 528 tokens a row; the pipeline
pads it to a 48-token tile, 560 a row: `--rows 560,1120,4480` for those); K = 2048,
F = 16384 (Gemma 2B). Checks each config's output against the kernel's float32 definition (`fp8_geglu_reference`)
and against the torch path: the share of e4m3 values that differ and the largest difference in e4m3 steps. Writes
a table to stdout and JSON to $OUT/geglu.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from expert_kernels_gpu import graph_ms  # this tool's neighbour (the script's folder is on sys.path)

from pi05_ros.engine.fast.kernels import geglu
from pi05_ros.engine.fast.kernels.geglu import FP8_MAX, TileConfig

# The first sweep (§63: 11 configs at Triton's default FP8 accumulation) kept these; each with float32 sums per K
# step (as `_scaled_mm` sums) and without
_TILES = ((128, 128, 128, 8, 3, 8), (128, 128, 128, 8, 4, 8), (128, 128, 64, 8, 5, 8), (128, 128, 128, 8, 3, 4),
          (64, 256, 128, 8, 3, 8))
CONFIGS = tuple(TileConfig(*tiles, precise=precise) for tiles in _TILES for precise in (True, False))
# --deep: the second sweep (§74) around the best of that one at 4224 rows, 64 of K a step with 5 stages: more
# stages, other group sizes, and the default beside them (Triton's default accumulation)
DEEP_CONFIGS = tuple(TileConfig(*tiles) for tiles in (
    (128, 128, 128, 8, 3, 8), (128, 128, 64, 8, 5, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 6, 8),
    (128, 128, 64, 8, 5, 4), (128, 128, 64, 8, 5, 16), (128, 128, 128, 8, 3, 16), (128, 128, 64, 4, 5, 8),
    (128, 64, 128, 4, 4, 8), (128, 64, 64, 4, 6, 8)))


def e4m3_differences(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(share of differing values, largest difference relative to the larger magnitude, counted where that is a
    normal e4m3 value, >= 2^-6: one e4m3 step is 1/16 to 1/8 of it) of two e4m3 tensors."""
    af, bf = a.float(), b.float()
    big = torch.maximum(af.abs(), bf.abs())
    normal = big >= 2.0**-6
    rel = ((af - bf).abs()[normal] / big[normal]).max() if bool(normal.any()) else torch.zeros(())
    return float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean()), float(rel)


def graph_time(fn, calls: int, iters: int) -> float:
    """p50 ms per call of `fn` captured `calls` times in one CUDA graph (expert_kernels_gpu.graph_ms, as the
    attention tool times its calls)."""
    return graph_ms(lambda: [fn() for _ in range(calls)], iters) / calls


# SigLIP's fc1 in the GELU form: one accumulator, so wider column tiles fit the same registers
GELU_CONFIGS = tuple(TileConfig(*tiles, precise=False) for tiles in (
    (128, 256, 128, 8, 3, 8), (128, 128, 128, 8, 3, 8), (128, 128, 128, 8, 4, 8), (64, 256, 128, 8, 3, 8),
    (128, 256, 64, 8, 4, 8), (256, 128, 64, 8, 3, 8), (128, 128, 128, 4, 3, 8))) + (
    geglu.GELU_CONFIG._replace(precise=True),)


def gelu_sweep(args: argparse.Namespace) -> int:
    """SigLIP's MLP three ways (the module docstring's --gelu), each in a CUDA graph of `--calls` calls."""
    from pi05_ros.engine.fast.blocks import Linear, fp8_gelu_mlp_fused, linear, linear_gelu_tanh

    dev = torch.device(args.device)
    width, hidden = 1152, 4304
    gen = torch.Generator(device=dev).manual_seed(0)
    w1, b1 = torch.randn(hidden, width, device=dev, generator=gen) * 0.03, torch.randn(hidden, device=dev) * 0.1
    w2, b2 = torch.randn(width, hidden, device=dev, generator=gen) * 0.015, torch.randn(width, device=dev) * 0.1
    bf16 = (Linear(w1, b1, torch.bfloat16), Linear(w2, b2, torch.bfloat16))
    rows_out = []
    for m in (int(r) for r in (args.rows if args.rows != "528,1056,4224" else "512,4096").split(",")):
        h = torch.randn(m, width, device=dev, generator=gen).bfloat16()
        mid = F.gelu(h.float() @ w1.t() + b1, approximate="tanh")
        want = mid @ w2.t() + b2  # float32
        fp8 = (Linear(w1, b1, torch.bfloat16), Linear(w2, b2, torch.bfloat16))
        fp8[0].quantize_fp8(float(h.float().abs().max()))  # static scales from this input, as calibration would
        fp8[1].quantize_fp8(float(mid.abs().max()))

        def bf16_path(h=h):  # noqa: ANN202
            return linear(linear_gelu_tanh(h, bf16[0].weight, bf16[0].bias), bf16[1].params)

        def fp8_two_gemm(h=h, fp8=fp8):  # noqa: ANN202
            return linear(F.gelu(linear(h, fp8[0].params), approximate="tanh"), fp8[1].params)

        ways = {"bf16 (fc1 + GELU epilogue, fc2)": torch.compile(bf16_path, dynamic=False),
                "fp8 two GEMMs (fp8_vision)": torch.compile(fp8_two_gemm, dynamic=False)}
        compiled_fused = torch.compile(fp8_gelu_mlp_fused, dynamic=False)  # the input quantization as one kernel
        for cfg in GELU_CONFIGS:
            def fused(h=h, fp8=fp8, cfg=cfg):  # noqa: ANN202 - the kernel reads GELU_CONFIG at each launch
                geglu.GELU_CONFIG, saved = cfg, geglu.GELU_CONFIG
                try:
                    return compiled_fused(h, fp8[0].params, fp8[1].params)  # noqa: B023
                finally:
                    geglu.GELU_CONFIG = saved

            ways[f"fp8 fused {tuple(cfg)}"] = fused
        flops = 2 * m * width * hidden * 2
        for name, fn in ways.items():
            try:
                out = fn()
                torch.cuda.synchronize()
                ms = graph_time(fn, args.calls, args.iters)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported, the sweep goes on
                print(json.dumps({"rows": m, "variant": name, "error": str(exc)[:200]}), flush=True)
                continue
            err = float((out.float() - want).norm() / want.norm())
            row = {"rows": m, "variant": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_l2_vs_float32": err}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    print("| rows | variant | us per MLP | TFLOP/s | rel L2 vs float32 |")
    print("|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['rows']} | {r['variant']} | {r['ms'] * 1e3:.1f} | {r['tflops']:.0f} | "
              f"{r['rel_l2_vs_float32']:.2e} |")
    with open(os.path.join(os.environ.get("OUT", "."), "geglu_gelu.json"), "w") as fh:
        json.dump(rows_out, fh, indent=1)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="528,1056,4224")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--calls", type=int, default=17, help="calls per graph (17: a prefill's MLP layers)")
    parser.add_argument("--gelu", action="store_true", help="SigLIP's MLP with the kernel's GELU form instead")
    parser.add_argument("--deep", action="store_true", help="DEEP_CONFIGS: the second sweep's configs instead")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the code path, interpreted
    args = parser.parse_args()
    if args.gelu:
        print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}",
              flush=True)
        return gelu_sweep(args)
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    k, f = 2048, 16384
    gen = torch.Generator(device=dev).manual_seed(0)
    # weights and inputs in e4m3 with the per-tensor scales blocks.Linear.quantize_fp8 would give them
    weight = (torch.randn(2 * f, k, device=dev, generator=gen) * 0.02)
    w_scale = weight.abs().max() / FP8_MAX
    weight = (weight / w_scale).to(torch.float8_e4m3fn)
    x_scale = torch.tensor(4.0 * 4.0 / FP8_MAX, device=dev)  # a calibrated amax of 4, headroom 4
    down_x_scale = torch.tensor(2.0 * 4.0 / FP8_MAX, device=dev)
    down_inv = 1.0 / down_x_scale

    def gate_up_gemm(xq: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)

    def torch_path(xq: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_gemm(xq).chunk(2, dim=-1)
        h = F.gelu(gate, approximate="tanh") * up
        return (h.float() * down_inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    compiled = torch.compile(torch_path, dynamic=False)
    rows_out = []
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, k, device=dev, generator=gen).clamp(-4, 4)
        xq = (x / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        scale = x_scale * w_scale
        ref = geglu.fp8_geglu_reference(xq, weight, scale, down_inv)
        base = compiled(xq)
        base_ms = graph_time(lambda: compiled(xq), args.calls, args.iters)  # noqa: B023
        share, max_rel = e4m3_differences(base, ref)
        flops = 2 * m * k * 2 * f
        row = {"rows": m, "variant": "torch path (scaled_mm bf16 + inductor GeGLU-quantize)", "ms": base_ms,
               "tflops": flops / base_ms / 1e9, "differ_vs_definition": share, "max_rel": max_rel}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        # cuBLAS's FP8 gate_up GEMM alone, without the GeGLU pass: the ceiling a fused kernel is measured against
        bare_ms = graph_time(lambda: gate_up_gemm(xq), args.calls, args.iters)  # noqa: B023
        row = {"rows": m, "variant": "cuBLAS scaled_mm gate_up alone, bf16 out (no GeGLU)", "ms": bare_ms,
               "tflops": flops / bare_ms / 1e9, "differ_vs_definition": None, "max_rel": None}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        for cfg in DEEP_CONFIGS if args.deep else CONFIGS:
            try:
                out = geglu.launch(xq, weight, scale, down_inv, cfg)
                torch.cuda.synchronize()
                ms = graph_time(lambda: geglu.launch(xq, weight, scale, down_inv, cfg), args.calls,  # noqa: B023
                                args.iters)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported, the sweep goes on
                print(json.dumps({"rows": m, "variant": str(tuple(cfg)), "error": str(exc)[:200]}), flush=True)
                continue
            share, max_rel = e4m3_differences(out, ref)
            share_base, max_rel_base = e4m3_differences(out, base)
            row = {"rows": m, "variant": "fused " + str(tuple(cfg)), "ms": ms, "tflops": flops / ms / 1e9,
                   "differ_vs_definition": share, "max_rel": max_rel, "differ_vs_torch_path": share_base,
                   "max_rel_vs_torch_path": max_rel_base,
                   "default_for_rows": cfg == geglu.config_for(m)}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    print("| rows | variant | ms per call | TFLOP/s | differ vs definition (max rel) "
          "| differ vs torch path (max rel) |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        if "ms" in r:
            vs = (f"{r['differ_vs_torch_path']:.2e} ({r['max_rel_vs_torch_path']:.3f})"
                  if "differ_vs_torch_path" in r else "-")
            vs_def = ("-" if r["differ_vs_definition"] is None
                      else f"{r['differ_vs_definition']:.2e} ({r['max_rel']:.3f})")
            print(f"| {r['rows']} | {r['variant']} | {r['ms'] * 1e3:.1f} us | {r['tflops']:.0f} | {vs_def} | {vs} |")
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "geglu.json"), "w") as fh:
        json.dump(rows_out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
