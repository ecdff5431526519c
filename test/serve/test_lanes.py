"""pi05-serve's lanes (`--lanes`): pipelines over one model that run batches at once, each on its own thread. In
process, with the protocol code and the fast pipeline on the CPU (no CUDA graphs or streams there; the rest as on a
GPU): requests spread over the lanes, each answer is what the policy gives that request alone, and a policy
without the fast pipeline says lanes need it."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.fast.pipeline import Pi05Pipeline
from pi05_ros.engine.policy import Policy
from pi05_ros.serve.layouts import native_layout
from pi05_ros.serve.service import PolicyService, ServeSettings
from pi05_ros.serve.wire import pack

NUM_STEPS = 2


@pytest.fixture(scope="module")
def policy() -> Policy:
    demo = Policy.demo(device="cpu", precision="fp32", seed=0)
    # the fast pipeline without graphs: what a GPU runs, minus CUDA graphs and streams
    return demo.with_runner(Pi05Pipeline(demo.model, "bf16", use_graphs=False, compile=False, expert_kernels="off",
                                         max_batch=2), precision="bf16")


def frame(policy: Policy, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    size = policy.config.vision.image_size
    images = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in policy.image_keys[:2]}
    return pack({"images": images, "state": rng.uniform(-1, 1, policy.state_dim).astype(np.float32),
                 "prompt": f"pick up cup number {seed}", "noise_seed": seed})


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_requests_spread_over_the_lanes_and_each_gets_its_own_answer(policy: Policy) -> None:
    layout = native_layout()
    service = PolicyService(policy, {layout.name: layout}, layout.name,
                            ServeSettings(num_steps=NUM_STEPS, window_ms=0, max_batch=2, lanes=2))
    assert len(service.lanes) == 2 and service.lanes[1].runner is not policy.runner
    assert service.lanes[1].runner.fast is policy.runner.fast  # one model's weights
    threads: dict[int, set[str]] = {0: set(), 1: set()}
    for index, lane in enumerate(service.lanes):
        run = lane.infer_prepared_batch

        def recording(*args, _run=run, _index=index, **kwargs):  # noqa: ANN002, ANN003, ANN202
            threads[_index].add(threading.current_thread().name)
            time.sleep(0.05)  # hold the lane, so the next batch goes to the other one
            return _run(*args, **kwargs)

        lane.infer_prepared_batch = recording
    seeds = list(range(8))
    layout_used = service.layouts[service.default_layout]

    async def answer_all() -> list[dict]:
        replies = await asyncio.gather(*(service._answer(frame(policy, seed), layout_used, time.monotonic())
                                         for seed in seeds))
        await service.close()
        return list(replies)

    replies = asyncio.run(answer_all())
    assert threads[0] and threads[1] and not threads[0] & threads[1]  # both lanes ran, each on its own thread
    assert sorted(reply["server_timing"]["batch_size"] for reply in replies) == [2] * 8

    alone = PolicyService(policy, {layout.name: layout}, layout.name,
                          ServeSettings(num_steps=NUM_STEPS, window_ms=0, max_batch=1))

    async def one_by_one() -> list[dict]:
        out = [await alone._answer(frame(policy, seed), layout_used, time.monotonic()) for seed in seeds]
        await alone.close()
        return out

    for got, want in zip(replies, asyncio.run(one_by_one()), strict=True):
        # bf16 GEMM inputs: products over 2 rows may round unlike over 1 (test_fast_pipeline_batch's bound)
        assert rel_err(got["actions"], want["actions"]) < 1e-3
    assert not np.allclose(replies[0]["actions"], replies[1]["actions"])  # the requests really differ


def test_lanes_need_the_fast_pipeline() -> None:
    policy = Policy.demo(device="cpu", precision="fp32", seed=0)  # the reference runner
    layout = native_layout()
    with pytest.raises(CheckpointError, match="lanes need the fast GPU pipeline"):
        PolicyService(policy, {layout.name: layout}, layout.name, ServeSettings(num_steps=1, lanes=2))
