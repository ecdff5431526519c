"""FP8 fidelity of the fast path, emulated on the CPU: which scaling scheme and which layer set keep the action
error of the full-size model within budget. Answers questions the GPU sweeps raised without a GPU.

    PYTHONPATH=. python3 tools/fp8_emulation.py [WORD...]  # 19 min on 2 cores (docs/benchmarks.md §18); WORDs
                                                           # pick variants, e.g. `rowwise`
    PYTHONPATH=. python3 tools/fp8_emulation.py sensitivity  # the default set plus one more group at a time
    PYTHONPATH=. python3 tools/fp8_emulation.py candidates   # larger sets the sensitivity figures suggest

FastModel runs in bf16 on the CPU, exactly the code the GPU runs eagerly; its linear layers are routed
(FastModel.linears_through) through one that quantizes the chosen layers to float8_e4m3fn the way `torch._scaled_mm`
sees them (fp8 operands, float32 accumulation, bf16 out) under one of these schemes:

    static   per-tensor weight scale, per-tensor input scale from a calibration amax x4 (what the pipeline does)
    dynamic  per-tensor weight scale, per-tensor input scale from each call's own amax
    rowwise  per-output-channel weight scales, per-token input scales (torch._scaled_mm's row-wise mode)

Fidelity as in docs/benchmarks.md: relative L2 of the action chunk against the float32 reference (same weights,
same noise), two 48-token observations A/B, 1 / 10 steps. The CPU's random weights differ from the GPU's (another
generator), so compare the schemes with each other and with the GPU's per-tensor figures, not digit for digit.
"""

from __future__ import annotations

import fnmatch
import gc
import os
import sys
import time

import numpy as np
import torch
from gpu_sweep import observations, rel_err  # the GPU sweep's observations and error: figures stay comparable

from pi05_ros.engine.config import PRESETS
from pi05_ros.engine.demo import random_model
from pi05_ros.engine.fast import blocks
from pi05_ros.engine.fast.blocks import FP8_HEADROOM, FP8_MAX, FastModel, denoise_eager, prefill_eager
from pi05_ros.engine.fast.calibration import record_input_amax
from pi05_ros.engine.fast.pipeline import FP8_ALL_LAYERS, FP8_DEFAULT_LAYERS
from pi05_ros.engine.runner import PreparedObservation, ReferenceRunner

E4M3 = torch.float8_e4m3fn
SETS = {"gemma_mlp (default)": FP8_DEFAULT_LAYERS, "gemma_all+expert_all": FP8_ALL_LAYERS}
SCHEMES = ("static", "dynamic", "rowwise")
# One more group of linears beside the default set, static scheme: which could join within the budget.
GROUPS = {"gemma_qkv": "prefix_blocks.*.qkv", "gemma_o": "prefix_blocks.*.out", "expert_qkv": "expert_blocks.*.qkv",
          "expert_o": "expert_blocks.*.out", "expert_gate_up": "expert_blocks.*.gate_up",
          "expert_down": "expert_blocks.*.down"}
# Picked from the sensitivity run (docs/benchmarks.md §19): the groups that cost least, added together.
CANDIDATES = [("expert_qkv", "expert_down"), ("expert_qkv", "expert_down", "gemma_o"),
              ("expert_qkv", "expert_down", "expert_o"), ("expert_qkv", "expert_gate_up", "expert_down")]


def quantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)


