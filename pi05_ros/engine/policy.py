"""The Policy: camera images + robot state + task prompt -> an action chunk in robot units.

    policy = Policy.load("/ckpt/pi05_droid", "/tok/paligemma_tokenizer.model")
    chunk = policy.infer({"base_0_rgb": img, "left_wrist_0_rgb": wrist}, state, "put the cup in the sink")
    chunk.actions  # [horizon, robot dof] float32

It owns the steps around the network: image resize-with-pad, state normalization, prompt tokenization,
noise, and un-normalization. The network itself runs on a *runner*: the plain PyTorch reference (any device)
or the fast CUDA pipeline where one is available.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pi05_ros.engine.checkpoint import CheckpointInfo, load_model
from pi05_ros.engine.config import PRESETS, Pi05Config
from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.normalize import (
    NormStats,
    find_lerobot_norm_stats,
    find_norm_stats,
    load_lerobot_norm_stats,
    load_norm_stats,
)
from pi05_ros.engine.preprocess import resize_with_pad, to_model_range, validate_image
from pi05_ros.engine.recordings import load_observations, recording_files
from pi05_ros.engine.reference import ModelInputs, Pi05Model
from pi05_ros.engine.timing import StageClock, StageStats
from pi05_ros.engine.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

MAX_DENOISE_STEPS = 100
CALIBRATION_FILE = "pi05_ros_fp8_calibration.json"
PRECISIONS = ("fp32", "bf16", "fp8")
_PRECISION_ALIASES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "fp8": "fp8"}


@dataclass
class ActionChunk:
    """One inference's result."""

    actions: np.ndarray  # [horizon, action_dof] float32, robot units
    num_steps: int
    timings: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds
    num_prompt_tokens: int = 0


@dataclass
class PreparedObservation:
    """What a runner consumes: everything already on the host in model units."""

    images: list[np.ndarray | None]  # per model slot: uint8 224x224x3, or None when the view is masked
    tokens: np.ndarray  # int64 [max_len]
    token_mask: np.ndarray  # bool [max_len]
    noise: np.ndarray  # float32 [horizon, action_dim]


class Runner(Protocol):
    """Runs the network: prepared observation -> normalized actions [horizon, action_dim] and stage timings."""

    name: str
    stage_names: tuple[str, ...]

    def run(self, obs: PreparedObservation, num_steps: int) -> tuple[np.ndarray, dict[str, float]]: ...


