"""Batched inference on the reference path: a batch of B equals B batches of 1, row by row, with each row's own
prompt, camera views, noise and state (the server's dynamic batches rely on it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pi05_ros.engine.action_space import DELTA, ActionSpace
from pi05_ros.engine.errors import InputError
from pi05_ros.engine.policy import Policy, RawObservation
from pi05_ros.engine.runner import ReferenceRunner, run_rows

# float32, the same operations on differently shaped (padded, packed) tensors: ~1e-6 apart in practice.
RTOL_F32 = 1e-5
ATOL_F32 = 1e-5

RNG = np.random.default_rng(5)


def image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def policy(tiny_checkpoint: Path, tokenizer_path: Path) -> Policy:
    return Policy.load(tiny_checkpoint, tokenizer_path, device="cpu")


@pytest.fixture(scope="module")
def mixed_rows(policy: Policy) -> list[RawObservation]:
    """Four rows that differ in everything a row can: views (one, two, three, a wrist alone), image sizes,
    prompt lengths, states and noise."""
    shape = (policy.action_horizon, policy.config.action_dim)
    rows = [
        ({"base_0_rgb": image(480, 640)}, "stack the blocks"),
        ({"base_0_rgb": image(224, 224), "left_wrist_0_rgb": image(240, 320)}, "put the cup in the sink"),
        ({"base_0_rgb": image(300, 200), "left_wrist_0_rgb": image(64, 64), "right_wrist_0_rgb": image(100, 90)},
         "open the drawer and take out the spoon"),
        ({"left_wrist_0_rgb": image(120, 160)}, "push the button"),
    ]
    return [RawObservation(images, RNG.uniform(-2, 2, policy.state_dim).astype(np.float32), prompt,
                           RNG.standard_normal(shape).astype(np.float32)) for images, prompt in rows]


def test_batch_of_b_equals_b_batches_of_one(policy: Policy, mixed_rows: list[RawObservation]) -> None:
    token_counts = {policy.prompt_tokens(row.prompt, row.state) for row in mixed_rows}
    assert len(token_counts) > 1  # the rows really have different prompt lengths
    batch = policy.infer_batch(mixed_rows, 10)
    assert len(batch) == len(mixed_rows)
    for row, chunk in zip(mixed_rows, batch, strict=True):
        one = policy.infer(row.images, row.state, row.prompt, 10, noise=row.noise)
        np.testing.assert_allclose(chunk.actions, one.actions, rtol=RTOL_F32, atol=ATOL_F32)
        assert chunk.num_prompt_tokens == one.num_prompt_tokens and chunk.num_steps == 10
        np.testing.assert_array_equal(chunk.state, row.state)
        assert set(chunk.timings) == set(policy.stage_names)
    # the rows are not all alike, so equality above is not one answer repeated
    assert not np.allclose(batch[0].actions, batch[1].actions)


def test_the_reference_batch_equals_its_rows_run_one_by_one(policy: Policy, mixed_rows: list[RawObservation]) -> None:
    prepared = [policy.prepare(row.images, row.state, row.prompt, row.noise) for row in mixed_rows]
    runner = ReferenceRunner(policy.model)
    batched, timings = runner.run_batch(prepared, 3)
    looped, looped_timings = run_rows(runner, prepared, 3)
    assert batched.shape == (4, policy.action_horizon, policy.config.action_dim)
    np.testing.assert_allclose(batched, looped, rtol=RTOL_F32, atol=ATOL_F32)
    assert set(timings) == set(looped_timings) == set(runner.stage_names)


def test_unseeded_rows_draw_the_noise_sequential_calls_would(policy: Policy, mixed_rows: list[RawObservation]) -> None:
    """Without noise, row i of a batch gets the i-th draw of the policy's seeded generator: the same actions as
    B sequential `infer` calls on a policy started from the same seed."""
    rows = [RawObservation(r.images, r.state, r.prompt) for r in mixed_rows[:3]]
    batch = policy.with_runner(policy.runner).infer_batch(rows, 2)
    sequential = policy.with_runner(policy.runner)
    for row, chunk in zip(rows, batch, strict=True):
        np.testing.assert_allclose(chunk.actions, sequential.infer(row.images, row.state, row.prompt, 2).actions,
                                   rtol=RTOL_F32, atol=ATOL_F32)


def test_each_row_keeps_its_own_state_for_delta_actions(policy: Policy, mixed_rows: list[RawObservation]) -> None:
    delta = Policy(policy.model, policy.tokenizer, policy.norm_stats, precision="fp32",
                   action_space=ActionSpace.uniform(DELTA, policy.action_dof))
    rows = [mixed_rows[0], RawObservation(mixed_rows[0].images, mixed_rows[0].state + 1.0, mixed_rows[0].prompt,
                                          mixed_rows[0].noise)]
    batch = delta.infer_batch(rows, 2)
    for row, chunk in zip(rows, batch, strict=True):
        one = delta.infer(row.images, row.state, row.prompt, 2, noise=row.noise)
        np.testing.assert_allclose(chunk.actions, one.actions, rtol=RTOL_F32, atol=ATOL_F32)


def test_a_bad_row_is_named(policy: Policy, mixed_rows: list[RawObservation]) -> None:
    bad = RawObservation({"base_0_rgb": image(10, 10).astype(np.float32)}, mixed_rows[0].state, "wipe the table")
    with pytest.raises(InputError, match=r"observation 1: base_0_rgb: expected uint8"):
        policy.infer_batch([mixed_rows[0], bad], 2)
    with pytest.raises(InputError, match="at least one observation"):
        policy.infer_batch([], 2)
    with pytest.raises(InputError, match="num_steps"):
        policy.infer_batch(mixed_rows, 0)


def test_rows_with_real_time_chunking_equal_their_single_inferences(policy: Policy,
                                                                  mixed_rows: list[RawObservation]) -> None:
    """RTC rows batch together when they share a beta (one guided batch); rows guided otherwise run one by one."""
    from pi05_ros.engine.rtc import RtcRequest

    previous = [policy.infer(row.images, row.state, row.prompt, 3, noise=row.noise).actions for row in mixed_rows[:3]]
    for betas in ((5.0, 5.0, 5.0), (5.0, 0.0, 2.0)):
        rows = [RawObservation(r.images, r.state, r.prompt, r.noise, RtcRequest(p + 0.1, delay=2, beta=beta))
                for r, p, beta in zip(mixed_rows[:3], previous, betas, strict=True)]
        batch = policy.infer_batch(rows, 3)
        for row, chunk in zip(rows, batch, strict=True):
            one = policy.infer(row.images, row.state, row.prompt, 3, noise=row.noise, rtc=row.rtc)
            np.testing.assert_allclose(chunk.actions, one.actions, rtol=RTOL_F32, atol=ATOL_F32)
        assert not np.allclose(batch[0].actions, previous[0])  # the guidance did act: not the plain chunk
