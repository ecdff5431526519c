"""The pi05-bench report: results dict -> report.md, breakdown.png and results.json.

The Markdown follows the structure of the original Jetson Thor latency report: header, executive summary per
denoise-step count, an overview, one detailed breakdown per step count with mean/std/% of total and notes,
and a JSON block. It adds the platform, setup times, the speed-up over the baseline, peak GPU memory, and,
when a targets file is given (docs/benchmark_cli.md), the run judged against those targets. It shows the
user's run only: comparisons with other systems belong in docs/benchmarks.md. Everything here reads only the
results dict, so a report can be re-rendered from a results.json on another machine
(`pi05-bench --from-results results.json`).

Stage names are the runners' own (engine/runner.py says what each means): the reference reports preprocess,
vision, embed_prefix, prefill_kv, denoise, postprocess, total; the fast pipeline host_staging, host copies,
vision_per_view and denoise_step instead of embed_prefix. Known names are ordered by pipeline position, any
other name is placed after the denoise loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Pipeline order of the stage names runners report; a name that extends one (vision_per_view) follows it.
_STAGE_ORDER = (
    "preprocess", "host_staging", "host_copy_in", "vision", "embed_prefix", "prefill_kv", "denoise",
    "host_copy_out", "postprocess", "unattributed", "total",
)
_UNKNOWN_RANK = _STAGE_ORDER.index("denoise") + 0.5
_SUB_SEPARATORS = ("_", ".", "/", ":")

UNATTRIBUTED = "unattributed"

_DISPLAY = {
    "preprocess": "Preprocess (host)",
    "host_staging": "Host staging",
    "host_copy_in": "Host -> device copy",
    "host_copy_out": "Device -> host copy",
    "vision": "Vision",
    "vision_per_view": "Vision (per view)",
    "embed_prefix": "Embed Prefix",
    "prefill_kv": "KV Cache Prefill",
    "denoise": "Denoise Loop",
    "denoise_step": "Denoise (per step)",
    "postprocess": "Postprocess (host)",
    UNATTRIBUTED: "Unattributed",
    "total": "E2E Total",
}

# Executive-summary columns: the sum of top-level stages whose names start with the prefix.
_SUMMARY_GROUPS = (("Vision", ("vision",)), ("Embed", ("embed",)), ("KV Cache", ("prefill",)),
                   ("Denoise", ("denoise",)))


# ------------------------------------------------------------------------------------------ stage names


def _rank(stage: str) -> float:
    if stage in _STAGE_ORDER:
        return _STAGE_ORDER.index(stage)
    best = max((s for s in _STAGE_ORDER if stage.startswith(s)), key=len, default=None)
    return _STAGE_ORDER.index(best) + 0.1 if best else _UNKNOWN_RANK


def order_stages(stages: Iterable[str]) -> list[str]:
    """Stages in pipeline order; unknown ones keep their given order, placed after the denoise loop."""
    listed = list(dict.fromkeys(stages))
    return sorted(listed, key=lambda s: (_rank(s), listed.index(s)))


def is_aggregate(stage: str) -> bool:
    """A stage that sums others (the end-to-end total, a GPU total): never stacked."""
    return stage in ("total", "e2e", "gpu") or stage.endswith("_total") or stage.startswith("total_")


def parent_stage(stage: str, stages: Iterable[str]) -> str | None:
    """The stage that `stage` is a part of ("vision_base" of "vision", "denoise_step" of "denoise"), if present."""
    candidates = [p for p in stages if p != stage and not is_aggregate(p)
                  and any(stage.startswith(p + sep) for sep in _SUB_SEPARATORS)]
    return max(candidates, key=len, default=None)


def top_level_stages(stages: Iterable[str]) -> list[str]:
    """The stages that partition the end-to-end time: neither aggregates nor parts of another present stage."""
    listed = list(stages)
    return order_stages(s for s in listed if not is_aggregate(s) and parent_stage(s, listed) is None
                        and s != UNATTRIBUTED)


def display_name(stage: str) -> str:
    if stage in _DISPLAY:
        return _DISPLAY[stage]
    for prefix, name in (("vision", "Vision"), ("denoise_step", "Denoise step"), ("denoise", "Denoise")):
        if stage.startswith(prefix) and len(stage) > len(prefix):
            return f"{name} ({stage[len(prefix):].lstrip('_./:').replace('_', ' ')})"
    return stage


def stage_note(stage: str, config: dict[str, Any], model: dict[str, Any]) -> str:
    """The Notes column of the detailed tables."""
    views, steps = config["views"], config["steps"]
    cfg = model.get("config", {})
    vlm_depth = cfg.get("vlm", {}).get("depth", "?")
    expert_depth = cfg.get("expert", {}).get("depth", "?")
    if stage == "preprocess":
        return "host: resize-with-pad, state normalization, tokenization, noise"
    if stage == "postprocess":
        return "host: un-normalize actions"
    if stage == UNATTRIBUTED:
        return "total minus the stages (host overhead, device->host copy, sync)"
    if stage == "vision":
        return f"SigLIP encoder, {views} view(s)"
    if stage.startswith("vision"):
        return "SigLIP encoder, one view"
    if stage == "embed_prefix":
        return "token-table look-up and prefix assembly (image + text tokens)"
    if stage == "host_staging":
        return "host: token-row gather, images and noise into pinned buffers"
    if stage == "prefill_kv":
        return f"Gemma over the prefix: K/V of its {vlm_depth} layers"
    if stage == "denoise":
        return f"action expert ({expert_depth} layers), {steps} Euler step(s)"
    if stage.startswith("denoise"):
        return "action expert, one Euler step"
    if stage == "host_copy_in":
        return "host -> device: images, tokens, noise"
    if stage == "host_copy_out":
        return "device -> host: actions"
    if is_aggregate(stage):
        return "aggregate"
    return ""


# ------------------------------------------------------------------------------------------ summaries


def config_title(config: dict[str, Any]) -> str:
    return f"{config['label']}, {config['views']} view{'s' if config['views'] != 1 else ''}"


def _ok(configs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in configs if c.get("status") == "ok"]


def headline_configs(results: dict[str, Any]) -> tuple[str, int, list[dict[str, Any]]]:
    """(label, views, configs per step count) of the configuration the executive summary shows.

    Views: 2 (the usual two cameras) when measured, else the first measured. Backend: fast fp8 when measured,
    else the first fast precision measured, else the baseline.
    """
    configs = _ok(results.get("configs", []))
    if not configs:
        return "", 0, []
    views_measured = sorted({c["views"] for c in configs})
    views = results.get("headline_views", 2)
    if views not in views_measured:
        views = views_measured[0]
    at_views = [c for c in configs if c["views"] == views]
    fast = [c for c in at_views if c["backend"] == "fast"]
    fast_precisions = list(dict.fromkeys(c["precision"] for c in fast))
    if fast:
        precision = "fp8" if "fp8" in fast_precisions else fast_precisions[0]
        chosen = [c for c in fast if c["precision"] == precision]
    else:
        chosen = [c for c in at_views if c["backend"] == "baseline"]
    chosen.sort(key=lambda c: c["steps"])
    return chosen[0]["label"], views, chosen


def group_mean(config: dict[str, Any], prefixes: Sequence[str]) -> float | None:
    stats = config["stats"]
    parts = [stats[s]["mean"] for s in top_level_stages(stats) if s.startswith(tuple(prefixes))]
    return sum(parts) if parts else None


def rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded (0.1 us for ms values) through nested dicts and lists, for readable JSON."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def build_summary(configs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The report's JSON block (also results.json's "summary"): per configuration, e2e and stage statistics."""
    out: dict[str, Any] = {}
    for c in _ok(configs):
        stats = c["stats"]
        out[c["id"]] = {
            "backend": c["backend"], "runner": c["runner"], "precision": c["precision"],
            "views": c["views"], "steps": c["steps"], "iters": c["iters"],
            "e2e_total": {k: stats["total"][k] for k in ("mean", "std", "p50", "p99")},
            "hz": c["hz"], "p99_p50": c["p99_p50"], "speedup": c.get("speedup"),
            "peak_mem_gb": c.get("peak_mem_gb"),
            "stages": {s: {"mean": stats[s]["mean"], "std": stats[s]["std"]}
                       for s in order_stages(stats) if s != "total"},
        }
    return rounded(out)


