"""What an ingress adds to one websocket round trip, without a model: a FastAPI app that answers each binary frame
with its first 2 KB (an observation in, an action chunk's size out), served by plain uvicorn in this process and
by Ray Serve through its Python proxy and through its HAProxy ingress (pi05-serve --ray's two `--ray-ingress`
choices). One client, frames of `--frame-kb`, closed loop; each Ray run in a process of its own, since Serve's
processes take the ingress from the environment Ray starts with.

    PYTHONPATH=. python3 tools/ray_ingress_overhead.py [--ways plain,proxy,haproxy] [--frame-kb 300] [--rounds 300]
        [--json OUT.json]

No `from __future__ import annotations` here: FastAPI reads the websocket parameter's annotation (serve/ray_app.py).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from pi05_ros.serve.ray_app import haproxy_environment_of_its_own

WAYS = ("plain", "proxy", "haproxy")
REPLY_BYTES = 2048


def make_app():  # noqa: ANN201 - FastAPI is imported here so that --help needs none of it
    from fastapi import FastAPI, WebSocket
    from starlette.websockets import WebSocketDisconnect

    app = FastAPI()

    async def answer(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                frame = await websocket.receive_bytes()
                await websocket.send_bytes(frame[:REPLY_BYTES])
        except WebSocketDisconnect:
            pass

    return app, answer


def round_trips(port: int, frame_kb: int, rounds: int, warmup: int) -> list[float]:
    from websockets.sync.client import connect

    frame = os.urandom(frame_kb * 1024)
    times = []
    with connect(f"ws://127.0.0.1:{port}/", max_size=None, compression=None, open_timeout=60) as ws:
        for index in range(warmup + rounds):
            start = time.perf_counter()
            ws.send(frame)
            reply = ws.recv(timeout=60)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
            assert len(reply) == min(REPLY_BYTES, len(frame))
    return times


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_way(way: str, frame_kb: int, rounds: int, warmup: int) -> list[float]:
    """In this process: serve the app `way`'s way, measure, stop."""
    port = free_port()
    app, answer = make_app()
    if way == "plain":
        import uvicorn

        app.websocket("/")(answer)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {port}")
            time.sleep(0.05)
        try:
            return round_trips(port, frame_kb, rounds, warmup)
        finally:
            server.should_exit = True
            thread.join(10)
    import ray
    from fastapi import WebSocket
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Answer:
        @app.websocket("/")
        async def session(self, websocket: WebSocket) -> None:
            await answer(websocket)

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Answer.bind(), route_prefix="/")
        return round_trips(port, frame_kb, rounds, warmup)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--frame-kb", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # a child: one way, times as JSON on stdout
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_way(args.one, args.frame_kb, args.rounds, args.warmup)))
        return 0
    ways = args.ways.split(",")
    if unknown := sorted(set(ways) - set(WAYS)):
        parser.error(f"unknown way(s) {unknown}: choose from {WAYS}")
    results = {}
    print(f"| ingress | p50 ms | p90 ms | p99 ms | {args.frame_kb} KB in, {REPLY_BYTES // 1024} KB out, "
          f"{args.rounds} round trips |")
    print("|---|---|---|---|---|")
    for way in ways:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
               "RAY_SERVE_ENABLE_HA_PROXY": "1" if way == "haproxy" else "0"}
        with tempfile.TemporaryDirectory(prefix="hap", dir="/tmp") as directory:
            # HAProxy's files and ports of this run's own: Serve's defaults allow one per host
            env.update(haproxy_environment_of_its_own(directory, free_port))
            try:
                child = subprocess.run([sys.executable, __file__, "--one", way, "--frame-kb", str(args.frame_kb),
                                        "--rounds", str(args.rounds), "--warmup", str(args.warmup)],
                                       env=env, capture_output=True, text=True, timeout=600)
                failure = ((child.stderr.strip().splitlines() or [f"exit code {child.returncode}"])[-1]
                           if child.returncode else None)
            except subprocess.TimeoutExpired:
                child, failure = None, "no result within 600 s"
        if failure is not None or child is None:
            print(f"| {way} | failed: {failure} | | | |", flush=True)
            results[way] = {"error": (child.stderr[-4000:] if child else failure)}
            continue
        times = np.array(json.loads(child.stdout.strip().splitlines()[-1]))
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        results[way] = {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "rounds": len(times)}
        print(f"| {way} | {p50:.2f} | {p90:.2f} | {p99:.2f} | |", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"frame_kb": args.frame_kb, "ways": results}, out, indent=1)
    return 0 if all("error" not in value for value in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
