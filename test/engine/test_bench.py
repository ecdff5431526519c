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
from pi05_ros.cli.report import UNATTRIBUTED, order_stages, parent_stage, top_level_stages
from pi05_ros.engine.runner import PreparedObservation, ReferenceRunner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGETS = Path(__file__).resolve().parents[2] / "docs" / "bench" / "targets-h100.json"  # the documented example


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
                     "--precision", "fp32", "--targets", str(TARGETS), "--out", str(out)])
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
    assert "not measured" in _section(report, "## Targets")

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
    """Stands in for Pi05Pipeline on CPU (it needs CUDA): the reference's numbers under richer stage names."""

    name = "fake_pipeline"
    stage_names = ("host_staging", "host_copy_in", "vision", "embed_prefix", "prefill_kv", "denoise",
                   "denoise_step", "host_copy_out")

    def __init__(self, model, precision: str = "bf16") -> None:  # noqa: ANN001
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
        timings = {"host_staging": 0.02, "host_copy_in": 0.01}
        timings.update({f"vision_view{i}": t["vision"] / len(views) for i in views})
        timings.update(vision=t["vision"], embed_prefix=t["embed_prefix"], prefill_kv=t["prefill_kv"],
                       denoise=t["denoise"], denoise_step=t["denoise"] / num_steps, host_copy_out=0.01)
        return actions, timings


def test_fast_runner_bookkeeping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "fast_runner_unavailable", lambda device: None)
    built = []

    def make_runner(model, precision: str, runner: str, **options) -> FakeFastRunner:  # noqa: ANN001
        built.append((model, runner, options["keep_reference"]))
        return FakeFastRunner(model, precision)

    monkeypatch.setattr(bench, "make_runner", make_runner)
    out = tmp_path / "bench"
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "1,10", "--iters", "2", "--warmup", "1",
                     "--baseline-iters", "1", "--precision", "fp8", "--targets", str(TARGETS), "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())

    # One model: the fast runner is built on the baseline's, which keeps its reference weights.
    baseline_model = built[0][0]
    assert built == [(baseline_model, "fast", True)] and not baseline_model.released
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