# ------------------------------------------------------------------------------------------ targets

_CONFIG_METRICS = {"p99_p50": "", "hz": "Hz", "peak_mem_gb": "GB"}
_SELECTORS = ("backend", "precision", "views", "steps")


class TargetsError(ValueError):
    """A targets file that cannot be used; str() names the file, the entry and the fix."""


def load_targets(path: Path) -> dict[str, Any]:
    """Read and check a targets file (its format: docs/benchmark_cli.md)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise TargetsError(f"targets file {path} is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("targets"), list) or not raw["targets"]:
        raise TargetsError(f"targets file {path} needs a non-empty list under \"targets\"")
    for i, t in enumerate(raw["targets"]):
        where = f"targets file {path}, entry {i}"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("metric"), str):
            raise TargetsError(f"{where}: needs a \"name\" and a \"metric\"")
        metric = t["metric"]
        if not (metric in _CONFIG_METRICS or metric == "setup_s"
                or (metric.startswith("stage.") and metric.count(".") == 2)):
            raise TargetsError(f"{where}: unknown metric {metric!r}; use stage.<stage>.<mean|p50|p99|...>, "
                               f"{', '.join(_CONFIG_METRICS)} or setup_s")
        bounds = [k for k in ("max", "min") if k in t]
        if len(bounds) != 1 or not isinstance(t[bounds[0]], int | float):
            raise TargetsError(f"{where}: give exactly one number, \"max\" or \"min\"")
        selectors = t.get("where", {})
        if not isinstance(selectors, dict) or set(selectors) - set(_SELECTORS):
            raise TargetsError(f"{where}: \"where\" takes {', '.join(_SELECTORS)}")
    return raw


def _matches(config: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(config.get(key) == value for key, value in where.items())


def _config_value(config: dict[str, Any], metric: str) -> float | None:
    if metric.startswith("stage."):
        _, stage, stat = metric.split(".")
        return config["stats"].get(stage, {}).get(stat)
    return config.get(metric)


def _describe(where: dict[str, Any]) -> str:
    return ", ".join(f"{key} {where[key]}" for key in _SELECTORS if key in where) or "any configuration"


def evaluate_targets(results: dict[str, Any], targets: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of a targets file against this run: the worst matching figure (the largest for a "max"
    target, the smallest for a "min" one), met / not met / not measured."""
    out = []
    configs = _ok(results.get("configs", []))
    for t in targets["targets"]:
        where, metric = t.get("where", {}), t["metric"]
        bound = "max" if "max" in t else "min"
        limit = float(t[bound])
        notes = [t["note"]] if t.get("note") else []
        if metric == "setup_s":
            runners = results.get("setup", {}).get("runners", {})
            label = where.get("precision")
            found = [(r["total_s"], None) for name, r in runners.items() if label in (None, name)]
            unit = "s"
            if results.get("setup", {}).get("model", {}).get("what") != "load checkpoint":
                notes.append("random weights were built, not loaded: use --checkpoint")
        else:
            found = [(v, c) for c in configs if _matches(c, where)
                     if (v := _config_value(c, metric)) is not None]
            unit = "ms" if metric.startswith("stage.") else _CONFIG_METRICS[metric]
        unit = t.get("unit", unit)
        target = f"{'<=' if bound == 'max' else '>='} {limit:g}" + (f" {unit}" if unit else "")
        entry = {"name": t["name"], "target": target, "limit": limit, "bound": bound, "unit": unit,
                 "metric": metric, "where": where}
        if not found:
            missing = [f"no measured run matches {_describe(where)}"]
            missing += [n for n in results.get("notes", []) if n.startswith("fast pipeline")][:1]
            out.append(entry | {"measured": None, "status": "not measured", "note": "; ".join(missing)})
            continue
        measured, worst = (max if bound == "max" else min)(found, key=lambda vc: vc[0])
        if len(found) > 1:
            notes.append(f"worst of {len(found)} matching runs")
        min_iters = t.get("min_iters")
        if worst is not None and min_iters and worst["iters"] < min_iters:
            notes.append(f"over {worst['iters']} runs; the target is over {min_iters} runs: use --iters {min_iters}")
        met = measured <= limit if bound == "max" else measured >= limit
        out.append(entry | {"measured": measured, "status": "met" if met else "not met", "note": "; ".join(notes)})
    return rounded(out)


