"""pi05-info CHECKPOINT: what a checkpoint is, without loading its weights.

Prints the detected format, the resolved config, parameter counts per part, the norm stats found, and every
missing, unexpected or mis-shaped tensor. Exits 1 when the checkpoint cannot be loaded as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pi05_ros.engine.checkpoint import inspect_checkpoint
from pi05_ros.engine.errors import Pi05Error
from pi05_ros.engine.normalize import find_lerobot_norm_stats, find_norm_stats


def _norm_stats_line(info) -> str:  # noqa: ANN001 - CheckpointInfo
    for finder in (find_norm_stats, find_lerobot_norm_stats):
        try:
            return str(finder(info.path))
        except Pi05Error as exc:
            last = str(exc)
    return f"none found ({last})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi05-info", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory or its model.safetensors")
    parser.add_argument("--config-preset", default=None, help="pi05, pi05_droid, pi05_libero or tiny")
    args = parser.parse_args(argv)
    try:
        info = inspect_checkpoint(args.checkpoint, args.config_preset)
    except Pi05Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cfg = info.config
    print(f"checkpoint:   {info.weights_file}")
    print(f"format:       {info.format}")
    print(f"config:       {cfg.name}: horizon {cfg.action_horizon}, action_dim {cfg.action_dim}, "
          f"max_token_len {cfg.max_token_len}, state in prompt {cfg.state_in_prompt}")
    for part in ("vision", "vlm", "expert"):
        print(f"  {part:<10}  {dataclasses.asdict(getattr(cfg, part))}")
    dtypes = sorted({dtype for _, dtype in info.tensors.values()})
    print(f"tensors:      {len(info.tensors)} ({', '.join(dtypes)})")
    counts = info.parameter_counts()
    for part, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:<18} {n:>15,}")
    print(f"  {'total':<18} {sum(counts.values()):>15,}")
    print(f"embeddings:   {info.embed_name or 'MISSING'}")
    print(f"norm stats:   {_norm_stats_line(info)}")
    if info.unexpected:
        print(f"unexpected:   {len(info.unexpected)} tensors the model does not use:")
        for name in info.unexpected:
            print(f"  {name}")
    problems = info.problems
    if problems:
        print(f"problems:     {len(problems)}")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print("problems:     none: the checkpoint loads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
