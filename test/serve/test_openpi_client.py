"""The real openpi client (openpi-client 0.1.2 from the package registry, numpy 1.26, in its own venv) against
pi05-serve on loopback: metadata on connect, /healthz, actions equal to the local Policy.infer for the same
inputs and noise seed, openpi's error convention, several clients at once, and openpi's three example layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_harness import OneThreadPolicy, ServerProcess, droid_observation, run_openpi_client

# float32 on both sides. The server runs one torch thread and the local Policy two, which orders some sums
# differently, and rows batched with other clients' differ from batch 1 by ~2e-6 (test/engine/test_batch.py).
RTOL = ATOL = 1e-5
NUM_STEPS = 5
DEFAULT_PROMPT = "fold the towel"


@pytest.fixture(scope="module")
def server(start_server, model_args: list[str]) -> ServerProcess:
    # A wide batch window, so that clients sending together land in one batch even on a loaded machine.
    return start_server([*model_args, "--robot", "droid", "--num-steps", str(NUM_STEPS), "--batch-window-ms", "100",
                         "--default-prompt", DEFAULT_PROMPT, "--metadata", '{"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}'])


def seeded(policy: OneThreadPolicy, seed: int) -> np.ndarray:
    """The noise the server makes for noise_seed (documented in serve/service.py)."""
    shape = (policy.action_horizon, policy.config.action_dim)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def expected_droid(policy: OneThreadPolicy, obs: dict[str, Any]) -> np.ndarray:
    """What Policy.infer answers for a DROID observation (keys mapped here by hand, as openpi's DroidInputs do)."""
    images = {"base_0_rgb": obs["observation/exterior_image_1_left"],
              "left_wrist_0_rgb": obs["observation/wrist_image_left"]}
    state = np.concatenate([obs["observation/joint_position"], obs["observation/gripper_position"]])
    return policy.infer(images, state, obs["prompt"], NUM_STEPS, noise=seeded(policy, obs["noise_seed"])).actions


def test_metadata_health_and_actions_equal_local_inference(server: ServerProcess, local_policy: OneThreadPolicy,
                                                           openpi_client_python: Path, tmp_path: Path) -> None:
    assert server.http_get("/healthz") == (200, "OK\n")
    rng = np.random.default_rng(1)
    observations = [droid_observation(rng, prompt, seed=seed) for prompt, seed in
                    (("put the cup in the sink", 1), ("stack the blocks", 2), ("open the drawer", 3))]
    observations.append(dict(observations[0]))  # the same observation and seed again
    observations.append(droid_observation(rng, "wipe the table", seed=4, size=(480, 640)))  # resized on the server
    result = run_openpi_client(openpi_client_python, server.url(), {"mode": "sequence",
                                                                     "observations": observations}, tmp_path)
    assert result["numpy"].startswith("1.")  # really openpi-client's own environment (numpy < 2)
    meta = result["metadata"]
    assert meta["server"] == "pi05_ros" and meta["layout"]["name"] == "droid"
    assert (meta["action_horizon"], meta["action_dof"], meta["state_dim"], meta["num_steps"]) == (10, 8, 8, NUM_STEPS)
    assert meta["reset_pose"] == [0, -1.5, 1.5, 0, 0, 0]  # --metadata entries reach openpi's clients
    replies = [entry["reply"] for entry in result["results"]]
    for index, (obs, reply) in enumerate(zip(observations, replies, strict=True)):
        assert {"actions", "policy_timing", "server_timing"} <= set(reply)
        assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (10, 8)
        np.testing.assert_allclose(reply["actions"], expected_droid(local_policy, obs), rtol=RTOL, atol=ATOL)
        assert reply["server_timing"]["infer_ms"] > 0 and reply["policy_timing"]["infer_ms"] > 0
        assert ("prev_total_ms" in reply["server_timing"]) == (index > 0)  # openpi: from the second reply on
    np.testing.assert_array_equal(replies[3]["actions"], replies[0]["actions"])  # same seed, same answer
    assert not np.allclose(replies[1]["actions"], replies[0]["actions"])


def test_an_error_is_a_text_reply_then_close_1011_and_others_go_on(server: ServerProcess,
                                                                     openpi_client_python: Path,
                                                                     tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    bad = droid_observation(rng, seed=5)
    del bad["observation/gripper_position"]
    result = run_openpi_client(openpi_client_python, server.url(),
                               {"mode": "sequence", "observations": [bad, droid_observation(rng, seed=6)]}, tmp_path)
    error, after = result["results"]
    assert error["error"].startswith("Error in inference server:\nInputError: missing state key(s) "
                                     "['observation/gripper_position']")
    assert error["after_error"] == "ConnectionClosedError"  # the server closed that connection (1011)
    assert after["reply"]["actions"].shape == (10, 8)  # a new connection is served


def test_several_clients_at_once_get_their_own_answers(server: ServerProcess, local_policy: OneThreadPolicy,
                                                      openpi_client_python: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    prompts = ("put the cup in the sink", "stack the blocks", "push the button", "open the drawer and take the spoon")
    observations = [droid_observation(rng, prompt, seed=10 + i) for i, prompt in enumerate(prompts)]
    result = run_openpi_client(openpi_client_python, server.url(),
                               {"mode": "concurrent", "observations": observations, "repeat": 3}, tmp_path)
    batch_sizes = []
    for obs, rounds in zip(observations, result["results"], strict=True):
        expected = expected_droid(local_policy, obs)
        assert len(rounds) == 3
        for entry in rounds:
            np.testing.assert_allclose(entry["reply"]["actions"], expected, rtol=RTOL, atol=ATOL)
            batch_sizes.append(entry["reply"]["server_timing"]["batch_size"])
    assert max(batch_sizes) >= 2, batch_sizes  # they were batched together, and still each got its own answer


def test_openpi_libero_and_aloha_layouts(server: ServerProcess, local_policy: OneThreadPolicy,
                                         openpi_client_python: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    state = rng.uniform(-2, 2, 8)
    libero = {"observation/image": image, "observation/wrist_image": wrist, "observation/state": state,
              "prompt": "pick up the black bowl", "noise_seed": 21}
    # openpi's ALOHA clients: channels-first cameras under "images", cam_low among them, no prompt
    aloha = {"images": {"cam_high": image.transpose(2, 0, 1), "cam_low": wrist.transpose(2, 0, 1),
                        "cam_right_wrist": wrist.transpose(2, 0, 1)}, "state": state, "noise_seed": 22}
    got_libero = run_openpi_client(openpi_client_python, server.url("/libero"),
                                   {"mode": "sequence", "observations": [libero]}, tmp_path)
    got_aloha = run_openpi_client(openpi_client_python, server.url("/aloha"),
                                  {"mode": "sequence", "observations": [aloha]}, tmp_path)
    assert got_libero["metadata"]["layout"]["name"] == "libero" and got_aloha["metadata"]["layout"]["name"] == "aloha"
    want_libero = local_policy.infer({"base_0_rgb": image, "left_wrist_0_rgb": wrist}, state, libero["prompt"],
                                     NUM_STEPS, noise=seeded(local_policy, 21)).actions
    want_aloha = local_policy.infer({"base_0_rgb": image, "right_wrist_0_rgb": wrist}, state, DEFAULT_PROMPT,
                                    NUM_STEPS, noise=seeded(local_policy, 22)).actions
    np.testing.assert_allclose(got_libero["results"][0]["reply"]["actions"], want_libero, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_aloha["results"][0]["reply"]["actions"], want_aloha, rtol=RTOL, atol=ATOL)