# ------------------------------------------------------------------------------------------ Markdown


def _ms(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}{' ' + unit if unit else ''}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _steps_title(steps: int) -> str:
    return f"{steps} Denoising Step{'s' if steps != 1 else ''}"


def _header(results: dict[str, Any]) -> list[str]:
    p = results.get("platform", {})
    configs = _ok(results.get("configs", []))
    fast = list(dict.fromkeys(c["precision"] for c in configs if c["backend"] == "fast"))
    base = next((c for c in configs if c["backend"] == "baseline"), None)
    backend = []
    if fast:
        paths = sorted({c["expert_path"] for c in configs if c["backend"] == "fast" and c.get("expert_path")})
        denoise = f"; denoise loop on {' / '.join(paths)}" if paths else ""
        backend.append(f"fast pipeline ({', '.join(fast)}{denoise})")
    if base:
        backend.append(f"baseline: {base['runner']} runner, {base['precision']} (plain PyTorch)")
    if not backend:
        backend.append("nothing measured")
    model = results.get("model", {})
    prompt = results.get("prompt", {})
    return [
        "# Pi0.5 Inference Latency - Detailed Performance Breakdown",
        "",
        f"**Generated**: {results.get('generated', '?')}",
        f"**Commit**: {p.get('git_commit', 'unknown')}",
        f"**Platform**: {p.get('device_name', '?')} ({p.get('device_detail', '')})",
        f"**Backend**: {'; '.join(backend)}",
        f"**Model**: {model.get('preset', '?')} from {model.get('source', '?')}, horizon "
        f"{model.get('config', {}).get('action_horizon', '?')}, prompt ~{prompt.get('tokens', '?')} valid tokens",
        f"**Command**: `{results.get('command', '')}`",
        "",
    ]


