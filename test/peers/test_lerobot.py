"""The engine against the real LeRobot 0.6.1 on small random PI05 checkpoints that LeRobot itself saved.

test/peers/lerobot_reference.py (run in the LeRobot venv) builds each case's policy with LeRobot's classes,
saves it with LeRobot's save_pretrained and processors, loads it back as a LeRobot user does and records its
token ids, its model images and its actions (predict_action_chunk + the post-processor) on fixed inputs and
noise. Here the same files go through Policy.load and Policy.infer, with nothing told but the checkpoint path
and the tokenizer: the conventions must come from LeRobot's files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peers import LEROBOT_CASES

from pi05_ros.cli import info as info_cli
from pi05_ros.engine.policy import Policy
from pi05_ros.engine.preprocess import to_model_range

# float32 on both sides, the same operations in a different order: ~1e-7 relative measured; 1e-5 allowed.
ACTION_RTOL = 1e-5


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def load_case(root: Path, case: str) -> tuple[Policy, dict, dict[str, np.ndarray]]:
    io = dict(np.load(root / case / "io.npz"))
    checkpoint = root / case / "checkpoint"
    policy = Policy.load(checkpoint, checkpoint / "paligemma_tokenizer.model", device="cpu")
    images = {str(key): io[f"image.{key}"] for key in io["camera_keys"]}
    return policy, io, images


@pytest.mark.parametrize("case", LEROBOT_CASES)
def test_actions_match_lerobot(lerobot_cases: Path, case: str) -> None:
    policy, io, images = load_case(lerobot_cases, case)
    task, state = str(io["task"]), io["state"]
    obs = policy.prepare(images, state, task, io["noise"])
    # the same token ids as LeRobot's HF tokenizer and its prompt step, before any action is compared
    np.testing.assert_array_equal(obs.tokens, io["token_ids"])
    np.testing.assert_array_equal(obs.token_mask, io["token_mask"])
    # LeRobot's normalization of the state (fp32, ~1e-7 relative; the constant dim is ~5e6 after its eps)
    np.testing.assert_allclose(policy.norm_stats.normalize_state(state), io["norm_state"], rtol=1e-6)
    # the images SigLIP sees: LeRobot puts the given cameras first (a masked view changes nothing after it)
    given = [to_model_range(im) for im in obs.images if im is not None]
    assert len(given) == int(io["model_image_masks"].sum())
    for ours, theirs in zip(given, io["model_images"][io["model_image_masks"]], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)  # fp32 bilinear weights, ~1e-7
    normalized, _ = policy.runner.run(obs, 10)
    err_normalized = relative_error(normalized[:, : policy.action_dof], io["actions_normalized"])
    chunk = policy.infer(images, state, task, 10, noise=io["noise"])
    err = relative_error(chunk.actions, io["actions"])
    print(f"[lerobot 0.6.1] {case}: {int(obs.token_mask.sum())} tokens, relative error normalized "
          f"{err_normalized:.2e}, robot units {err:.2e}")
    assert err_normalized < ACTION_RTOL and err < ACTION_RTOL


def test_checkpoint_conventions_come_from_lerobots_files(lerobot_cases: Path) -> None:
    io = np.load(lerobot_cases / "relative" / "io.npz")
    assert bool(io["both_tables_saved"])  # LeRobot 0.6.1 saved embed_tokens and lm_head: the loader took one
    policy, _, _ = load_case(lerobot_cases, "relative")
    assert policy.checkpoint.embed_name.endswith("embed_tokens.weight")
    assert policy.conventions.prompt_format == "pi05" and policy.conventions.lerobot_version == ">= 0.5.1"
    assert (policy.conventions.image_resize, policy.conventions.time_grid) == ("lerobot", "lerobot")
    # relative_exclude_joints ["gripper"] over joint_0..5, gripper: six deltas, the gripper absolute
    assert policy.action_space.kinds == ("delta",) * 6 + ("absolute",)
    assert policy.image_keys == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    assert policy.slot_for("observation.images.left_wrist_0_rgb") == "left_wrist_0_rgb"
    mixed, _, _ = load_case(lerobot_cases, "mixed")
    assert (mixed.norm_stats.state_mode, mixed.norm_stats.action_mode) == ("MEAN_STD", "QUANTILES")
    assert mixed.action_space.kinds == ("absolute",) * 7


def test_feature_names_feed_the_same_slots(lerobot_cases: Path) -> None:
    policy, io, images = load_case(lerobot_cases, "camera_480x640")
    assert all(name.startswith("observation.images.") for name in images)  # LeRobot's feature names
    by_slot = {name.removeprefix("observation.images."): image for name, image in images.items()}
    a = policy.infer(images, io["state"], str(io["task"]), 2, noise=io["noise"]).actions
    b = policy.infer(by_slot, io["state"], str(io["task"]), 2, noise=io["noise"]).actions
    np.testing.assert_array_equal(a, b)


def test_pi05_info_reports_lerobots_conventions(lerobot_cases: Path, capsys) -> None:  # noqa: ANN001
    assert info_cli.main([str(lerobot_cases / "relative" / "checkpoint")]) == 0
    out = capsys.readouterr().out
    assert "family         lerobot, LeRobot >= 0.5.1" in out
    assert "prompt format  pi05: LeRobot >= 0.5.1: config.json has use_relative_actions" in out
    assert "normalization  state QUANTILES, actions QUANTILES (LeRobot formulas" in out
    assert "action space   0:delta, 1:delta, 2:delta, 3:delta, 4:delta, 5:delta, 6:absolute: LeRobot relative" in out
    assert "per column (robot terms): position, position" in out
    assert "image resize   lerobot" in out and "time grid      lerobot" in out
    assert "embed_tokens.weight (unused: paligemma_with_expert.paligemma.lm_head.weight)" in out


def test_lerobots_time_grid_is_what_closes_the_gap(lerobot_cases: Path) -> None:
    """openpi's accumulated float32 grid on a LeRobot checkpoint leaves a few times the error of LeRobot's own
    1 + k*dt grid (measured 4.4e-7 vs 9e-8 relative): the grid the checkpoint's family uses is the closer one."""
    policy, io, images = load_case(lerobot_cases, "camera_480x640")
    obs = policy.prepare(images, io["state"], str(io["task"]), io["noise"])
    errors = {}
    for grid in ("lerobot", "openpi"):
        policy.model.cfg = policy.model.cfg.replace(time_grid=grid)
        normalized, _ = policy.runner.run(obs, 10)
        errors[grid] = relative_error(normalized[:, : policy.action_dof], io["actions_normalized"])
    assert errors["lerobot"] * 2 < errors["openpi"], errors
