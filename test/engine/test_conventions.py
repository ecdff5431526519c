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
    # the demo model of a preset takes its robot's state: LIBERO sends 8 values (end effector position and
    # axis-angle, two gripper fingers) for 7 action columns
    from pi05_ros.engine.demo import demo_norm_stats_for

    for name, state_values, columns in (("pi05_libero", 8, 7), ("pi05_droid", 8, 8), ("pi05_aloha", 14, 14),
                                        ("pi05", 7, 7)):
        state, actions = demo_norm_stats_for(PRESETS[name])
        assert (state.mean.shape, actions.mean.shape) == ((state_values,), (columns,)), name
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


# openpi's policies/aloha_policy.py (adapt_to_pi=True), restated here from its text to check ours against
ALOHA_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], np.float64)


def openpi_aloha_state(state: np.ndarray) -> np.ndarray:
    """_decode_state: flip, then each gripper linear position -> pi's normalized gripper angle."""
    out = ALOHA_FLIP * state.astype(np.float64)
    linear = out[[6, 13]] * (0.05800 - 0.01844) + 0.01844
    angle = np.arcsin(np.clip((0.022 ** 2 + linear ** 2 - 0.036 ** 2) / (2 * 0.022 * linear), -1.0, 1.0))
    out[[6, 13]] = (angle - 0.5476) / (1.6296 - 0.5476)
    return out


def openpi_aloha_actions(actions: np.ndarray) -> np.ndarray:
    """_encode_actions: flip, then each gripper output + 0.5476 normalized over ALOHA's gripper joint range."""
    out = ALOHA_FLIP * actions.astype(np.float64)
    out[:, [6, 13]] = (out[:, [6, 13]] + 0.5476 - -0.6213) / (1.4910 - -0.6213)
    return out


@pytest.fixture(scope="module")
def aloha_checkpoint(tiny_model: Pi05Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tiny_model, tmp_path_factory.mktemp("aloha") / "pi05_aloha", fmt="openpi",
                            norm_stats=demo_norm_stats(14))


def test_the_aloha_preset_runs_openpis_joint_flips_and_gripper_conversion(aloha_checkpoint: Path,
                                                                         tokenizer_path: Path) -> None:
    from pi05_ros.engine.rtc import RtcRequest

    aloha = Policy.load(aloha_checkpoint, tokenizer_path, device="cpu", config_preset="pi05_aloha")
    plain = Policy.load(aloha_checkpoint, tokenizer_path, device="cpu", config_preset="pi05_aloha",
                        joint_convention="none")
    assert any("aloha_to_pi" in line and "preset" in line for line in aloha.describe_conventions())
    assert plain.joints.identity and aloha.action_space.kinds == ((DELTA,) * 6 + (ABSOLUTE,)) * 2
    state = np.array([0.3, 0.4, -0.2, 0.1, 0.5, -0.6, 0.5, -0.3, 0.2, 0.7, 0.0, -0.1, 0.2, 0.8], np.float32)
    noise = RNG.standard_normal((aloha.config.action_horizon, aloha.config.action_dim)).astype(np.float32)
    pi_state = openpi_aloha_state(state)
    # the model sees pi's state: the prompt's discretized state is the plain policy's for that state
    prepared = aloha.prepare({"base_0_rgb": IMG}, state, "fold the towel", noise)
    np.testing.assert_array_equal(prepared.tokens, plain.prepare({"base_0_rgb": IMG}, pi_state.astype(np.float32),
                                                                 "fold the towel", noise).tokens)
    # and its actions, the state added back in pi's space, come back in ALOHA's (float32 chain: 1e-5)
    pi_actions = plain.infer({"base_0_rgb": IMG}, pi_state.astype(np.float32), "fold the towel", 2, noise=noise)
    chunk = aloha.infer({"base_0_rgb": IMG}, state, "fold the towel", 2, noise=noise)
    np.testing.assert_allclose(chunk.actions, openpi_aloha_actions(pi_actions.actions), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(chunk.state, state)  # the chunk keeps the robot's own state
    # real-time chunking's previous chunk goes back to the model's units through the same steps
    normalized, _ = aloha.runner.run(prepared, 2)
    guidance = aloha.rtc_guidance(RtcRequest(chunk.actions, delay=2, beta=5.0), aloha.joints.state_to_model(state))
    np.testing.assert_allclose(guidance.previous[:, :14], normalized[:, :14], rtol=1e-4, atol=1e-4)


def test_the_aloha_convention_needs_alohas_fourteen_values(tiny_checkpoint: Path, tokenizer_path: Path,
                                                          aloha_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="joint_convention aloha_to_pi .* needs ALOHA's 14 state values"):
        Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", config_preset="pi05_aloha",
                    action_space="absolute")
    with pytest.raises(CheckpointError, match="unknown joint_convention 'aloha'"):
        Policy.load(aloha_checkpoint, tokenizer_path, device="cpu", joint_convention="aloha")
    aloha = Policy.load(aloha_checkpoint, tokenizer_path, device="cpu", joint_convention="aloha_to_pi")
    assert any("aloha_to_pi" in line and "given" in line for line in aloha.describe_conventions())
    sixteen = write_checkpoint(aloha.model, aloha_checkpoint.parent / "sixteen", norm_stats=demo_norm_stats(16))
    with pytest.raises(CheckpointError, match="needs ALOHA's 14 state values .* give 16 and 14"):
        Policy.load(sixteen, tokenizer_path, device="cpu", config_preset="pi05_aloha", action_dim=14)


def test_the_aloha_preset_on_a_lerobot_checkpoint_keeps_the_joints(tiny_model: Pi05Model, tmp_path: Path) -> None:
    """adapt_to_pi is openpi's: LeRobot trains on the dataset's joints as they are."""
    from pi05_ros.engine.conventions import resolve_conventions

    folder = lerobot_checkpoint(tiny_model, tmp_path / "lerobot_aloha")
    conventions = resolve_conventions(inspect_checkpoint(folder, "pi05_aloha"))
    assert conventions.joint_convention == "none" and "LeRobot has no adapt_to_pi" in \
        conventions.reasons["joint_convention"]
    given = resolve_conventions(inspect_checkpoint(folder, "pi05_aloha"), joint_convention="aloha_to_pi")
    assert given.joint_convention == "aloha_to_pi"
