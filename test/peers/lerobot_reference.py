"""Reference outputs from the real, unmodified LeRobot 0.6.1: run by the tests with the LeRobot venv's python
(scripts/peers.sh), never imported by the project.

    <lerobot venv>/bin/python test/peers/lerobot_reference.py policies --out DIR [--case NAME ...]
    <lerobot venv>/bin/python test/peers/lerobot_reference.py resize --frames IN.npz --out OUT.npz

`policies`: per case, a small random PI05 policy built by LeRobot's own classes, saved with LeRobot's own
`save_pretrained` and processors, loaded back the way a LeRobot user loads it (`PI05Policy.from_pretrained` +
`make_pre_post_processors`) and run with `predict_action_chunk` + the post-processor on fixed inputs and noise.
Writes DIR/<case>/checkpoint/ (LeRobot's files) and DIR/<case>/io.npz (inputs, LeRobot's token ids and images,
its actions). `resize`: LeRobot's own `resize_with_pad_torch` on the given uint8 frames, as its policy calls it.

Shrinking (nothing of LeRobot is edited): before any policy is built, this process wraps three names in
`lerobot.policies.pi05.modeling_pi05`'s namespace: `get_gemma_config` returns small Gemma sizes, and the
PaliGemma / expert Gemma classes get small SigLIP sizes and a small vocabulary before their real constructors
run. LeRobot's config.json only names the variants (gemma_2b / gemma_300m); after LeRobot has saved, reloaded
and run a checkpoint, this script adds one key to its config.json, "tiny", with the shrunk sizes, so that the
engine can build the same small model (the key the engine's small test checkpoints use). Nothing else changes.

LeRobot's tokenizer step loads "google/paligemma-3b-pt-224" with `AutoTokenizer.from_pretrained`. This script
trains a small SentencePiece model shaped like PaliGemma's (pad 0, eos 1, bos 2, unk 3, byte fallback, "\\n" a
piece), has transformers convert it, and stores the result as that repository's snapshot in a private HF_HOME,
with HF_HUB_OFFLINE=1: nothing is downloaded. The .model goes beside each checkpoint for the engine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

# Small sizes. LeRobot hard-codes 8 query heads (modeling_pi05.py reshapes to 1 * 8 * head_dim) and one KV head
# shared by both experts; SigLIP keeps 224 px images of 14 px patches.
SMALL = {
    "vision": {"image_size": 224, "patch_size": 14, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 64},
    "vlm": {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16,
            "vocab_size": 2048},
    "expert": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16},
}
CHUNK = 10
STATE_DIM = ACTION_DIM = 7
ACTION_NAMES = [f"joint_{i}" for i in range(6)] + ["gripper"]
CAMERAS = ["observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb",
           "observation.images.right_wrist_0_rgb"]
TASK = "pick up the_red cube\nand place it"
SEED = 1234
FULL = [(224, 224)] * 3
# name -> (STATE mode, ACTION mode, use_relative_actions, camera (H, W) per feature or None = not given)
CASES = {
    "quantiles": ("QUANTILES", "QUANTILES", False, FULL),
    "mean_std": ("MEAN_STD", "MEAN_STD", False, FULL),
    "mixed": ("MEAN_STD", "QUANTILES", False, FULL),
    "relative": ("QUANTILES", "QUANTILES", True, FULL),
    "missing_camera": ("QUANTILES", "QUANTILES", False, [(224, 224), None, (224, 224)]),
    "camera_480x640": ("QUANTILES", "QUANTILES", False, [(480, 640), (224, 224), (224, 224)]),
}


def offline_hub(hf_home: Path) -> None:
    """Must run before huggingface_hub / transformers are imported (they read these at import)."""
    os.environ.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1", TOKENIZERS_PARALLELISM="false")


def train_sentencepiece() -> bytes:
    """A small BPE SentencePiece model laid out like PaliGemma's: <pad>=0 <eos>=1 <bos>=2 <unk>=3, byte fallback,
    digits split, no dummy prefix, identity normalization, whitespace kept, "\\n" a piece."""
    import sentencepiece as spm

    words = ("pick up the red blue green cube block cup place put it on in into the table drawer open close "
             "task state action robot arm gripper move left right top bottom towel fold").split()
    corpus = []
    for i in range(400):
        w = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(4 + i % 5))
        s = " ".join(str((i * 37 + k * 11) % 256) for k in range(8))
        corpus.append(f"Task: {w}, State: {s};\nAction: ")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=1024, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return buf.getvalue()


def install_hub_tokenizer(hf_home: Path, sp_model: bytes) -> None:
    """transformers' own GemmaTokenizer conversion of the SP model, cached as google/paligemma-3b-pt-224."""
    from transformers import AutoTokenizer

    src = hf_home / "tokenizer_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(sp_model)
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>", "clean_up_tokenization_spaces": False}))
    tok = AutoTokenizer.from_pretrained(str(src))
    commit = "0" * 40
    repo = hf_home / "hub" / "models--google--paligemma-3b-pt-224"
    snap = repo / "snapshots" / commit
    shutil.rmtree(snap, ignore_errors=True)
    snap.mkdir(parents=True)
    tok.save_pretrained(str(snap))
    (snap / "tokenizer.model").write_bytes(sp_model)
    cfg_path = snap / "tokenizer_config.json"  # it records where the .model came from: keep it self-contained
    cfg = json.loads(cfg_path.read_text())
    for key in ("vocab_file", "is_local"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    # transformers 5.5's AutoTokenizer reads the repository's model config first; the real repository has one.
    (snap / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def shrink_lerobot_pi05() -> None:
    """Small sizes through LeRobot's own constructors: three names of modeling_pi05 wrapped, no file edited."""
    import lerobot.policies.pi05.modeling_pi05 as m

    if getattr(m, "_pi05_ros_small", False):
        return
    vlm, expert, vision = SMALL["vlm"], SMALL["expert"], SMALL["vision"]
    real_paligemma, real_expert = m.PaliGemmaForConditionalGenerationWithPiGemma, m.PiGemmaForCausalLM

    def small_gemma_config(variant: str):  # noqa: ANN202
        d = {"gemma_2b": vlm, "gemma_300m": expert}[variant]
        return m.GemmaConfig(width=d["width"], depth=d["depth"], mlp_dim=d["mlp_dim"], num_heads=d["num_heads"],
                             num_kv_heads=d["num_kv_heads"], head_dim=d["head_dim"])

    def small_paligemma(config):  # noqa: ANN001, ANN202
        vc = config.vision_config
        vc.hidden_size, vc.num_hidden_layers = vision["hidden_size"], vision["num_hidden_layers"]
        vc.num_attention_heads, vc.intermediate_size = vision["num_attention_heads"], vision["intermediate_size"]
        vc.patch_size, vc.image_size = vision["patch_size"], vision["image_size"]
        vc.projection_dim = config.text_config.hidden_size
        config.text_config.vocab_size = vlm["vocab_size"]
        return real_paligemma(config=config)

    def small_expert(config):  # noqa: ANN001, ANN202
        config.vocab_size = vlm["vocab_size"]
        return real_expert(config=config)

    m.get_gemma_config = small_gemma_config
    m.PaliGemmaForConditionalGenerationWithPiGemma = small_paligemma
    m.PiGemmaForCausalLM = small_expert
    m._pi05_ros_small = True


def randomize(policy, seed: int) -> None:  # noqa: ANN001
    """Every parameter random (LeRobot's init leaves the adaRMS dense layers and norm weights 0), embed_tokens
    and lm_head different: matrices N(0, 0.5/sqrt(fan_in)), vectors N(0, 0.1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(policy.named_parameters(), key=lambda kv: kv[0]):
            std = 0.5 / float(torch.tensor(p.shape[1:]).prod()) ** 0.5 if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def make_stats(rng) -> dict:  # noqa: ANN001
    import numpy as np

    def feature(dim: int, scale, offset) -> dict:  # noqa: ANN001
        x = rng.normal(offset, scale, size=(4096, dim)).astype(np.float32)
        out = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0)}
        for name, q in (("q01", 0.01), ("q99", 0.99), ("q10", 0.10), ("q90", 0.90)):
            out[name] = np.quantile(x, q, axis=0).astype(np.float32)
        return out

    state = feature(STATE_DIM, rng.uniform(0.2, 1.5, STATE_DIM), rng.uniform(-1, 1, STATE_DIM))
    action = feature(ACTION_DIM, rng.uniform(0.05, 0.5, ACTION_DIM), rng.uniform(-0.3, 0.3, ACTION_DIM))
    # a constant dimension: LeRobot's eps replaces its zero quantile / min-max range
    for key in ("q01", "q99", "min", "max", "q10", "q90"):
        state[key][3] = np.float32(0.25)
    return {"observation.state": state, "action": action}


def run_case(name: str, out: Path, sp_model: bytes) -> dict:
    import numpy as np
    import torch
    from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.pi05 import PI05Config, PI05Policy
    from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors
    from safetensors import safe_open

    state_mode, action_mode, relative, cameras = CASES[name]
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    case_dir = out / name
    ckpt = case_dir / "checkpoint"
    shutil.rmtree(case_dir, ignore_errors=True)
    ckpt.mkdir(parents=True)

    input_features = {key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, *(hw or (224, 224))))
                      for key, hw in zip(CAMERAS, cameras, strict=True)}
    input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    config = PI05Config(
        input_features=input_features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        device="cpu", chunk_size=CHUNK, n_action_steps=CHUNK, num_inference_steps=10, dtype="float32",
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode[state_mode],
                               "ACTION": NormalizationMode[action_mode]},
        use_relative_actions=relative, action_feature_names=list(ACTION_NAMES) if relative else None,
    )
    stats = make_stats(rng)
    policy = PI05Policy(config)
    randomize(policy, SEED)
    policy.eval()
    pre, post = make_pi05_pre_post_processors(config, dataset_stats=stats)
    policy.save_pretrained(ckpt)
    pre.save_pretrained(ckpt)
    post.save_pretrained(ckpt)

    images = {key: rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
              for key, hw in zip(CAMERAS, cameras, strict=True) if hw is not None}
    state = rng.normal(stats["observation.state"]["mean"], stats["observation.state"]["std"]).astype(np.float32)
    state[3] = 0.3  # the constant dimension: far outside [-1, 1] once normalized
    noise = torch.randn((1, CHUNK, config.max_action_dim), generator=torch.Generator().manual_seed(SEED + 1))

    def raw_batch() -> dict:
        # what lerobot.policies.utils.prepare_observation_for_inference builds (uint8 HWC -> float [0, 1] CHW),
        # without its batch dimension: the pre-processor adds it
        batch = {k: torch.from_numpy(v).to(torch.float32).div(255).permute(2, 0, 1).contiguous()
                 for k, v in images.items()}
        batch["observation.state"] = torch.from_numpy(state.copy())
        batch["task"] = TASK
        return batch

    loaded = PI05Policy.from_pretrained(str(ckpt), local_files_only=True)
    loaded.eval()
    pre_loaded, post_loaded = make_pre_post_processors(loaded.config, pretrained_path=str(ckpt))
    results = {}
    for tag, (pol, pp, po) in {"in_memory": (policy, pre, post), "loaded": (loaded, pre_loaded, post_loaded)}.items():
        batch = pp(raw_batch())
        model_images, masks = pol._preprocess_images(batch)
        with torch.no_grad():
            normalized = pol.predict_action_chunk(batch, noise=noise.clone())
        results[tag] = {"batch": batch, "images": model_images, "masks": masks, "normalized": normalized,
                        "actions": po(normalized.clone())}
    r = results["loaded"]
    # LeRobot's from_pretrained returns its random model on any load error: the reloaded policy must compute
    # exactly what the saved one did, or this reference is not LeRobot's reading of its own files.
    if not all(torch.equal(results["in_memory"][k], r[k]) for k in ("normalized", "actions")):
        raise SystemExit(f"{name}: the policy LeRobot loaded back differs from the one it saved")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    norm_step = next(s for s in pre_loaded.steps if type(s).__name__ == "NormalizerProcessorStep")
    norm_state = norm_step._apply_transform(torch.from_numpy(state.copy())[None], "observation.state",
                                            FeatureType.STATE)[0].numpy()
    npz = {
        "task": np.array(TASK), "state": state, "noise": noise[0].numpy(), "norm_state": norm_state,
        "token_ids": r["batch"]["observation.language.tokens"][0].numpy().astype(np.int64),
        "token_mask": r["batch"]["observation.language.attention_mask"][0].numpy().astype(bool),
        "camera_keys": np.array([k for k in CAMERAS if k in images]),
        "model_images": np.stack([x[0].numpy() for x in r["images"]]),  # slot order: given cameras first
        "model_image_masks": np.array([bool(m[0]) for m in r["masks"]]),
        "actions_normalized": r["normalized"][0].numpy(), "actions": r["actions"][0].numpy(),
        "both_tables_saved": np.array(
            {"model.paligemma_with_expert.paligemma.lm_head.weight",
             "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"} <= names),
    }
    for key, image in images.items():
        npz["image." + key] = image
    np.savez(case_dir / "io.npz", **npz)
    (ckpt / "paligemma_tokenizer.model").write_bytes(sp_model)
    # LeRobot is done with the files: the one addition the engine needs to build the same small model
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tiny"] = SMALL
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return {"case": name, "tokens": int(npz["token_mask"].sum())}


def resize(frames: Path, out: Path) -> None:
    """LeRobot's resize_with_pad_torch on each uint8 HWC frame, as PI05Policy._preprocess_images calls it
    (float [0, 1] channels-last batch), mapped to [-1, 1] as the policy does."""
    import numpy as np
    import torch
    from lerobot.policies.common.vla_utils import resize_with_pad_torch

    result = {}
    for key, frame in np.load(frames).items():
        x = torch.from_numpy(frame).to(torch.float32).div(255)[None]
        result[key] = (resize_with_pad_torch(x, 224, 224) * 2.0 - 1.0)[0].numpy()
    np.savez(out, **result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    policies = sub.add_parser("policies")
    policies.add_argument("--out", type=Path, required=True)
    policies.add_argument("--case", action="append", choices=list(CASES))
    policies.add_argument("--threads", type=int, default=2)
    resize_cmd = sub.add_parser("resize")
    resize_cmd.add_argument("--frames", type=Path, required=True)
    resize_cmd.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "resize":
        resize(args.frames, args.out)
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    offline_hub(out / "hf_home")
    import torch

    torch.set_num_threads(args.threads)
    import lerobot

    shrink_lerobot_pi05()
    sp_model = train_sentencepiece()
    install_hub_tokenizer(out / "hf_home", sp_model)
    summary = {"lerobot": getattr(lerobot, "__version__", "?"), "torch": torch.__version__,
               "cases": [run_case(name, out, sp_model) for name in (args.case or CASES)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
