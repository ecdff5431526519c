"""The attention of Pi0.5's Gemma layers alone, each way the fast path can run it, at the prefill's and the denoise
step's shapes: time and error.

    PYTHONPATH=. python3 tools/attention_gpu.py [--batches 1,2,4,8] [--iters 200] [--sweep]
        [--tokens 528] [--cache-rows 0] [--input-sets 1]

One K/V head of 256, 8 query heads, at the pipeline's shapes (see `shapes`); each row has its own valid prefix
length. Ways: "gemm" (torch.compile'd GEMM -> masked softmax -> GEMM, the default), "sdpa" (PyTorch SDPA), and the
flash kernel (kernels/attention.py) by how it walks the keys: "flash-skip" (a branch skips fully masked key blocks),
"flash-all" (computes them too) and "flash-runs" (visits only the blocks of the mask's leading and trailing runs,
no branch in the loop). --sweep times the kernel's tile shapes for each walk in --walks. Each is captured in a
CUDA graph of 10 calls; p50 of `iters` replays per call, in us. Error: relative L2 against float32 "gemm" on the
same bf16 inputs. Writes $OUT/attention.json. The in-pipeline figures differ (there inductor fuses the GEMM path's
softmax with its neighbours): compare the ways in the pipeline with batch_stages_gpu.py --attention.

Closer to the pipeline (§76: the flash kernel took 99.5 us a layer in a batch of 8's prefill and 62.8 alone):
--tokens 560 (2 views and a 48-token prompt tile), --cache-rows 832 (K and V as the first keys of each row's
832-row cache, as the pipeline slices them) and --input-sets 4 (the graph's 10 calls cycle through 4 sets of
inputs and outputs, ~174 MB at a batch of 8, so no call finds its operands in the 50 MB L2 from the call before; at
a batch of 1 they still fit). --json names the output file under $OUT (default attention.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
from expert_kernels_gpu import graph_ms  # this tool's neighbour (the script's folder is on sys.path)

from pi05_ros.engine.fast.blocks import ATTENTION


def graph_time(fn, iters: int) -> float:
    """p50 in us of one call, from a CUDA graph of 10 calls replayed `iters` times."""
    return graph_ms(lambda: [fn() for _ in range(10)], iters) * 1e3 / 10


PREFILL_KEYS = 720  # the prefill's K/V rows for 2 views: the longest prompt's capacity


def shapes(stage: str, batch: int, gen: torch.Generator, tokens: int = 528, cache_rows: int = 0) -> tuple:
    """The pipeline's shapes for 2 views and a short prompt (batch_stages_gpu.py's): the prefill runs `tokens`
    against its 720-row capacity (the longest prompt's), the denoise step 50 against 832 cache rows; ~520 valid
    prefix keys per row. `cache_rows` > 0: K and V are the first keys of [batch, 1, cache_rows, D] caches."""
    heads, d, horizon, denoise_rows = 8, 256, 50, 832
    tokens, keys = (tokens, PREFILL_KEYS) if stage == "prefill" else (horizon, denoise_rows)
    dev = torch.device("cuda")
    q = torch.randn(batch, tokens, heads, d, generator=gen, device=dev).to(torch.bfloat16)
    rows = max(cache_rows, keys)
    k = torch.randn(batch, 1, rows, d, generator=gen, device=dev).to(torch.bfloat16)[:, :, :keys]
    v = torch.randn(batch, 1, rows, d, generator=gen, device=dev).to(torch.bfloat16)[:, :, :keys]
    n_valid = torch.tensor([520 - 3 * i for i in range(batch)], device=dev).view(-1, 1)
    idx = torch.arange(keys, device=dev)
    valid = idx < n_valid
    if stage == "denoise":
        valid |= idx >= keys - horizon
    return q, k, v, valid.view(batch, 1, 1, keys)


def flash_way(walk: str):
    """The flash kernel walking its keys one way (kernels/attention.py KEY_WALKS; called eagerly: one custom op)."""
    from pi05_ros.engine.fast.kernels import attention as flash

    def run(q, k, v, mask):  # noqa: ANN001, ANN202
        default, flash.KEY_WALK = flash.KEY_WALK, walk
        try:
            return flash.flash_gqa_attention(q, k, v, mask)
        finally:
            flash.KEY_WALK = default

    return run


def sweep(iters: int, walks: list[str]) -> list[dict]:
    """The flash kernel's tile shapes (query rows, keys per step, warps, pipeline stages) at the shapes that matter."""
    from pi05_ros.engine.fast.kernels import attention as flash

    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = {(stage, batch): shapes(stage, batch, gen) for stage, batch in
             (("prefill", 8), ("prefill", 1), ("denoise", 8), ("denoise", 1))}
    rows = []
    for walk, bm, kb, warps, stages in itertools.product(walks, (64, 128), (32, 64, 128), (4, 8), (2, 3)):
        flash.BLOCK_ROWS, flash.KEY_BLOCK, flash.WARPS, flash.STAGES = bm, kb, warps, stages
        row = {"walk": walk, "block_rows": bm, "key_block": kb, "warps": warps, "stages": stages}
        run = flash_way(walk)
        for (stage, batch), (q, k, v, mask) in cases.items():
            try:
                row[f"{stage}{batch}_us"] = graph_time(lambda q=q, k=k, v=v, mask=mask, run=run: run(q, k, v, mask),
                                                       iters)
            except Exception as exc:  # e.g. more shared memory than the GPU has: recorded, the sweep goes on
                row[f"{stage}{batch}_us"] = None
                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                torch.cuda.synchronize()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--ways", default="gemm,sdpa,flash-skip,flash-all,flash-runs")
    parser.add_argument("--sweep", action="store_true", help="only time the flash kernel's tile shapes")
    parser.add_argument("--walks", default="skip,runs", help="--sweep: the key walks to time each tile shape with")
    parser.add_argument("--tokens", type=int, default=528, help="prefill tokens a row (the pipeline's: 560)")
    parser.add_argument("--cache-rows", type=int, default=0, help="K/V as slices of caches this long (pipeline: 832)")
    parser.add_argument("--input-sets", type=int, default=1, choices=range(1, 11), metavar="1-10",
                        help="input sets the graph's 10 calls cycle through")
    parser.add_argument("--json", default="attention.json", help="file name under $OUT for the rows")
    args = parser.parse_args()
    if args.cache_rows and args.cache_rows < PREFILL_KEYS:
        parser.error(f"--cache-rows must hold the prefill's {PREFILL_KEYS} keys (the pipeline's caches have 832 rows)")
    if args.sweep:
        rows = sweep(args.iters, args.walks.split(","))
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "attention_sweep.json"), "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    # every (stage, batch) is a compilation of its own: past dynamo's limit a way would silently run eagerly
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    compiled = {way: (flash_way(way.removeprefix("flash-")) if way.startswith("flash-")
                      else torch.compile(ATTENTION[way], dynamic=False))
                for way in args.ways.split(",")}
    rows = []
    for stage in ("prefill", "denoise"):
        for batch in (int(b) for b in args.batches.split(",")):
            sets = [shapes(stage, batch, gen, args.tokens, args.cache_rows) for _ in range(args.input_sets)]
            q, k, v, mask = sets[0]
            want = ATTENTION["gemm"](q.float(), k.float(), v.float(), mask)
            row = {"stage": stage, "batch": batch, "tokens": q.shape[1], "cache_rows": args.cache_rows,
                   "input_sets": args.input_sets}
            for way, fn in compiled.items():
                outs = [torch.empty(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], dtype=q.dtype, device=q.device)
                        for _ in sets]
                turn = itertools.cycle(range(len(sets)))

                def call(fn=fn, outs=outs, sets=sets, turn=turn) -> None:
                    i = next(turn)  # each captured call its own set (cycled), so L2 holds no operand
                    outs[i].copy_(fn(*sets[i]))

                row[f"{way}_us"] = graph_time(call, args.iters)
                out = outs[0]
                row[f"{way}_err"] = float((out.float() - want).norm() / want.norm())
            print(json.dumps(row), flush=True)
            rows.append(row)
    ways = list(compiled)
    print("\n| stage | batch | " + " | ".join(f"{w} us (rel L2)" for w in ways) + " |")
    print("|---|---|" + "---|" * len(ways))
    for row in rows:
        print(f"| {row['stage']} | {row['batch']} | "
              + " | ".join(f"{row[f'{w}_us']:.1f} ({row[f'{w}_err']:.1e})" for w in ways) + " |")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), args.json), "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
