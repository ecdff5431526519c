"""The fast pipeline's batches on the CPU (no CUDA graphs there, the rest as on a GPU): rows grouped by their
number of views, split at max_batch, padded to a batch bucket, each row with its own prompt length and noise, give
what each row gets alone. The graphs per bucket are tested on the GPU (test/gpu/test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pi05_ros.engine.fast.pipeline import Pi05Pipeline
from pi05_ros.engine.policy import Policy
from pi05_ros.engine.runner import PreparedObservation, ReferenceRunner

RNG = np.random.default_rng(11)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def policy(tiny_checkpoint: Path, tokenizer_path: Path) -> Policy:
    return Policy.load(tiny_checkpoint, tokenizer_path, device="cpu")


@pytest.fixture(scope="module")
def pipeline(policy: Policy) -> Pi05Pipeline:
    # text_tile 8: the prompts below span three tiles (8, 16, 24 tokens)
    return Pi05Pipeline(policy.model, precision="bf16", use_graphs=False, compile=False, expert_kernels="off",
                        max_batch=4, text_tile=8)


@pytest.fixture(scope="module")
def rows(policy: Policy) -> list[PreparedObservation]:
    """Seven rows as a runner gets them: five with one view (more than max_batch 4; not always the same slot), one
    with two, one with three; prompts of 3 to 24 tokens."""
    cfg = policy.config
    size, max_len = cfg.vision.image_size, cfg.max_token_len
    lengths = [5, 12, 3, 24, 17, 9, 20]
    slots = [(0,), (0,), (1,), (0,), (2,), (0, 1), (0, 1, 2)]
    out = []
    for length, used in zip(lengths, slots, strict=True):
        images = [RNG.integers(0, 256, (size, size, 3), dtype=np.uint8) if slot in used else None
                  for slot in range(len(cfg.image_keys))]
        tokens = np.zeros(max_len, np.int64)
        tokens[:length] = RNG.integers(1, cfg.vocab_size, length)
        out.append(PreparedObservation(images, tokens, np.arange(max_len) < length,
                                       RNG.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)))
    return out


def test_buckets(pipeline: Pi05Pipeline) -> None:
    assert pipeline.batch_buckets == (1, 2, 4)
    assert [pipeline.bucket(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    with pytest.raises(ValueError, match="1..4"):
        pipeline._run_group([], 1)


def test_batch_equals_its_rows_alone(pipeline: Pi05Pipeline, policy: Policy, rows: list[PreparedObservation]) -> None:
    batched, timings = pipeline.run_batch(rows, 3)
    alone = np.stack([pipeline.run(row, 3)[0] for row in rows])
    assert batched.shape == (7, policy.action_horizon, policy.config.action_dim)
    # bf16 GEMM inputs on both sides: products over more rows may round differently (measured 0.0 on the CPU)
    for row in range(7):
        assert rel_err(batched[row], alone[row]) < 1e-3, row
    assert not np.allclose(batched[0], batched[1])  # the rows really differ
    # and the fast path stays within its bf16 budget of the float32 reference (2e-2; 8.3e-4 measured)
    reference, _ = ReferenceRunner(policy.model).run_batch(rows, 3)
    assert rel_err(batched, reference) < 2e-2
    assert set(timings) == set(pipeline.stage_names)
    assert timings["denoise_step"] == pytest.approx(timings["denoise"] / 3)


def test_padded_rows_change_nothing(pipeline: Pi05Pipeline, rows: list[PreparedObservation]) -> None:
    """Three rows replay the bucket of 4: its fourth row holds whatever the staging last held, which must not
    reach the three (rows are independent)."""
    three = rows[:3]
    first, _ = pipeline.run_batch(three, 1)
    pipeline.run_batch(rows[1:5], 1)  # other contents in all four staging rows
    again, _ = pipeline.run_batch(three, 1)
    np.testing.assert_array_equal(first, again)  # same shapes, same inputs: bit for bit


def test_rows_of_one_batch_need_the_same_views(pipeline: Pi05Pipeline, rows: list[PreparedObservation]) -> None:
    with pytest.raises(ValueError, match="same number of camera views"):
        pipeline._run_group([rows[0], rows[5]], 1)


def test_a_guided_row_runs_alone_and_the_rest_still_batch(pipeline: Pi05Pipeline, policy: Policy,
                                                          rows: list[PreparedObservation]) -> None:
    """Real-time chunking runs one row at a time; the other rows of the same call still batch."""
    from dataclasses import replace

    from pi05_ros.engine.rtc import Guidance

    cfg = policy.config
    previous = RNG.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    guided = replace(rows[1], guidance=Guidance.build(previous, 2, 20, 5.0, "exp", columns=cfg.action_dim))
    mixed = [rows[0], guided, rows[2], rows[3]]
    actions, _ = pipeline.run_batch(mixed, 3)
    np.testing.assert_array_equal(actions[1], pipeline.run(guided, 3)[0])
    others, _ = pipeline.run_batch([rows[0], rows[2], rows[3]], 3)  # a batch of 3 (bucket 4), as in `mixed`
    np.testing.assert_array_equal(actions[[0, 2, 3]], others)
    assert not np.allclose(actions[1], pipeline.run(rows[1], 3)[0])  # the guidance did act
    with pytest.raises(ValueError, match="runs alone"):
        pipeline._run_group([rows[0], guided], 3)


def test_a_graph_made_after_a_long_run_starts_at_the_step_tables_first_row(
        policy: Policy, rows: list[PreparedObservation], replaying_graphs: None) -> None:
    """Making a step graph runs the step three times; after a run of 100 steps the table's index stood at its end,
    and those runs read past it (a device-side assert on a GPU). The new bucket's first batch must work and equal
    its rows alone."""
    pipe = Pi05Pipeline(policy.model, precision="bf16", use_graphs=False, compile=False, expert_kernels="off",
                        max_batch=2, text_tile=8)
    pipe.use_graphs = True  # the graph path, with the stand-in above
    alone = [pipe.run(row, 10)[0] for row in rows[:2]]
    pipe.run(rows[0], 100)  # the step table's index ends at 100 (its last row is 99)
    batched, _ = pipe.run_batch(rows[:2], 10)  # bucket 2: its graphs are made now
    for got, want in zip(batched, alone, strict=True):
        assert rel_err(got, want) < 2e-2  # bf16 (the same path at batch 1 and 2 here), as test_batch_equals...


def test_the_vision_tower_starts_before_the_text_is_staged(pipeline: Pi05Pipeline, rows: list[PreparedObservation],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The host gathers the token-table rows while the vision tower runs (it needs only the images): the vision
    stage is launched before the first text row is staged, and the prefill after the last. A batch that must be
    refused is refused before anything runs."""
    order: list[str] = []
    for name in ("_vision_fn", "_prefill_fn"):
        make = getattr(pipeline, name)

        def traced(*args, _make=make, _name=name):  # noqa: ANN001, ANN202 - wraps the stage's builder
            fn = _make(*args)
            return lambda: (order.append(_name), fn())[1]

        monkeypatch.setattr(pipeline, name, traced)
    pipeline._graphs.clear()  # the stages are built again through the wrappers
    real_take = np.take
    monkeypatch.setattr(np, "take", lambda *a, **kw: (order.append("text row"), real_take(*a, **kw))[1])
    try:
        actions, timings = pipeline.run_batch(rows[:2], 2)
        assert actions.shape[0] == 2 and np.isfinite(actions).all()
        assert order == ["_vision_fn", "text row", "text row", "_prefill_fn"], order
        assert timings["host_staging"] > 0 and timings["host_copy_in"] >= 0
        order.clear()
        with pytest.raises(ValueError, match="same number of camera views"):
            pipeline._run_group([rows[0], rows[5]], 2)  # one view and two: refused before the vision tower ran
        assert order == []
    finally:
        pipeline._graphs.clear()  # the module's other tests build their stages without the wrappers


