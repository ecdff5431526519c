"""RemotePolicy: `Policy.infer` answered by a policy server (`pi05-serve`, or its Ray Serve deployment).

    policy = RemotePolicy("ws://gpu-host:8000")
    chunk = policy.infer({"base_0_rgb": img}, state, "put the cup in the sink", num_steps=10)
    chunk.actions   # [horizon, action dof] float32, robot units, as Policy.infer returns them
    chunk.timings   # "network" (the wire, both ways), the server's stages, "total" (this call)

It speaks the server's own observation layout (`/pi05_ros`: images by model slot, state, prompt, num_steps, noise)
and reads the model's facts (camera slots, state and action sizes, action space, stage names) from the metadata
frame, so code written against `Policy` (the ROS node) runs unchanged. One connection, opened at construction
(a server that is not up is an error there), opened again on the next call after an error or a timeout.

Timing stages (ms): `serialize` (msgpack of the observation), `network` (round trip minus the server's time:
the wire both ways and the websocket framing), `server_queue` (waiting for a batch), the server policy's own
stages (`preprocess`, `vision`, ..., `postprocess`), `deserialize`, and `total` (the whole call).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from pi05_ros.engine.action_space import ActionSpace
from pi05_ros.engine.errors import InputError, Pi05Error
from pi05_ros.engine.joint_conventions import example_state_length
from pi05_ros.engine.rtc import RtcRequest
from pi05_ros.engine.runner import ActionChunk
from pi05_ros.engine.timing import StageStats
from pi05_ros.serve.wire import WireError, pack, unpack

NATIVE_PATH = "/pi05_ros"
CLOSE_TIMEOUT_S = 1.0  # closing a dropped connection waits at most this for the server's close frame
CLIENT_STAGES_BEFORE = ("serialize", "network", "server_queue")
CLIENT_STAGES_AFTER = ("deserialize", "total")


class RemotePolicyError(Pi05Error):
    """The policy server cannot be reached, did not answer in time, or failed on its side."""


def native_url(url: str) -> str:
    """`url` pointed at the server's own layout: ws://host:port -> ws://host:port/pi05_ros."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    if parts.scheme not in ("ws", "wss"):
        raise RemotePolicyError(f"policy server URL must start with ws:// or wss://, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else NATIVE_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class RemotePolicy:
    """A policy server behind `Policy`'s interface (see the module docstring)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0, connect_timeout_s: float = 5.0,
                 max_message_bytes: int = 16 * 2**20) -> None:
        self.url = native_url(url)
        self.timeout_s, self.connect_timeout_s, self.max_message_bytes = timeout_s, connect_timeout_s, max_message_bytes
        self._lock = threading.Lock()  # one round trip at a time
        self._connection: ClientConnection | None = None
        self._closed = False
        self.metadata: dict[str, Any] = self._connect()
        meta = self.metadata
        space = meta["action_space"]
        self.action_space = ActionSpace(tuple(space["kinds"]), bool(space["joint_space"]),
                                        tuple(space["state_index"]) if space.get("state_index") else None)
        self.image_keys: tuple[str, ...] = tuple(meta["image_keys"])
        self.camera_names: dict[str, str] = dict(meta["camera_names"])  # camera name -> model slot
        self.state_dim: int = int(meta["state_dim"])
        self.max_state_values: int = int(meta.get("max_state_values", self.state_dim))  # older servers: state_dim
        self.joint_convention: str = str(meta.get("joint_convention", "none"))
        self.action_dof: int = int(meta["action_dof"])
        self.action_horizon: int = int(meta["action_horizon"])
        self.action_dim: int = int(meta["action_dim"])
        self.precision: str = str(meta["precision"])
        self.is_demo: bool = bool(meta["is_demo"])
        server_stages = tuple(s for s in meta["stage_names"] if s != "total")
        self.stage_names: tuple[str, ...] = (*CLIENT_STAGES_BEFORE, *server_stages, *CLIENT_STAGES_AFTER)
        self._stats = StageStats()

    # --- what the node reads

    @property
    def device(self) -> str:
        return f"remote {self.url} ({self.metadata['device']})"

    def describe(self) -> str:
        return f"{self.metadata['model']}, served at {self.url}"

    def example_state(self) -> np.ndarray:
        """Zeros of the length a robot sends (the node's warm-up), as the served Policy's."""
        size = example_state_length(self.joint_convention, self.state_dim, self.max_state_values,
                                    self.action_space.delta_columns()[1])
        return np.zeros(size, np.float32)

    def describe_conventions(self) -> list[str]:
        """The server policy's conventions, one line each (Policy.describe_conventions)."""
        return list(self.metadata["conventions"])

    def slot_for(self, camera: str) -> str | None:
        """The model slot a camera name feeds, or None when the served model has no such camera."""
        return self.camera_names.get(camera)

    def stage_stats(self) -> dict[str, dict[str, float]]:
        return self._stats.summary()

    # --- connection

    def _connect(self) -> dict[str, Any]:
        try:
            # held open across calls; a connection dropped after a timeout closes within CLOSE_TIMEOUT_S (the
            # library's 10 s would be added to the caller's timeout when the server is gone)
            connection = connect(self.url, compression=None, max_size=self.max_message_bytes,
                                 open_timeout=self.connect_timeout_s, close_timeout=CLOSE_TIMEOUT_S, legacy=True)
        except InvalidStatus as exc:
            raise RemotePolicyError(f"the policy server at {self.url} refused the connection: "
                                    f"HTTP {exc.response.status_code} "
                                    f"{exc.response.body.decode(errors='replace').strip()}") from exc
        except (OSError, TimeoutError, InvalidURI, InvalidHandshake, ConnectionClosed) as exc:  # not a ws server
            raise RemotePolicyError(f"cannot reach the policy server at {self.url} ({type(exc).__name__}: {exc}); "
                                    "is pi05-serve running there?") from exc
        try:
            metadata = unpack(connection.recv(timeout=self.connect_timeout_s))
        except (TimeoutError, ConnectionClosed, WireError) as exc:
            connection.close()
            raise RemotePolicyError(f"{self.url} sent no pi05_ros metadata frame ({exc})") from exc
        if not isinstance(metadata, dict) or metadata.get("server") != "pi05_ros":
            connection.close()
            raise RemotePolicyError(f"{self.url} is not a pi05_ros policy server (metadata {metadata!r:.200})")
        self._connection = connection
        return metadata

    def close(self) -> None:
        """Close the connection; later calls raise RemotePolicyError. A call in flight on another thread is not
        waited for (a stop must not wait on the server, whose reply may take the whole timeout or, from a stalled
        server, never come): its socket is shut down, and that call ends with RemotePolicyError."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()
            return
        connection = self._connection
        if connection is not None:
            try:
                connection.socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked send / recv at once
            except OSError:
                pass  # already closed

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inference

    def infer(self, images: Mapping[str, np.ndarray], state: np.ndarray, prompt: str, num_steps: int | None = None,
              noise: np.ndarray | None = None, rtc: RtcRequest | None = None) -> ActionChunk:
        """Actions for one observation, from the server. InputError for input the server's model cannot use,
        RemotePolicyError when the server cannot be reached or fails. `num_steps`: None, the server's own
        (`pi05-serve --num-steps`, in the metadata). `rtc`: real-time chunking, as in Policy.infer (the previous
        chunk travels with the request)."""
        start = time.perf_counter()
        state = np.asarray(state, dtype=np.float32)
        request: dict[str, Any] = {"images": dict(images), "state": state, "prompt": prompt}
        if num_steps is not None:
            request["num_steps"] = num_steps
        else:
            num_steps = int(self.metadata["num_steps"])
        if noise is not None:
            request["noise"] = np.asarray(noise, dtype=np.float32)
        if rtc is not None:
            request["rtc"] = {"previous": np.asarray(rtc.previous, dtype=np.float32), "delay": rtc.delay,
                              "beta": rtc.beta, "end": rtc.end, "schedule": rtc.schedule, "start": rtc.start}
        try:
            frame = pack(request)
        except (TypeError, WireError) as exc:
            raise InputError(f"cannot send this observation: {exc}") from exc
        serialized = time.perf_counter()
        with self._lock:
            reply_frame = self._round_trip(frame)
        received = time.perf_counter()
        try:
            reply = unpack(reply_frame)
            actions = np.array(reply["actions"], dtype=np.float32)  # a writable copy of the read-only view
            server, policy_timing = reply["server_timing"], reply["policy_timing"]
        except (WireError, KeyError, TypeError) as exc:
            raise RemotePolicyError(f"{self.url} sent a reply this client cannot read ({exc})") from exc
        end = time.perf_counter()
        timings = {"serialize": (serialized - start) * 1e3,
                   "network": max(0.0, (received - serialized) * 1e3 - float(server["infer_ms"])),
                   "server_queue": float(server.get("queue_ms", 0.0))}
        timings.update({stage: float(ms) for stage, ms in policy_timing.items() if stage not in ("total", "infer_ms")})
        timings["deserialize"] = (end - received) * 1e3
        timings["total"] = (end - start) * 1e3
        self._stats.add(timings)
        return ActionChunk(actions, num_steps, timings, int(reply.get("num_prompt_tokens", 0)), self.action_space,
                           state.copy())

    def _round_trip(self, frame: bytes) -> bytes:
        if self._closed:
            raise RemotePolicyError(f"this RemotePolicy for {self.url} was closed; create a new one")
        if self._connection is None:
            metadata = self._connect()
            if metadata["model"] != self.metadata["model"] or metadata["layout"] != self.metadata["layout"]:
                self._drop()
                raise RemotePolicyError(f"{self.url} now serves another model ({metadata['model']}); create a new "
                                        "RemotePolicy for it")
        connection = self._connection
        assert connection is not None
        try:
            if self._closed:  # closed while this call connected
                raise ConnectionClosed(None, None)
            connection.send(frame)
            reply = connection.recv(timeout=self.timeout_s)
        except TimeoutError as exc:
            self._drop()  # a late reply would answer the next request
            raise RemotePolicyError(f"no reply from {self.url} within {self.timeout_s:g} s") from exc
        except (ConnectionClosed, OSError) as exc:  # OSError: a send into a socket close() shut down
            self._drop()
            if self._closed:
                raise RemotePolicyError(f"the RemotePolicy for {self.url} was closed during this call") from exc
            raise RemotePolicyError(f"the connection to {self.url} closed ({exc}); the next call reconnects") from exc
        if isinstance(reply, str):  # openpi's error convention: the reason as text, then close 1011
            self._drop()
            kind, _, message = reply.partition(": ")
            if kind == "InputError":
                raise InputError(message)
            raise RemotePolicyError(f"the policy server failed: {reply}")
        return reply

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
