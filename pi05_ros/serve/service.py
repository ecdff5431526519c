"""openpi's policy protocol over one `Policy`, whatever carries the frames (the websockets server of
serve/server.py, or Ray Serve's FastAPI ingress in serve/ray_app.py).

Per connection:
1. the server sends one binary frame: msgpack(metadata) (the model, the observation layout, the limits);
2. then, per request: the client sends msgpack(observation) in a binary frame; the server answers
   msgpack({"actions": float32 [horizon, action dof], "policy_timing": {...}, "server_timing": {...},
   "num_prompt_tokens": n});
3. an error is a text frame with the reason ("InputError: observation/joint_position: ..."), then the server
   closes the connection with code 1011, as openpi's server does (openpi-client raises RuntimeError with the text).

`policy_timing` holds openpi's `infer_ms` (the policy's total) and this engine's stage milliseconds;
`server_timing` openpi's `infer_ms` (frame received to reply ready) and, from the second reply of a connection
on, `prev_total_ms` (the previous request, reply sent included), plus `batch_size` and where `infer_ms` went:
`prepare_ms` (frame received to row submitted: decoding, checking, preprocessing), `queue_ms` (waiting for its
batch), `run_ms` (the batch's run) and `wake_ms` (batch done to this reply ready: the event loop answering the
batch's rows).

The noise of a request, so that answers can be reproduced: the `noise` key (the array itself) or the `noise_seed`
key (`seeded_noise(seed, ...)`: numpy's default_rng(seed), float32 standard normal), not both; without either, the
server's own generator seeded with `seed` at start, drawn in the order requests arrive (reproducible for one
client in sequence, not across concurrent clients; a Ray replica's seed is `seed` + its rank).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pi05_ros.engine.checkpoint import inspect_checkpoint
from pi05_ros.engine.config import PRESETS
from pi05_ros.engine.errors import InputError
from pi05_ros.engine.policy import MAX_DENOISE_STEPS, Policy, RawObservation
from pi05_ros.engine.preprocess import needs_resize
from pi05_ros.engine.runner import ActionChunk, PreparedObservation
from pi05_ros.serve.batching import Batcher, BatchResult, ServerBusy
from pi05_ros.serve.layouts import ObservationLayout, Request, seeded_noise
from pi05_ros.serve.wire import WireError, pack, unpack

log = logging.getLogger(__name__)

SERVER_NAME = "pi05_ros"
ERROR_CLOSE_CODE = 1011  # internal error: openpi's server closes with it after the error text
SLOW_CLIENT_CLOSE_CODE = 1008  # policy violation: the client does not read its replies
FULL_CLOSE_CODE = 1013  # try again later: the server was full when this connection's session began
# /stats' counters, there from the start (0) so that a reader finds every key on a fresh server
STAT_COUNTERS = ("connections", "requests", "replies", "abandoned", "rejected_full", "slow_clients_closed",
                 "clients_closed_sending_ahead", "errors_InputError", "errors_WireError", "errors_ServerBusy",
                 "errors_InternalError")
# Longer prompts are tokenized on the prepare pool, not the event loop: a frame may carry megabytes of prompt, and
# tokenizing 7 MB took 1.7 s (the whole string is encoded before it is cut to the model's token limit).
INLINE_PROMPT_CHARS = 2048
NEEDS_TOKENIZER = "--checkpoint needs --tokenizer (PaliGemma's paligemma_tokenizer.model)"
ERROR_TEXT_CHARS = 2000  # an error reply (and its log line) quotes at most this much: it may echo client input


@dataclass(frozen=True)
class ServeSettings:
    """What one server (or one Ray replica) runs with; `pi05-serve --help` describes each."""

    num_steps: int = 10
    window_ms: float = 10.0  # a full fleet or a lone robot does not wait it out (serve/batching.py)
    max_batch: int = 8
    max_clients: int = 128
    max_message_bytes: int = 10 * 2**20
    send_timeout_s: float = 10.0
    default_prompt: str | None = None
    seed: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)  # extra entries of the metadata frame
    # camera counts the GPU pipeline is warmed for before the first client (empty: the layout's full count)
    warm_up_views: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.num_steps <= MAX_DENOISE_STEPS:
            raise InputError(f"num_steps must be in 1..{MAX_DENOISE_STEPS}, got {self.num_steps}")
        if self.window_ms < 0 or self.max_batch < 1 or self.max_clients < 1:
            raise InputError("the batch window must be >= 0 ms, max batch and max clients >= 1")
        if self.max_message_bytes < 1024 or self.send_timeout_s <= 0:
            raise InputError("the message limit must be at least 1 KiB and the send timeout positive")
        if any(views < 1 for views in self.warm_up_views):
            raise InputError(f"warm-up view counts must be >= 1, got {list(self.warm_up_views)}")


class ConnectionGone(Exception):
    """The client closed the connection or it broke."""


# Observations a connection may have waiting behind the one being answered: the one-process server stops reading the
# socket beyond them (TCP holds the client back); the Ray replica, which cannot stop Ray reading, closes the connection.
RECEIVE_QUEUE_FRAMES = 2


class Transport(Protocol):
    """One client connection, as the service needs it."""

    async def receive(self) -> bytes | str: ...  # raises ConnectionGone

    async def send(self, frame: bytes | str) -> None: ...  # raises ConnectionGone

    async def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...  # drop the connection without a closing handshake

    async def wait_closed(self) -> None: ...  # returns when the client has gone


@dataclass
class Row:
    """One prepared request on its way into a batch."""

    prepared: PreparedObservation
    state: np.ndarray
    preprocess_ms: float
    num_steps: int
    submitted: float = field(default_factory=time.monotonic)


Submit = Callable[[Row], Awaitable[BatchResult]]


class PolicyService:
    """The protocol over `policy`: one instance per server or replica, shared by all its connections.

    `layouts` are the observation layouts served (by name; `default_layout` answers clients that name none).
    `submit` hands a row to the batching (default: this service's own `Batcher`; Ray's `@serve.batch` in
    serve/ray_app.py); it returns a BatchResult whose value is the row's ActionChunk or an Exception.
    """

    def __init__(self, policy: Policy, layouts: Mapping[str, ObservationLayout], default_layout: str,
                 settings: ServeSettings, submit: Submit | None = None) -> None:
        if default_layout not in layouts:
            raise InputError(f"default layout {default_layout!r} is not among {list(layouts)}")
        usable = {}
        for name, layout in layouts.items():  # the one asked for must fit; the others are served where they fit
            try:
                layout.check_model(policy.image_keys)
            except InputError as exc:
                if name == default_layout:
                    raise
                log.info("layout %r is not served: %s", name, exc)
                continue
            usable[name] = layout
        self.policy, self.layouts, self.default_layout, self.settings = policy, usable, default_layout, settings
        self._noise = np.random.default_rng(settings.seed)
        # Requests whose views need resizing (or with a very long prompt) are prepared here, beside the event loop and
        # the batch thread, so that the work overlaps the running batch and other connections' reads. Views already
        # at the model's size (openpi's clients resize before sending) are prepared on the event loop: ~0.1 ms of
        # tokenizing and checking, less than the hand-off to this pool and back (docs/benchmarks.md §54).
        self._prepare_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pi05-prepare")
        self.batcher = Batcher(self.run_rows, window_s=settings.window_ms / 1e3, max_batch=settings.max_batch,
                               max_pending=settings.max_clients, group=lambda row: row.num_steps,
                               senders=lambda: self.open_connections)
        self._submit: Submit = submit or self.batcher.submit
        self.open_connections = 0
        self.counters: Counter[str] = Counter(dict.fromkeys(STAT_COUNTERS, 0))

    # --- what clients see besides replies

    def layout_for(self, path: str) -> ObservationLayout | None:
        """The layout a websocket path selects: '/' the default, '/<name>' a named one; None if unknown."""
        name = path.strip("/") or self.default_layout
        return self.layouts.get(name)

    def metadata(self, layout: ObservationLayout) -> dict[str, Any]:
        policy = self.policy
        space = policy.action_space
        return {
            **self.settings.metadata,  # first: --metadata adds entries (openpi's reset_pose), it replaces none
            "server": SERVER_NAME,
            "model": policy.describe(),
            "config": policy.config.name,
            "is_demo": policy.is_demo,
            "precision": policy.precision,
            "device": policy.device,
            "image_keys": list(policy.image_keys),
            "camera_names": dict(policy.camera_names),  # every camera name the model takes -> its slot
            "conventions": list(policy.describe_conventions()),
            "state_dim": policy.state_dim,
            # a state may have up to this many values (norm stats padded past the robot's joints)
            "max_state_values": policy.max_state_values,
            "joint_convention": policy.joints.name,
            "action_dof": policy.action_dof,
            "action_horizon": policy.action_horizon,
            "action_dim": policy.config.action_dim,  # the noise's second dimension
            "action_space": {"kinds": list(space.kinds), "joint_space": space.joint_space,
                             "state_index": list(space.state_index) if space.state_index is not None else None},
            "num_steps": self.settings.num_steps,
            "max_denoise_steps": MAX_DENOISE_STEPS,
            "stage_names": list(policy.stage_names),
            "layout": layout.describe(),
            "layouts": sorted(self.layouts),
            "batching": {"window_ms": self.settings.window_ms, "max_batch": self.settings.max_batch},
            "max_message_bytes": self.settings.max_message_bytes,
        }

    def full(self) -> bool:
        """No room for another connection (`max_clients`); counts the refusal it leads to."""
        if self.open_connections < self.settings.max_clients:
            return False
        self.counters["rejected_full"] += 1
        return True

    def stats(self) -> dict[str, Any]:
        return {"connections_open": self.open_connections, "pending": self.batcher.pending,
                "batch_sizes": {str(k): v for k, v in sorted(self.batcher.batch_sizes.items())},
                "dropped": self.batcher.dropped, **self.counters}

    # --- one connection

    async def serve(self, transport: Transport, layout: ObservationLayout) -> None:
        """The protocol loop of one connection, until the client leaves or an error closes it."""
        # The handshake's check (HTTP 503 / 403) lets a burst of simultaneous handshakes through; this one, with no
        # await before the count goes up, holds max_clients exactly.
        if self.full():
            try:
                await transport.close(FULL_CLOSE_CODE, f"the server is full ({self.settings.max_clients} clients); "
                                                       "try again later")
            except ConnectionGone:
                pass
            return
        self.open_connections += 1
        self.counters["connections"] += 1
        try:
            await self._serve(transport, layout)
        except ConnectionGone:
            pass
        finally:
            self.open_connections -= 1

    async def _serve(self, transport: Transport, layout: ObservationLayout) -> None:
        if not await self._send_or_drop(transport, pack(self.metadata(layout))):
            return
        prev_total_ms: float | None = None
        while True:
            frame = await transport.receive()
            received = time.monotonic()
            self.counters["requests"] += 1
            try:
                reply = await self._answer_unless_gone(transport, frame, layout, received)
            except (InputError, WireError, ServerBusy) as exc:  # the client's doing: say what to fix
                await self._fail(transport, type(exc).__name__, str(exc))
                return
            except ConnectionGone:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug or a device failure: this client hears of it
                log.exception("request failed")
                await self._fail(transport, "InternalError", f"{type(exc).__name__}: {exc}")
                return
            timing = reply["server_timing"]
            timing["infer_ms"] = (time.monotonic() - received) * 1e3
            if prev_total_ms is not None:
                timing["prev_total_ms"] = prev_total_ms
            if not await self._send_or_drop(transport, pack(reply)):
                return
            self.counters["replies"] += 1
            prev_total_ms = (time.monotonic() - received) * 1e3

    async def _answer_unless_gone(self, transport: Transport, frame: bytes | str, layout: ObservationLayout,
                                  received: float) -> dict[str, Any]:
        """The reply to `frame`; if the client leaves first, its request is withdrawn (ConnectionGone)."""
        answer = asyncio.ensure_future(self._answer(frame, layout, received))
        gone = asyncio.ensure_future(transport.wait_closed())
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the session itself cancelled (Ray does so when a client leaves)
            self._withdraw(answer)
            raise
        finally:
            gone.cancel()
        if not answer.done():
            self._withdraw(answer)
            raise ConnectionGone
        return answer.result()

    def _withdraw(self, answer: asyncio.Future) -> None:
        """A request whose client has gone: out of its batch if it has not run (Batcher drops cancelled rows)."""
        if answer.done():
            return
        answer.cancel()
        # an answer that failed as it was cancelled: its exception is nobody's ("never retrieved" otherwise)
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())
        self.counters["abandoned"] += 1

    async def _send_or_drop(self, transport: Transport, frame: bytes) -> bool:
        """Send `frame`; a client that has not read for send_timeout_s is closed (False): it must not hold its
        slot and the server's memory forever."""
        try:
            await asyncio.wait_for(transport.send(frame), self.settings.send_timeout_s)
        except TimeoutError:
            self.counters["slow_clients_closed"] += 1
            log.warning("closing a connection that has not read what it was sent for %.0f s",
                        self.settings.send_timeout_s)
            transport.abort()
            return False
        return True

    async def _fail(self, transport: Transport, kind: str, message: str) -> None:
        self.counters[f"errors_{kind}"] += 1
        if len(message) > ERROR_TEXT_CHARS:
            message = f"{message[:ERROR_TEXT_CHARS]} ... ({len(message) - ERROR_TEXT_CHARS} more characters)"
        log.info("error reply (%s): %s", kind, message)
        try:
            await asyncio.wait_for(transport.send(f"{kind}: {message}"), self.settings.send_timeout_s)
            await transport.close(ERROR_CLOSE_CODE, "error; the reason is in the previous frame")
        except (TimeoutError, ConnectionGone):
            transport.abort()

    async def _answer(self, frame: bytes | str, layout: ObservationLayout, received: float) -> dict[str, Any]:
        """The reply to one frame; `received` is when it came in (time.monotonic())."""
        if isinstance(frame, str):
            raise WireError("expected a binary frame holding msgpack (openpi's msgpack-numpy), got a text frame")
        request = layout.parse(unpack(frame), self.settings.default_prompt)
        num_steps = request.num_steps or self.settings.num_steps
        noise = self._noise_for(request)
        size = self.policy.config.vision.image_size
        resizing = any(needs_resize(image, size) for image in request.images.values())
        if resizing or len(request.prompt) > INLINE_PROMPT_CHARS:
            prepared, preprocess_ms = await asyncio.get_running_loop().run_in_executor(
                self._prepare_pool, self._prepare, request, noise)
        else:
            prepared, preprocess_ms = self._prepare(request, noise)
        row = Row(prepared, request.state, preprocess_ms, num_steps)
        result = await self._submit(row)
        if isinstance(result.value, BaseException):
            raise result.value
        chunk: ActionChunk = result.value
        if not np.isfinite(chunk.actions).all():  # a numeric fault must not reach a robot as actions
            bad = int((~np.isfinite(chunk.actions)).sum())
            raise RuntimeError(f"the model returned {bad} non-finite action value(s) (NaN/inf) of "
                               f"{chunk.actions.size}; nothing was sent. A numeric fault in the engine (fp8 overflow, "
                               "a GPU error): check the server's log and restart it if it persists")
        now = time.monotonic()
        return {
            "actions": chunk.actions,
            "policy_timing": {"infer_ms": chunk.timings["total"], **chunk.timings},
            "server_timing": {"prepare_ms": (row.submitted - received) * 1e3, "queue_ms": result.queue_ms,
                              "run_ms": result.run_ms,
                              "wake_ms": (now - result.finished) * 1e3,
                              "batch_size": result.batch_size},
            "num_prompt_tokens": chunk.num_prompt_tokens,
        }

    def _noise_for(self, request: Request) -> np.ndarray:
        if request.noise is not None:
            return request.noise
        shape = (self.policy.action_horizon, self.policy.config.action_dim)
        if request.noise_seed is not None:
            return seeded_noise(request.noise_seed, *shape)
        return self._noise.standard_normal(shape, dtype=np.float32)  # drawn on the event loop: arrival order

    def _prepare(self, request: Request, noise: np.ndarray) -> tuple[PreparedObservation, float]:
        start = time.perf_counter()
        prepared = self.policy.prepare(request.images, request.state, request.prompt, noise, request.rtc)
        return prepared, (time.perf_counter() - start) * 1e3

    # --- the batch function (the batch thread)

    def run_rows(self, rows: Sequence[Row]) -> list[ActionChunk | Exception]:
        """One batch through the policy; if it fails, its rows one by one, so that only a failing row's client
        hears of it."""
        try:
            return list(self.policy.infer_prepared_batch([r.prepared for r in rows], [r.state for r in rows],
                                                         rows[0].num_steps, [r.preprocess_ms for r in rows]))
        except Exception as exc:  # noqa: BLE001
            if len(rows) == 1:
                return [exc]
            log.warning("a batch of %d failed (%s: %s); running its rows one by one", len(rows),
                        type(exc).__name__, exc)
            return [self.run_rows([row])[0] for row in rows]

    async def close(self) -> None:
        await self.batcher.close()
        self._prepare_pool.shutdown(wait=True)


