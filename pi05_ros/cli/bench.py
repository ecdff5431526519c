"""pi05-bench: time the fast pipeline beside the reference baseline and write a latency report.

    pi05-bench                                   # GPU: full-size random weights, 2 views, steps 1/3/10, bf16+fp8
                                                 # CPU: the tiny preset, baseline only (it says so)
    pi05-bench --checkpoint DIR --tokenizer paligemma_tokenizer.model --views 1,2,3 --iters 1000
    pi05-bench --preset tiny --device cpu --steps 1,3 --iters 3 --warmup 1 --precision fp32   # CPU smoke run

For each (views, precision, steps) it runs the fast pipeline and, on the same loaded model, the plain PyTorch
reference in bf16 as the baseline; then writes report.md, breakdown.png and results.json into --out. A thin
shell over the engine: the model comes from Policy.load / Policy.demo, the fast runner from make_runner, the
statistics from engine/timing.py. See docs/benchmark_cli.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi05_ros.cli import int_in_range
from pi05_ros.cli.report import (
    UNATTRIBUTED,
    TargetsError,
    build_summary,
    evaluate_targets,
    is_aggregate,
    load_targets,
    order_stages,
    parent_stage,
    rounded,
    write_report,
)
from pi05_ros.engine.config import PRESETS
from pi05_ros.engine.errors import Pi05Error
from pi05_ros.engine.policy import Policy, fast_runner_unavailable, make_runner, resolve_device
from pi05_ros.engine.progress import progress_bar
from pi05_ros.engine.reference import Pi05Model, parameter_count
from pi05_ros.engine.timing import summarize

HEADLINE_VIEWS = 2  # the usual robot workload: two cameras
NUM_OBSERVATIONS = 8  # distinct observations cycled through, so the prompt (state) length varies as on a robot
# Realistic task words, all known to the demo tokenizer; repeated as needed to reach --prompt-tokens.
_TASK_WORDS = (
    "pick up the red cube and put it in the bowl then open the drawer and take out the spoon then move the arm "
    "to the left and close the gripper then stack the blocks and wipe the table then fold the towel and push "
    "the button then place the bottle on the shelf"
).split()


# ------------------------------------------------------------------------------------------ arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return list(dict.fromkeys(values))


# Pipeline options a precision may carry after '+', timed as a configuration of its own beside the plain one
# (`--precision fp8,fp8+unfused-mlp`). fused-mlp / unfused-mlp: the prefix MLP's GeGLU in its FP8 gate_up kernel
# (kernels/geglu.py; the default on Hopper) forced on / off; fp8-vision: SigLIP's MLP in FP8 too; fused-vision-mlp:
# that MLP with fc1's GELU in its FP8 kernel (implies fp8-vision; what fp8-vision takes on Hopper anyway);
# residual-carry / no-residual-carry: each layer's last residual add in the next layer's first norm
# (blocks.vision_layer) on (the default: the same as plain) / off.
PRECISION_OPTIONS: dict[str, dict[str, Any]] = {"fused-mlp": {"prefix_fused_mlp": True},
                                                "unfused-mlp": {"prefix_fused_mlp": False},
                                                "fp8-vision": {"fp8_vision": True},
                                                "fused-vision-mlp": {"fp8_vision": True, "vision_fused_mlp": True},
                                                "residual-carry": {"carry_residual": True},
                                                "no-residual-carry": {"carry_residual": False}}


FP8_ONLY_OPTIONS = ("fused-mlp", "unfused-mlp", "fp8-vision", "fused-vision-mlp")


def _precision_list(text: str) -> list[str]:
    values = _str_list(text)
    for value in values:
        base = value.split("+")[0]
        if base not in ("bf16", "fp8", "fp32"):
            raise argparse.ArgumentTypeError(f"unknown precision {base!r} in {value!r}; the fast pipeline runs bf16 "
                                             "or fp8 (fp32: the CPU's baseline only)")
        needs_fp8 = [name for name in value.split("+")[1:] if name in FP8_ONLY_OPTIONS]
        if base != "fp8" and needs_fp8:
            raise argparse.ArgumentTypeError(f"{value!r}: {'+'.join(needs_fp8)} are options of the fp8 pipeline; "
                                             "use fp8+...")
        unknown = [name for name in value.split("+")[1:] if name not in PRECISION_OPTIONS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown option {'+'.join(unknown)!r} in {value!r}; options: "
                                             f"{', '.join(PRECISION_OPTIONS)}")
    return values


def _pipeline_options(precision: str) -> tuple[str, dict[str, Any]]:
    """'fp8+fused-mlp' -> ('fp8', {'prefix_fused_mlp': True})."""
    base, *names = precision.split("+")
    options: dict[str, Any] = {}
    for name in names:
        options.update(PRECISION_OPTIONS[name])
    return base, options


def _str_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pi05-bench", description=__doc__.splitlines()[0])
    src = parser.add_argument_group("model (random full-size weights unless --checkpoint)")
    src.add_argument("--checkpoint", type=Path, help="openpi or LeRobot Pi0.5 checkpoint directory")
    src.add_argument("--tokenizer", type=Path, help="PaliGemma SentencePiece model (with --checkpoint)")
    src.add_argument("--norm-stats", default=None, help="norm_stats.json, LeRobot .safetensors or asset id")
    src.add_argument("--preset", default=None, choices=sorted(PRESETS),
                     help="config preset (default for random weights: pi05 on a GPU, tiny on the CPU; with "
                     "--checkpoint the base its config.json overlays)")
    src.add_argument("--seed", type=int_in_range(0), default=0, help="seed of weights, observations and noise (0)")
    run = parser.add_argument_group("what to time")
    run.add_argument("--views", type=_int_list, default=str(HEADLINE_VIEWS),
                     help="camera view counts, comma-separated (2)")
    run.add_argument("--steps", type=_int_list, default="1,3,10", help="denoise step counts (1,3,10)")
    run.add_argument("--precision", type=_precision_list, default="bf16,fp8",
                     help="fast pipeline precisions (bf16,fp8); options after fp8 ('+fused-mlp', '+unfused-mlp', "
                          "'+fp8-vision', '+fused-vision-mlp', '+residual-carry', '+no-residual-carry', combinable) "
                          "time that configuration too")
    run.add_argument("--prompt-tokens", type=int_in_range(1), default=48,
                     help="valid prompt tokens to aim for, discretized state included (48)")
    run.add_argument("--warmup", type=int, default=10,
                     help="untimed runs per configuration (10; at most 3 for the baseline)")
    run.add_argument("--iters", type=int, default=50, help="timed runs per fast configuration (50)")
    run.add_argument("--baseline-iters", type=int, default=None,
                     help="timed runs per baseline configuration (default: min(--iters, 50))")
    run.add_argument("--no-baseline", action="store_true", help="skip the reference baseline")
    run.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    run.add_argument("--calibration-data", type=Path, default=None,
                     help="folder of recorded observations (.npz) to calibrate FP8 on (default: synthetic ones)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("bench_out"), help="report folder (bench_out)")
    out.add_argument("--from-results", type=Path, default=None,
                     help="only re-render report.md and breakdown.png from this results.json")
    out.add_argument("--targets", type=Path, default=None,
                     help="a targets file (JSON, docs/benchmark_cli.md) to judge the run against in the report")
    args = parser.parse_args(argv)
    if args.checkpoint and not args.tokenizer:
        parser.error("--checkpoint needs --tokenizer (the PaliGemma SentencePiece model)")
    if not args.checkpoint and (args.tokenizer or args.norm_stats):
        parser.error("--tokenizer and --norm-stats go with --checkpoint (random weights use the demo tokenizer)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name a folder for the report")

    if args.warmup < 0 or args.iters < 1 or (args.baseline_iters is not None and args.baseline_iters < 1):
        parser.error("--warmup must be >= 0, --iters and --baseline-iters >= 1")
    if args.baseline_iters is None:
        # The baseline is 7-22x slower (docs/benchmarks.md); 50 runs pin its median well enough for the speed-up.
        args.baseline_iters = min(args.iters, 50)
    return args


# ------------------------------------------------------------------------------------------ inputs


def build_baseline_policy(args: argparse.Namespace, device: torch.device) -> tuple[Policy, dict[str, Any]]:
    """The baseline Policy (reference runner; bf16 on a GPU, fp32 on CPU) and what its setup took.

    Its model keeps the reference weights: the fast runners are built on the same model later."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    start = time.perf_counter()
    if args.checkpoint:
        policy = Policy.load(args.checkpoint, args.tokenizer, norm_stats=args.norm_stats, config_preset=args.preset,
                             device=str(device), precision=precision, seed=args.seed, runner="reference")
        what, source = "load checkpoint", str(args.checkpoint)
    else:
        policy = Policy.demo(device=str(device), precision=precision, seed=args.seed, preset=args.preset or "pi05",
                             runner="reference")
        what, source = "build random weights", "random weights (demo tokenizer)"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return policy, {"what": what, "seconds": time.perf_counter() - start, "source": source}


