"""pi05-info CHECKPOINT: what a checkpoint is, without loading its weights.

Prints the detected format, the resolved config, parameter counts per part, the norm stats found, the
conventions Policy.load will apply around the network (prompt format, normalization per feature, action
space per column, camera names, image resize, time grid, joint convention; each with why), and every missing,
unexpected or mis-shaped tensor. Exits 1 when `Policy.load` would fail on the checkpoint as it is
(a tensor problem, or no norm stats it can find), and then says what it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pi05_ros.engine.checkpoint import CheckpointInfo, inspect_checkpoint
from pi05_ros.engine.conventions import Conventions, resolve_action_space, resolve_conventions
from pi05_ros.engine.errors import Pi05Error
from pi05_ros.engine.joint_conventions import joint_convention
from pi05_ros.engine.normalize import NormStats, find_checkpoint_norm_stats, resolve_norm_stats, unpadded_dim


def _norm_stats(info: CheckpointInfo, given: str | None) -> tuple[str, str | None, NormStats | None]:
    """(what to print, what Policy.load will need or None, the stats) for the checkpoint's norm stats."""
    try:
        if given is None:
            found = find_checkpoint_norm_stats(info.path, info.format)
            stats = resolve_norm_stats(info.path, info.format, str(found))
            where = str(found)
        else:
            stats = resolve_norm_stats(info.path, info.format, given)
            where = f"{given} (given)"
    except Pi05Error as exc:
        return (f"none usable: {exc}", "norm stats: pass norm_stats=<path to norm_stats.json> (docs/checkpoints.md)",
                None)
    return f"{where}: state dim {stats.state.dim}, action dim {stats.actions.dim}", None, stats


def _conventions(conventions: Conventions, stats: NormStats | None, args: argparse.Namespace) -> str | None:
    """Print what Policy.load does around the network; returns a problem that stops it, or None."""
    c = conventions
    print("conventions:  (what Policy.load does around the network, and why)")
    print(f"  family         {c.family}" + (f", LeRobot {c.lerobot_version}" if c.lerobot_version else ""))
    print(f"  prompt format  {c.prompt_format}: {c.reasons['prompt_format']}")
    print(f"  image resize   {c.image_resize}: {c.reasons['image_resize']}")
    print(f"  time grid      {c.time_grid}: {c.reasons['time_grid']}")
    print(f"  cameras        {c.describe_cameras()} ({c.reasons['cameras']})")
    print(f"  joints         {joint_convention(c.joint_convention).describe()}: {c.reasons['joint_convention']}")
    if stats is None:
        print("  normalization  unknown until norm stats are found")
        print("  action space   unknown until norm stats are found (their action dim)")
        return None
    print(f"  normalization  {stats.describe()}")
    try:
        mask = [m.strip().lower() in ("1", "true", "t") for m in args.action_space_mask.split(",")] \
            if args.action_space_mask else None
        space, why = resolve_action_space(c, stats.actions.dim, args.action_space, mask)
        space.check_state(stats.state.dim)
        joint_convention(c.joint_convention).check(unpadded_dim(stats.state), stats.state.dim, space.dof)
    except Pi05Error as exc:
        print(f"  action space   impossible: {exc}")
        return f"a possible action space: {exc}"
    print(f"  action space   {space.describe()}: {why}")
    print(f"                 per column (robot terms): {', '.join(space.output_kinds)}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi05-info", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory or its model.safetensors")
    parser.add_argument("--config-preset", default=None,
                        help="the preset config.json is laid over: pi05, pi05_droid, pi05_droid_joint_position, "
                             "pi05_aloha, pi05_libero or tiny")
    parser.add_argument("--norm-stats", default=None,
                        help="check this norm_stats.json, LeRobot .safetensors or asset id instead of the one found")
    parser.add_argument("--prompt-format", default=None, help="pi05, pi05_padded or pi0 instead of the checkpoint's")
    parser.add_argument("--image-resize", default=None,
                        help="openpi_client, openpi_server or lerobot instead of the family's")
    parser.add_argument("--joint-convention", default=None,
                        help="none or aloha_to_pi instead of the preset's (engine/joint_conventions.py)")
    parser.add_argument("--action-space", default=None,
                        help="absolute, delta, velocity, end_effector or a kind per column (comma-separated)")
    parser.add_argument("--action-space-mask", default=None, help="comma-separated true/false per column")
    args = parser.parse_args(argv)
    try:
        info = inspect_checkpoint(args.checkpoint, args.config_preset)
        conventions = resolve_conventions(info, prompt_format=args.prompt_format, image_resize=args.image_resize,
                                          joint_convention=args.joint_convention)
    except Pi05Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cfg = info.config
    print(f"checkpoint:   {info.weights_file}")
    print(f"format:       {info.format}")
    print(f"config:       {cfg.name}: horizon {cfg.action_horizon}, action_dim {cfg.action_dim}, "
          f"max_token_len {cfg.max_token_len}, max_state_dim {cfg.max_state_dim}")
    for part in ("vision", "vlm", "expert"):
        print(f"  {part:<10}  {dataclasses.asdict(getattr(cfg, part))}")
    dtypes = sorted({dtype for _, dtype in info.tensors.values()})
    print(f"tensors:      {len(info.tensors)} ({', '.join(dtypes)})")
    counts = info.parameter_counts()
    for part, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:<18} {n:>15,}")
    print(f"  {'total':<18} {sum(counts.values()):>15,}")
    unused = f" (unused: {', '.join(info.unused_tables)})" if info.unused_tables else ""
    print(f"embeddings:   {info.embed_name or 'MISSING'}{unused}")
    stats_line, needs, stats = _norm_stats(info, args.norm_stats)
    print(f"norm stats:   {stats_line}")
    impossible = _conventions(conventions, stats, args)
    needs = needs or impossible
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
