"""tools/batch_stages_gpu.py's variants on the CPU (the tiny model, bf16, no graphs; the GPU runs the same code): a
variant that fails becomes an error row, one table-safe line, and the variants after it still run; a failing
baseline stops the run (there is nothing to compare with). Device time is scarce: one variant's failure must not
cost the rest of a call."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pi05_ros.engine.fast.blocks import FastModel
from pi05_ros.engine.policy import Policy

_spec = importlib.util.spec_from_file_location(
    "batch_stages_gpu", Path(__file__).resolve().parents[2] / "tools" / "batch_stages_gpu.py")
batch_stages_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch_stages_gpu)


@pytest.fixture(autouse=True)
def eager_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers run eagerly: what is tested is the tool's handling of its variants, not inductor's C++ compile on
    the CPU (most of a minute per variant on two cores)."""
    monkeypatch.setattr(FastModel, "compile", lambda self: None)


@pytest.fixture(scope="module")
def setup() -> tuple[Policy, list]:
    policy = Policy.demo(device="cpu", precision="bf16")
    size = policy.config.vision.image_size
    rng = np.random.default_rng(0)
    images = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in policy.image_keys[:2]}
    obs = policy.prepare(images, np.zeros(policy.state_dim, np.float32), "pick up the cup")
    return policy, [obs]


def _fail_for(name_part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = batch_stages_gpu._time_variant

    def time_variant(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name_part in name:
            raise RuntimeError("out of resource: shared memory | Required: 262144\nHardware limit: 232448")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(batch_stages_gpu, "_time_variant", time_variant)


def test_a_failing_variant_is_an_error_row_and_the_rest_still_run(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    policy, prepared = setup
    _fail_for("SDPA", monkeypatch)
    rows: list[dict] = []
    batch_stages_gpu.variants(policy, prepared, 1, 1, "SDPA,residual carry", on_row=rows.append)
    assert [row["variant"].split(":")[0].split(" (")[0] for row in rows] == [
        "baseline", "SDPA attention", "residual carry off"]
    baseline, failed, after = rows
    assert "error" not in baseline and baseline["rel_l2_vs_baseline"] == 0
    # the first line of the message only, its table separator replaced: the row stays one table row
    assert failed["error"] == "RuntimeError: out of resource: shared memory / Required: 262144"
    assert set(failed) == {"variant", "error"}
    assert "error" not in after and after["rel_l2_vs_baseline"] == 0  # eagerly the carry gives the same sums
    assert after["denoise"] > 0


def test_a_failing_baseline_stops_the_run(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    policy, prepared = setup
    _fail_for("baseline", monkeypatch)
    rows: list[dict] = []
    with pytest.raises(RuntimeError, match="out of resource"):
        batch_stages_gpu.variants(policy, prepared, 1, 1, "residual carry", on_row=rows.append)
    assert [row["variant"] for row in rows] == ["baseline (a fresh model, as the variants)"]
    assert "error" in rows[0]