def _observation(cfg, length: int, used: tuple[int, ...]) -> PreparedObservation:  # noqa: ANN001
    size = cfg.vision.image_size
    images = [RNG.integers(0, 256, (size, size, 3), dtype=np.uint8) if slot in used else None
              for slot in range(len(cfg.image_keys))]
    tokens = np.zeros(cfg.max_token_len, np.int64)
    tokens[:length] = RNG.integers(1, cfg.vocab_size, length)
    return PreparedObservation(images, tokens, np.arange(cfg.max_token_len) < length,
                               RNG.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32))


@pytest.mark.parametrize(("keys", "horizon", "length"), [
    (("a", "b", "c", "d"), 10, 12),  # a LeRobot checkpoint with four cameras of its own (built for 3 before)
    (("front",), 10, 12),  # one camera: its FP8 calibration took two views
    (("a", "b", "c"), 4, 20),  # text padded to its tile past the positions a short horizon left spare
])
def test_models_with_their_own_camera_count_and_a_short_horizon_run_as_the_reference(
        keys: tuple[str, ...], horizon: int, length: int) -> None:
    import torch

    from pi05_ros.engine.config import TINY
    from pi05_ros.engine.demo import random_model
    from pi05_ros.engine.fast.blocks import FastModel
    from pi05_ros.engine.fast.calibration import synthetic_observations

    cfg = TINY.replace(image_keys=keys, action_horizon=horizon)
    model = random_model(cfg, seed=3)
    observation = _observation(cfg, length, tuple(range(len(keys))))
    expected, _ = ReferenceRunner(model).run(observation, 3)
    # float32 packing: the fast path equals the reference to float rounding (1e-5), a view or position mix-up O(1)
    pipe = Pi05Pipeline(FastModel(model, torch.float32), use_graphs=False, compile=False, expert_kernels="off")
    assert pipe.max_views == len(keys)
    actions, _ = pipe.run(observation, 3)
    assert rel_err(actions, expected) < 1e-5
    views = min(2, pipe.max_views)  # what FP8 calibration runs on when it has no recordings
    pipe.calibrate(list(synthetic_observations(cfg, 1, views=views)), 2)


