"""pi05-info CHECKPOINT: what a checkpoint is, without loading its weights.

Prints the detected format, the resolved config, parameter counts per part, the norm stats found, and every
missing, unexpected or mis-shaped tensor. Exits 1 when `Policy.load` would fail on the checkpoint as it is
(a tensor problem, or no norm stats it can find), and then says what it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pi05_ros.engine.checkpoint import CheckpointInfo, inspect_checkpoint
from pi05_ros.engine.errors import Pi05Error
from pi05_ros.engine.normalize import find_checkpoint_norm_stats, resolve_norm_stats


def _norm_stats(info: CheckpointInfo, given: str | None) -> tuple[str, str | None]:
    """(what to print, what Policy.load will need or None) for the checkpoint's norm stats."""
    try:
        if given is None:
            found = find_checkpoint_norm_stats(info.path, info.format)
            stats = resolve_norm_stats(info.path, info.format, str(found))
            where = str(found)
        else:
            stats = resolve_norm_stats(info.path, info.format, given)
            where = f"{given} (given)"
    except Pi05Error as exc:
        return f"none usable: {exc}", "norm stats: pass norm_stats=<path to norm_stats.json> (docs/checkpoints.md)"
    return f"{where}: state dim {stats.state.dim}, action dim {stats.actions.dim}", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi05-info", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory or its model.safetensors")
    parser.add_argument("--config-preset", default=None, help="pi05, pi05_droid, pi05_libero or tiny")
    parser.add_argument("--norm-stats", default=None,
                        help="check this norm_stats.json, LeRobot .safetensors or asset id instead of the one found")
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
    stats_line, needs = _norm_stats(info, args.norm_stats)
    print(f"norm stats:   {stats_line}")
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
    if needs:
        print(f"problems:     none in the weights, but Policy.load needs {needs}")
        return 1
    print("problems:     none: the checkpoint loads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