class ReferenceRunner:
    """The plain PyTorch model, synchronizing at stage ends to time them."""

    name = "reference"
    stage_names = ("vision", "embed_prefix", "prefill_kv", "denoise")

    def __init__(self, model: Pi05Model) -> None:
        self.model = model

    def run(self, obs: PreparedObservation, num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        device = self.model.device
        clock = StageClock(device)
        size = self.model.cfg.vision.image_size
        images = np.stack([to_model_range(im) if im is not None else np.full((3, size, size), -1.0, np.float32)
                           for im in obs.images])
        inputs = ModelInputs(
            images=torch.from_numpy(images)[None],
            image_masks=torch.tensor([[im is not None for im in obs.images]]),
            tokens=torch.from_numpy(obs.tokens)[None],
            token_mask=torch.from_numpy(obs.token_mask)[None],
            noise=torch.from_numpy(obs.noise)[None].to(device),
        )
        actions = self.model.sample_actions(inputs, num_steps, hook=clock.mark)
        out = actions[0].cpu().numpy()
        timings = clock.finish()
        timings.pop("total")
        return out, timings


def _resolve_norm_stats(info: CheckpointInfo, norm_stats: str | Path | None, use_quantiles: bool) -> NormStats:
    """A norm_stats.json path, a LeRobot processor .safetensors path, an asset id, or None (find it)."""
    if norm_stats is not None:
        path = Path(str(norm_stats)).expanduser()
        if path.suffix == ".json":
            return load_norm_stats(path, use_quantiles=use_quantiles)
        if path.suffix == ".safetensors":
            return load_lerobot_norm_stats(path)
        return load_norm_stats(find_norm_stats(info.path, str(norm_stats)), use_quantiles=use_quantiles)
    if info.format == "lerobot" and not (info.path / "assets").is_dir():
        return load_lerobot_norm_stats(find_lerobot_norm_stats(info.path))
    return load_norm_stats(find_norm_stats(info.path), use_quantiles=use_quantiles)


def _user_cache(name: str) -> Path:
    cache = Path.home() / ".cache" / "pi05_ros" / name
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _calibration_path(directory: Path) -> Path:
    """Where FP8 scales live: beside the checkpoint, or in the user cache when that folder is read-only."""
    if directory.is_dir() and os.access(directory, os.W_OK):
        return directory / CALIBRATION_FILE
    return _user_cache(directory.name) / CALIBRATION_FILE


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("no CUDA GPU: running the plain PyTorch reference path on the CPU")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CheckpointError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for but no CUDA GPU is visible; use device=cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run: 'auto' is fp32 on CPU, fp8 on a GPU with FP8 GEMMs (SM 8.9+), else bf16."""
    if precision == "auto":
        if device.type == "cpu":
            return "fp32"
        return "fp8" if torch.cuda.get_device_capability(device) >= (8, 9) else "bf16"
    try:
        resolved = _PRECISION_ALIASES[precision]
    except KeyError:
        raise CheckpointError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}") from None
    if device.type == "cpu" and resolved != "fp32":
        log.warning("precision %s was asked for on CPU; the CPU reference path runs fp32", resolved)
        return "fp32"
    return resolved


def make_runner(model: Pi05Model, precision: str, runner: str, calibration: Path | None,
                keep_reference: bool,
                calibration_observations: Callable[[], list[PreparedObservation]] | None = None) -> Runner:
    """'auto': the fast CUDA pipeline on a GPU for bf16/fp8, else the reference; or 'fast' / 'reference'."""
    if runner == "auto":
        runner = "fast" if model.device.type == "cuda" and precision in ("bf16", "fp8") else "reference"
    if runner == "reference":
        return ReferenceRunner(model)
    if runner != "fast":
        raise CheckpointError(f"unknown runner {runner!r}; choose auto, fast or reference")
    if model.device.type != "cuda":
        raise CheckpointError("the fast runner needs a CUDA GPU; use runner=reference (or auto) on CPU")
    from pi05_ros.engine.pipeline import Pi05Pipeline  # CUDA-only code, imported only where it runs

    return Pi05Pipeline(model, precision=precision, calibration=calibration, release_reference=not keep_reference,
                        calibration_observations=calibration_observations)


class Policy:
    """Pi0.5 with its tokenizer and norm stats; see the module docstring."""

    def __init__(
        self,
        model: Pi05Model,
        tokenizer: PromptTokenizer,
        norm_stats: NormStats,
        *,
        precision: str,
        runner: Runner | None = None,
        action_dim: int | None = None,
        seed: int = 0,
        is_demo: bool = False,
        checkpoint: CheckpointInfo | None = None,
    ) -> None:
        self.model = model
        self.config: Pi05Config = model.cfg
        self.tokenizer = tokenizer
        self.norm_stats = norm_stats
        self.precision = precision
        self.runner: Runner = runner or ReferenceRunner(model)
        self.action_dof = int(action_dim or norm_stats.actions.dim)
        if not 1 <= self.action_dof <= self.config.action_dim:
            raise CheckpointError(f"action_dim {self.action_dof} must be within 1..{self.config.action_dim}")
        self.state_dim = norm_stats.state.dim
        self.is_demo = is_demo
        self.checkpoint = checkpoint
        self._noise_gen = np.random.default_rng(seed)
        self._stats = StageStats()

    # --- construction

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        tokenizer: str | Path,
        *,
        norm_stats: str | Path | None = None,
        config_preset: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        action_dim: int | None = None,
        use_quantiles: bool = True,
        seed: int = 0,
        runner: str = "auto",
        keep_reference: bool = False,
        calibration_data: str | Path | None = None,
    ) -> Policy:
        """Load an openpi or LeRobot Pi0.5 checkpoint. `norm_stats` is a norm_stats.json path or an asset id.

        On a GPU the fast pipeline runs (bf16/fp8); its FP8 scales are calibrated on the first start and saved
        beside the checkpoint (`pi05_ros_fp8_calibration.json`) so later starts skip calibration. They come
        from synthetic observations, or from the robot's own recordings with `calibration_data=<folder>` (see
        engine/recordings.py); delete the saved file to calibrate again.
        """
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        model, info = load_model(checkpoint, config_preset=config_preset, device=dev,
                                 dtype=torch.float32 if prec == "fp32" else torch.bfloat16)
        stats = _resolve_norm_stats(info, norm_stats, use_quantiles)
        tok = PromptTokenizer(tokenizer, model.cfg.max_token_len, model.cfg.state_in_prompt)
        policy = cls(model, tok, stats, precision=prec, action_dim=action_dim, seed=seed, checkpoint=info)
        recorded = None
        if calibration_data is not None:
            recording_files(calibration_data)  # fail early on a bad folder, whatever the device

            def recorded() -> list[PreparedObservation]:
                return [policy.prepare(*obs) for obs in load_observations(calibration_data)]

        policy.runner = make_runner(model, prec, runner, _calibration_path(info.path), keep_reference, recorded)
        log.info("loaded %s", policy.describe())
        return policy

    @classmethod
    def demo(cls, device: str = "auto", precision: str = "auto", seed: int = 0, preset: str | None = None,
             runner: str = "auto") -> Policy:
        """The built-in random-weight model (tiny on CPU, full size on a GPU). Its actions mean nothing."""
        from pi05_ros.engine.demo import DEMO_MAX_TOKEN_LEN, demo_norm_stats, demo_prompt_tokenizer, random_model

        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        cfg = PRESETS[preset or ("tiny" if dev.type == "cpu" else "pi05")]
        if cfg.name == "tiny":
            cfg = cfg.replace(max_token_len=DEMO_MAX_TOKEN_LEN)
        model = random_model(cfg, seed=seed, device=dev, dtype=torch.float32 if prec == "fp32" else torch.bfloat16)
        tok = demo_prompt_tokenizer(cfg.max_token_len, cfg.state_in_prompt)
        state, actions = demo_norm_stats()
        policy = cls(model, tok, NormStats(state, actions), precision=prec, seed=seed, is_demo=True)
        calibration = _user_cache(f"demo_{cfg.name}_seed{seed}") / CALIBRATION_FILE
        policy.runner = make_runner(model, prec, runner, calibration, keep_reference=False)
        log.warning("DEMO MODE: %s with RANDOM weights; its actions are meaningless", policy.describe())
        return policy

    # --- properties the node and the benchmark read

    @property
    def image_keys(self) -> tuple[str, ...]:
        return self.config.image_keys

    @property
    def action_horizon(self) -> int:
        return self.config.action_horizon

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("preprocess", *self.runner.stage_names, "postprocess", "total")

    def describe(self) -> str:
        source = "demo (random weights)" if self.is_demo else str(self.checkpoint.path if self.checkpoint else "?")
        return (f"Pi0.5 [{self.config.name}] from {source} on {self.device}, {self.precision}, runner "
                f"{self.runner.name}, horizon {self.action_horizon}, state dim {self.state_dim}, "
                f"action dof {self.action_dof}")

    def stage_stats(self) -> dict[str, dict[str, float]]:
        """Per-stage mean/std/p50/p99 (ms) over the last inferences."""
        return self._stats.summary()

    # --- inference

    def prepare(self, images: Mapping[str, np.ndarray], state: np.ndarray, prompt: str,
                noise: np.ndarray | None = None) -> PreparedObservation:
        """Validate and convert one observation into model units (host only)."""
        unknown = set(images) - set(self.image_keys)
        if unknown:
            raise InputError(
                f"unknown camera slot(s) {sorted(unknown)}; this model's slots are {list(self.image_keys)}"
            )
        if not images:
            raise InputError(f"no camera image given; provide at least one of {list(self.image_keys)}")
        size = self.config.vision.image_size
        prepared = [resize_with_pad(validate_image(images[k], k), size) if k in images else None
                    for k in self.image_keys]
        state = np.asarray(state, dtype=np.float32)
        if state.ndim != 1:
            raise InputError(f"state must be a 1-D vector, got shape {state.shape}")
        if not np.all(np.isfinite(state)):
            bad = np.flatnonzero(~np.isfinite(state)).tolist()
            raise InputError(f"state has NaN/inf at index {bad}; check the joint-state source")
        if state.shape[0] != self.state_dim:
            raise InputError(f"state has {state.shape[0]} values but the norm stats describe {self.state_dim}; "
                             "select the robot's joints in the order the model was trained with")
        state_norm = self.norm_stats.normalize_state(state)
        pad_to = self.config.prompt_state_dim
        if pad_to and pad_to > state_norm.shape[0]:
            state_norm = np.pad(state_norm, (0, pad_to - state_norm.shape[0]))
        tokens, mask = self.tokenizer(prompt, state_norm)
        shape = (self.config.action_horizon, self.config.action_dim)
        if noise is None:
            noise = self._noise_gen.standard_normal(shape, dtype=np.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise InputError(f"noise must have shape {shape}, got {noise.shape}")
        return PreparedObservation(prepared, tokens, mask, noise)

    def infer(self, images: Mapping[str, np.ndarray], state: np.ndarray, prompt: str, num_steps: int = 10,
              noise: np.ndarray | None = None) -> ActionChunk:
        """Actions for one observation. Raises InputError for input the model cannot use."""
        if not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_DENOISE_STEPS:
            raise InputError(f"num_steps must be an integer in 1..{MAX_DENOISE_STEPS}, got {num_steps!r}")
        start = time.perf_counter()
        obs = self.prepare(images, state, prompt, noise)
        timings = {"preprocess": (time.perf_counter() - start) * 1e3}
        normalized, run_timings = self.runner.run(obs, num_steps)
        timings.update(run_timings)
        post_start = time.perf_counter()
        actions = self.norm_stats.unnormalize_actions(normalized[:, : self.action_dof])
        end = time.perf_counter()
        timings["postprocess"] = (end - post_start) * 1e3
        timings["total"] = (end - start) * 1e3
        self._stats.add(timings)
        return ActionChunk(np.ascontiguousarray(actions, dtype=np.float32), num_steps, timings,
                           int(obs.token_mask.sum()))

