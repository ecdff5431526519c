"""pi05-serve: a policy server speaking openpi's websocket protocol, so openpi's clients drop in unchanged.

    pi05-serve --checkpoint ~/ckpt/pi05_droid --tokenizer ~/ckpt/paligemma_tokenizer.model --robot droid
    pi05-serve --demo --port 8000                                  # the random-weight demo model
    pi05-serve --checkpoint ... --tokenizer ... --ray --replicas 8  # Ray Serve: one replica per GPU

Observations from several clients that arrive within --batch-window-ms run as one batch (at most --max-batch).
The protocol, the layouts and the limits: docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pi05_ros.cli import int_in_range
from pi05_ros.engine.errors import Pi05Error

log = logging.getLogger("pi05-serve")


def _bool_list(text: str) -> tuple[bool, ...]:
    words = {"true": True, "1": True, "t": True, "false": False, "0": False, "f": False}
    try:
        values = tuple(words[part.strip().lower()] for part in text.split(",") if part.strip())
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected comma-separated true/false, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated true/false, got nothing")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi05-serve", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", help="openpi or LeRobot Pi0.5 checkpoint directory")
    model.add_argument("--tokenizer", help="PaliGemma's paligemma_tokenizer.model")
    model.add_argument("--demo", action="store_true", help="serve the built-in random-weight demo model")
    model.add_argument("--norm-stats", help="norm_stats.json, LeRobot processor .safetensors or asset id")
    model.add_argument("--config-preset",
                       help="the preset config.json is laid over: pi05, pi05_droid, "
                            "pi05_droid_joint_position, pi05_aloha, pi05_libero or tiny")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    model.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp8")
    model.add_argument("--action-dim", type=int_in_range(1),
                       help="the robot's action columns (default: the norm stats')")
    model.add_argument("--seed", type=int_in_range(0), default=0,
                       help="seed of the server's noise generator (requests without noise or noise_seed)")
    model.add_argument("--threads", type=int_in_range(1), help="torch CPU threads (default: torch's choice)")
    model.add_argument("--fp8-vision", action="store_true",
                       help="SigLIP's MLP in FP8 too (precision fp8; action error 3.3e-2 against the float32 "
                            "reference, over plain fp8's 3e-2 budget), on Hopper with fc1's GELU in its FP8 kernel: "
                            "vision 0.3 ms faster at a batch of 8, 0.05-0.13 ms at batch 1 (H100; docs/serving.md)")
    model.add_argument("--expert-kernels", choices=("auto", "on", "off"), default="auto",
                       help="the fused Triton kernels for the denoise loop: auto = batches of 1-2 rows on Hopper "
                            "(measured faster); on = every batch, on any GPU Triton supports; off = the torch path")
    conventions = parser.add_argument_group("the checkpoint's conventions (default: its own; pi05-info shows them)")
    conventions.add_argument("--prompt-format", help="pi05, pi05_padded (LeRobot <= 0.4) or pi0")
    conventions.add_argument("--image-resize", help="openpi_client, openpi_server or lerobot")
    conventions.add_argument("--joint-convention", help="none or aloha_to_pi (openpi's ALOHA adapt_to_pi)")
    conventions.add_argument("--action-space",
                             help="absolute, delta, velocity, end_effector, or a kind per column (comma-separated)")
    conventions.add_argument("--action-space-mask", type=_bool_list,
                             help="per column true/false, comma-separated (openpi's make_bool_mask)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--robot", default="pi05_ros",
                          help="observation layout at '/': droid, libero, aloha, pi05_ros, or a layout .json file "
                               "(every built-in one is also at '/<name>')")
    protocol.add_argument("--num-steps", type=int, default=10, help="denoise steps (a request may set num_steps)")
    protocol.add_argument("--default-prompt", help="task prompt for observations without one (openpi's ALOHA clients)")
    protocol.add_argument("--metadata", default="{}",
                          help="JSON object added to the metadata frame, e.g. "
                               "'{\"reset_pose\": [0, -1.5, 1.5, 0, 0, 0]}'")
    network = parser.add_argument_group("network and limits")
    network.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    network.add_argument("--port", type=int_in_range(0, 65535), default=8000,
                         help="port (0: a free one, printed at start)")
    network.add_argument("--batch-window-ms", type=float, default=10.0,
                         help="how long the oldest waiting request waits for others to batch with, at most (a batch "
                              "runs at once when full or when every connection has a request waiting)")
    network.add_argument("--max-batch", type=int, default=8,
                         help="most observations in one batch (the GPU pipeline is built and warmed for it)")
    network.add_argument("--warm-up-views", default="",
                         help="camera counts to warm the GPU pipeline for before the first client, comma separated, "
                              "e.g. 2 for robots that send two of the layout's three cameras (default: the layout's "
                              "full count; a count not warmed pays seconds of capture and compile on its first batch "
                              "of each size)")
    network.add_argument("--max-clients", type=int, default=128, help="most connections at once")
    network.add_argument("--max-message-mb", type=float, default=10.0, help="largest observation message (MiB)")
    network.add_argument("--send-timeout-s", type=float, default=10.0,
                         help="drop a client whose reply cannot be written for this long (it does not read)")
    ray = parser.add_argument_group("Ray Serve (many GPUs, many hosts)")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment instead of one process")
    ray.add_argument("--replicas", type=int_in_range(1), default=1, help="Ray replicas (one per GPU)")
    ray.add_argument("--gpus-per-replica", type=float,
                     help="GPUs each replica holds (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--ray-address", help="an existing Ray cluster ('auto' or host:port); default: start one here")
    ray.add_argument("--ray-batching", choices=("ours", "ray"), default="ours",
                     help="batching inside a replica: this server's batcher or Ray's @serve.batch")
    ray.add_argument("--ray-ingress", choices=("haproxy", "proxy"),
                     help="Serve's HAProxy ingress (websockets tunnelled to the replicas; the default unless "
                          "RAY_SERVE_ENABLE_HA_PROXY is set otherwise) or its Python proxy (every message relayed as "
                          "a Ray call, 3-10 ms more a request than HAProxy on a GPU host); with --ray-address, the "
                          "cluster's own choice (RAY_SERVE_ENABLE_HA_PROXY=1 or 0 in `ray start`'s environment) holds")
    return parser


def _settings(args: argparse.Namespace) -> Any:
    from pi05_ros.serve.service import ServeSettings

    try:
        metadata = json.loads(args.metadata)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"pi05-serve: --metadata is not valid JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise SystemExit("pi05-serve: --metadata must be a JSON object")
    try:
        views = tuple(int(part) for part in args.warm_up_views.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"pi05-serve: --warm-up-views takes camera counts like 2 or 2,3, got "
                         f"{args.warm_up_views!r}") from None
    return ServeSettings(num_steps=args.num_steps, window_ms=args.batch_window_ms, max_batch=args.max_batch,
                         max_clients=args.max_clients, max_message_bytes=int(args.max_message_mb * 2**20),
                         send_timeout_s=args.send_timeout_s, default_prompt=args.default_prompt, seed=args.seed,
                         metadata=metadata, warm_up_views=views)


def _spec(args: argparse.Namespace) -> Any:
    from pi05_ros.serve.service import PolicySpec

    if args.demo == bool(args.checkpoint):
        raise SystemExit("pi05-serve: give --checkpoint DIR --tokenizer FILE, or --demo")
    if args.demo:
        ignored = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--norm-stats", args.norm_stats),
                                            ("--config-preset", args.config_preset), ("--action-dim", args.action_dim),
                                            ("--prompt-format", args.prompt_format),
                                            ("--image-resize", args.image_resize),
                                            ("--joint-convention", args.joint_convention),
                                            ("--action-space", args.action_space),
                                            ("--action-space-mask", args.action_space_mask))
                   if value is not None]
        if ignored:
            raise SystemExit(f"pi05-serve: {', '.join(ignored)} go with --checkpoint; the demo model has its own")

    def absolute(path: str) -> str:  # Ray's workers resolve paths against their own working directory
        return str(Path(path).expanduser().absolute())

    return PolicySpec(checkpoint=None if args.demo else absolute(args.checkpoint),
                      tokenizer=absolute(args.tokenizer) if args.tokenizer else None,
                      norm_stats=args.norm_stats, config_preset=args.config_preset, device=args.device,
                      precision=args.precision, action_dim=args.action_dim, seed=args.seed, cpu_threads=args.threads,
                      max_batch=args.max_batch, fp8_vision=args.fp8_vision, expert_kernels=args.expert_kernels,
                      prompt_format=args.prompt_format, image_resize=args.image_resize,
                      joint_convention=args.joint_convention, action_space=args.action_space,
                      action_space_mask=args.action_space_mask)


def _layouts(robot: str) -> tuple[dict, str]:
    from pi05_ros.serve.layouts import BUILT_IN, resolve_layout

    layout = resolve_layout(robot)
    return {**BUILT_IN, layout.name: layout}, layout.name


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the server's event loop on uvloop where it is installed (scripts/setup.sh pins it): its socket reads and
    callbacks cost less than asyncio's, which counts on the path from a batch's end to the next batch's start
    (docs/benchmarks.md §54); asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    run = getattr(uvloop, "run", None)  # uvloop.run: 0.18 and later
    if run is None:
        asyncio.run(main)
    else:
        run(main)


def _serve_here(args: argparse.Namespace) -> int:
    from pi05_ros.serve.server import run_server
    from pi05_ros.serve.service import PolicyService, warm_up, warm_up_views

    settings = _settings(args)
    layouts, default = _layouts(args.robot)
    policy = _spec(args).load()
    service = PolicyService(policy, layouts, default, settings)
    warm_up(policy, settings.num_steps, warm_up_views(settings, layouts[default], policy))

    def ready(host: str, port: int) -> None:
        others = " ".join(f"/{name}" for name in sorted(service.layouts) if name != default)  # those that fit
        print(f"pi05-serve: {policy.describe()}", flush=True)
        print(f"pi05-serve: serving layout '{default}' at ws://{host}:{port}/ (also {others}); "
              f"health http://{host}:{port}/healthz; batches of up to {settings.max_batch} within "
              f"{settings.window_ms:g} ms", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_server(service, args.host, args.port, stop=stop, on_ready=ready)

    run_event_loop(main())
    print("pi05-serve: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.ray:
            from pi05_ros.serve.ray_app import serve_on_ray

            return serve_on_ray(_spec(args), _settings(args), *_layouts(args.robot), host=args.host, port=args.port,
                                replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                                address=args.ray_address, batching=args.ray_batching, ingress=args.ray_ingress)
        return _serve_here(args)
    except (Pi05Error, OSError) as exc:
        print(f"pi05-serve: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
