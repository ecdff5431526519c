"""The built-in random-weight model: weights, a small SentencePiece tokenizer and norm stats, all made here.

Used by the demo (node without a checkpoint), the tests and the benchmark. Also writes such a model as a
real checkpoint on disk in openpi or LeRobot layout, so loaders are exercised exactly as users run them.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from pi05_ros.engine.checkpoint import EMBED_NAMES, NAME_PREFIXES
from pi05_ros.engine.config import Pi05Config
from pi05_ros.engine.normalize import Stats, save_norm_stats
from pi05_ros.engine.reference import Pi05Model, build_on_meta
from pi05_ros.engine.tokenizer import PromptTokenizer

DEMO_DOF = 7
# The tiny model keeps the golden dimensions but takes realistic prompts (a weight shape does not depend on it).
DEMO_MAX_TOKEN_LEN = 96

# Text the demo tokenizer is trained on: task words, and every number a discretized state can print.
_CORPUS_LINES = [
    "Task: pick up the red cube and put it in the bowl, State: 12 128 255 0 77 190 3;",
    "Action: put the cup in the sink", "open the drawer and take out the spoon",
    "move the arm to the left", "close the gripper", "stack the blocks", "wipe the table",
    "fold the towel", "push the button", "place the bottle on the shelf",
    " ".join(str(i) for i in range(256)),
]


def demo_tokenizer(directory: str | Path | None = None, vocab_size: int = 400) -> Path:
    """Train a small SentencePiece model with PaliGemma's special ids (pad 0, eos 1, bos 2, unk 3).

    Without `directory` it goes to a new temporary folder that the caller owns; `demo_prompt_tokenizer` is the
    one to use for a tokenizer in memory with nothing left on disk."""
    directory = Path(directory or tempfile.mkdtemp(prefix="pi05_demo_tok_"))
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_CORPUS_LINES * 20) + "\n")
    prefix = directory / "demo_tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, character_coverage=1.0,
        # PaliGemma's tokenizer keeps "\n" as a piece; the default normalizer would fold it into a space.
        user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2, num_threads=1,
    )
    return prefix.with_suffix(".model")


def demo_prompt_tokenizer(max_len: int, state_in_prompt: bool = True) -> PromptTokenizer:
    """The demo tokenizer, loaded; its training folder is deleted again (a node start must not leave files)."""
    with tempfile.TemporaryDirectory(prefix="pi05_demo_tok_") as folder:
        return PromptTokenizer(demo_tokenizer(folder), max_len, state_in_prompt)


def demo_norm_stats(dof: int = DEMO_DOF, state_values: int | None = None) -> tuple[Stats, Stats]:
    """Plausible (state, action) stats for an arm of `dof` - 1 joints with a gripper: joints within +-2.5 rad,
    gripper in [0, 1]; the state has `state_values` of them where the robot sends another count (default dof)."""

    def stats(size: int) -> Stats:
        q01 = np.array([-2.5] * (size - 1) + [0.0], dtype=np.float32)
        q99 = np.array([2.5] * (size - 1) + [1.0], dtype=np.float32)
        return Stats(mean=(q01 + q99) / 2, std=(q99 - q01) / 4, q01=q01, q99=q99)

    return stats(state_values or dof), stats(dof)


def demo_norm_stats_for(cfg: Pi05Config) -> tuple[Stats, Stats]:
    """demo_norm_stats of the size of the robot a preset was made for (pi05_droid: 8 columns, pi05_aloha: 14,
    pi05_libero: 8 state values for 7 columns); the demo arm's otherwise."""
    if cfg.action_space is None:
        return demo_norm_stats()
    return demo_norm_stats(cfg.action_space.dof, cfg.robot_state_values)


def _init_mean_std(name: str, shape: torch.Size) -> tuple[float, float]:
    """Fan-in scaled random weights (as the golden data was made) so every part influences the actions."""
    if name.endswith("bias"):
        return 0.0, 0.01
    if len(shape) == 1:  # norm weights: SigLIP LayerNorm multiplies by w, Gemma RMSNorm by (1 + w)
        return (1.0 if name.startswith("vision.") else 0.0), 0.1
    if "position_embedding" in name:
        return 0.0, 0.2
    return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))


def random_model(cfg: Pi05Config, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Pi05Model:
    """A Pi05Model with random weights, created directly on `device` (full size never passes through the CPU)."""
    device = torch.device(device)
    model = build_on_meta(cfg)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = _init_mean_std(name, p.shape)
            p.normal_(mean, std, generator=gen)
    model.requires_grad_(False)
    model.set_precision(dtype)
    # The token table stays in host memory, as the loader keeps it.
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    model.embed_tokens = (torch.randn(cfg.vocab_size, cfg.vlm.width, generator=cpu_gen)
                          / math.sqrt(cfg.vlm.width)).to(dtype)
    return model.eval()


def openpi_state_dict(model: Pi05Model) -> dict[str, torch.Tensor]:
    """The model's tensors under openpi's names (the tied table stored as paligemma.lm_head, as openpi saves)."""
    to_openpi = {}
    for src, dst in NAME_PREFIXES:
        to_openpi.setdefault(dst, src)  # first spelling (current HF layout) wins
    out = {}
    for name, t in model.state_dict().items():
        dst = next(d for d in to_openpi if name.startswith(d))
        out[to_openpi[dst] + name[len(dst):]] = t.detach().cpu().contiguous()
    out[EMBED_NAMES[2]] = model.embed_tokens.detach().cpu().contiguous()
    return out


def write_checkpoint(model: Pi05Model, directory: str | Path, fmt: str = "openpi",
                     asset_id: str = "demo", norm_stats: tuple[Stats, Stats] | None = None) -> Path:
    """Save `model` as an openpi PyTorch or LeRobot checkpoint directory (weights, config.json, norm stats)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = openpi_state_dict(model)
    cfg = model.cfg
    if fmt == "lerobot":
        tensors = {f"model.{k}": v.float() for k, v in tensors.items()}
        config = {"type": "pi05", "chunk_size": cfg.action_horizon, "n_action_steps": cfg.action_horizon,
                  "max_action_dim": cfg.action_dim, "max_state_dim": cfg.action_dim,
                  "tokenizer_max_length": cfg.max_token_len}
    elif fmt == "openpi":
        config = {"action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
                  "max_token_len": cfg.max_token_len, "precision": "float32", "pi05": True,
                  "paligemma_variant": "gemma_2b" if cfg.vlm.width == 2048 else "tiny",
                  "action_expert_variant": "gemma_300m" if cfg.expert.width == 1024 else "tiny"}
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    if cfg.name == "tiny":
        config["tiny"] = _tiny_dims(cfg)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state, actions = norm_stats or demo_norm_stats()
    save_norm_stats(directory / "assets" / asset_id / "norm_stats.json", state, actions)
    return directory


def _tiny_dims(cfg: Pi05Config) -> dict:
    def gemma(g) -> dict:  # noqa: ANN001
        return {"width": g.width, "depth": g.depth, "mlp_dim": g.mlp_dim, "num_heads": g.num_heads,
                "num_kv_heads": g.num_kv_heads, "head_dim": g.head_dim}
    v = cfg.vision
    return {
        "vision": {"image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.width,
                   "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads, "intermediate_size": v.mlp_dim},
        "vlm": gemma(cfg.vlm) | {"vocab_size": cfg.vocab_size},
        "expert": gemma(cfg.expert),
    }
