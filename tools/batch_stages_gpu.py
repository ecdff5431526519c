"""Where a batch's time goes on the fast path: stage times of `run_batch` for each batch bucket, no server.

    PYTHONPATH=. python3 tools/batch_stages_gpu.py [--precision fp8] [--steps 10] [--views 2] [--iters 50]
        [--buckets 1,2,4,8] [--expert-kernels auto|on|off] [--attention auto|gemm|sdpa|flash] [--variants [WORDS]]
        [--profile B]

The full-size random-weight demo model, sized for batches of up to 8 as pi05-serve builds it; B copies of one
prepared observation (2 views, a 6-word prompt) per batch. Prints a table per bucket (median stage times, ms, and
the wall time of the call) and writes it as JSON to $OUT/batch_stages[_<expert kernels>].json (--expert-kernels on:
batches denoise on the fused kernels, auto: on the torch path, as pi05-serve does). --variants times the largest bucket
again on fresh pipelines: more linears in FP8, SDPA attention, inductor's max-autotune, SigLIP layers with fc1's GELU
in a cuBLASLt epilogue or another attention call; each beside a baseline built the same way, with its actions'
relative L2 difference from the baseline's (FP8 fidelity against float32 is in docs/benchmarks.md; WORDS, comma
separated, keeps the variants whose names contain one of them; --device cpu runs the CPU-able ones on the tiny model
in bf16 without graphs, to check the tool);
--profile B writes the kernel table of batches of B to $OUT/profile_B.txt. Results feed docs/benchmarks.md
(issue 9: which stage grows with the batch).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch

from pi05_ros.engine.policy import Policy

STAGES = ("host_staging", "host_copy_in", "vision", "prefill_kv", "denoise", "host_copy_out")


def time_batches(runner, prepared: list, steps: int, iters: int) -> dict:
    """Median stage times (and wall p99) of `iters` calls of run_batch, after 5 that capture and warm."""
    for _ in range(5):
        runner.run_batch(prepared, steps)
    samples: dict[str, list[float]] = {name: [] for name in (*STAGES, "wall")}
    for _ in range(iters):
        start = time.perf_counter()
        _, timings = runner.run_batch(prepared, steps)
        samples["wall"].append((time.perf_counter() - start) * 1e3)
        for name in STAGES:
            samples[name].append(timings.get(name, float("nan")))  # the reference runner has fewer stages
    row = {"batch": len(prepared), "path": getattr(runner, "path_for", lambda _: "reference")(len(prepared)),
           **{name: float(np.median(values)) for name, values in samples.items()},
           "wall_p99": float(np.percentile(samples["wall"], 99))}
    row["per_row_ms"] = row["wall"] / len(prepared)
    return row


# --- vision-layer variants, timed here before any of them goes into blocks.py (the profile of a batch of 8 on an
# H100, docs/benchmarks.md §51: per SigLIP layer, a GELU kernel over fc1's output ~25 us and an ATen strided copy
# ~30 us beside cuDNN's attention). fc1's GELU in the cuBLASLt epilogue paid (§56) and is now blocks.vision_layer's.


def vision_layer_variant(gelu_epilogue: bool = True, attention: str = "sdpa"):
    """blocks.vision_layer, with fc1's GELU as a kernel of its own (gelu_epilogue=False: the layer before §56) and/or
    another attention call: "flash" (FlashAttention-2 through ATen, CUDA only), "contiguous" (q, k, v copied by
    inductor's kernel before SDPA)."""
    from pi05_ros.engine.fast import blocks

    def layer(x, qkv, out, fc1, fc2, num_heads, eps, linear_fn=blocks.linear, carry=None,  # noqa: ANN001, ANN202
              defer=False):
        if carry is not None:  # blocks.vision_layer's residual carry
            x = x + carry.float()
        b, n, width = x.shape
        h = torch.nn.functional.layer_norm(x, (width,), eps=eps)
        q, k, v = linear_fn(h, qkv).view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        if attention == "flash":
            attn = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        elif attention == "contiguous":
            attn = torch.nn.functional.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        else:
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + linear_fn(attn.transpose(1, 2).reshape(b, n, width), out).float()
        h = torch.nn.functional.layer_norm(x, (width,), eps=eps)
        if gelu_epilogue:
            hidden = blocks._mlp_hidden(h, fc1, linear_fn)
        else:
            hidden = torch.nn.functional.gelu(linear_fn(h, fc1), approximate="tanh")
        y = linear_fn(hidden, fc2)
        return (x, y) if defer else x + y.float()

    return layer


PREFIX_MLP_UNFUSED = "prefix MLP: two FP8 GEMMs and a GeGLU kernel (the default before §70)"
NO_CARRY = "residual carry off: each layer adds its own residual (before §70)"
SKIP_WALK = "flash prefill skip walk (before §70)"
VISION_MLP_FUSED = "fp8 prefix MLP + SigLIP MLP, fc1 GELU in its FP8 kernel"
# the opt-in options together (FP8 beyond the default layers: over the plain fp8 budget, docs/benchmarks.md §70), with
# SigLIP's MLP fused as fp8_vision takes it on Hopper
ALL_OPTIONS = "all options: fp8 prefix all + SigLIP MLP fused"
INDUCTOR_PDL = "inductor PDL"
INDUCTOR_TUNING = "inductor coordinate descent"


def variants(policy: Policy, prepared: list, steps: int, iters: int, words: str,
             on_row: Callable[[dict], None]) -> None:
    """The same batch on pipelines with more linears in FP8, another attention, layers compiled with inductor's
    GEMM autotuning, another vision layer, or one of the defaults off; `on_row(row)` for each as it is timed. Each
    runs on a fresh random model with the same seed, after a "baseline" pipeline built the same way (the pipeline's
    defaults): each row's actions are compared with the baseline's (speed is the question; FP8 fidelity against the
    float32 reference is in docs/benchmarks.md)."""
    from pi05_ros.engine.fast.kernels import attention as flash_attention
    from pi05_ros.engine.fast.pipeline import FP8_DEFAULT_LAYERS

    device = torch.device(policy.device)
    cuda = device.type == "cuda"  # elsewhere: bf16 without graphs, to check the tool and the variants' agreement
    expert_fp8 = (*FP8_DEFAULT_LAYERS, "expert_blocks.*.qkv", "expert_blocks.*.down")
    baseline = None
    walk_default = flash_attention.KEY_WALK
    default = FP8_DEFAULT_LAYERS
    # name, FP8 linears, FP8 SigLIP MLP, attention, stacks compiled with max-autotune, layer functions replaced,
    # Pi05Pipeline options (and "walk": the flash kernel's KEY_WALK)
    for name, layers, vision, attention, autotune, replaced, options in (
            ("baseline (a fresh model, as the variants)", default, False, "auto", (), {}, {}),
            # second: the row a short run must not lose
            (ALL_OPTIONS, ("prefix_blocks.*",), True, "auto", (), {}, {"vision_fused_mlp": True}),
            ("fp8 prefix all linears", ("prefix_blocks.*",), False, "auto", (), {}, {}),
            # SigLIP's FP8 MLP with fc1's bias, GELU and fc2's input quantization in one kernel (kernels/geglu.py; what
            # fp8_vision takes on Hopper), against its two FP8 GEMMs and the baseline (bf16 fc1 + GELU epilogue)
            (VISION_MLP_FUSED, default, True, "auto", (), {}, {"vision_fused_mlp": True}),
            ("fp8 prefix MLP + SigLIP MLP, two FP8 GEMMs", default, True, "auto", (), {}, {"vision_fused_mlp": False}),
            ("fp8 prefix all + SigLIP MLP, two FP8 GEMMs", ("prefix_blocks.*",), True, "auto", (), {},
             {"vision_fused_mlp": False}),
            ("SDPA attention (cuDNN)", default, False, "sdpa", (), {}, {}),
            # FP8 in the expert: qkv + down is within the 3e-2 budget in the CPU emulation (§19), all of it is not
            ("fp8 prefix MLP + expert qkv, down", expert_fp8, False, "auto", (), {}, {}),
            ("fp8 prefix MLP + expert all", (*default, "expert_blocks.*"), False, "auto", (), {}, {}),
            # inductor's max-autotune: Triton GEMM templates against cuBLAS per shape, pointwise epilogues fused
            # into the winners (the expert's GEMMs at M = 400 take cuBLAS tiles at 190-370 TFLOP/s, §51)
            ("expert layers max-autotune", default, False, "auto", ("expert",), {}, {}),
            ("vision + expert layers max-autotune", default, False, "auto", ("vision", "expert"), {}, {}),
            ("vision fc1 GELU as its own kernel (before §56)", default, False, "auto", (),
             {"vision": vision_layer_variant(gelu_epilogue=False)}, {}),
            ("vision attention FlashAttention-2", default, False, "auto", (),
             {"vision": vision_layer_variant(attention="flash")}, {}),
            ("vision attention q/k/v contiguous", default, False, "auto", (),
             {"vision": vision_layer_variant(attention="contiguous")}, {}),
            # the defaults of §70, each off: the prefix MLP's fused FP8 gate_up + GeGLU kernel, the residual carry,
            # the flash prefill's walk over the mask's runs
            (PREFIX_MLP_UNFUSED, default, False, "auto", (), {}, {"prefix_fused_mlp": False}),
            (NO_CARRY, default, False, "auto", (), {}, {"carry_residual": False}),
            (SKIP_WALK, default, False, "auto", (), {}, {"walk": "skip"}),
            # both stacks on the flash kernel, either walk
            ("flash attention, skip walk", default, False, "flash", (), {}, {"walk": "skip"}),
            ("flash attention, runs walk", default, False, "flash", (), {}, {"walk": "runs"}),
            # inductor options for the compiled stacks (vision, prefix, expert): programmatic dependent launch on its
            # Triton kernels (each waits in-kernel for its predecessor, so its launch and prologue overlap the
            # predecessor's tail; cuBLAS's GEMMs between them are launched without it), and coordinate-descent
            # tuning of the pointwise and reduction kernels' block sizes
            (INDUCTOR_PDL, default, False, "auto", (), {}, {"inductor": {"triton.enable_pdl": True}}),
            (INDUCTOR_TUNING, default, False, "auto", (), {}, {"inductor": {"coordinate_descent_tuning": True}}),
            (INDUCTOR_PDL + " + " + INDUCTOR_TUNING, default, False, "auto", (), {},
             {"inductor": {"triton.enable_pdl": True, "coordinate_descent_tuning": True}}),
            # last: a max-autotune compile of a stack can take minutes (§15: 294 s)
            ("prefix layers max-autotune", default, False, "auto", ("prefix",), {}, {})):
        if baseline is not None and words and not any(word in name for word in words.split(",")):
            continue
        if not cuda and ("FlashAttention" in name or autotune or "flash" in name or "walk" in options
                         or "inductor" in options
                         or "prefix_fused_mlp" in options):
            continue  # CUDA only (the Triton kernels run on the CPU only interpreted); the CPU run checks the rest
        fp8_only = name.startswith("fp8") or name == ALL_OPTIONS or "prefix_fused_mlp" in options
        if fp8_only and policy.precision != "fp8":
            continue  # its FP8 linears would run in bf16 under an FP8 name (or it would equal the baseline)
        options = dict(options)
        # read when the attention op launches, i.e. when this pipeline's graphs are captured below
        flash_attention.KEY_WALK = options.pop("walk", walk_default)
        try:
            actions, row = _time_variant(name, layers, vision, attention, autotune, replaced, options, policy,
                                         prepared, steps, iters)
        except Exception as error:  # noqa: BLE001 - one variant's failure (a kernel that does not compile or
            # launch on this card) must not cost the rows after it: device time is scarce
            traceback.print_exc()  # the whole of it in the log; the row keeps its first line for the table
            first_line = (str(error).strip().splitlines() or [""])[0].replace("|", "/")
            row = {"variant": name, "error": f"{type(error).__name__}: {first_line}"[:300]}
            print(json.dumps(row), flush=True)
            on_row(row)
            if baseline is None:
                raise  # nothing to compare the others with
            if cuda and not _cuda_usable():
                print("the CUDA context is unusable after that failure: no further variants", flush=True)
                return
            continue
        finally:
            flash_attention.KEY_WALK = walk_default
            gc.collect()  # a failed variant's pipeline may sit in reference cycles: free it before the next one
            if cuda:
                torch.cuda.empty_cache()
        if baseline is None:
            baseline = actions
        row["rel_l2_vs_baseline"] = float(np.linalg.norm(actions - baseline) / max(np.linalg.norm(baseline), 1e-12))
        print(json.dumps(row), flush=True)
        on_row(row)  # written as it comes: a step cut off by its time limit keeps the rows it finished


def _cuda_usable() -> bool:
    """Whether CUDA still runs work after a failed variant (an illegal address poisons the context for good)."""
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the same: stop
        return False


def _time_variant(name: str, layers: tuple[str, ...], vision: bool, attention: str, autotune: tuple[str, ...],
                  replaced: dict, options: dict, policy: Policy, prepared: list, steps: int,
                  iters: int) -> tuple[np.ndarray, dict]:
    """One variant's pipeline on a fresh random model: its first call's actions and its timing row."""
    from pi05_ros.engine.demo import random_model
    from pi05_ros.engine.fast import blocks
    from pi05_ros.engine.fast.pipeline import Pi05Pipeline

    device = torch.device(policy.device)
    cuda = device.type == "cuda"
    # Dynamo keeps compiled layers per function across pipelines: a variant whose inputs pass an earlier one's guards
    # would run the earlier one's kernels (§72: a dynamic-shape entry served a static variant, 2 ms slower). Each
    # variant compiles its own (inductor's on-disk cache keeps that quick).
    torch._dynamo.reset()
    inductor = options.pop("inductor", None)
    model = random_model(policy.config, seed=0, device=device, dtype=torch.bfloat16)
    pipe = Pi05Pipeline(model, policy.precision if cuda else "bf16", fp8_layers=layers, fp8_vision=vision,
                        attention=attention, max_batch=len(prepared), release_reference=True, use_graphs=cuda,
                        **options)
    del model
    if inductor:  # the stacks compiled with these inductor options (an unknown option fails here, by name)
        known = torch._inductor.config.get_config_copy()
        unknown = [key for key in inductor if key not in known]
        if unknown:
            raise ValueError(f"inductor in torch {torch.__version__} has no option {unknown}")
        for stack in ("vision", "prefix", "expert"):
            setattr(pipe.fast, f"_{stack}_layer", torch.compile(getattr(blocks, f"{stack}_layer"),
                                                                dynamic=None if stack == "prefix" else False,
                                                                options=dict(inductor)))
    for stack in autotune:  # replaces compile()'s function before anything is compiled or captured
        setattr(pipe.fast, f"_{stack}_layer", torch.compile(getattr(blocks, f"{stack}_layer"),
                                                            dynamic=None if stack == "prefix" else False,
                                                            mode="max-autotune-no-cudagraphs"))
    for stack, layer in replaced.items():
        setattr(pipe.fast, f"_{stack}_layer", torch.compile(layer, dynamic=False))
    start = time.perf_counter()
    actions, _ = pipe.run_batch(prepared, steps)  # compiles (and autotunes) this bucket's stages, captures graphs
    first_call_s = time.perf_counter() - start
    return actions, {"variant": name, "first_call_s": first_call_s, **time_batches(pipe, prepared, steps, iters)}


def profile(runner, prepared: list, steps: int, path: str) -> None:
    """Kernel time of 5 batches (CUDA graph replays included), by kernel, largest first; then each stage's graph
    of this batch size alone (20 replays; the denoise step's once per step), so the denoise loop's kernels are not
    mixed with the prefill's."""
    from torch.profiler import ProfilerActivity

    def table(fn, count: int) -> str:
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(count):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)

    runner.run_batch(prepared, steps)
    text = "## 5 whole batches\n" + table(lambda: runner.run_batch(prepared, steps), 5)
    for key, graph in getattr(runner, "_graphs", {}).items():
        if key[-1] != len(prepared):  # every stage key ends with its batch size
            continue
        count = 20
        if key[0] == "denoise_step":  # each replay moves the step table on: stay within this schedule's steps
            runner._tables[key[2]].index.zero_()
            count = steps
        text += f"\n## {key}: {count} replays\n" + table(graph.replay, count)
    with open(path, "w") as f:
        f.write(text)
    print(text[:20000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--buckets", default="1,2,4,8")
    parser.add_argument("--variants", nargs="?", const="", default=None, metavar="WORDS",
                        help="also time variants at the largest bucket, each beside a same-seed baseline: more FP8 "
                             "linears (prefix, SigLIP MLP, expert), SDPA attention, inductor's max-autotune on the "
                             "expert, vision or prefix layers, SigLIP layers with fc1's GELU in a cuBLASLt epilogue or "
                             "FlashAttention-2 or contiguous q/k/v; WORDS (comma separated) keeps those whose names "
                             "contain one")
    parser.add_argument("--profile", type=int, default=0, metavar="B",
                        help="also profile 5 batches of B (torch profiler): kernel table to $OUT/profile_B.txt")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu checks the tool on the tiny model")
    parser.add_argument("--expert-kernels", default="auto", choices=("auto", "on", "off"),
                        help="the pipeline's expert_kernels (on: batches of 2+ on the fused kernels too)")
    parser.add_argument("--attention", choices=("auto", "gemm", "sdpa", "flash"), default=None,
                        help="the pipeline's attention (default: its own, auto); set before any capture")
    args = parser.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    out = os.environ.get("OUT", "/tmp")
    policy = Policy.demo(device=args.device, precision=args.precision, max_batch=max(buckets),
                         expert_kernels=args.expert_kernels)
    runner = policy.runner
    if args.attention is not None:  # read when a stage is first made; nothing is compiled or captured yet
        runner.attention = args.attention
        if args.attention != "auto":
            runner.fast.prefix_attention = runner.fast.expert_attention = args.attention
    rng = np.random.default_rng(0)
    size = policy.config.vision.image_size
    images = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in policy.image_keys[:args.views]}
    state = rng.uniform(-1, 1, policy.state_dim).astype(np.float32)
    obs = policy.prepare(images, state, "pick up the cup and place it")
    attention = getattr(runner, "attention", "-")  # the runner may be gone by the table (--variants frees it)
    name = "batch_stages.json" if args.expert_kernels == "auto" else f"batch_stages_{args.expert_kernels}.json"
    if args.attention is not None:
        name = name.replace(".json", f"_{args.attention}.json")
    if args.variants:  # one file per selection and batch: a session runs several
        selection = re.sub(r"[^a-z0-9]+", "-", args.variants.lower()).strip("-")
        name = name.replace(".json", f"_{selection}_b{max(buckets)}.json")
    rows: list[dict] = []

    def save() -> None:
        with open(os.path.join(out, name), "w") as f:
            json.dump({"precision": args.precision, "steps": args.steps, "views": args.views,
                       "expert_kernels": args.expert_kernels, "attention": attention, "rows": rows}, f, indent=1)

    for batch in buckets:
        row = {"variant": "default", **time_batches(runner, [obs] * batch, args.steps, args.iters)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    save()
    if args.profile:
        profile(runner, [obs] * args.profile, args.steps, os.path.join(out, f"profile_{args.profile}.txt"))
    if args.variants is not None:
        del runner
        policy.runner = None
        torch.cuda.empty_cache()
        def add(row: dict) -> None:
            rows.append(row)
            save()

        variants(policy, [obs] * max(buckets), args.steps, args.iters, args.variants, on_row=add)
    header = ("variant", "batch", "path", *STAGES, "wall", "wall_p99", "per_row_ms", "rel_l2_vs_baseline",
              *(("error",) if any("error" in row for row in rows) else ()))
    print(f"\n{args.precision}, {args.steps} steps, {args.views} views, expert_kernels={args.expert_kernels}, "
          f"attention={attention}, "
          f"median of {args.iters} (ms)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row.get(h, "-") for h in header]
        print("| " + " | ".join(str(c) if isinstance(c, (int, str)) else f"{c:.3g}" if abs(c) < 0.01 else f"{c:.2f}"
                                for c in cells) + " |")


if __name__ == "__main__":
    main()
