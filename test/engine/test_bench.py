"""pi05-bench on CPU: the report's structure, its JSON block, the PNG, and the fast-runner bookkeeping."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pi05_ros.cli import bench
from pi05_ros.cli.report import order_stages, parent_stage, top_level_stages
from pi05_ros.engine.runner import PreparedObservation, ReferenceRunner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_cpu_thread() -> Iterator[None]:
    # On a shared 2-core machine, 2 OpenMP threads beside any other load run the tiny model ~20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _section(report: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = report.index(heading + "\n")
    rest = report[start + len(heading) + 1:]
    match = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.MULTILINE)
    return rest[: match.start()] if match else rest


def _first_table(text: str) -> list[list[str]]:
    """Rows (cells stripped, header and separator dropped) of the first Markdown table in `text`."""
    block: list[list[str]] = []
    for ln in text.splitlines():
        if ln.startswith("|"):
            block.append([c.strip() for c in ln.strip("|").split("|")])
        elif block:
            break
    assert len(block) >= 2 and set(block[1][0]) <= {"-"}, f"no table in:\n{text}"
    return block[2:]


def _json_block(report: str) -> dict:
    body = _section(report, "## Benchmark Data (JSON)")
    match = re.search(r"```json\n(.*?)\n```", body, flags=re.DOTALL)
    assert match, "no JSON block"
    return json.loads(match.group(1))


def test_cpu_baseline_report(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "1,3", "--iters", "3", "--warmup", "1",
                     "--precision", "fp32", "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())

    # Executive summary: one row per step count, in order.
    rows = _first_table(_section(report, "## Executive Summary"))
    assert [r[0] for r in rows] == ["**1**", "**3**"]
    assert all(r[1].endswith("ms**") and r[2].endswith("Hz**") for r in rows)

    # A detailed breakdown per step count with the reference stages and an E2E row.
    for title in ("## 1 Denoising Step - Detailed Breakdown", "## 3 Denoising Steps - Detailed Breakdown"):
        table = _first_table(_section(report, title))
        names = [r[0] for r in table]
        for stage in ("Vision", "Embed Prefix", "KV Cache Prefill", "Denoise Loop", "**E2E Total**"):
            assert stage in names, (title, names)
        assert all(len(r) == 7 for r in table)  # component, mean, std, p50, p99, %, notes
    assert "Denoise Analysis" in report

    # The fast path is skipped on CPU with a reason, and the targets say so.
    assert "fast pipeline unavailable: device is cpu" in report
    assert "not measured" in _section(report, "## Targets (issue 3: H100, batch 1, 2 views, ~48-token prompt, "
                                              "horizon 50)")

    # The JSON block is results.json's summary, and results.json holds the raw samples.
    assert _json_block(report) == results["summary"]
    assert set(results["summary"]) == {"baseline-fp32/2v/1steps", "baseline-fp32/2v/3steps"}
    config = results["configs"][0]
    assert len(config["samples"]["total"]) == 3
    assert config["stats"]["total"]["p50"] > 0 and config["peak_mem_gb"] is None
    assert 40 <= results["prompt"]["tokens"] <= 56

    # Platform and commit are recorded.
    assert "## Platform" in report and results["platform"]["python"]

    png = (out / "breakdown.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


class FakeFastRunner:
    """Stands in for Pi05Pipeline on CPU: the reference's numbers under the fast pipeline's richer stage names."""

    name = "fake_pipeline"
    stage_names = ("host_copy_in", "vision", "embed_prefix", "prefill_kv", "denoise", "host_copy_out")

    def __init__(self, model, precision: str = "bf16", max_views: int = 3, calibration=None) -> None:  # noqa: ANN001
        self.ref = ReferenceRunner(model)
        self.precision = precision
        self.setup_times = {"calibrate": 0.25, "capture": 0.0}
        self.captured: set[int] = set()

    def run(self, obs: PreparedObservation, num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        if num_steps not in self.captured:  # a graph per step count, captured on first use
            self.captured.add(num_steps)
            self.setup_times["capture"] += 0.5
        actions, t = self.ref.run(obs, num_steps)
        views = [i for i, im in enumerate(obs.images) if im is not None]
        timings = {"host_copy_in": 0.01}
        timings.update({f"vision_view{i}": t["vision"] / len(views) for i in views})
        timings.update(vision=t["vision"], embed_prefix=t["embed_prefix"], prefill_kv=t["prefill_kv"],
                       denoise=t["denoise"], denoise_step=t["denoise"] / num_steps, host_copy_out=0.01)
        return actions, timings


def test_fast_runner_bookkeeping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "fast_unavailable_reason", lambda device: None)
    monkeypatch.setattr(bench, "make_fast_runner", lambda model, precision, **kw: FakeFastRunner(model, precision,
                                                                                                 **kw))
    out = tmp_path / "bench"
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "1,10", "--iters", "2", "--warmup", "1",
                     "--baseline-iters", "1", "--precision", "fp8", "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())

    fast = [c for c in results["configs"] if c["backend"] == "fast"]
    assert [c["steps"] for c in fast] == [1, 10] and all(c["speedup"] > 0 for c in fast)
    # The executive summary shows the fast fp8 runs against the baseline.
    rows = _first_table(_section(report, "## Executive Summary"))
    assert [r[0] for r in rows] == ["**1**", "**10**"] and all(r[-1].endswith("x") for r in rows)
    # Per-view vision and the per-step denoise are parts, not stacked stages; setup counts lazy captures.
    stats = fast[0]["stats"]
    assert parent_stage("vision_view0", stats) == "vision" and "vision_view0" not in top_level_stages(stats)
    assert "Denoise (per step)" in _section(report, "## 10 Denoising Steps - Detailed Breakdown")
    setup = results["setup"]["runners"]["fp8"]
    assert setup["lazy_s"] == pytest.approx(1.0)
    assert setup["total_s"] == pytest.approx(results["setup"]["model"]["seconds"] + setup["build_s"] + 1.0)
    assert "capture (1.00 s on first use)" in report
    # The targets are evaluated (met or not) once fp8 numbers exist.
    targets = {t["name"]: t for t in results["targets"]}
    assert targets["10 steps, fp8, end to end"]["status"] in ("met", "not met")
    assert "use --iters 1000" in targets["p99 / p50 over 1000 runs"]["note"]
    assert _json_block(report) == results["summary"]

    # The report re-renders from results.json alone.
    again = tmp_path / "again"
    assert bench.main(["--from-results", str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "report.md").read_text() == report
    assert (again / "breakdown.png").read_bytes().startswith(PNG_MAGIC)


def test_stage_order_is_pipeline_order() -> None:
    keys = ["total", "postprocess", "denoise", "mystery", "prefill_kv", "vision_base", "preprocess", "vision",
            "host_copy_out", "embed_prefix", "host_copy_in"]
    assert order_stages(keys) == ["preprocess", "host_copy_in", "vision", "vision_base", "embed_prefix",
                                  "prefill_kv", "denoise", "mystery", "host_copy_out", "postprocess", "total"]
    assert top_level_stages(keys) == ["preprocess", "host_copy_in", "vision", "embed_prefix", "prefill_kv",
                                      "denoise", "mystery", "host_copy_out", "postprocess"]
