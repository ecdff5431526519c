"""Development sweeps on the GPU machine: fidelity and speed of fast-path variants in one run.

    PYTHONPATH=. python3 tools/gpu_sweep.py profile bf16 fp8      # stage timings + kernel tables
    PYTHONPATH=. python3 tools/gpu_sweep.py fp8-sets               # which linears can run in FP8
    PYTHONPATH=. python3 tools/gpu_sweep.py vision-fp8             # which SigLIP linears can run in FP8
    PYTHONPATH=. python3 tools/gpu_sweep.py tiles                  # new prompt tiles, p99/p50 with GC on/off
    PYTHONPATH=. python3 tools/gpu_sweep.py load                   # load + calibrate + capture from a file

Full-size random weights; fidelity against the float32 reference on two synthetic observations (48-token
prompt). Kernel tables go to $OUT (or /tmp). Results feed docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pi05_ros.engine.config import PRESETS
from pi05_ros.engine.demo import random_model
from pi05_ros.engine.fast.build import build_fast_runner
from pi05_ros.engine.fast.calibration import synthetic_observations
from pi05_ros.engine.fast.kernels.expert import KernelConfig
from pi05_ros.engine.fast.pipeline import FP8_ALL_LAYERS, FP8_DEFAULT_LAYERS, Pi05Pipeline
from pi05_ros.engine.reference import Pi05Model
from pi05_ros.engine.runner import PreparedObservation, ReferenceRunner

OUT = os.environ.get("OUT", "/tmp")
SCALES = Path(OUT) / "calibration.json"  # one calibration of these weights, reused by every variant
P, E, V = "prefix_blocks.*.", "expert_blocks.*.", "vision_blocks.*."
PROFILE_VARIANTS = {
    "bf16": {"precision": "bf16"},
    "bf16-sdpa": {"precision": "bf16", "attention": "sdpa"},
    "bf16-eager": {"precision": "bf16", "compile": False},
    "fp8": {"precision": "fp8"},
    "fp8-all": {"precision": "fp8", "fp8_layers": FP8_ALL_LAYERS},
    "fp8-vision": {"precision": "fp8", "fp8_vision": True},
    "fp8-torch-expert": {"precision": "fp8", "expert_kernels": "off"},
    # the fused expert kernels without programmatic dependent launch: kernel durations that do not overlap
    "fp8-nopdl": {"precision": "fp8", "expert_kernel_config": KernelConfig(pdl=False)},
}
FP8_SETS = {
    "prefix_mlp (default)": FP8_DEFAULT_LAYERS,
    "prefix_all": (P + "*",),
    "prefix_mlp+expert_mlp": (P + "gate_up", P + "down", E + "gate_up", E + "down"),
    "prefix_all+expert_mlp": (P + "*", E + "gate_up", E + "down"),
    "prefix_all+expert_all": FP8_ALL_LAYERS,
}
VISION_SETS = {"all": (V + "*",), "mlp (default)": (V + "fc1", V + "fc2"), "fc1": (V + "fc1",), "fc2": (V + "fc2",)}


def observations(model: Pi05Model, seeds: tuple[int, ...] = (123, 7)) -> list[PreparedObservation]:
    out = []
    for seed in seeds:
        obs = next(iter(synthetic_observations(model.cfg, 1, views=2, seed=seed)))
        mask = np.arange(model.cfg.max_token_len) < 48
        out.append(PreparedObservation(obs.images, np.where(mask, obs.tokens, 0), mask, obs.noise))
    return out


def reference(model: Pi05Model, obs: PreparedObservation, steps: int) -> np.ndarray:
    return ReferenceRunner(model).run(obs, steps)[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def median_ms(pipe: Pi05Pipeline, obs: PreparedObservation, steps: int, runs: int = 60,
              key: str | None = None) -> float:
    for _ in range(5):
        pipe.run(obs, steps)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        _, timings = pipe.run(obs, steps)
        samples.append(timings[key] if key else (time.perf_counter() - start) * 1e3)
    return float(np.median(samples))


def sweep(model: Pi05Model, variants: dict[str, dict], key: str | None) -> None:
    obss = observations(model)
    refs = [{s: reference(model, o, s) for s in (1, 10)} for o in obss]
    for name, kwargs in variants.items():
        pipe = build_fast_runner(model, scales_file=SCALES, **kwargs)
        errs = " ".join(f"{rel_err(pipe.run(o, s)[0], r[s]):.2e}"
                        for o, r in zip(obss, refs, strict=True) for s in (1, 10))
        times = f"{key} {median_ms(pipe, obss[0], 1, key=key):.3f} ms" if key else (
            f"e2e 1 step {median_ms(pipe, obss[0], 1):.2f} ms, 10 steps {median_ms(pipe, obss[0], 10):.2f} ms")
        print(f"{name:<24} rel err A 1/10, B 1/10: {errs} | {times}", flush=True)
        del pipe
        torch.cuda.empty_cache()


def profile(model: Pi05Model, names: list[str]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    obs = observations(model, (1,))[0]
    for name in names:
        pipe = build_fast_runner(model, scales_file=SCALES, **PROFILE_VARIANTS[name])
        for steps in (1, 3, 10):
            runs = [pipe.run(obs, steps)[1] for _ in range(60)][10:]
            stages = " ".join(f"{k}={np.median([r[k] for r in runs]):.3f}" for k in runs[0])
            print(f"{name} steps={steps} e2e p50 {median_ms(pipe, obs, steps):.2f} ms | {stages}", flush=True)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            pipe.run(obs, 10)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        with open(f"{OUT}/kernels_{name}.txt", "w") as f:
            f.write(table)
        del pipe
        torch.cuda.empty_cache()


def tiles_and_jitter(model: Pi05Model) -> None:
    """Cost of a prompt entering a new 16-token tile after warm-up, and p99/p50 with the GC on and off."""
    import gc

    obs = observations(model, (1,))[0]
    pipe = build_fast_runner(model, precision="fp8", scales_file=SCALES)
    for _ in range(3):
        pipe.run(obs, 10)
    for n_text in (70, 100, 150, 199):
        mask = np.arange(model.cfg.max_token_len) < n_text
        longer = PreparedObservation(obs.images, np.where(mask, obs.tokens, 1), mask, obs.noise)
        start = time.perf_counter()
        pipe.run(longer, 10)
        first = (time.perf_counter() - start) * 1e3
        print(f"text {n_text} tokens: first call {first:.1f} ms, then {median_ms(pipe, longer, 10, runs=30):.2f} ms")
    for gc_on in (True, False):
        for steps in (1, 10):
            (gc.enable if gc_on else gc.disable)()
            walls = []
            for _ in range(1000):
                start = time.perf_counter()
                pipe.run(obs, steps)
                walls.append((time.perf_counter() - start) * 1e3)
            p50, p99 = np.percentile(walls, 50), np.percentile(walls, 99)
            print(f"gc {'on ' if gc_on else 'off'} steps={steps}: p50 {p50:.2f} p99 {p99:.2f} ratio {p99 / p50:.3f}")
    gc.enable()


def load_times() -> None:
    """Write a full-size random checkpoint (openpi layout, bf16), then time Policy.load + first inference in
    fresh processes: the first calibrates FP8 and compiles, the second finds the saved scales and caches."""
    import subprocess

    from pi05_ros.engine.demo import demo_tokenizer, write_checkpoint

    ckpt = "/tmp/pi05_full_ckpt"
    start = time.perf_counter()
    write_checkpoint(random_model(PRESETS["pi05"], seed=0, device="cuda", dtype=torch.bfloat16), ckpt)
    print(f"wrote {ckpt} in {time.perf_counter() - start:.1f} s", flush=True)
    tok = demo_tokenizer("/tmp/pi05_tok")
    child = (
        "import time, numpy as np; t0 = time.perf_counter()\n"
        "from pi05_ros.engine.policy import Policy\n"
        f"p = Policy.load('{ckpt}', '{tok}', device='cuda', precision='fp8'); t1 = time.perf_counter()\n"
        "img = np.zeros((224, 224, 3), np.uint8)\n"
        "p.infer({'base_0_rgb': img, 'left_wrist_0_rgb': img}, np.zeros(7), 'pick up the cup', 10)\n"
        "t2 = time.perf_counter()\n"
        "import torch\n"
        "print(f'LOAD {t1 - t0:.1f} s (setup {p.runner.setup_times}), first inference {t2 - t1:.1f} s, "
        "total {t2 - t0:.1f} s, GPU memory held {torch.cuda.memory_allocated() / 1e9:.2f} GB, "
        "peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB')\n"
    )
    for run in ("first start", "second start (cached scales)"):
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=os.environ)
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "LOAD" in ln or "Error" in ln]
        print(run, lines[-3:], flush=True)


def main() -> None:
    what, rest = sys.argv[1], sys.argv[2:]
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if what == "load":
        return load_times()
    dtype = torch.bfloat16 if what in ("profile", "tiles") else torch.float32  # float32: the fidelity reference
    model = random_model(PRESETS["pi05"], seed=0, device="cuda", dtype=dtype)
    if what == "profile":
        profile(model, rest or ["bf16", "fp8"])
    elif what == "tiles":
        tiles_and_jitter(model)
    elif what == "fp8-sets":
        variants = {n: {"precision": "fp8", "fp8_layers": s} for n, s in FP8_SETS.items()}
        sweep(model, {"bf16": {"precision": "bf16"}} | variants, None)
    elif what == "vision-fp8":
        variants = {n: {"precision": "fp8", "fp8_vision": True, "fp8_vision_layers": s} for n, s in VISION_SETS.items()}
        sweep(model, variants, "vision")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