def _platform(results: dict[str, Any]) -> list[str]:
    p = results.get("platform", {})
    rows = [(label, str(p.get(key, "unknown"))) for label, key in (
        ("Device", "device_name"), ("Compute capability", "compute_capability"), ("GPU memory", "device_memory"),
        ("Driver", "driver"), ("CUDA (torch build)", "cuda"), ("cuDNN", "cudnn"), ("torch", "torch"),
        ("triton", "triton"), ("Python", "python"), ("OS", "os"), ("CPU", "cpu"), ("git commit", "git_commit"))]
    rows.append(("Date", str(results.get("generated", "?"))))
    return ["## Platform", "", *_table(("Item", "Value"), rows), ""]


def _executive_summary(results: dict[str, Any]) -> list[str]:
    label, views, chosen = headline_configs(results)
    lines = ["## Executive Summary", ""]
    if not chosen:
        return lines + ["Nothing was measured.", ""]
    baseline = {c["steps"]: c for c in _ok(results["configs"])
                if c["backend"] == "baseline" and c["views"] == views}
    lines.append(f"{label}, {views} view(s), ~{results.get('prompt', {}).get('tokens', '?')}-token prompt; "
                 "means over the timed runs, speed-up = baseline median / median.")
    lines.append("")
    header = ("Denoising Steps", "Total Latency", "Frequency", *(g for g, _ in _SUMMARY_GROUPS), "p99/p50",
              "Baseline", "Speed-up")
    rows = []
    for c in chosen:
        base = baseline.get(c["steps"])
        rows.append((
            f"**{c['steps']}**", f"**{c['stats']['total']['mean']:.2f} ms**", f"**{c['hz']:.1f} Hz**",
            *(_fmt(group_mean(c, prefixes), "ms") for _, prefixes in _SUMMARY_GROUPS),
            f"{c['p99_p50']:.3f}",
            _fmt(base["stats"]["total"]["mean"], "ms") if base and c is not base else "-",
            _fmt(c.get("speedup"), "x") if c["backend"] == "fast" else "-",
        ))
    lines += _table(header, rows)
    lines += ["", "### All Configurations", ""]
    header = ("Backend", "Views", "Steps", "Mean (ms)", "p50 (ms)", "p99 (ms)", "p99/p50", "Hz", "Speed-up",
              "Peak GPU mem", "Prompt tokens", "First call (ms)", "Runs")
    rows = []
    for c in sorted(_ok(results["configs"]), key=lambda c: (c["views"], c["steps"], c["backend"] != "baseline",
                                                             c["precision"])):
        t = c["stats"]["total"]
        rows.append((c["label"], str(c["views"]), str(c["steps"]), _ms(t["mean"]), _ms(t["p50"]), _ms(t["p99"]),
                     f"{c['p99_p50']:.3f}", f"{c['hz']:.1f}", _fmt(c.get("speedup"), "x"),
                     _fmt(c.get("peak_mem_gb"), "GB"), _fmt(c.get("prompt_tokens"), digits=1),
                     _ms(c.get("first_call_ms")), str(c["iters"])))
    return lines + _table(header, rows) + [""]