@dataclass(frozen=True)
class PolicySpec:
    """How to load the policy: what `pi05-serve` was given, in a form a Ray replica can load it from."""

    checkpoint: str | None = None  # None: the built-in random-weight demo model
    tokenizer: str | None = None
    norm_stats: str | None = None
    config_preset: str | None = None
    device: str = "auto"
    precision: str = "auto"
    action_dim: int | None = None
    seed: int = 0
    cpu_threads: int | None = None
    max_batch: int = 1  # the fast pipeline's largest batch (ServeSettings.max_batch)
    fp8_vision: bool = False
    expert_kernels: str = "auto"
    # the checkpoint's conventions, overridden (Policy.load's arguments; None: the checkpoint's own)
    prompt_format: str | None = None
    image_resize: str | None = None
    joint_convention: str | None = None
    action_space: str | None = None
    action_space_mask: tuple[bool, ...] | None = None

    def check_files(self) -> None:
        """A checkpoint's tokenizer is given and is a file (a Ray driver checks it before any replica loads; the
        checkpoint's own check is model_image_keys)."""
        if self.checkpoint is None:
            return
        if not self.tokenizer:
            raise InputError(NEEDS_TOKENIZER)
        if not Path(self.tokenizer).is_file():
            raise InputError(f"--tokenizer {self.tokenizer}: no such file; give PaliGemma's SentencePiece model "
                             "(paligemma_tokenizer.model)")

    def model_image_keys(self) -> tuple[str, ...]:
        """The model's camera slots, read from the checkpoint's config and names without loading a tensor (a Ray
        driver checks the default layout with them before any replica loads; a bad path fails here too)."""
        if self.checkpoint is None:
            return PRESETS["pi05"].image_keys  # the demo model, tiny or full size: openpi's three slots
        return inspect_checkpoint(self.checkpoint, self.config_preset).config.image_keys

    def load(self) -> Policy:
        if self.cpu_threads:
            import torch

            torch.set_num_threads(self.cpu_threads)
        if self.checkpoint is None:
            return Policy.demo(device=self.device, precision=self.precision, seed=self.seed,
                               max_batch=self.max_batch, fp8_vision=self.fp8_vision,
                               expert_kernels=self.expert_kernels)
        if not self.tokenizer:
            raise InputError(NEEDS_TOKENIZER)
        return Policy.load(self.checkpoint, self.tokenizer, norm_stats=self.norm_stats,
                           config_preset=self.config_preset, device=self.device, precision=self.precision,
                           action_dim=self.action_dim, seed=self.seed, max_batch=self.max_batch,
                           fp8_vision=self.fp8_vision, expert_kernels=self.expert_kernels,
                           prompt_format=self.prompt_format, image_resize=self.image_resize,
                           joint_convention=self.joint_convention, action_space=self.action_space,
                           action_space_mask=list(self.action_space_mask) if self.action_space_mask else None)


