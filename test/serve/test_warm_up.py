"""pi05-serve's warm-up: the camera counts it makes the GPU pipeline's graphs for before the first client
(`--warm-up-views`, default the layout's full count), each with every batch bucket and both warm-up prompts. On an
H100 with cold compile caches, a count not warmed cost its first batch of 2 ~6.4 s of capture and compile inside a
timed run (docs/benchmarks.md §72). In process, the demo model on the CPU; the pipeline built without graphs records
what a GPU's would capture."""

from __future__ import annotations

import pytest

from pi05_ros.cli.serve import _settings, build_parser
from pi05_ros.engine.errors import InputError
from pi05_ros.engine.fast.pipeline import Pi05Pipeline
from pi05_ros.engine.policy import Policy
from pi05_ros.serve.layouts import native_layout, resolve_layout
from pi05_ros.serve.service import ServeSettings, layout_views, warm_up, warm_up_views


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.demo(device="cpu", precision="fp32", seed=0)


def test_the_counts_default_to_the_layouts_and_are_checked(policy: Policy) -> None:
    layout = native_layout()
    most = layout_views(layout, policy)
    assert most == len(policy.image_keys) == 3
    assert warm_up_views(ServeSettings(), layout, policy) == (3,)
    assert warm_up_views(ServeSettings(warm_up_views=(2, 2, 3)), layout, policy) == (2, 3)
    with pytest.raises(InputError, match=r"in 1\.\.3 .*got \[4\]"):
        warm_up_views(ServeSettings(warm_up_views=(4,)), layout, policy)
    with pytest.raises(InputError, match=">= 1"):
        ServeSettings(warm_up_views=(0, 2))
    # droid's requests carry both its cameras or are refused: no other count to warm
    droid = resolve_layout("droid")
    assert warm_up_views(ServeSettings(), droid, policy) == (2,)
    with pytest.raises(InputError, match="requires every one of its 2 cameras"):
        warm_up_views(ServeSettings(warm_up_views=(1, 2)), droid, policy)
    with pytest.raises(ValueError, match="at least one camera count"):
        warm_up(policy, 1, ())
    args = build_parser().parse_args(["--demo", "--warm-up-views", "2,3"])
    assert _settings(args).warm_up_views == (2, 3)
    assert _settings(build_parser().parse_args(["--demo"])).warm_up_views == ()
    with pytest.raises(SystemExit, match="camera counts like 2 or 2,3, got 'two'"):
        _settings(build_parser().parse_args(["--demo", "--warm-up-views", "two"]))


def test_every_count_gets_every_bucket_and_prompt(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = Pi05Pipeline(policy.model, precision="bf16", use_graphs=False, compile=False, expert_kernels="off",
                            max_batch=4)
    assert pipeline.batch_buckets == (1, 2, 4)
    batches: list[tuple[int, int, int]] = []  # (cameras, rows, valid prompt tokens)
    run_batch = pipeline.run_batch

    def recording(prepared, num_steps):  # noqa: ANN001, ANN202
        batches.append((prepared[0].num_views, len(prepared), int(prepared[0].token_mask.sum())))
        return run_batch(prepared, num_steps)

    monkeypatch.setattr(pipeline, "run_batch", recording)
    monkeypatch.setattr(policy, "runner", pipeline)
    warm_up(policy, 1, (1, 3))
    prompts = sorted({tokens for *_, tokens in batches})
    assert len(prompts) == 2  # the short prompt and the typical task (their token counts)
    assert [(views, rows) for views, rows, _ in batches] == [
        (views, rows) for views in (1, 3) for rows in (1, 2, 4) for _ in prompts]


def test_a_runner_without_graphs_runs_once(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    infer_batch = policy.infer_batch

    def recording(observations, steps):  # noqa: ANN001, ANN202
        calls.append(len(observations))
        return infer_batch(observations, steps)

    monkeypatch.setattr(policy, "infer_batch", recording)
    assert not hasattr(policy.runner, "batch_buckets")  # the CPU's reference runner
    warm_up(policy, 1, (1, 2, 3))
    assert calls == [1]