def _targets(results: dict[str, Any]) -> list[str]:
    """The run against the targets file it was given; nothing without one."""
    targets = results.get("targets")
    if not targets:
        return []
    gpu = results.get("platform", {}).get("device_name", "?")
    lines = ["## Targets", "", f"{results.get('targets_title') or 'From the targets file'}; measured on {gpu}.", ""]
    rows = []
    for t in targets:
        digits = {"ms": 2, "GB": 2, "s": 1}.get(t["unit"], 3)
        measured = "-" if t["measured"] is None else f"{t['measured']:.{digits}f}{' ' + t['unit'] if t['unit'] else ''}"
        status = {"met": "**met**", "not met": "**not met**"}.get(t["status"], t["status"])
        rows.append((t["name"], t["target"], measured, status, t.get("note", "")))
    return lines + _table(("", "Target", "Measured", "Status", "Note"), rows) + [""]


def _setup(results: dict[str, Any]) -> list[str]:
    setup = results.get("setup", {})
    lines = ["## Setup Times", ""]
    rows = []
    model = setup.get("model")
    if model:
        rows.append(("model", model["what"], f"{model['seconds']:.2f}", _fmt(model.get("gpu_gb"), "GB")))
    for label, r in setup.get("runners", {}).items():
        who = f"fast {label}"
        rows.append((who, f"build {r['runner']} (wall)", f"{r['build_s']:.2f}", _fmt(r.get("gpu_gb"), "GB")))
        at_build = r.get("setup_times_at_build", {})
        for name, seconds in r.get("setup_times", {}).items():
            if name not in at_build:
                name += " (on first use)"
            elif seconds > at_build[name] + 5e-3:
                name += f" ({seconds - at_build[name]:.2f} s on first use)"
            rows.append((who, name, f"{seconds:.2f}", ""))
        rows.append((who, "**load + calibrate + capture**", f"**{r['total_s']:.2f}**", ""))
    if not rows:
        return lines + ["No setup was timed.", ""]
    lines += _table(("Backend", "Step", "Seconds", "GPU memory held"), rows)
    return lines + ["", "The runner's own steps happen inside its build (and its wall time) unless marked as on "
                    "first use (a graph captured for a new step count or view count); the total is the model load + "
                    "the build + the work on first use. GPU memory held: allocated by the model / by the runner's "
                    "build (its re-packed or quantized weights and buffers).", ""]


def _bar(fraction: float, width: int = 40) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled)


def _overview(results: dict[str, Any], has_png: bool) -> list[str]:
    label, views, chosen = headline_configs(results)
    lines = ["## Performance Breakdown Overview", ""]
    if has_png:
        lines += ["![Stage breakdown per configuration, baseline and fast side by side](breakdown.png)", ""]
    for c in chosen:
        total = c["stats"]["total"]["mean"]
        lines += ["```", f"Pipeline Latency Distribution ({label}, {views} views, "
                  f"{c['steps']} denoising step{'s' if c['steps'] != 1 else ''} = {total:.2f} ms)", ""]
        stages = top_level_stages(c["stats"]) + ([UNATTRIBUTED] if UNATTRIBUTED in c["stats"] else [])
        for s in stages:
            mean = c["stats"][s]["mean"]
            frac = mean / total if total > 0 else 0.0
            lines.append(f"  {display_name(s):<22} {_bar(max(frac, 0.0))} {100 * frac:5.1f}%  {mean:8.2f} ms")
        lines += ["```", ""]
    return lines