def build_prompt(policy: Policy, target_tokens: int, state: np.ndarray) -> tuple[str, int]:
    """A task prompt whose full tokenized form (with the discretized state) is closest to `target_tokens`."""
    target = min(target_tokens, policy.config.max_token_len)
    words = list(_TASK_WORDS)
    while len(words) < target:
        words += _TASK_WORDS
    best: tuple[int, str, int] | None = None
    for k in range(1, len(words) + 1):
        prompt = " ".join(words[:k])
        n = policy.prompt_tokens(prompt, state)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), prompt, n)
        if n >= target:
            break
    assert best is not None
    return best[1], min(best[2], policy.config.max_token_len)


def make_observations(policy: Policy, views: int, count: int, seed: int) -> list[tuple[dict[str, np.ndarray],
                                                                                     np.ndarray]]:
    """`count` random (images, state) pairs: uint8 frames at the model's size, states within the norm range."""
    rng = np.random.default_rng(seed)
    size = policy.config.vision.image_size
    stats = policy.norm_stats.state
    keys = policy.image_keys[:views]
    return [({k: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in keys},
             rng.uniform(stats.q01, stats.q99).astype(np.float32)) for _ in range(count)]


# ------------------------------------------------------------------------------------------ timing


class Progress:
    """Numbers the configurations ([3/8]) and shows one progress bar per configuration (engine/progress.py)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.title = ""

    def start(self, title: str, runs: int) -> Any:
        self.index += 1
        self.title = f"[{self.index}/{self.total}] {title}"
        return progress_bar(runs, self.title, unit="run", leave=False)

    def finish(self, message: str) -> None:
        print(f"{self.title}  {message}", file=sys.stderr, flush=True)


def _top_level(keys: tuple[str, ...], cache: dict[tuple[str, ...], list[str]]) -> list[str]:
    if keys not in cache:
        cache[keys] = [k for k in keys if not is_aggregate(k) and parent_stage(k, keys) is None]
    return cache[keys]


def time_config(policy: Policy, observations: list[tuple[dict[str, np.ndarray], np.ndarray]], prompt: str,
                steps: int, warmup: int, iters: int, bar: Any) -> dict[str, Any]:
    """Warm up, then time `iters` inferences; per-stage samples, statistics and peak GPU memory."""
    device = policy.model.device
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    first_ms = None
    for i in range(warmup):
        images, state = observations[i % len(observations)]
        chunk = policy.infer(images, state, prompt, num_steps=steps)
        first_ms = chunk.timings["total"] if first_ms is None else first_ms
        bar.set_postfix_str(f"warm-up, last {chunk.timings['total']:.2f} ms", refresh=False)
        bar.update()
    samples: dict[str, list[float]] = {}
    tokens = []
    split_cache: dict[tuple[str, ...], list[str]] = {}
    for i in range(iters):
        images, state = observations[i % len(observations)]
        chunk = policy.infer(images, state, prompt, num_steps=steps)
        timings = chunk.timings
        for stage, ms in timings.items():
            samples.setdefault(stage, []).append(float(ms))
        # What no stage accounts for (host overhead, the reference's device->host copy).
        top = _top_level(tuple(timings), split_cache)
        samples.setdefault(UNATTRIBUTED, []).append(timings["total"] - sum(timings[k] for k in top))
        tokens.append(chunk.num_prompt_tokens)
        first_ms = timings["total"] if first_ms is None else first_ms
        bar.set_postfix_str(f"timing, last {timings['total']:.2f} ms", refresh=False)
        bar.update()
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    stats = {stage: rounded(summarize(values)) for stage, values in samples.items()}
    stats = {stage: stats[stage] for stage in order_stages(stats)}
    total = stats["total"]
    return {
        "iters": iters, "warmup": warmup, "first_call_ms": first_ms,
        "stats": stats, "hz": 1e3 / total["mean"], "p99_p50": total["p99"] / total["p50"],
        "peak_mem_gb": peak, "prompt_tokens": float(np.mean(tokens)),
        "samples": {stage: [round(v, 5) for v in values] for stage, values in samples.items()},
    }


# ------------------------------------------------------------------------------------------ platform


def _command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def collect_platform(device: torch.device) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]
    # PI05_GIT_COMMIT names the commit of a copied tree whose .git is absent or stale (a GPU machine that
    # receives the working tree's files); it wins over what git says there.
    commit = os.environ.get("PI05_GIT_COMMIT")
    if not commit:
        commit = _command_output(["git", "rev-parse", "--short", "HEAD"], cwd=repo)
        if commit and _command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo):
            commit += " (uncommitted changes)"
    info: dict[str, Any] = {
        "torch": torch.__version__, "triton": _version("triton"), "numpy": np.__version__,
        "python": platform.python_version(), "os": platform.platform(), "cpu": _cpu_name(),
        "git_commit": commit or "unknown", "cuda": torch.version.cuda or "none", "cudnn": "none",
        "driver": "none", "device_name": "CPU", "device_detail": _cpu_name(),
        "compute_capability": "-", "device_memory": "-",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                                  f"--id={device.index or 0}"])
        info.update(
            device_name=props.name, compute_capability=f"SM {props.major}.{props.minor}",
            device_memory=f"{props.total_memory / 2**30:.1f} GiB", driver=driver or "unknown",
            cudnn=str(torch.backends.cudnn.version()),
        )
        info["device_detail"] = (f"{info['compute_capability']}, driver {info['driver']}, CUDA {info['cuda']}, "
                                 f"torch {info['torch']}")
    return info


# ------------------------------------------------------------------------------------------ the run


def _config_entry(backend: str, runner_name: str, precision: str, views: int, steps: int) -> dict[str, Any]:
    label = f"baseline {precision}" if backend == "baseline" else f"fast {precision}"
    return {"id": f"{backend}-{precision}/{views}v/{steps}steps", "backend": backend, "label": label,
            "runner": runner_name, "precision": precision, "views": views, "steps": steps}


def _free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_plan(policy: Policy, backend: str, precision: str, args: argparse.Namespace, iters: int, warmup: int,
              observations: dict[int, list], prompt: str, progress: Progress,
              results: dict[str, Any]) -> bool:
    """Time every (views, steps) configuration on `policy`. False when one failed."""
    ok = True
    for views in args.views:
        for steps in args.steps:
            entry = _config_entry(backend, policy.runner.name, precision, views, steps)
            t0 = time.perf_counter()
            try:
                with progress.start(f"{entry['label']}, {views} view(s), {steps} step(s)", warmup + iters) as bar:
                    entry.update(time_config(policy, observations[views], prompt, steps, warmup, iters, bar))
                # after the runs: a fused-kernel build failure would have fallen back to the torch path
                if getattr(policy.runner, "expert_path", None):
                    entry["expert_path"] = policy.runner.expert_path
            except Exception as exc:  # keep going: one bad config, not a lost run
                traceback.print_exc()
                entry.update(status="failed", note=f"{type(exc).__name__}: {exc}")
                results["notes"].append(f"{entry['label']}, {views} view(s), {steps} step(s) failed: "
                                        f"{type(exc).__name__}: {exc}")
                progress.finish(f"FAILED: {exc}")
                results["configs"].append(entry)
                ok = False
                _free_cuda()
                continue
            entry["status"] = "ok"
            results["configs"].append(entry)
            t = entry["stats"]["total"]
            progress.finish(f"{iters} runs: mean {t['mean']:.2f} ms, p50 {t['p50']:.2f}, p99 {t['p99']:.2f} "
                            f"({time.perf_counter() - t0:.1f} s)")
    return ok


def _add_speedups(configs: list[dict[str, Any]]) -> None:
    base = {(c["views"], c["steps"]): c for c in configs if c["backend"] == "baseline" and c["status"] == "ok"}
    for c in configs:
        if c["status"] != "ok":
            continue
        b = base.get((c["views"], c["steps"]))
        c["speedup"] = b["stats"]["total"]["p50"] / c["stats"]["total"]["p50"] if b and c is not b else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        targets = load_targets(args.targets) if args.targets else None
    except TargetsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.from_results:
        try:
            results = json.loads(args.from_results.read_text())
            if not isinstance(results, dict) or "configs" not in results:
                raise ValueError("not a pi05-bench results.json (no 'configs')")
        except (OSError, ValueError) as exc:
            print(f"error: --from-results {args.from_results}: {exc}", file=sys.stderr)
            return 2
        if targets is not None:
            results["targets"] = evaluate_targets(results, targets)
            results["targets_title"] = targets.get("title", str(args.targets))
        written = write_report(results, args.out, write_json=False)
        print("wrote " + ", ".join(str(p) for p in written.values()))
        return 0
    try:  # before anything runs: a report that cannot be written would lose the whole run
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".pi05-bench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        print(f"error: --out {args.out} cannot be written: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
    except Pi05Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if device.type == "cuda" and any(p.split("+")[0] == "fp32" for p in args.precision):
        print("error: --precision fp32: the fast pipeline runs bf16 or fp8 (the baseline is the bf16 reference "
              "on a GPU)", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.checkpoint and args.preset is None:
        # The full-size model in fp32 on a CPU takes about a minute to build and minutes per inference.
        args.preset = "tiny"
        print("pi05-bench: no CUDA GPU, so the tiny preset runs on the CPU (baseline only); "
              "--preset pi05 times the full-size model there (slow)", file=sys.stderr)
    torch.manual_seed(args.seed)
    results: dict[str, Any] = {
        "schema": 1, "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["pi05-bench", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "headline_views": HEADLINE_VIEWS, "platform": collect_platform(device),
        "configs": [], "notes": [], "setup": {"runners": {}},
    }
    print(f"pi05-bench on {results['platform']['device_name']}: building the model ...", file=sys.stderr, flush=True)
    try:
        policy, setup = build_baseline_policy(args, device)
    except Pi05Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    model = policy.model
    results["setup"]["model"] = {"what": setup["what"], "seconds": setup["seconds"], "gpu_gb": _gpu_gb(device)}
    max_views = len(policy.image_keys)
    bad_views = [v for v in args.views if v > max_views]
    if bad_views:
        print(f"error: --views {bad_views} exceeds this model's {max_views} camera slots", file=sys.stderr)
        return 2
    observations = {v: make_observations(policy, v, NUM_OBSERVATIONS, args.seed) for v in args.views}
    prompt, n_tokens = build_prompt(policy, args.prompt_tokens, observations[args.views[0]][0][1])
    results["prompt"] = {"text": prompt, "tokens": n_tokens, "target": args.prompt_tokens}
    results["model"] = {
        "preset": model.cfg.name, "source": setup["source"], "dtype": str(model.compute_dtype).replace("torch.", ""),
        "config": _config_dict(model),
        "parameters": {part: parameter_count(getattr(model, part)) for part in ("vision", "vlm", "expert")},
    }
    print(f"  {setup['what']}: {setup['seconds']:.1f} s; prompt {n_tokens} tokens: {prompt!r}", file=sys.stderr)

    # Whether the fast pipeline can run at all decides the progress count up front.
    fast_reason = fast_runner_unavailable(device)
    if fast_reason:
        fast_reason = f"fast pipeline unavailable: {fast_reason}"
        results["notes"].append(fast_reason + " (only the baseline was measured)")
    per_backend = len(args.views) * len(args.steps)
    total = (0 if args.no_baseline else per_backend) + (0 if fast_reason else per_backend * len(args.precision))
    progress = Progress(total)
    all_ok = True
    try:
        if not args.no_baseline:
            all_ok &= _run_plan(policy, "baseline", policy.precision, args, args.baseline_iters,
                                min(args.warmup, 3), observations, prompt, progress, results)
        else:
            results["notes"].append("baseline skipped (--no-baseline): no speed-up figures")
        if fast_reason:
            print(f"  skipped fast configurations: {fast_reason}", file=sys.stderr, flush=True)
        else:
            for precision in args.precision:
                all_ok &= _run_fast(policy, precision, args, observations, prompt, progress, results)
    except KeyboardInterrupt:
        results["notes"].append("interrupted (Ctrl-C): the report covers the configurations that finished")
        print("\ninterrupted: writing the report of what finished", file=sys.stderr)
        all_ok = False
    _add_speedups(results["configs"])
    results["summary"] = build_summary(results["configs"])
    if targets is not None:
        results["targets"] = evaluate_targets(results, targets)
        results["targets_title"] = targets.get("title", str(args.targets))
    written = write_report(results, args.out)
    print("wrote " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    return 0 if all_ok else 1


def _run_fast(policy: Policy, precision: str, args: argparse.Namespace, observations: dict[int, list],
              prompt: str, progress: Progress, results: dict[str, Any]) -> bool:
    """Build one fast runner on the baseline's model, time its configurations, free it (so peak memory is this
    runner's alone)."""
    recorded = None
    if args.calibration_data:
        def recorded() -> list:
            return policy.recorded_observations(args.calibration_data)

    print(f"building the fast pipeline ({precision}) ...", file=sys.stderr, flush=True)
    _free_cuda()
    device = policy.model.device
    held_before = _gpu_gb(device)
    start = time.perf_counter()
    try:
        # No scales file: every run calibrates FP8 afresh, so the setup times include calibration.
        base, options = _pipeline_options(precision)
        runner = make_runner(policy.model, base, "fast", keep_reference=True,
                             calibration_observations=recorded, max_views=max(args.views), **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a build failure of one precision must not lose the others
        traceback.print_exc()
        results["notes"].append(f"fast pipeline {precision} failed to build: {type(exc).__name__}: {exc}")
        progress.total -= len(args.views) * len(args.steps)
        return False
    build_s = time.perf_counter() - start
    gc.collect()  # what the build allocated and still holds, not its garbage
    held = _gpu_gb(device)
    runner_gb = held - held_before if held is not None and held_before is not None else None
    at_build = dict(getattr(runner, "setup_times", {}) or {})
    actual = str(getattr(runner, "precision", base))
    label = precision
    if actual != base:  # e.g. fp8 on a GPU without e4m3: never report such runs as fp8
        label = f"{precision}-as-{actual}"
        results["notes"].append(f"fast pipeline asked for {precision} runs {actual} on this GPU (labelled {label})")
    fast_policy = policy.with_runner(runner, precision=actual)
    print(f"  built in {build_s:.1f} s; setup {_fmt_times(at_build)}", file=sys.stderr)
    try:
        ok = _run_plan(fast_policy, "fast", label, args, args.iters, args.warmup, observations, prompt, progress,
                       results)
    finally:
        final = dict(getattr(runner, "setup_times", {}) or {})
        # Steps the runner records after its build (graphs captured on first use of a step count) add to setup.
        lazy = sum(max(final[k] - at_build.get(k, 0.0), 0.0) for k in final)
        results["setup"]["runners"][label] = {
            "runner": runner.name, "expert_path": getattr(runner, "expert_path", None), "build_s": build_s,
            "gpu_gb": runner_gb,
            "setup_times_at_build": at_build, "setup_times": final,
            "lazy_s": lazy, "total_s": results["setup"]["model"]["seconds"] + build_s + lazy,
        }
        del fast_policy, runner
        _free_cuda()
    return ok


def _gpu_gb(device: torch.device) -> float | None:
    """GPU memory allocated now (GB), or None off CUDA."""
    return torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _fmt_times(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) or "not reported"


def _config_dict(model: Pi05Model) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(model.cfg), default=str))


if __name__ == "__main__":
    sys.exit(main())
