"""Normalization stats: openpi's json, LeRobot's processor files, formulas, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.normalize import (
    Stats,
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


def test_lerobot_processor_file(tmp_path: Path) -> None:
    s = _stats(4)
    flat = {f"{feat}.{k}": getattr(s, k)
            for feat in ("observation.state", "action") for k in ("mean", "std", "q01", "q99")}
    path = tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    save_file(flat, str(path))
    ns = load_lerobot_norm_stats(path)
    assert ns.use_quantiles and ns.state.dim == 4
    np.testing.assert_array_equal(ns.actions.q99, s.q99)
    (tmp_path / "policy_postprocessor.json").write_text(json.dumps({"norm_map": {"ACTION": "MEAN_STD"}}))
    assert not load_lerobot_norm_stats(path).use_quantiles


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