def _detail_table(c: dict[str, Any], model: dict[str, Any], single_step: float | None) -> list[str]:
    stats = c["stats"]
    total = stats["total"]["mean"]
    top = top_level_stages(stats)
    bottleneck = max(top, key=lambda s: stats[s]["mean"], default=None)
    rows = []

    def row(stage: str, name: str, bold: bool = False) -> tuple[str, ...]:
        s = stats[stage]
        pct = f"{100 * s['mean'] / total:.1f}%" if total > 0 else "-"
        note = stage_note(stage, c, model)
        if stage == bottleneck:
            pct, note = f"**{pct}**", f"{note} (**bottleneck**)" if note else "**bottleneck**"
        cells = (name, _ms(s["mean"]), _ms(s["std"]), _ms(s["p50"]), _ms(s["p99"]), pct, note)
        return tuple(f"**{x}**" if bold and i < 2 else x for i, x in enumerate(cells))

    for stage in order_stages(stats):
        if stage == "total":
            continue
        parent = parent_stage(stage, stats)
        name = display_name(stage) if parent is None else f"&nbsp;&nbsp;{display_name(stage)}"
        rows.append(row(stage, name))
        if stage == "vision" and c["views"] > 1 and not any(parent_stage(s, stats) == "vision" for s in stats):
            rows.append(("&nbsp;&nbsp;Vision per view (derived)", _ms(stats["vision"]["mean"] / c["views"]), "-",
                         "-", "-", "-", f"vision / {c['views']}"))
        if stage == "denoise" and c["steps"] > 1 and not any(parent_stage(s, stats) == "denoise" for s in stats):
            rows.append(("&nbsp;&nbsp;Denoise per step (derived)", _ms(stats["denoise"]["mean"] / c["steps"]),
                         "-", "-", "-", "-", f"denoise / {c['steps']}"))
    t = stats["total"]
    rows.append(("**E2E Total**", f"**{_ms(t['mean'])}**", _ms(t["std"]), _ms(t["p50"]), _ms(t["p99"]), "100%",
                 f"**{c['hz']:.1f} Hz**; p99/p50 {c['p99_p50']:.3f}"
                 + (f"; {c['speedup']:.2f}x over the baseline" if c.get("speedup") else "")))
    lines = _table(("Component", "Time (ms)", "Std (ms)", "p50 (ms)", "p99 (ms)", "% of Total", "Notes"), rows)
    denoise = stats.get("denoise", {}).get("mean")
    if denoise is not None:
        lines += ["", "#### Denoise Analysis", ""]
        per_step_key = next((s for s in stats if s.startswith("denoise") and parent_stage(s, stats) == "denoise"
                             and "step" in s), None)
        # A measured 1-step run beats a runner's per-step figure, which may be denoise / steps.
        if single_step is not None:
            single, source = single_step, "the 1-step run"
        elif per_step_key:
            single, source = stats[per_step_key]["mean"], f"the runner's '{per_step_key}' stage"
        else:
            single, source = None, ""
        if single is not None:
            lines.append(f"- Single step: {single:.2f} ms (from {source})")
        lines.append(f"- {c['steps']} step{'s' if c['steps'] != 1 else ''} total: {denoise:.2f} ms")
        lines.append(f"- Per-step average: {denoise / c['steps']:.2f} ms")
        if single is not None and single > 0 and c["steps"] > 1:
            overhead = denoise - c["steps"] * single
            lines.append(f"- Loop overhead: {overhead:.2f} ms ({100 * overhead / denoise:.1f}%)")
    return lines


