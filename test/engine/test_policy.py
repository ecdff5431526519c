"""The Policy end to end on a tiny checkpoint written to disk: images + state + prompt -> robot actions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.policy import Policy
from pi05_ros.engine.preprocess import prepare_image
from pi05_ros.engine.reference import ModelInputs

RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)
WRIST = RNG.integers(0, 256, (240, 320, 3), dtype=np.uint8)
STATE = np.array([0.1, -0.5, 1.2, 0.0, 2.0, -2.4, 0.7], np.float32)


@pytest.fixture(scope="module")
def policy(tiny_checkpoint: Path, tokenizer_path: Path) -> Policy:
    return Policy.load(tiny_checkpoint, tokenizer_path, device="cpu")


def test_infer_returns_robot_actions_and_timings(policy: Policy) -> None:
    chunk = policy.infer({"base_0_rgb": IMG, "left_wrist_0_rgb": WRIST}, STATE, "put the cup in the sink", 3)
    assert chunk.actions.shape == (policy.action_horizon, 7) and chunk.actions.dtype == np.float32
    assert np.isfinite(chunk.actions).all() and chunk.num_steps == 3 and chunk.num_prompt_tokens > 10
    assert set(chunk.timings) == set(policy.stage_names)
    assert all(v >= 0 for v in chunk.timings.values())
    assert chunk.timings["total"] >= chunk.timings["denoise"]
    stats = policy.stage_stats()
    assert set(stats["total"]) >= {"mean", "std", "p50", "p99"}


def test_policy_equals_model_on_same_inputs(policy: Policy) -> None:
    """Policy = preprocess + tokenize + model + un-normalize, nothing else."""
    noise = RNG.standard_normal((policy.action_horizon, 32)).astype(np.float32)
    chunk = policy.infer({"base_0_rgb": IMG}, STATE, "stack the blocks", 2, noise=noise)
    tokens, mask = policy.tokenizer("stack the blocks", policy.norm_stats.normalize_state(STATE))
    masked = np.full((3, 224, 224), -1, np.float32)
    images = np.stack([prepare_image(IMG), masked, masked])
    inputs = ModelInputs(torch.from_numpy(images)[None], torch.tensor([[True, False, False]]),
                         torch.from_numpy(tokens)[None], torch.from_numpy(mask)[None], torch.from_numpy(noise)[None])
    raw = policy.model.sample_actions(inputs, 2)[0].numpy()
    expected = policy.norm_stats.unnormalize_actions(raw[:, :7])
    np.testing.assert_allclose(chunk.actions, expected, rtol=1e-5, atol=1e-5)  # float32, same ops


def test_same_noise_same_actions_and_seeded_noise_differs(policy: Policy) -> None:
    noise = np.zeros((policy.action_horizon, 32), np.float32)
    a = policy.infer({"base_0_rgb": IMG}, STATE, "wipe the table", 1, noise=noise).actions
    b = policy.infer({"base_0_rgb": IMG}, STATE, "wipe the table", 1, noise=noise).actions
    np.testing.assert_array_equal(a, b)
    c = policy.infer({"base_0_rgb": IMG}, STATE, "wipe the table", 1).actions
    assert not np.array_equal(a, c)


def test_state_changes_the_prompt_and_actions(policy: Policy) -> None:
    noise = np.zeros((policy.action_horizon, 32), np.float32)
    a = policy.infer({"base_0_rgb": IMG}, STATE, "fold the towel", 2, noise=noise).actions
    b = policy.infer({"base_0_rgb": IMG}, -STATE, "fold the towel", 2, noise=noise).actions
    assert not np.allclose(a, b)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"state": np.array([np.nan] * 7)}, "NaN"),
    ({"state": np.zeros(5)}, "5 values but the norm stats describe 7"),
    ({"state": np.zeros((7, 1))}, "1-D"),
    ({"prompt": ""}, "prompt is empty"),
    ({"images": {"top_cam": IMG}}, "unknown camera slot"),
    ({"images": {}}, "no camera image"),
    ({"images": {"base_0_rgb": None}}, r"no camera image given \(every one is None\)"),
    ({"images": {"base_0_rgb": IMG.astype(np.float32)}}, "expected uint8"),
    ({"num_steps": 0}, "num_steps"),
    ({"noise": np.zeros((3, 3), np.float32)}, "noise must have shape"),
])
def test_bad_inputs_raise_input_error(policy: Policy, kwargs: dict, message: str) -> None:
    args = {"images": {"base_0_rgb": IMG}, "state": STATE, "prompt": "go", "num_steps": 1} | kwargs
    with pytest.raises(InputError, match=message):
        policy.infer(**args)


def test_views_prepared_before_equal_images_resized_in_infer(policy: Policy) -> None:
    """prepare_view (the ROS node resizes each frame on arrival) is the resize infer would do: the same actions, bit
    for bit (same float32 ops on the same pixels), and a prepared view owns its pixels."""
    noise = RNG.standard_normal((policy.action_horizon, 32)).astype(np.float32)
    base, wrist = policy.prepare_view(IMG, "base_0_rgb"), policy.prepare_view(WRIST, "left_wrist_0_rgb")
    assert base.pixels.shape == (224, 224, 3) and base.source_shape == (480, 640)
    prepared = policy.infer({"base_0_rgb": base, "left_wrist_0_rgb": wrist}, STATE, "open the drawer", 2, noise=noise)
    raw = policy.infer({"base_0_rgb": IMG, "left_wrist_0_rgb": WRIST}, STATE, "open the drawer", 2, noise=noise)
    np.testing.assert_array_equal(prepared.actions, raw.actions)
    square = RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    view = policy.prepare_view(square)
    np.testing.assert_array_equal(view.pixels, square)
    assert not np.shares_memory(view.pixels, square)  # the caller may overwrite its frame buffer
    with pytest.raises(InputError, match="base_0_rgb: expected uint8"):
        policy.prepare_view(IMG.astype(np.float32), "base_0_rgb")


def test_a_view_prepared_for_another_resize_is_refused(policy: Policy) -> None:
    from pi05_ros.engine.preprocess import prepare_view

    other = "lerobot" if policy.conventions.image_resize != "lerobot" else "openpi_client"
    view = prepare_view(IMG, 224, other)
    with pytest.raises(InputError, match=f"base_0_rgb: the view was prepared for 224x224 by the '{other}' resize"):
        policy.infer({"base_0_rgb": view}, STATE, "go", 1)


def test_policy_keeps_working_after_bad_input(policy: Policy) -> None:
    with pytest.raises(InputError):
        policy.infer({"base_0_rgb": IMG}, np.full(7, np.inf), "go", 1)
    assert policy.infer({"base_0_rgb": IMG}, STATE, "go", 1).actions.shape[1] == 7


def test_action_dim_override_and_describe(tiny_checkpoint: Path, tokenizer_path: Path) -> None:
    p = Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", action_dim=4)
    assert p.infer({"base_0_rgb": IMG}, STATE, "go", 1).actions.shape == (p.action_horizon, 4)
    assert "tiny" in p.describe() and "cpu" in p.describe() and not p.is_demo


def test_load_errors(tiny_checkpoint: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer .* does not exist"):
        Policy.load(tiny_checkpoint, tmp_path / "nope.model", device="cpu")
    with pytest.raises(CheckpointError, match="no norm stats for asset 'other'"):
        Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", norm_stats="other")
    with pytest.raises(CheckpointError, match="unknown precision"):
        Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", precision="int3")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="no CUDA GPU"):
            Policy.load(tiny_checkpoint, tokenizer_path, device="cuda")


def test_demo_policy_runs_on_cpu() -> None:
    demo = Policy.demo(device="cpu")
    assert demo.is_demo and demo.config.name == "tiny" and demo.state_dim == demo.action_dof == 7
    chunk = demo.infer({"base_0_rgb": IMG}, np.zeros(7), "pick up the red cube and put it in the bowl", 2)
    assert chunk.actions.shape == (10, 7) and "demo" in demo.describe()


def test_cpu_fallback_is_told_without_any_logging_setup(tmp_path: Path) -> None:
    """A plain Python session (no logging configured) hears that the CPU runs, and why."""
    code = "from pi05_ros.engine.policy import Policy; Policy.demo()"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU: running the plain PyTorch reference path on the CPU" in result.stderr
    assert "DEMO MODE" in result.stderr


def test_load_and_demo_reject_an_unknown_expert_kernels_choice(golden_dir, tmp_path) -> None:
    from pi05_ros.engine.demo import demo_tokenizer
    from pi05_ros.engine.errors import CheckpointError
    from pi05_ros.engine.policy import Policy

    with pytest.raises(CheckpointError, match="expert_kernels must be one of auto, on, off"):
        Policy.load(golden_dir, demo_tokenizer(tmp_path / "tok"), expert_kernels="fast")
    with pytest.raises(CheckpointError, match="expert_kernels must be one of auto, on, off"):
        Policy.demo(device="cpu", expert_kernels="fast")


def test_files_that_would_load_a_silently_wrong_policy_are_refused(tiny_checkpoint: Path, tokenizer_path: Path,
                                                                    tmp_path: Path, caplog) -> None:
    """Each of these loaded and ran before, giving NaN, inf or wrong-unit actions, or an IndexError mid-inference."""
    import json
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from pi05_ros.engine.config import TINY
    from pi05_ros.engine.demo import random_model, write_checkpoint

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_checkpoint, tmp_path / name))

    # weights stored as integers: a cast would have loaded them (actions up to 467 from an int32 projection)
    ints = copy("ints")
    tensors = load_file(str(ints / "model.safetensors"))
    tensors["action_out_proj.weight"] = (tensors["action_out_proj.weight"] * 100).to(torch.int32)
    save_file(tensors, str(ints / "model.safetensors"))
    with pytest.raises(CheckpointError, match="dtype: action_out_proj.weight is I32, expected a float type"):
        Policy.load(ints, tokenizer_path, device="cpu")

    # norm stats with NaN (or a value beyond float32) in a statistic the mode uses
    stats_file = next(tiny_checkpoint.glob("assets/*/norm_stats.json"))
    for value, shown in ((float("nan"), "NaN"), (1e39, "1e39")):
        bad = json.loads(stats_file.read_text())
        bad["norm_stats"]["actions"]["q99"][2] = value
        path = tmp_path / f"stats_{shown}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=r"actions.q99 has NaN/inf at index \[2\]; recompute"):
            Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", norm_stats=path)
    # a zero range is legitimate (a joint that never moved) and is said once, at load
    flat = json.loads(stats_file.read_text())
    flat["norm_stats"]["state"]["q99"][1] = flat["norm_stats"]["state"]["q01"][1]
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    with caplog.at_level(logging.WARNING, logger="pi05_ros.engine.normalize"):
        Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", norm_stats=tmp_path / "flat.json")
    assert any("state has a zero range at index [1]" in r.getMessage() for r in caplog.records)

    # more action columns than the norm stats describe: the extra ones would stay in model units
    dof = len(json.loads(stats_file.read_text())["norm_stats"]["actions"]["q99"])
    with pytest.raises(CheckpointError, match=f"action_dim {dof + 2} is more than the {dof} action columns"):
        Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", action_dim=dof + 2)

    # a tokenizer whose ids run past the model's embedding table (an IndexError at the first inference)
    small = write_checkpoint(random_model(TINY.replace(vocab_size=300), seed=1), tmp_path / "vocab300")
    with pytest.raises(CheckpointError, match="the tokenizer has 400 pieces but the model's embedding table has 300"):
        Policy.load(small, tokenizer_path, device="cpu")


@pytest.mark.parametrize(("change", "message"), [
    ({"action_horizon": "ten"}, "action_horizon must be a positive integer, got 'ten'"),
    ({"action_horizon": None}, "action_horizon must be a positive integer, got None"),
    ({"action_horizon": 10.7}, "action_horizon must be a positive integer, got 10.7"),
    ({"action_horizon": 0}, "action_horizon must be a positive integer, got 0"),
    ({"max_token_len": -5}, "max_token_len must be a positive integer, got -5"),
    ({"chunk_size": True}, "chunk_size must be a positive integer, got True"),
    ({"image_keys": "base_0_rgb"}, "image_keys must be a list of camera slot names, got 'base_0_rgb'"),
    ({"tiny": {"vision": 3}}, "config.json: .*restore the checkpoint's config.json"),
])
def test_config_json_fields_of_the_wrong_type_are_named(tiny_checkpoint: Path, tmp_path: Path, change: dict,
                                                        message: str) -> None:
    import json
    import shutil

    from pi05_ros.engine.checkpoint import load_model

    broken = Path(shutil.copytree(tiny_checkpoint, tmp_path / "cfg"))
    config = json.loads((broken / "config.json").read_text())
    config.update(change)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(broken)


def test_a_state_shorter_than_padded_norm_stats_takes_their_first_dims(policy: Policy) -> None:
    """openpi's older norm stats were computed on states zero-padded to 32: its Normalize uses the first len(state)
    dims, so an 8-joint robot sends 8 values. Padding is a trailing run of dims whose every statistic is 0."""
    from pi05_ros.engine.normalize import NormStats, Stats

    real = policy.norm_stats.state
    padded = Stats(**{k: np.pad(getattr(real, k), (0, 32 - real.dim)) for k in real.present()})
    wide = Policy(policy.model, policy.tokenizer, NormStats(padded, policy.norm_stats.actions), precision="fp32")
    assert (wide.state_dim, wide.max_state_values) == (7, 32)
    state = np.linspace(-1, 1, 7).astype(np.float32)
    noise = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    images = {"base_0_rgb": np.zeros((224, 224, 3), np.uint8)}
    # the same prompt (7 state values) and actions as with the unpadded stats
    np.testing.assert_array_equal(wide.prepare(images, state, "pick", noise).tokens,
                                  policy.prepare(images, state, "pick", noise).tokens)
    np.testing.assert_array_equal(wide.infer(images, state, "pick", 2, noise=noise).actions,
                                  policy.infer(images, state, "pick", 2, noise=noise).actions)
    wide.infer(images, np.zeros(32, np.float32), "pick", 2)  # the padded length itself is taken too
    with pytest.raises(InputError, match=r"state has 6 values but the norm stats describe 7 \(then 25 padding"):
        wide.infer(images, state[:6], "pick", 2)
    with pytest.raises(InputError, match="state has 33 values"):
        wide.infer(images, np.zeros(33, np.float32), "pick", 2)


def test_a_config_json_that_is_not_text_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from pi05_ros.engine.checkpoint import load_model

    broken = Path(shutil.copytree(tiny_checkpoint, tmp_path / "binary"))
    (broken / "config.json").write_bytes(b"\xff\xfe\x00\x01 not utf-8")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(broken)
