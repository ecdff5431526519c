"""Where pi05-serve prepares a request: views already at the model's size with a prompt of ordinary length on the
event loop (the hand-off to a thread cost more than the work, docs/benchmarks.md §54); views that need resizing, and
very long prompts (megabytes fit in a frame; tokenizing them takes seconds), on the prepare pool, off the loop. In
process, with the demo model on the CPU and the real protocol code; the answers are checked too. And a request
whose session is cancelled while it waits for its batch leaves the queue."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pi05_ros.engine.policy import Policy
from pi05_ros.serve.layouts import native_layout
from pi05_ros.serve.service import INLINE_PROMPT_CHARS, PolicyService, ServeSettings
from pi05_ros.serve.wire import pack


@pytest.fixture(scope="module")
def service() -> PolicyService:
    policy = Policy.demo(device="cpu", precision="fp32", seed=0)
    layout = native_layout()
    return PolicyService(policy, {layout.name: layout}, layout.name, ServeSettings(num_steps=1, window_ms=0))


def frame(policy: Policy, size: tuple[int, int], prompt: str) -> bytes:
    rng = np.random.default_rng(3)
    images = {key: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for key in policy.image_keys[:2]}
    return pack({"images": images, "state": np.zeros(policy.state_dim, np.float32), "prompt": prompt,
                 "noise_seed": 1})


def test_requests_are_prepared_on_the_loop_or_the_pool(service: PolicyService, monkeypatch) -> None:
    policy = service.policy
    threads: list[str] = []
    prepare = policy.prepare

    def recording_prepare(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        threads.append(threading.current_thread().name)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(policy, "prepare", recording_prepare)
    size = policy.config.vision.image_size
    long_prompt = "pick up the cup " * (INLINE_PROMPT_CHARS // 16 + 1)
    cases = [((size, size), "pick up the cup"), ((240, 320), "pick up the cup"), ((size, size), long_prompt)]

    async def answer_all() -> tuple[str, list[np.ndarray]]:
        loop_thread = threading.current_thread().name
        replies = [await service._answer(frame(policy, shape, prompt), service.layouts[service.default_layout],
                                         time.monotonic()) for shape, prompt in cases]
        return loop_thread, [reply["actions"] for reply in replies]

    loop_thread, actions = asyncio.run(answer_all())
    assert threads[0] == loop_thread  # 224x224 and a short prompt: prepared on the event loop
    assert threads[1].startswith("pi05-prepare") and threads[2].startswith("pi05-prepare")
    for chunk in actions:
        assert chunk.shape == (policy.action_horizon, policy.action_dof) and np.isfinite(chunk).all()
    # the same seed, the same 224x224 images: the long prompt is cut to the model's tokens, so the answer differs
    # from the short prompt's only through the prompt
    assert not np.allclose(actions[0], actions[2])


def test_a_fresh_service_reports_every_counter() -> None:
    """A /stats reader finds every key from the start (a Counter's keys used to appear only once counted)."""
    from pi05_ros.serve.service import STAT_COUNTERS

    policy = Policy.demo(device="cpu", precision="fp32", seed=0)
    layout = native_layout()
    stats = PolicyService(policy, {layout.name: layout}, layout.name, ServeSettings(num_steps=1)).stats()
    assert {key: stats[key] for key in STAT_COUNTERS} == dict.fromkeys(STAT_COUNTERS, 0)
    assert (stats["connections_open"], stats["pending"], stats["dropped"], stats["batch_sizes"]) == (0, 0, 0, {})


class _RecordingTransport:
    """A connection that records what the service does with it."""

    def __init__(self) -> None:
        self.sent: list = []
        self.closed: tuple[int, str] | None = None

    async def send(self, frame: bytes | str) -> None:
        self.sent.append(frame)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_a_session_that_begins_on_a_full_server_is_closed_with_1013() -> None:
    """The handshake's check and the session's start are apart on Ray (an await of the accept between them), so a
    burst can pass the first: the session's own check, with no await before the count goes up, holds the limit."""
    policy = Policy.demo(device="cpu", precision="fp32", seed=0)
    layout = native_layout()
    service = PolicyService(policy, {layout.name: layout}, layout.name, ServeSettings(num_steps=1, max_clients=2))
    service.open_connections = 2
    transport = _RecordingTransport()
    asyncio.run(service.serve(transport, layout))
    assert transport.sent == [] and transport.closed == (1013, "the server is full (2 clients); try again later")
    assert (service.open_connections, service.counters["rejected_full"], service.counters["connections"]) == (2, 1, 0)


def test_built_in_layouts_that_do_not_fit_the_model_are_not_served_and_the_default_must_fit() -> None:
    """A LeRobot checkpoint with cameras of its own names: the droid/libero/aloha layouts feed openpi's slots, which
    it lacks; the server starts with the layouts that fit (it refused to start at all before)."""
    from pi05_ros.engine.config import TINY
    from pi05_ros.engine.demo import demo_norm_stats, demo_prompt_tokenizer, random_model
    from pi05_ros.engine.errors import InputError
    from pi05_ros.engine.normalize import NormStats
    from pi05_ros.serve.layouts import BUILT_IN

    cfg = TINY.replace(image_keys=("front", "wrist", "side", "top"))
    policy = Policy(random_model(cfg, seed=0), demo_prompt_tokenizer(cfg.max_token_len), NormStats(*demo_norm_stats()),
                    precision="fp32")
    served = PolicyService(policy, BUILT_IN, "pi05_ros", ServeSettings(num_steps=1, window_ms=0))
    assert set(served.layouts) == {"pi05_ros"}
    with pytest.raises(InputError, match="layout 'droid' feeds camera slot"):
        PolicyService(policy, BUILT_IN, "droid", ServeSettings(num_steps=1, window_ms=0))


def test_metadata_and_warm_up_take_the_state_lengths_the_policy_takes() -> None:
    """Norm stats padded past the robot's joints (or a constant-zero last joint): the metadata says how many values
    a state may have, and the warm-up uses a length every action column can refer to."""
    from pi05_ros.engine.action_space import DELTA, ActionSpace
    from pi05_ros.engine.demo import demo_norm_stats
    from pi05_ros.engine.normalize import NormStats, Stats
    from pi05_ros.serve.service import warm_up

    demo = Policy.demo(device="cpu", precision="fp32")
    state, actions = demo_norm_stats()
    zero_last = Stats(**{k: np.concatenate([getattr(state, k)[:6], [0.0]]).astype(np.float32)
                         for k in state.present()})  # a joint that never moved from 0
    policy = Policy(demo.model, demo.tokenizer, NormStats(zero_last, actions), precision="fp32",
                    action_space=ActionSpace.uniform(DELTA, 7))
    assert (policy.state_dim, policy.max_state_values, len(policy.example_state())) == (6, 7, 7)
    padded = Stats(**{k: np.pad(getattr(state, k), (0, 25)) for k in state.present()})  # 32 dims, 7 real
    absolute = Policy(demo.model, demo.tokenizer, NormStats(padded, actions), precision="fp32")
    assert len(absolute.example_state()) == 7  # what the robot sends: the warmed text tiles are its requests
    warm_up(policy, 1)  # every column relative to the state: a 6-value warm-up state was refused
    layout = native_layout()
    meta = PolicyService(policy, {layout.name: layout}, layout.name,
                         ServeSettings(num_steps=1, window_ms=0)).metadata(layout)
    assert (meta["state_dim"], meta["max_state_values"]) == (6, 7)


class _OpenTransport:
    """A connection that never closes by itself (Ray's, when Ray cancels the session before its reader sees the
    client leave)."""

    async def wait_closed(self) -> None:
        await asyncio.Event().wait()


def test_a_session_cancelled_while_its_request_waits_withdraws_the_request() -> None:
    """Ray cancels a websocket session when its client leaves; if that cancellation comes before the transport's own
    disconnect, the request must still leave its batch (before, it ran for nobody)."""
    policy = Policy.demo(device="cpu", precision="fp32", seed=0)
    layout = native_layout()
    # a 2 s window and two connections said open: the row waits in the queue for a batch mate
    service = PolicyService(policy, {layout.name: layout}, layout.name, ServeSettings(num_steps=1, window_ms=2000))
    service.open_connections = 2

    async def cancel_while_queued() -> None:
        session = asyncio.ensure_future(service._answer_unless_gone(
            _OpenTransport(), frame(policy, (policy.config.vision.image_size,) * 2, "pick up the cup"), layout,
            time.monotonic()))
        while service.batcher.pending == 0:  # prepared and queued
            await asyncio.sleep(0.01)
        session.cancel()
        with pytest.raises(asyncio.CancelledError):
            await session
        await asyncio.sleep(2.5)  # past the window: a batch would have run by now
        await service.close()

    asyncio.run(cancel_while_queued())
    assert service.counters["abandoned"] == 1
    assert not service.batcher.batch_sizes  # no batch ran