def layout_views(layout: ObservationLayout, policy: Policy) -> int:
    """How many camera views a layout's requests carry at most (a camera map: as many as the policy has slots, up
    to what its runner takes)."""
    most = min(len(policy.image_keys), getattr(policy.runner, "max_views", len(policy.image_keys)))
    return min(len(layout.images) or most, most)


# Warm-up prompts: a short one and a typical task, so the prompt-length tiles (16 tokens, state included) that
# most requests reach have their prefill graphs before the first client. A longer prompt still captures once.
WARM_UP_PROMPTS = ("warm up", "pick up the red block on the left and put it in the blue bowl next to the cup")


def warm_up_views(settings: ServeSettings, layout: ObservationLayout, policy: Policy) -> tuple[int, ...]:
    """The camera counts to warm up for: `settings.warm_up_views`, or the layout's full count (`layout_views`).

    A robot that sends fewer cameras than its layout names (e.g. two of pi05_ros's three, or of aloha's) makes graphs
    of its own: name its count here, or its first batch of each size pays their capture and compile (seconds on a
    GPU with cold compile caches). A layout that requires all its cameras (droid, libero) only ever gets its full
    count."""
    most = layout_views(layout, policy)
    views = settings.warm_up_views or (most,)
    _check_views(views, most, layout, "the cameras this layout and model take")
    return tuple(dict.fromkeys(views))