def test_a_prompt_longer_than_the_model_takes_is_refused(pipeline: Pi05Pipeline, policy: Policy) -> None:
    cfg = policy.config
    long = _observation(cfg, cfg.max_token_len, (0,))
    tokens = np.concatenate([long.tokens, np.ones(4, np.int64)])
    too_long = PreparedObservation(long.images, tokens, np.ones(len(tokens), bool), long.noise)
    with pytest.raises(ValueError, match=f"at most {cfg.max_token_len}"):
        pipeline.run(too_long, 2)


def test_calibration_after_graphs_exist_is_refused(policy: Policy, rows: list[PreparedObservation],
                                                  replaying_graphs: None) -> None:
    """Its eager runs replace the suffix buffers the captured denoise graphs read (a later replay was 1.4e-2 off)."""
    pipe = Pi05Pipeline(policy.model, precision="bf16", use_graphs=False, compile=False, expert_kernels="off")
    pipe.calibrate(rows[:1], 2)  # before any graph: fine
    pipe.use_graphs = True
    pipe.run(rows[0], 2)
    with pytest.raises(RuntimeError, match="before any CUDA graph"):
        pipe.calibrate(rows[:1], 2)


def test_lanes_share_the_weights_and_run_at_once_as_each_alone(pipeline: Pi05Pipeline,
                                                                rows: list[PreparedObservation]) -> None:
    """Pi05Pipeline.lane(): the same packed model, buffers of its own. Two lanes on two threads at once (torch's CPU
    ops release the GIL, so they do overlap) give, bit for bit, what each gives alone: no buffer is shared."""
    import threading

    other = pipeline.lane()
    assert other.fast is pipeline.fast
    assert other.d_x.data_ptr() != pipeline.d_x.data_ptr()
    assert other.h_images.data_ptr() != pipeline.h_images.data_ptr()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(other.d_batch_keys, pipeline.d_batch_keys, strict=True))
    work = {pipeline: rows[:2], other: [rows[3], rows[0], rows[1]]}
    alone = {lane: lane.run_batch(lane_rows, 3)[0] for lane, lane_rows in work.items()}
    together: dict[Pi05Pipeline, list[np.ndarray]] = {lane: [] for lane in work}
    start = threading.Barrier(2)

    def loop(lane: Pi05Pipeline) -> None:
        start.wait()
        for _ in range(4):
            together[lane].append(lane.run_batch(work[lane], 3)[0])

    threads = [threading.Thread(target=loop, args=(lane,)) for lane in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for lane in work:
        assert len(together[lane]) == 4
        for actions in together[lane]:
            np.testing.assert_array_equal(actions, alone[lane])  # exact: the same ops on the same inputs