def _details(results: dict[str, Any]) -> list[str]:
    configs = _ok(results.get("configs", []))
    model = results.get("model", {})
    one_step = {(c["backend"], c["precision"], c["views"]): c["stats"].get("denoise", {}).get("mean")
                for c in configs if c["steps"] == 1}
    lines = []
    for steps in sorted({c["steps"] for c in configs}):
        lines += [f"## {_steps_title(steps)} - Detailed Breakdown", ""]
        at = sorted((c for c in configs if c["steps"] == steps),
                    key=lambda c: (c["views"], c["backend"] != "baseline", c["precision"]))
        for c in at:
            lines += [f"### {config_title(c)}", ""]
            lines += _detail_table(c, model, one_step.get((c["backend"], c["precision"], c["views"])))
            lines.append("")
        lines += ["---", ""]
    return lines


def _notes(results: dict[str, Any]) -> list[str]:
    lines = ["## Notes", ""]
    lines += [f"- {n}" for n in results.get("notes", [])]
    lines += [
        "- Method: each configuration runs `--warmup` untimed inferences, then `--iters` timed ones through "
        "`Policy.infer` (host uint8 images + state + prompt -> actions in host memory, robot units). "
        "Stage times are the runner's own; E2E Total is the host wall clock around the whole call, so it "
        "includes preprocessing (resize, tokenization) and postprocessing. Observations cycle through a few "
        "random images and states, so the prompt length varies slightly as it does on a robot.",
        "- Peak GPU memory is `torch.cuda.max_memory_allocated` over the configuration (warm-up included); it "
        "counts the model weights, the runner's buffers and quantized weights, and transient memory. Fast "
        "runners are built one at a time and freed before the next.",
        "",
    ]
    return lines


