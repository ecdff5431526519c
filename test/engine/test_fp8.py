"""The fast path's FP8: calibration, quantization and the FP8 GEMM, on the CPU (torch._scaled_mm runs there too).

The GPU's Pi05Pipeline calls the same FastModel.quantize_fp8 and record_input_amax; test/gpu checks it at full size.
"""

from __future__ import annotations

import pytest
import torch

from pi05_ros.engine.fast.blocks import FP8_HEADROOM, FP8_MAX, FastModel, Linear, sample_eager
from pi05_ros.engine.fast.calibration import record_input_amax
from pi05_ros.engine.fast.pipeline import FP8_ALL_LAYERS, FP8_DEFAULT_LAYERS, FP8_VISION_LAYERS
from pi05_ros.engine.reference import Pi05Model

E4M3 = torch.float8_e4m3fn


pytestmark = pytest.mark.cpu_fp8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def calibrated(model: Pi05Model, fast_case, cases: tuple[int, ...] = (0, 2)) -> tuple[FastModel, dict]:  # noqa: ANN001
    fast = FastModel(model, torch.bfloat16)
    with record_input_amax(fast) as amax:
        for case in cases:
            sample_eager(fast, *fast_case(case), 10)
    return fast, amax


def test_fp8_linear_is_the_scaled_e4m3_product() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen)
    x = torch.randn(5, 96, generator=gen)
    layer = Linear(weight, bias, torch.bfloat16)
    amax = float(x.abs().max())
    layer.quantize_fp8(amax)
    assert layer.weight.dtype == E4M3

    from pi05_ros.engine.fast.blocks import linear

    got = linear(x, layer.params)
    # The definition, by hand: per-tensor scales, e4m3 operands, float32 products, bf16 out.
    w_scale = weight.to(torch.bfloat16).float().abs().max() / FP8_MAX
    x_scale = amax * FP8_HEADROOM / FP8_MAX
    wq = (weight.to(torch.bfloat16).float() / w_scale).to(E4M3).float() * w_scale
    xq = (x / x_scale).to(E4M3).float() * x_scale
    want = (xq @ wq.t() + bias.to(torch.bfloat16).float()).to(torch.bfloat16)
    # Same operands and scales; only the order of the float32 sums differs: bf16 output rounding (~4e-3).
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    # And it really is FP8: against the exact float32 product the error is e4m3's (3-bit mantissa), not bf16's.
    exact = x @ weight.t() + bias
    assert 5e-3 < rel_err(got.float(), exact) < 8e-2  # measured 4.1e-2


def test_calibration_records_every_linear(golden_model: Pi05Model, fast_case) -> None:
    fast, amax = calibrated(golden_model, fast_case)
    assert set(amax) == set(fast.linears())
    assert all(value > 0 for value in amax.values())
    recorded = dict(amax)
    sample_eager(fast, *fast_case(1), 1)
    assert amax == recorded  # recording ends with the block


def test_default_set_is_gemma_mlp_only(golden_model: Pi05Model, fast_case) -> None:
    fast, amax = calibrated(golden_model, fast_case)
    chosen = fast.quantize_fp8(amax, FP8_DEFAULT_LAYERS)
    mlp_layers = golden_model.cfg.vlm.depth - 1  # the last prefix layer only computes K/V: no MLP
    assert sorted(chosen) == sorted([f"prefix_blocks.{i}.{n}" for i in range(mlp_layers) for n in ("gate_up", "down")])
    for name, layer in fast.linears().items():
        assert (layer.weight.dtype == E4M3) == (name in chosen), name


@pytest.mark.parametrize("steps", [1, 10])
def test_fp8_everywhere_stays_within_budget_on_the_golden_model(golden_model: Pi05Model, golden_cases, fast_case,
                                                                steps: int) -> None:
    """Every Gemma, expert and SigLIP MLP linear in FP8, scales calibrated on cases 0 and 2, tested on case 1."""
    fast, amax = calibrated(golden_model, fast_case)
    chosen = fast.quantize_fp8(amax, FP8_ALL_LAYERS + FP8_VISION_LAYERS)
    assert len(chosen) > 0
    images, rows, noise = fast_case(1)
    err = rel_err(sample_eager(fast, images, rows, noise, steps), golden_cases[f"case1/actions_steps{steps}"][0])
    # Issue 3's budget with SigLIP in FP8 is 5e-2; measured here 2.1e-2 (1 step) / 9.0e-3 (10 steps) on the CPU.
    assert err < 5e-2
    bf16 = FastModel(golden_model, torch.bfloat16)
    bf16_err = rel_err(sample_eager(bf16, images, rows, noise, steps), golden_cases[f"case1/actions_steps{steps}"][0])
    assert err > bf16_err  # FP8 really ran: it costs more than bf16 alone
