"""Normalization stats: openpi's json, LeRobot's processor files, formulas, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.normalize import (
    NormStats,
    Stats,
    find_lerobot_norm_stats,
    find_norm_stats,
    load_lerobot_norm_stats,
    load_norm_stats,
    save_norm_stats,
)


def _stats(dim: int) -> Stats:
    q01 = np.linspace(-2, 0, dim).astype(np.float32)
    q99 = np.linspace(1, 3, dim).astype(np.float32)
    return Stats(mean=(q01 + q99) / 2, std=np.ones(dim, np.float32), q01=q01, q99=q99)


def test_quantile_formula_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "assets" / "robot" / "norm_stats.json"
    save_norm_stats(path, _stats(3), _stats(2))
    ns = load_norm_stats(path)
    x = np.array([-2.0, 0.5, 3.0, 42.0], np.float32)  # one dim past the stats: left alone
    y = ns.normalize_state(x)
    expected = (x[:3] - ns.state.q01) / (ns.state.q99 - ns.state.q01 + 1e-6) * 2 - 1
    np.testing.assert_allclose(y[:3], expected, rtol=1e-6)
    assert y[3] == 42.0
    a = np.random.default_rng(0).uniform(-1, 1, (5, 32)).astype(np.float32)
    back = ns.unnormalize_actions(a)
    np.testing.assert_allclose(back[:, :2], (a[:, :2] + 1) / 2 * (ns.actions.q99 - ns.actions.q01 + 1e-6)
                               + ns.actions.q01, rtol=1e-6)
    np.testing.assert_array_equal(back[:, 2:], a[:, 2:])
    assert find_norm_stats(tmp_path) == path


def test_mean_std_mode(tmp_path: Path) -> None:
    path = tmp_path / "n.json"
    save_norm_stats(path, _stats(2), _stats(2))
    ns = load_norm_stats(path, use_quantiles=False)
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_allclose(ns.normalize_state(x), (x - ns.state.mean) / (ns.state.std + 1e-6), rtol=1e-6)


def _lerobot_processor_json(folder: Path, state_mode: str, action_mode: str) -> None:
    """The two processor files as LeRobot 0.6.1 writes them (only the steps that matter here)."""
    norm_map = {"VISUAL": "IDENTITY", "STATE": state_mode, "ACTION": action_mode}
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "normalizer_processor", "config": {"eps": 1e-08, "features": {}, "norm_map": norm_map},
         "state_file": "policy_preprocessor_step_3_normalizer_processor.safetensors"}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {"eps": 1e-08, "features": {}, "norm_map": norm_map},
         "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"}]}
    (folder / "policy_preprocessor.json").write_text(json.dumps(pre))
    (folder / "policy_postprocessor.json").write_text(json.dumps(post))


def test_lerobot_processor_file_and_its_modes_per_feature(tmp_path: Path) -> None:
    s = _stats(4)
    flat = {f"{feat}.{k}": getattr(s, k)
            for feat in ("observation.state", "action") for k in ("mean", "std", "q01", "q99")}
    path = tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    save_file(flat, str(path))
    ns = load_lerobot_norm_stats(path)  # no processor JSON: LeRobot PI05's defaults
    assert ns.use_quantiles and ns.state.dim == 4 and ns.convention == "lerobot"
    np.testing.assert_array_equal(ns.actions.q99, s.q99)
    _lerobot_processor_json(tmp_path, "MEAN_STD", "QUANTILES")
    mixed = load_lerobot_norm_stats(path)
    assert (mixed.state_mode, mixed.action_mode, mixed.eps) == ("MEAN_STD", "QUANTILES", 1e-8)
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    # LeRobot: eps on std when normalizing (fp32 ~1e-7 relative)
    np.testing.assert_allclose(mixed.normalize_state(x), (x - s.mean) / (s.std + 1e-8), rtol=1e-6)
    assert find_lerobot_norm_stats(tmp_path) == path  # the file the post-processor's JSON names


def test_lerobot_and_openpi_epsilons_differ_as_their_code_does() -> None:
    q01 = np.array([0.0, 0.25], np.float32)
    q99 = np.array([2.0, 0.25], np.float32)  # the second range is exactly 0
    s = Stats(mean=np.array([1.0, 0.0], np.float32), std=np.array([0.5, 2.0], np.float32), q01=q01, q99=q99)
    lerobot = NormStats(s, s, "QUANTILES", "MEAN_STD", "lerobot", 1e-8)
    openpi = NormStats(s, s, "QUANTILES", "MEAN_STD", "openpi", 1e-6)
    x = np.array([1.0, 0.3], np.float32)
    # LeRobot: no eps on a non-zero range, eps alone where the range is 0
    np.testing.assert_allclose(lerobot.normalize_state(x), [2 * 1.0 / 2.0 - 1, 2 * 0.05 / 1e-8 - 1], rtol=1e-6)
    # (fp32: ~1e-7 absolute near 0, ~1e-6 relative on the huge value)
    np.testing.assert_allclose(openpi.normalize_state(x), [1.0 / (2.0 + 1e-6) * 2 - 1, 0.05 / 1e-6 * 2 - 1],
                               rtol=1e-6, atol=1e-6)
    y = np.array([[0.5, -1.0]], np.float32)
    # un-normalizing mean/std: LeRobot adds no eps, openpi adds 1e-6 (exact in fp32 here: std 0.5 and 2.0)
    np.testing.assert_array_equal(lerobot.unnormalize_actions(y), [[0.5 * 0.5 + 1.0, -1.0 * 2.0 + 0.0]])
    np.testing.assert_allclose(openpi.unnormalize_actions(y), [[0.5 * (0.5 + 1e-6) + 1.0, -(2.0 + 1e-6)]],
                               rtol=1e-7)


def test_a_mode_without_its_statistics_is_a_clear_error() -> None:
    s = Stats(q01=np.zeros(2, np.float32), q99=np.ones(2, np.float32))
    with pytest.raises(CheckpointError, match="state is normalized with MEAN_STD but has no mean/std"):
        NormStats(s, s, "MEAN_STD", "QUANTILES", "lerobot", 1e-8)
    with pytest.raises(CheckpointError, match="openpi norm stats know only"):
        NormStats(s, s, "MIN_MAX", "QUANTILES", "openpi", 1e-6)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_norm_stats(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0]}}}))
    with pytest.raises(CheckpointError, match="'state' and 'actions'"):
        load_norm_stats(tmp_path / "bad.json")
    (tmp_path / "noq.json").write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0], "std": [1.0]},
                                                                  "actions": {"mean": [0.0], "std": [1.0]}}}))
    with pytest.raises(CheckpointError, match="no q01/q99"):
        load_norm_stats(tmp_path / "noq.json")
    with pytest.raises(CheckpointError, match="assets/<asset_id>/norm_stats.json"):
        find_norm_stats(tmp_path)
    for asset in ("a", "b"):
        save_norm_stats(tmp_path / "assets" / asset / "norm_stats.json", _stats(1), _stats(1))
    with pytest.raises(CheckpointError, match="several norm stats"):
        find_norm_stats(tmp_path)
    assert find_norm_stats(tmp_path, "b").parent.name == "b"


def test_the_documented_norm_stats_example_and_recipe_work(tmp_path: Path) -> None:
    """docs/checkpoints.md's norm_stats.json example loads, and its recipe writes a file that loads."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md").read_text()
    example = re.search(r"```json\n(.*?)```", doc, flags=re.DOTALL).group(1)
    (tmp_path / "norm_stats.json").write_text(example)
    stats = load_norm_stats(tmp_path / "norm_stats.json")
    assert stats.state.dim == stats.actions.dim == 7 and stats.actions.q99[-1] == 1.0

    recipe = re.search(r"```python\n(.*?)```", doc, flags=re.DOTALL).group(1)
    rng = np.random.default_rng(0)
    scope = {"states": rng.normal(size=(500, 6)), "actions": rng.normal(size=(500, 6))}
    recipe = recipe.replace("ckpt/assets", str(tmp_path / "ckpt" / "assets"))
    exec(compile("\n".join(line[2:] for line in recipe.splitlines()), "checkpoints.md", "exec"), scope)
    made = load_norm_stats(tmp_path / "ckpt" / "assets" / "my_robot" / "norm_stats.json")
    np.testing.assert_allclose(made.state.q01, np.quantile(scope["states"], 0.01, 0), rtol=1e-6)


def test_norm_stats_and_layout_files_that_are_not_text_are_named(tmp_path: Path) -> None:
    from pi05_ros.engine.errors import InputError
    from pi05_ros.engine.normalize import read_norm_stats_json
    from pi05_ros.serve.layouts import load_layout

    binary = tmp_path / "norm_stats.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="norm_stats.json is not a readable JSON file"):
        read_norm_stats_json(binary)
    with pytest.raises(InputError, match="cannot read the layout file"):
        load_layout(binary)