def test_a_precision_with_a_pipeline_option_is_timed_beside_the_plain_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--precision fp8,fp8+fused-mlp,...`: fast runners of one model, each built with its label's Pipeline options
    (the prefix MLP fused or not, SigLIP's MLP in FP8 and fused, the residual carry off) and reported under its own
    label; an unknown option is refused first."""
    monkeypatch.setattr(bench, "fast_runner_unavailable", lambda device: None)
    built = []

    def make_runner(model, precision: str, runner: str, **options) -> FakeFastRunner:  # noqa: ANN001
        built.append((precision, options))
        return FakeFastRunner(model, precision)

    monkeypatch.setattr(bench, "make_runner", make_runner)
    out = tmp_path / "bench"
    labels = ["fp8", "fp8+fused-mlp", "fp8+fused-mlp+fused-vision-mlp", "fp8+unfused-mlp+no-residual-carry"]
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--iters", "2", "--warmup", "1",
                     "--no-baseline", "--precision", ",".join(labels), "--out", str(out)])
    assert rc == 0
    # None: not passed, the pipeline's default
    assert [(p, o.get("prefix_fused_mlp"), o.get("fp8_vision"), o.get("vision_fused_mlp")) for p, o in built] == [
        ("fp8", None, None, None), ("fp8", True, None, None), ("fp8", True, True, True), ("fp8", False, None, None)]
    assert [o.get("carry_residual") for _, o in built] == [None, None, None, False]
    results = json.loads((out / "results.json").read_text())
    assert sorted(c["precision"] for c in results["configs"]) == labels
    assert set(results["setup"]["runners"]) == set(labels)
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp8+nope", "--out", str(out)])
    assert len(built) == 4  # refused while parsing: nothing built


def test_stage_order_is_pipeline_order() -> None:
    keys = ["total", "postprocess", "denoise", "mystery", "prefill_kv", "vision_base", "preprocess", "vision",
            "host_copy_out", "embed_prefix", "host_copy_in"]
    assert order_stages(keys) == ["preprocess", "host_copy_in", "vision", "vision_base", "embed_prefix",
                                  "prefill_kv", "denoise", "mystery", "host_copy_out", "postprocess", "total"]
    assert top_level_stages(keys) == ["preprocess", "host_copy_in", "vision", "embed_prefix", "prefill_kv",
                                      "denoise", "mystery", "host_copy_out", "postprocess"]


def test_report_orders_only_the_stage_names_runners_emit() -> None:
    from pi05_ros.cli import report
    from pi05_ros.engine.fast.pipeline import Pi05Pipeline

    around = ("preprocess", "postprocess", "total")  # Policy's own
    emitted = set(around) | set(ReferenceRunner.stage_names) | set(Pi05Pipeline.stage_names)
    assert set(report._STAGE_ORDER) - {UNATTRIBUTED} <= emitted
    fast = ["preprocess", *Pi05Pipeline.stage_names, "postprocess", "total"]
    assert order_stages(reversed(fast)) == fast  # the fast pipeline's names come out in pipeline order
    assert top_level_stages(fast) == ["preprocess", "host_staging", "host_copy_in", "vision", "prefill_kv",
                                      "denoise", "host_copy_out", "postprocess"]  # per view / per step are parts


def _config(precision: str, views: int, steps: int, p50: float, iters: int = 50) -> dict:
    stats = {"total": {"mean": p50, "p50": p50, "p99": 1.1 * p50}, "denoise": {"p50": p50 / 2}}
    return {"status": "ok", "backend": "fast", "precision": precision, "views": views, "steps": steps,
            "iters": iters, "stats": stats, "p99_p50": 1.1, "hz": 1e3 / p50, "peak_mem_gb": views * 2.0}


def test_targets_judge_the_worst_matching_run(tmp_path: Path) -> None:
    from pi05_ros.cli.report import evaluate_targets, load_targets

    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"title": "my robot", "targets": [
        {"name": "fast enough", "metric": "stage.total.p50", "max": 9.0, "where": {"precision": "fp8", "steps": 10}},
        {"name": "memory", "metric": "peak_mem_gb", "max": 5.0, "where": {"precision": "fp8"}},
        {"name": "rate", "metric": "hz", "min": 100.0, "where": {"steps": 10}, "min_iters": 1000},
        {"name": "bf16", "metric": "stage.total.p50", "max": 1.0, "where": {"precision": "bf16"}},
    ]}))
    results = {"configs": [_config("fp8", 1, 10, 8.0), _config("fp8", 2, 10, 8.5), _config("fp8", 3, 1, 4.0)],
               "notes": []}
    got = {t["name"]: t for t in evaluate_targets(results, load_targets(path))}
    assert got["fast enough"]["measured"] == 8.5 and got["fast enough"]["status"] == "met"
    assert "worst of 2 matching runs" in got["fast enough"]["note"] and got["fast enough"]["target"] == "<= 9 ms"
    assert got["memory"]["measured"] == 6.0 and got["memory"]["status"] == "not met"  # 3 views: the largest
    assert got["rate"]["measured"] == pytest.approx(1e3 / 8.5) and got["rate"]["status"] == "met"
    assert "use --iters 1000" in got["rate"]["note"]
    assert got["bf16"]["status"] == "not measured" and got["bf16"]["measured"] is None


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", "non-empty list"),
    ('{"targets": [{"name": "x", "metric": "speed", "max": 1}]}', "unknown metric 'speed'"),
    ('{"targets": [{"name": "x", "metric": "p99_p50", "max": 1, "min": 0}]}', "exactly one number"),
    ('{"targets": [{"name": "x", "metric": "p99_p50", "max": 1, "where": {"gpu": "h100"}}]}', "where"),
    ('{"targets": [{"name": "x", "metric": "p99_p50", "max": 1, "where": 5}]}', "\"where\" takes"),
    ("{not json", "not readable JSON"),
])
def test_bad_targets_file_is_refused_before_any_run(tmp_path: Path, content: str, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "targets.json"
    path.write_text(content)
    assert bench.main(["--device", "cpu", "--targets", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bare_bench_on_cpu_times_the_tiny_preset_and_shows_no_targets(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert bench.main(["--device", "cpu", "--steps", "1", "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0
    assert "tiny preset runs on the CPU" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["preset"] == "tiny" and "targets" not in results
    report = (out / "report.md").read_text()
    assert "## Targets" not in report and "issue" not in report.lower()


@pytest.mark.parametrize(("args", "message"), [
    (["--precision", "int4"], "unknown precision 'int4'"),
    (["--precision", "bf16+fused-mlp"], "options of the fp8 pipeline"),
    (["--seed", "-1"], "expected an integer >= 0"),
    (["--prompt-tokens", "0"], "expected an integer >= 1"),
    (["--tokenizer", "tok.model"], "go with --checkpoint"),
])
def test_arguments_that_would_be_ignored_or_fail_late_are_refused_at_once(args: list[str], message: str,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_unwritable_out_or_unreadable_results_fail_before_any_run(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--out", str(a_file)])
    assert "is a file" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--out", str(a_file / "below")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    for bad in (tmp_path / "missing.json", tmp_path, a_file):
        assert bench.main(["--from-results", str(bad), "--out", str(tmp_path / "r")]) == 2
        assert "--from-results" in capsys.readouterr().err
    with pytest.raises(Exception, match="not supported"):
        from pi05_ros.engine.policy import resolve_device
        resolve_device("mps")