class Emulator:
    """Stands in for blocks.linear: the chosen layers go through emulated FP8, the others through blocks' own
    linear (bf16)."""

    def __init__(self, fast: FastModel) -> None:
        self.names = {m.weight.data_ptr(): name for name, m in fast.linears().items()}
        self.patterns: tuple[str, ...] = ()
        self.scheme = "static"
        self.amax: dict[str, float] = {}
        self._bf16_linear = blocks.linear
        self._weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def configure(self, patterns: tuple[str, ...], scheme: str) -> None:
        self.patterns, self.scheme, self._weights = patterns, scheme, {}
        gc.collect()

    def _weight(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._weights:
            w = weight.float()
            if self.scheme == "rowwise":
                scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [N, 1]
            else:
                scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
            self._weights[name] = (quantize(w, scale), scale)
        return self._weights[name]

    def __call__(self, x: torch.Tensor, p: blocks.LinearParams) -> torch.Tensor:
        weight, bias = p[0], p[1]
        name = self.names[weight.data_ptr()]
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns):
            return self._bf16_linear(x, p)
        wq, w_scale = self._weight(name, weight)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1]).float()
        if self.scheme == "static":
            x_scale = torch.tensor(max(self.amax[name], 1e-6) * FP8_HEADROOM / FP8_MAX)
        elif self.scheme == "dynamic":
            x_scale = (x2.abs().max() / FP8_MAX).clamp(min=1e-12)
        else:
            x_scale = (x2.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [M, 1]
        y = quantize(x2, x_scale).float() @ wq.float().t()
        y = y * x_scale * (w_scale.t() if w_scale.dim() else w_scale)
        if bias is not None:
            y = y + bias.float()
        return y.to(torch.bfloat16).reshape(*lead, -1)


def run_fast(fast: FastModel, token_rows: torch.Tensor, obs: PreparedObservation,
             steps: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Vision + prefill once, then the denoise loop per step count."""
    images = torch.from_numpy(np.stack([im for im in obs.images if im is not None]))
    prefix = prefill_eager(fast, images, token_rows[torch.from_numpy(obs.tokens[obs.token_mask])])
    return {n: denoise_eager(fast, prefix, torch.from_numpy(obs.noise), n).numpy() for n in steps}


def main() -> None:
    torch.set_grad_enabled(False)
    start = time.time()
    cfg = PRESETS[os.environ.get("PI05_PRESET", "pi05")]  # "tiny" for a quick check of the script itself
    model = random_model(cfg, seed=0)
    print(f"[{time.time() - start:5.0f} s] full-size random model (float32, CPU), {torch.get_num_threads()} threads",
          flush=True)
    tests, calib = observations(model, (123, 7)), observations(model, (1, 2))
    refs = [{n: ReferenceRunner(model).run(obs, n)[0] for n in (1, 10)} for obs in tests]
    print(f"[{time.time() - start:5.0f} s] float32 reference actions", flush=True)
    token_rows = model.embed_tokens.to(torch.bfloat16)
    fast = FastModel(model, torch.bfloat16, release_reference=True)
    del model
    gc.collect()
    emulator = Emulator(fast)

    with record_input_amax(fast) as amax:  # no layer chosen yet: every linear runs bf16 while recording
        for obs in calib:
            run_fast(fast, token_rows, obs, (10,))
    emulator.amax = amax
    print(f"[{time.time() - start:5.0f} s] calibrated {len(emulator.amax)} linears on 2 other observations",
          flush=True)

    variants = [("bf16 (no FP8)", (), "static")] + [
        (f"{set_name}, {scheme}", patterns, scheme)
        for set_name, patterns in SETS.items() for scheme in SCHEMES]
    only = sys.argv[1:]
    if only == ["candidates"]:
        variants = [(f"gemma_mlp + {' + '.join(groups)}, static",
                     (*FP8_DEFAULT_LAYERS, *(GROUPS[g] for g in groups)), "static") for groups in CANDIDATES]
        only = []
    if only == ["sensitivity"]:
        variants = [(f"gemma_mlp + {group}, static", (*FP8_DEFAULT_LAYERS, pattern), "static")
                    for group, pattern in GROUPS.items()]
        only = []
    with fast.linears_through(emulator):
        for label, patterns, scheme in variants:
            if only and not any(word in label for word in only):
                continue
            emulator.configure(patterns, scheme)
            errs = []
            for obs, ref in zip(tests, refs, strict=True):
                got = run_fast(fast, token_rows, obs, (1, 10))
                errs += [rel_err(got[n], ref[n]) for n in (1, 10)]
            print(f"[{time.time() - start:5.0f} s] {label:<36} A 1/10: {errs[0]:.1e} / {errs[1]:.1e}   "
                  f"B 1/10: {errs[2]:.1e} / {errs[3]:.1e}", flush=True)

if __name__ == "__main__":
    main()
