"""Checkpoint conventions read from real files written here: prompt format by LeRobot version, camera names,
action spaces (LeRobot's relative actions, openpi's presets, the caller's), time grids, the token tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pi05_ros.cli import info as info_cli
from pi05_ros.engine.action_space import ABSOLUTE, DELTA, VELOCITY
from pi05_ros.engine.checkpoint import inspect_checkpoint, load_model
from pi05_ros.engine.conventions import parse_action_space
from pi05_ros.engine.demo import demo_norm_stats, write_checkpoint
from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.lerobot_files import relative_action_mask
from pi05_ros.engine.policy import Policy
from pi05_ros.engine.reference import Pi05Model, euler_schedule

RNG = np.random.default_rng(1)
IMG = RNG.integers(0, 256, (240, 320, 3), dtype=np.uint8)
STATE = np.array([0.1, -0.5, 1.2, 0.0, 2.0, -2.4, 0.7], np.float32)
EMBED = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
LM_HEAD = "model.paligemma_with_expert.paligemma.lm_head.weight"


def lerobot_checkpoint(model: Pi05Model, folder: Path, both_tables: bool = False, **config: object) -> Path:
    """The tiny model in LeRobot's layout; `both_tables` adds embed_tokens beside a DIFFERENT lm_head, as
    LeRobot 0.5+ saves; `config` goes into its config.json."""
    write_checkpoint(model, folder, fmt="lerobot")
    if both_tables:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[EMBED] = tensors[LM_HEAD].clone()
        tensors[LM_HEAD] = torch.randn_like(tensors[LM_HEAD])  # LeRobot's unused, un-fine-tuned table
        save_file(tensors, str(folder / "model.safetensors"))
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | config))
    return folder


def test_both_token_tables_load_and_embed_tokens_is_the_table(tiny_model: Pi05Model, tmp_path: Path) -> None:
    folder = lerobot_checkpoint(tiny_model, tmp_path / "both", both_tables=True)
    model, info = load_model(folder)
    assert info.embed_name.endswith("embed_tokens.weight") and info.unused_tables == [LM_HEAD[len("model."):]]
    assert info.problems == [] and info.unexpected == []
    torch.testing.assert_close(model.embed_tokens, tiny_model.embed_tokens, rtol=0, atol=0)  # not lm_head's


@pytest.mark.parametrize(("both_tables", "config", "version"), [
    (False, {"use_relative_actions": False}, ">= 0.5.1"),
    (True, {}, ">= 0.5.0"),
    (False, {}, None),
])
def test_prompt_format_follows_the_lerobot_version_the_files_show(tiny_model: Pi05Model, tmp_path: Path,
                                                                   tokenizer_path: Path, both_tables: bool,
                                                                   config: dict, version: str | None) -> None:
    folder = lerobot_checkpoint(tiny_model, tmp_path / "ckpt", both_tables, **config)
    policy = Policy.load(folder, tokenizer_path, device="cpu")
    assert policy.conventions.prompt_format == "pi05" and policy.conventions.lerobot_version == version
    reason = policy.conventions.reasons["prompt_format"]
    assert ("LeRobot <= 0.4 needs prompt_format=pi05_padded" in reason) == (version is None)
    unpadded = policy.tokenizer.encode("go", policy.prompt_state(STATE))
    padded = Policy.load(folder, tokenizer_path, device="cpu", prompt_format="pi05_padded")
    assert padded.conventions.reasons["prompt_format"] == "given"
    text_state = padded.prompt_state(STATE)
    assert text_state.shape == (32,) and (text_state[7:] == 0).all()  # zeros: bin 128 in the prompt
    assert len(padded.tokenizer.encode("go", text_state)) > len(unpadded)
    with pytest.raises(CheckpointError, match="unknown prompt_format 'pi06'"):
        Policy.load(folder, tokenizer_path, device="cpu", prompt_format="pi06")


def test_lerobot_camera_names_are_the_slots(tiny_model: Pi05Model, tmp_path: Path, tokenizer_path: Path) -> None:
    features = {"observation.images.top": {"type": "VISUAL", "shape": [3, 480, 640]},
                "observation.images.wrist": {"type": "VISUAL", "shape": [3, 224, 224]},
                "observation.state": {"type": "STATE", "shape": [7]}}
    folder = lerobot_checkpoint(tiny_model, tmp_path / "cams", input_features=features, empty_cameras=1)
    policy = Policy.load(folder, tokenizer_path, device="cpu")
    assert policy.image_keys == ("top", "wrist", "empty_camera_0")
    assert policy.slot_for("observation.images.wrist") == "wrist" and policy.slot_for("base_0_rgb") is None
    noise = np.zeros((policy.action_horizon, 32), np.float32)
    a = policy.infer({"top": IMG}, STATE, "go", 1, noise=noise).actions
    b = policy.infer({"observation.images.top": IMG}, STATE, "go", 1, noise=noise).actions
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"unknown camera slot 'base_0_rgb'.*'observation.images.top'"):
        policy.infer({"base_0_rgb": IMG}, STATE, "go", 1)
    with pytest.raises(InputError, match="two images given for camera slot 'top'"):
        policy.infer({"top": IMG, "observation.images.top": IMG}, STATE, "go", 1)


def test_lerobot_relative_actions_add_the_raw_state_on_the_mask(tiny_model: Pi05Model, tmp_path: Path,
                                                                tokenizer_path: Path) -> None:
    names = [f"joint_{i}" for i in range(6)] + ["Gripper_left"]
    folder = lerobot_checkpoint(tiny_model, tmp_path / "rel", use_relative_actions=True,
                                relative_exclude_joints=["gripper"], action_feature_names=names)
    policy = Policy.load(folder, tokenizer_path, device="cpu")
    assert policy.action_space.kinds == (DELTA,) * 6 + (ABSOLUTE,)  # "gripper" is a substring, case folded
    absolute = Policy.load(folder, tokenizer_path, device="cpu", action_space="absolute")
    noise = np.zeros((policy.action_horizon, 32), np.float32)
    relative = policy.infer({"base_0_rgb": IMG}, STATE, "go", 1, noise=noise).actions
    plain = absolute.infer({"base_0_rgb": IMG}, STATE, "go", 1, noise=noise).actions
    np.testing.assert_allclose(relative[:, :6] - plain[:, :6], np.broadcast_to(STATE[:6], (10, 6)), atol=1e-6)
    np.testing.assert_array_equal(relative[:, 6], plain[:, 6])
    # LeRobot's mask rule: no names or no exclusions -> all relative; names short of the columns -> rest relative
    assert relative_action_mask(3, ["gripper"], None) == [True] * 3
    assert relative_action_mask(3, [], ["a", "gripper", "c"]) == [True] * 3
    assert relative_action_mask(4, ["grip"], ["a", "gripper"]) == [True, False, True, True]


def test_presets_carry_openpis_action_spaces(tiny_checkpoint: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    from pi05_ros.engine.config import PRESETS

    assert PRESETS["pi05_droid"].action_space.kinds == (VELOCITY,) * 7 + (ABSOLUTE,)
    assert PRESETS["pi05_aloha"].action_space.kinds == ((DELTA,) * 6 + (ABSOLUTE,)) * 2
    assert PRESETS["pi05_droid_joint_position"].action_space.kinds == (DELTA,) * 7 + (ABSOLUTE,)
    libero = PRESETS["pi05_libero"]
    assert libero.prompt_format == "pi0" and libero.action_space.output_kinds == ("other",) * 7
    # the tiny checkpoint's 7 columns do not fit DROID's 8: a startup error that names the fix
    with pytest.raises(CheckpointError, match="describes 8 columns .* but the policy outputs 7; pass action_space"):
        Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", config_preset="pi05_droid")


def test_action_space_overrides_and_impossible_combinations(tiny_checkpoint: Path, tokenizer_path: Path) -> None:
    droid = parse_action_space("velocity", [True] * 6 + [False], 7)
    assert droid.kinds == (VELOCITY,) * 6 + (ABSOLUTE,)
    assert parse_action_space(None, [True, True], 4).kinds == (DELTA, DELTA, ABSOLUTE, ABSOLUTE)
    assert parse_action_space("end_effector", None, 3).output_kinds == ("other",) * 3
    assert parse_action_space("velocity, absolute", None, 2).kinds == (VELOCITY, ABSOLUTE)
    assert parse_action_space("", None, 2) is None
    for space, mask, message in [
        ("torque", None, "unknown action_space 'torque'"),
        ("absolute", [True], "with action_space=absolute it would mark nothing"),
        ("delta,absolute", [True], "give one of them"),
        ("delta,absolute", None, "lists 2 kinds but the policy outputs 3"),
        ("delta", [True] * 4, "has 4 entries but the policy outputs 3"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            parse_action_space(space, mask, 3)
    # a delta column needs a state value: 8 action columns over 7 state values
    p = Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", action_space="velocity",
                    action_space_mask=[True] * 6 + [False])
    assert p.action_space.kinds == (VELOCITY,) * 6 + (ABSOLUTE,) and p.action_space_reason == "given"
    assert Policy.load(tiny_checkpoint, tokenizer_path, device="cpu").action_space_reason.startswith(
        "absolute positions assumed")


def test_delta_column_without_a_state_value_fails_before_loading(tiny_model: Pi05Model, tmp_path: Path,
                                                                 tokenizer_path: Path) -> None:
    from pi05_ros.engine.normalize import Stats

    state, actions = demo_norm_stats(7)
    wide = Stats(**{k: np.concatenate([getattr(actions, k), getattr(actions, k)[:1]]) for k in actions.present()})
    folder = write_checkpoint(tiny_model, tmp_path / "wide", norm_stats=(state, wide))
    with pytest.raises(CheckpointError, match=r"column\(s\) \[7\] are deltas but the state has only 7 values"):
        Policy.load(folder, tokenizer_path, device="cpu", action_space="delta")


def test_each_family_has_its_time_grid() -> None:
    lerobot = [t for t, _ in euler_schedule(10, "lerobot")]
    openpi = [t for t, _ in euler_schedule(10, "openpi")]
    assert lerobot[2] == float(np.float32(0.8)) and openpi[2] == float(np.float32(0.79999995))
    assert len(lerobot) == len(openpi) == 10 and lerobot[0] == openpi[0] == 1.0
    assert {dt for _, dt in euler_schedule(10, "lerobot")} == {float(np.float32(-0.1))}
    with pytest.raises(ValueError, match="unknown time grid"):
        euler_schedule(3, "jax")


def test_pi05_info_reports_the_conventions(tiny_checkpoint: Path, capsys) -> None:  # noqa: ANN001
    assert info_cli.main([str(tiny_checkpoint), "--config-preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "prompt format  pi05: openpi tiny: the task and the discretized state" in out
    assert "image resize   openpi_client: openpi's clients resize with openpi_client.image_tools" in out
    assert "normalization  state QUANTILES, actions QUANTILES (openpi formulas, +1e-6)" in out
    assert "action space   7 x absolute: absolute positions assumed" in out
    assert "cameras        base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb" in out
    assert info_cli.main([str(tiny_checkpoint), "--action-space", "velocity",
                          "--action-space-mask", "true,true,true,true,true,true,false"]) == 0
    assert "per column (robot terms): velocity, velocity, velocity, velocity, velocity, velocity, position" in (
        capsys.readouterr().out)
    assert info_cli.main([str(tiny_checkpoint), "--action-space", "delta,delta"]) == 1
    assert "action space   impossible: action_space lists 2 kinds" in capsys.readouterr().out
    assert inspect_checkpoint(tiny_checkpoint).config.time_grid == "openpi"
