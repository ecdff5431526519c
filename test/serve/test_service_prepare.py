"""Where pi05-serve prepares a request: views already at the model's size with a prompt of ordinary length on the
event loop (the hand-off to a thread cost more than the work, docs/benchmarks.md §54); views that need resizing, and
very long prompts (megabytes fit in a frame; tokenizing them takes seconds), on the prepare pool, off the loop. In
process, with the demo model on the CPU and the real protocol code; the answers are checked too."""

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