def check_warm_up_views(settings: ServeSettings, layout: ObservationLayout, model_views: int) -> None:
    """What `warm_up_views` can check before a model is loaded: the counts against the layout's own cameras, or for
    a layout that maps camera names (pi05_ros) the model's camera slots, `model_views` (read from the checkpoint
    without loading it). A Ray deployment checks this in the driver, so that a wrong count fails there at once,
    not in every replica after its model load. What the loaded runner takes is checked once it is loaded."""
    if not settings.warm_up_views:
        return
    if layout.images:
        _check_views(settings.warm_up_views, len(layout.images), layout, "the cameras this layout names")
    else:
        _check_views(settings.warm_up_views, model_views, layout, "the model's camera slots")


def _check_views(views: Sequence[int], most: int, layout: ObservationLayout, what: str) -> None:
    if any(not 1 <= n <= most for n in views):
        raise InputError(f"warm-up view counts must be in 1..{most} ({what}), got {list(views)}")
    if layout.images and layout.all_images_required and set(views) != {most}:
        raise InputError(f"layout '{layout.name}' requires every one of its {most} cameras: its requests only ever "
                         f"carry {most}; warm up for {most} (the default), got {list(views)}")


def warm_up(policy: Policy, num_steps: int, views: int | Sequence[int] = 1,
            prompts: tuple[str, ...] = WARM_UP_PROMPTS) -> None:
    """Inferences before the first client's, so that it does not pay for first-call set-up: for each camera count in
    `views` and each batch bucket of the fast pipeline one batch per prompt (capturing its CUDA graphs). A request
    with a camera count not warmed, or a prompt in a tile not warmed, captures (and, at batches of 2 and more,
    compiles) on its first use: logged as `captured CUDA graph ...`. A runner without batch buckets (the reference
    runner) makes no graphs per camera count or batch size: one inference checks it runs."""
    size = policy.config.vision.image_size
    state = policy.example_state()
    counts = [views] if isinstance(views, int) else list(views)
    if not counts:
        raise ValueError("warm_up needs at least one camera count")
    buckets = getattr(policy.runner, "batch_buckets", None)
    if buckets is None:  # nothing captured or compiled per camera count or batch size
        counts, buckets, prompts = counts[:1], (1,), prompts[:1]
    for count in counts:
        images = {key: np.zeros((size, size, 3), np.uint8) for key in policy.image_keys[:max(1, count)]}
        for bucket in buckets:
            start = time.perf_counter()
            for prompt in prompts:
                policy.infer_batch([RawObservation(images, state, prompt)] * bucket, num_steps)
            log.info("warm-up: %d camera(s), batches of %d in %.2f s", count, bucket, time.perf_counter() - start)
