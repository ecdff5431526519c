"""Loading real safetensors checkpoints written to disk in openpi and LeRobot layouts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pi05_ros.cli import info as info_cli
from pi05_ros.engine.checkpoint import CheckpointInfo, _check_names, inspect_checkpoint, load_model
from pi05_ros.engine.config import PRESETS, TINY
from pi05_ros.engine.demo import write_checkpoint
from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.reference import Pi05Model

# Names, shapes and dtypes of a real openpi Pi0.5 checkpoint's state dict (no weights).
REFERENCE_TSV = Path(__file__).resolve().parents[1] / "data" / "openpi_pi05_state_dict.tsv"


def _copy_with(src: Path, dst: Path, change) -> Path:  # noqa: ANN001
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_full_size_names_and_shapes_match_openpi_reference() -> None:
    """Every tensor of a real openpi Pi0.5 checkpoint (813 names/shapes) maps onto the model with its shape."""
    tensors = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        tensors[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    assert len(tensors) == 813
    info = CheckpointInfo(REFERENCE_TSV, REFERENCE_TSV, "openpi", PRESETS["pi05"], "", tensors)
    _check_names(info)
    assert info.problems == []
    assert info.unexpected == []
    counts = info.parameter_counts()
    # The TSV lists the tied table twice (embed_tokens and paligemma.lm_head); a saved checkpoint keeps one,
    # which gives the spec's 3,616,757,520 stored parameters.
    assert sum(counts.values()) - counts["embed_tokens"] == 3_616_757_520
    assert info.embed_name.endswith("embed_tokens.weight")


def test_openpi_and_lerobot_layouts_load_to_the_same_model(tiny_model: Pi05Model, tiny_checkpoint: Path,
                                                           tmp_path: Path, case_inputs) -> None:
    lerobot_dir = write_checkpoint(tiny_model, tmp_path / "lerobot", fmt="lerobot")
    a, info_a = load_model(tiny_checkpoint)
    b, info_b = load_model(lerobot_dir)
    assert (info_a.format, info_b.format) == ("openpi", "lerobot")
    assert (info_a.config.time_grid, info_b.config.time_grid) == ("openpi", "lerobot")  # each family's own
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    inputs = case_inputs(0)
    reference = tiny_model.sample_actions(inputs, 2)
    # Same weights bit for bit; CPU kernels may round differently with the buffers' memory alignment (~1e-7).
    torch.testing.assert_close(a.sample_actions(inputs, 2), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.sample_actions(inputs, 2), reference, rtol=0, atol=1e-5)


def test_bfloat16_load_keeps_openpi_float32_parameters(tiny_checkpoint: Path) -> None:
    model, _ = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["vlm.layers.0.mlp.gate_proj.weight"] == torch.bfloat16
    assert dtypes["vision.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    for name in ("vision.embeddings.patch_embedding.weight", "vision.embeddings.position_embedding.weight",
                 "vlm.layers.0.input_layernorm.weight", "expert.layers.0.input_layernorm.dense.weight",
                 "action_in_proj.weight", "action_out_proj.weight", "time_mlp_in.weight"):
        assert dtypes[name] == torch.float32, name
    assert model.embed_tokens.device.type == "cpu"  # the token table serves look-ups from host memory


def test_missing_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    victim = "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.up_proj.weight"
    broken = _copy_with(tiny_checkpoint, tmp_path / "missing", lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=r"missing tensor: .*layers\.1\.mlp\.up_proj\.weight"):
        load_model(broken)


def test_shape_mismatch_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    victim = "action_out_proj.weight"

    def change(t: dict) -> None:
        t[victim] = torch.zeros(16, 48)

    broken = _copy_with(tiny_checkpoint, tmp_path / "shape", change)
    expected = r"shape mismatch: action_out_proj.weight: file \[16, 48\], model \[32, 48\]"
    with pytest.raises(CheckpointError, match=expected):
        load_model(broken)


def test_wrong_preset_reports_mismatches(tiny_checkpoint: Path, tmp_path: Path) -> None:
    d = tmp_path / "noconfig"
    shutil.copytree(tiny_checkpoint, d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="does not fit the pi05 config"):
        load_model(d)
    model, _ = load_model(d, config_preset="tiny")
    assert model.cfg.vlm.width == TINY.vlm.width


def test_unexpected_tensors_are_reported_not_fatal(tiny_checkpoint: Path, tmp_path: Path, caplog) -> None:
    extra = _copy_with(tiny_checkpoint, tmp_path / "extra", lambda t: t.update({"some_adapter.weight": torch.ones(2)}))
    assert inspect_checkpoint(extra).unexpected == ["some_adapter.weight"]
    with caplog.at_level(logging.WARNING):
        load_model(extra)
    assert "some_adapter.weight" in caplog.text


def test_truncated_file_gives_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    d = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(d)


def test_foreign_files_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"this is not safetensors at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "junk")
    (tmp_path / "other").mkdir()
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="holds no Pi0.5 tensors"):
        load_model(tmp_path / "other")
    (tmp_path / "pi0").mkdir()
    save_file({"paligemma_with_expert.x": torch.zeros(1), "state_proj.weight": torch.zeros(1)},
              str(tmp_path / "pi0" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="Pi0 checkpoint"):
        load_model(tmp_path / "pi0")


def test_bad_paths_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(tmp_path / "empty")
    (tmp_path / "badcfg").mkdir()
    save_file({"a": torch.zeros(1)}, str(tmp_path / "badcfg" / "model.safetensors"))
    (tmp_path / "badcfg" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "badcfg")
    (tmp_path / "badcfg" / "config.json").write_text("[1, 2]")  # JSON, but not an object
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        load_model(tmp_path / "badcfg")


def test_loading_logs_progress_when_not_a_terminal(tiny_checkpoint: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pi05_ros.engine.checkpoint"):
        load_model(tiny_checkpoint)
    assert "loading model.safetensors" in caplog.text and "100%" in caplog.text


def test_load_accepts_the_weights_file_itself(tiny_checkpoint: Path) -> None:
    model, info = load_model(tiny_checkpoint / "model.safetensors")
    assert info.path == tiny_checkpoint and model.cfg.name == "tiny"


def test_pi05_info_cli(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert info_cli.main([str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "format:       openpi" in out and "problems:     none" in out
    assert "norm_stats.json" in out
    broken = _copy_with(tiny_checkpoint, tmp_path / "b", lambda t: t.pop("time_mlp_in.bias"))
    assert info_cli.main([str(broken)]) == 1
    assert "missing tensor: time_mlp_in.bias" in capsys.readouterr().out
    assert info_cli.main([str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_pi05_info_says_what_policy_load_needs_without_norm_stats(tiny_checkpoint: Path, tiny_model: Pi05Model,
                                                                  tokenizer_path: Path, tmp_path: Path, capsys) -> None:
    from pi05_ros.engine.policy import Policy

    bare = tmp_path / "openpi_without_assets"
    shutil.copytree(tiny_checkpoint, bare)
    shutil.rmtree(bare / "assets")
    assert info_cli.main([str(bare)]) == 1
    out = capsys.readouterr().out
    assert "problems:     none: the checkpoint loads" not in out
    assert "Policy.load needs norm stats: pass norm_stats=<path to norm_stats.json>" in out
    assert "assets/<asset_id>/norm_stats.json" in out and "compute_norm_stats" in out
    assert "LeRobot" not in out and "lerobot" not in out  # an openpi checkpoint gets openpi's advice
    with pytest.raises(CheckpointError, match="compute_norm_stats"):  # and Policy.load fails just so
        Policy.load(bare, tokenizer_path, device="cpu")
    # With a norm stats file given, it loads.
    stats = tiny_checkpoint / "assets" / "demo" / "norm_stats.json"
    assert info_cli.main([str(bare), "--norm-stats", str(stats)]) == 0
    out = capsys.readouterr().out
    assert "state dim 7, action dim 7" in out and "problems:     none: the checkpoint loads" in out

    lerobot = write_checkpoint(tiny_model, tmp_path / "lerobot_without_stats", fmt="lerobot")
    shutil.rmtree(lerobot / "assets")
    assert info_cli.main([str(lerobot)]) == 1
    out = capsys.readouterr().out
    assert "LeRobot normalizer" in out and "Policy.load needs norm stats" in out


def test_lerobot_config_keys_override_preset(tmp_path: Path) -> None:
    from pi05_ros.engine.config import load_config

    (tmp_path / "config.json").write_text(json.dumps({"type": "pi05", "chunk_size": 15, "max_action_dim": 32,
                                                      "max_state_dim": 32, "tokenizer_max_length": 120}))
    cfg = load_config(tmp_path)
    assert (cfg.action_horizon, cfg.max_token_len, cfg.max_state_dim) == (15, 120, 32)
