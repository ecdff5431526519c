"""One graph of one Euler step serves every step count: the step's constants are data (engine/fast/pipeline.py's
StepTable). On the CPU: the step loop over a table equals FastModel.denoise, on the torch path and the kernels."""

from __future__ import annotations

import pytest
import torch

from pi05_ros.engine.fast.blocks import FastModel, denoise_eager, prefill_eager
from pi05_ros.engine.fast.kernels import available
from pi05_ros.engine.fast.pipeline import StepTable


def run_steps(step, table: StepTable, x: torch.Tensor, num_steps: int) -> None:
    """What the pipeline's denoise stage does: reset the index, then the (graph-captured) step num_steps times."""
    table.index.zero_()
    for _ in range(num_steps):
        table.select()
        step(x, *table.current)


def test_select_copies_row_index_and_advances() -> None:
    schedule = (torch.arange(12.0).view(3, 4), torch.arange(6.0).view(3, 2), torch.ones(5), torch.zeros(1))
    table = StepTable(schedule, capacity=16)
    table.load(schedule)
    assert table.holds == 3 and torch.equal(table.current[2], torch.ones(5))  # per-count entries copied once
    seen = []
    for _ in range(3):
        table.select()
        seen.append((table.current[0].clone(), table.current[1].clone()))
    assert all(torch.equal(a, schedule[0][i]) and torch.equal(b, schedule[1][i]) for i, (a, b) in enumerate(seen))
    assert int(table.index) == 3
    assert table.fits((torch.zeros(16, 4), torch.zeros(16, 2), torch.ones(5), torch.zeros(1)))
    assert not table.fits((torch.zeros(17, 4), torch.zeros(17, 2), torch.ones(5), torch.zeros(1)))  # capacity


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_step_loop_over_a_table_equals_the_denoise_loop(golden_model, fast_case, steps: int) -> None:
    fast = FastModel(golden_model, torch.float32)
    images, rows, noise = fast_case(0)
    prefix = prefill_eager(fast, images, rows)
    want = denoise_eager(fast, prefix, noise, steps)
    table = StepTable(fast.step_schedule(16), capacity=16)  # sized once, then any count up to 16 loads into it
    for count in (16, steps):  # a longer schedule loaded before: stale rows past `steps` must not matter
        table.load(fast.step_schedule(count))
    x = noise.clone()[None]
    run_steps(lambda x_t, *c: fast.denoise_step(x_t, prefix.n_valid, prefix.keys, prefix.values, *c),
              table, x, steps)
    assert torch.equal(x[0], want)  # the same operations in the same order: bit-identical


@pytest.mark.skipif(not available(torch.device("cpu")), reason="needs Triton (its CPU interpreter runs the kernels)")
def test_step_loop_on_the_kernels_equals_their_denoise_loop(golden_model, fast_case) -> None:
    from pi05_ros.engine.fast.kernels.expert import ExpertKernels

    fast = FastModel(golden_model, torch.float32)
    images, rows, noise = fast_case(1)
    prefix = prefill_eager(fast, images, rows)
    kernels = ExpertKernels(fast)
    schedule = kernels.schedule(fast.step_schedule(3))
    want = noise.clone()[None]
    kernels.denoise(want, prefix.n_valid, prefix.keys, prefix.values, schedule)
    table = StepTable(schedule, capacity=16)
    table.load(schedule)
    x = noise.clone()[None]
    run_steps(lambda x_t, *c: kernels.denoise_step(x_t, prefix.n_valid, prefix.keys, prefix.values, *c),
              table, x, 3)
    assert torch.equal(x, want)