def _model(results: dict[str, Any]) -> list[str]:
    model = results.get("model", {})
    cfg = model.get("config")
    if not cfg:
        return []
    v, vlm, ex = cfg["vision"], cfg["vlm"], cfg["expert"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    params = model.get("parameters", {})

    def count(part: str) -> str:
        n = params.get(part)
        if not n:
            return ""
        return f", {n / 1e6:.0f}M params" if n >= 1e6 else f", {n / 1e3:.0f}K params"

    tree = [
        f"Pi05Model [{model.get('preset', '?')}]",
        f"├── Vision encoder (SigLIP){count('vision')}",
        f"│   ├── Input: {v['image_size']}x{v['image_size']}x3 per view, {patches} patch tokens each",
        f"│   └── {v['depth']} layers, width {v['width']}, MLP {v['mlp_dim']}, {v['num_heads']} heads",
        f"├── Prefix (Gemma){count('vlm')}: {vlm['depth']} layers, width {vlm['width']}, MLP {vlm['mlp_dim']}, "
        f"{vlm['num_heads']} heads / {vlm['num_kv_heads']} KV head, head dim {vlm['head_dim']}",
        f"│   └── Prompt up to {cfg['max_token_len']} tokens (task + discretized state)",
        f"└── Action expert (Gemma){count('expert')}: {ex['depth']} layers, width {ex['width']}, MLP "
        f"{ex['mlp_dim']}, adaRMS",
        f"    └── Horizon {cfg['action_horizon']} x action dim {cfg['action_dim']}, flow matching, Euler steps",
    ]
    return ["## Model Architecture Reference", "", "```", *tree, "```", ""]


def render_markdown(results: dict[str, Any], has_png: bool = True) -> str:
    summary = results.get("summary") or build_summary(results.get("configs", []))
    lines = _header(results)
    lines += _executive_summary(results)
    lines += _targets(results)
    lines += _setup(results)
    lines += _overview(results, has_png)
    lines += ["---", ""]
    lines += _details(results)
    lines += _notes(results)
    lines += _model(results)
    lines += _platform(results)
    lines += ["## Benchmark Data (JSON)", "", "```json", json.dumps(summary, indent=2), "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the chart


def _stack_value(config: dict[str, Any], stage: str) -> float:
    """The bar segment of `stage` in `config` (ms): top-level stages and the non-negative unattributed rest."""
    stats = config["stats"]
    if stage not in stats or (stage != UNATTRIBUTED and stage not in top_level_stages(stats)):
        return 0.0
    return max(stats[stage]["mean"], 0.0)


def plot_breakdown(results: dict[str, Any], path: Path) -> None:
    """Stacked bars of the top-level stages per configuration: one column per step count, baseline and fast
    side by side per view count. Rows: ms; ms of the fast runs alone (next to the baseline they are slivers),
    when both were measured; % of the total."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the GPU machine or in CI
    import matplotlib.pyplot as plt

    configs = _ok(results.get("configs", []))
    steps_list = sorted({c["steps"] for c in configs}) or [0]
    stages = order_stages(s for c in configs for s in top_level_stages(c["stats"]))
    if any(UNATTRIBUTED in c["stats"] for c in configs):
        stages.append(UNATTRIBUTED)
    # tab10 without its grey (kept for "unattributed"), then tab20's lighter shades.
    palette = [plt.get_cmap("tab10")(i) for i in range(10) if i != 7]
    palette += [plt.get_cmap("tab20")(i) for i in range(1, 20, 2) if i != 15]
    colors = {s: ("#bbbbbb" if s == UNATTRIBUTED else palette[i % len(palette)]) for i, s in enumerate(stages)}
    backends = {c["backend"] for c in configs}
    panels = [("ms (mean)", False, None)]
    if len(backends) > 1:
        panels.append(("ms (mean), fast only", False, "fast"))
    panels.append(("% of total", True, None))
    max_bars = max((sum(1 for c in configs if c["steps"] == s) for s in steps_list), default=1)
    fig, axes = plt.subplots(len(panels), len(steps_list), squeeze=False,
                             figsize=(max(6.0, 1.0 + len(steps_list) * (1.2 + 0.75 * max_bars)), 4.2 * len(panels)))
    for col, steps in enumerate(steps_list):
        for row, (ylabel, percent, only) in enumerate(panels):
            ax = axes[row][col]
            at = sorted((c for c in configs if c["steps"] == steps and only in (None, c["backend"])),
                        key=lambda c: (c["views"], c["backend"] != "baseline", c["precision"]))
            x = list(range(len(at)))
            bottoms = [0.0] * len(at)
            for s in stages:
                heights = []
                for c in at:
                    total = c["stats"]["total"]["mean"]
                    value = _stack_value(c, s)
                    heights.append(100 * value / total if percent and total > 0 else value)
                ax.bar(x, heights, bottom=bottoms, color=colors[s], label=display_name(s), width=0.6)
                bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
            if percent:
                ax.set_ylim(0, 105)
            else:
                for xi, c in zip(x, at, strict=True):
                    ax.annotate(f"{c['stats']['total']['mean']:.1f}", (xi, bottoms[xi]), ha="center", va="bottom",
                                fontsize=7, xytext=(0, 2), textcoords="offset points")
                ax.margins(y=0.12)
            if row == 0:
                ax.set_title(_steps_title(steps))
            ax.set_ylabel(ylabel)
            ax.set_xticks(x)
            ax.set_xticklabels([f"{c['views']}v\n{c['label'].replace(' ', chr(10), 1)}" for c in at], fontsize=7)
            ax.set_xlim(-0.6, max(len(at), 2) - 0.4)  # a lone bar keeps a bar's width
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4) or 1, fontsize=8, frameon=False)
    gpu = results.get("platform", {}).get("device_name", "")
    fig.suptitle(f"Pi0.5 stage breakdown per configuration ({gpu})", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ writing


def write_report(results: dict[str, Any], out_dir: Path, write_json: bool = True) -> dict[str, Path]:
    """Write report.md, breakdown.png (when matplotlib is importable) and results.json into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results.setdefault("summary", build_summary(results.get("configs", [])))
    written: dict[str, Path] = {}
    png = out_dir / "breakdown.png"
    try:
        plot_breakdown(results, png)
        written["png"] = png
    except ImportError as exc:  # matplotlib is an optional extra (pip install pi05_ros[bench])
        note = f"breakdown.png not drawn: {exc}; re-render with `pi05-bench --from-results results.json`"
        if note not in results.setdefault("notes", []):
            results["notes"].append(note)
    if write_json:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        written["json"] = out_dir / "results.json"
    (out_dir / "report.md").write_text(render_markdown(results, has_png="png" in written))
    written["md"] = out_dir / "report.md"
    return written
