"""The Policy: camera images + robot state + task prompt -> an action chunk in robot units.

    policy = Policy.load("/ckpt/pi05_droid", "/tok/paligemma_tokenizer.model")
    chunk = policy.infer({"base_0_rgb": img, "left_wrist_0_rgb": wrist}, state, "put the cup in the sink")
    chunk.actions  # [horizon, robot dof] float32
    chunks = policy.infer_batch([RawObservation(images, state, prompt), ...])  # one model batch, one chunk per row

It owns the steps around the network: image resize-with-pad, state normalization, prompt tokenization,
noise, and un-normalization. The network itself runs on a *runner*: the plain PyTorch reference (any device)
or the fast CUDA pipeline where one is available.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi05_ros.engine.action_space import ABSOLUTE, ActionSpace
from pi05_ros.engine.checkpoint import CheckpointInfo, inspect_checkpoint, load_model
from pi05_ros.engine.config import PRESETS, Pi05Config
from pi05_ros.engine.conventions import (
    PI0,
    PI05_PADDED,
    Conventions,
    default_conventions,
    resolve_action_space,
    resolve_conventions,
)
from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.fast.calibration import CALIBRATION_FILE, scales_path, user_cache_dir
from pi05_ros.engine.joint_conventions import example_state_length
from pi05_ros.engine.joint_conventions import joint_convention as joint_convention_of
from pi05_ros.engine.normalize import NormStats, resolve_norm_stats, unpadded_dim
from pi05_ros.engine.preprocess import PreparedView, prepare_view, resize_views
from pi05_ros.engine.recordings import load_observations, recording_files
from pi05_ros.engine.reference import Pi05Model
from pi05_ros.engine.rtc import SCHEDULES as RTC_SCHEDULES
from pi05_ros.engine.rtc import Guidance, RtcRequest
from pi05_ros.engine.runner import ActionChunk, PreparedObservation, ReferenceRunner, Runner
from pi05_ros.engine.timing import StageStats
from pi05_ros.engine.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

EXPERT_KERNELS = ("auto", "on", "off")  # Pi05Pipeline's choices for the denoise loop (engine/fast/pipeline.py)

MAX_DENOISE_STEPS = 100
PRECISIONS = ("fp32", "bf16", "fp8")
_PRECISION_ALIASES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "fp8": "fp8"}
RUNNERS = ("auto", "fast", "reference")


def check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_DENOISE_STEPS:
        raise InputError(f"num_steps must be an integer in 1..{MAX_DENOISE_STEPS}, got {num_steps!r}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        # A warning: with no logging set up, Python's last-resort handler still prints it on stderr.
        log.warning("no CUDA GPU: running the plain PyTorch reference path on the CPU (float32)")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CheckpointError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):  # torch knows mps, xpu, meta ...: this engine runs on neither
        raise CheckpointError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for but no CUDA GPU is visible; use device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CheckpointError(f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA GPU(s) "
                              f"are visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
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


def fast_runner_unavailable(device: torch.device) -> str | None:
    """Why the fast pipeline cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"device is {device.type}: the fast pipeline needs a CUDA GPU"
    return None


def _check_expert_kernels(choice: str) -> None:
    if choice not in EXPERT_KERNELS:
        raise CheckpointError(f"expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got {choice!r}")


def make_runner(model: Pi05Model, precision: str, runner: str = "auto", *, scales_file: Path | None = None,
                keep_reference: bool = False,
                calibration_observations: Callable[[], Iterable[PreparedObservation]] | None = None,
                **fast_options: Any) -> Runner:
    """A runner for an already-loaded model: 'auto' is the fast CUDA pipeline on a GPU for bf16/fp8, else the
    reference; or 'fast' / 'reference'.

    For the fast pipeline: FP8 scales are read from / saved to `scales_file` (None: calibrate every time),
    calibrated on `calibration_observations()` when given; `keep_reference` keeps the reference weights so
    the same model can still run the reference (the benchmark's baseline); `fast_options` go to Pi05Pipeline.
    """
    if runner == "auto":
        runner = "fast" if model.device.type == "cuda" and precision in ("bf16", "fp8") else "reference"
    if runner == "reference":
        return ReferenceRunner(model)
    if runner != "fast":
        raise CheckpointError(f"unknown runner {runner!r}; choose {', '.join(RUNNERS)}")
    why = fast_runner_unavailable(model.device)
    if why:
        raise CheckpointError(f"{why}; use runner=reference (or auto) on CPU")
    from pi05_ros.engine.fast.build import build_fast_runner  # the CUDA path: imported only where it runs

    return build_fast_runner(model, precision, scales_file=scales_file, release_reference=not keep_reference,
                             calibration_observations=calibration_observations, **fast_options)


@dataclass
class RawObservation:
    """One observation in robot units, as `Policy.infer` takes it (for `infer_batch`)."""

    images: Mapping[str, np.ndarray | PreparedView]  # model slot -> uint8 HxWx3 RGB, any size (or prepare_view's)
    state: np.ndarray
    prompt: str
    noise: np.ndarray | None = None  # [horizon, action_dim]; None: drawn from the policy's seeded generator
    rtc: RtcRequest | None = None  # real-time chunking toward the previous chunk (as in infer)


def _check_dof(dof: int, model_action_dim: int, stats: NormStats) -> None:
    """The robot's action columns: within the model's, and each one un-normalized by the norm stats (a column
    beyond them would come back in model units, about +-1, not the robot's)."""
    if not 1 <= dof <= model_action_dim:
        raise CheckpointError(f"action_dim {dof} must be within 1..{model_action_dim} (the model's action width); "
                              f"the norm stats ({stats.source or 'given'}) describe {stats.actions.dim} action "
                              "columns")
    if dof > stats.actions.dim:
        raise CheckpointError(f"action_dim {dof} is more than the {stats.actions.dim} action columns the norm stats "
                              f"({stats.source or 'given'}) describe: the extra columns would not be un-normalized; "
                              "give the robot's action_dim or norm stats for every column")


def _vocab_message(tokenizer_vocab: int, model_vocab: int) -> str:
    return (f"the tokenizer has {tokenizer_vocab} pieces but the model's embedding table has {model_vocab} rows: "
            "its token ids would index past the table. Use the checkpoint's own tokenizer (PaliGemma's "
            "paligemma_tokenizer.model for Pi0.5)")


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
        action_space: ActionSpace | None = None,
        conventions: Conventions | None = None,
        action_space_reason: str = "",
    ) -> None:
        self.model = model
        self.config: Pi05Config = model.cfg
        self.tokenizer = tokenizer
        self.norm_stats = norm_stats
        self.precision = precision
        self.runner: Runner = runner or ReferenceRunner(model)
        self.action_dof = int(action_dim or norm_stats.actions.dim)
        _check_dof(self.action_dof, self.config.action_dim, norm_stats)
        if tokenizer.vocab_size > self.config.vocab_size:
            raise CheckpointError(_vocab_message(tokenizer.vocab_size, self.config.vocab_size))
        # The state takes state_dim values, or up to the stats' own length where those end in padding (openpi's
        # Normalize uses the first len(state) dims of its stats, so 32-dim stats of an 8-joint robot take 8).
        self.state_dim = unpadded_dim(norm_stats.state)
        self.max_state_values = norm_stats.state.dim
        self.conventions = conventions or default_conventions(self.config.name, self.config.image_keys,
                                                              self.config.prompt_format, self.config.max_state_dim,
                                                              self.config.joint_convention)
        self.joints = joint_convention_of(self.conventions.joint_convention)
        # what the action columns mean; absolute positions unless the checkpoint or the caller says otherwise
        self.action_space = action_space or ActionSpace.uniform(ABSOLUTE, self.action_dof)
        self.action_space_reason = action_space_reason or ("given" if action_space else "absolute (default)")
        if self.action_space.dof != self.action_dof:
            raise CheckpointError(f"the action space describes {self.action_space.dof} columns but the policy "
                                  f"outputs {self.action_dof}; give one kind per action column")
        self.action_space.check_state(self.max_state_values)
        self.joints.check(self.state_dim, self.max_state_values, self.action_dof)
        self.is_demo = is_demo
        self.checkpoint = checkpoint
        self.seed = seed
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
        use_quantiles: bool | None = None,
        seed: int = 0,
        runner: str = "auto",
        keep_reference: bool = False,
        calibration_data: str | Path | None = None,
        expert_kernels: str = "auto",
        prompt_format: str | None = None,
        image_resize: str | None = None,
        action_space: str | ActionSpace | None = None,
        action_space_mask: Sequence[bool] | None = None,
        max_batch: int = 1,
        fp8_vision: bool = False,
        joint_convention: str | None = None,
    ) -> Policy:
        """Load an openpi or LeRobot Pi0.5 checkpoint. `norm_stats` is a norm_stats.json path or an asset id.

        The checkpoint's family conventions (engine/conventions.py) apply unless overridden: `prompt_format`
        (pi05, pi05_padded, pi0), `image_resize` (openpi_client, openpi_server, lerobot), `use_quantiles`
        (both features' normalization mode), `action_space` (absolute, delta, velocity, end_effector, or a
        comma-separated kind per column) with `action_space_mask` (True = that kind, default delta; False =
        absolute; openpi's make_bool_mask), `joint_convention` (none, aloha_to_pi: engine/joint_conventions.py).
        `describe_conventions()` says what was chosen and why.

        On a GPU the fast pipeline runs (bf16/fp8); its FP8 scales are calibrated on the first start and saved
        beside the checkpoint (`pi05_ros_fp8_calibration.json`) so later starts skip calibration. They come
        from synthetic observations, or from the robot's own recordings with `calibration_data=<folder>` (see
        engine/recordings.py); delete the saved file to calibrate again. `expert_kernels` ("auto", "on", "off")
        chooses the fused Triton kernels for the denoise loop (auto: batches of up to 2 rows on Hopper, where they
        were measured faster; on: every GPU Triton supports, every batch). `max_batch` sizes the fast pipeline for
        batches of up to that many rows (`infer_batch`: a server's), with CUDA graphs per batch bucket; 1 (a robot)
        keeps its memory to one row. `fp8_vision` runs SigLIP's MLP in FP8 too (precision fp8 only; docs/fast_path.md).
        """
        _check_expert_kernels(expert_kernels)
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        # Everything a user can get wrong is checked before the weights are read.
        info = inspect_checkpoint(checkpoint, config_preset)
        conventions = resolve_conventions(info, prompt_format=prompt_format, image_resize=image_resize,
                                          joint_convention=joint_convention)
        stats = resolve_norm_stats(info.path, info.format, norm_stats, use_quantiles)
        tok = PromptTokenizer(tokenizer, info.config.max_token_len, conventions.prompt_format != PI0)
        if tok.vocab_size > info.config.vocab_size:
            raise CheckpointError(_vocab_message(tok.vocab_size, info.config.vocab_size))
        dof = int(action_dim or stats.actions.dim)
        _check_dof(dof, info.config.action_dim, stats)
        space, why = resolve_action_space(conventions, dof, action_space, action_space_mask)
        space.check_state(stats.state.dim)
        joint_convention_of(conventions.joint_convention).check(unpadded_dim(stats.state), stats.state.dim, dof)
        model, info = load_model(checkpoint, config_preset=config_preset, device=dev,
                                 dtype=torch.float32 if prec == "fp32" else torch.bfloat16)
        policy = cls(model, tok, stats, precision=prec, action_dim=action_dim, seed=seed, checkpoint=info,
                     action_space=space, conventions=conventions, action_space_reason=why)
        recorded = None
        if calibration_data is not None:
            recording_files(calibration_data)  # fail early on a bad folder, whatever the device

            def recorded() -> list[PreparedObservation]:
                return policy.recorded_observations(calibration_data)

        policy.runner = make_runner(model, prec, runner, scales_file=scales_path(info.path),
                                    keep_reference=keep_reference, calibration_observations=recorded,
                                    expert_kernels=expert_kernels, max_batch=max_batch, fp8_vision=fp8_vision)
        log.info("loaded %s", policy.describe())
        return policy

    @classmethod
    def demo(cls, device: str = "auto", precision: str = "auto", seed: int = 0, preset: str | None = None,
             runner: str = "auto", max_batch: int = 1, expert_kernels: str = "auto",
             fp8_vision: bool = False) -> Policy:
        """The built-in random-weight model (tiny on CPU, full size on a GPU). Its actions mean nothing.
        `max_batch`, `expert_kernels` and `fp8_vision` as for `load`."""
        from pi05_ros.engine.demo import DEMO_MAX_TOKEN_LEN, demo_norm_stats_for, demo_prompt_tokenizer, random_model

        _check_expert_kernels(expert_kernels)
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        cfg = PRESETS[preset or ("tiny" if dev.type == "cpu" else "pi05")]
        if cfg.name == "tiny":
            cfg = cfg.replace(max_token_len=DEMO_MAX_TOKEN_LEN)
        model = random_model(cfg, seed=seed, device=dev, dtype=torch.float32 if prec == "fp32" else torch.bfloat16)
        tok = demo_prompt_tokenizer(cfg.max_token_len, cfg.prompt_format != PI0)
        state, actions = demo_norm_stats_for(cfg)
        policy = cls(model, tok, NormStats(state, actions), precision=prec, seed=seed, is_demo=True)
        scales = user_cache_dir(f"demo_{cfg.name}_seed{seed}") / CALIBRATION_FILE  # written only if it calibrates
        policy.runner = make_runner(model, prec, runner, scales_file=scales, max_batch=max_batch,
                                    expert_kernels=expert_kernels, fp8_vision=fp8_vision)
        log.warning("DEMO MODE: %s with RANDOM weights; its actions are meaningless", policy.describe())
        return policy

    def with_runner(self, runner: Runner, precision: str | None = None) -> Policy:
        """Another Policy on the same model, tokenizer and norm stats, running `runner` (e.g. the benchmark's
        fast pipeline beside its reference baseline). Its noise starts again from the seed."""
        return Policy(self.model, self.tokenizer, self.norm_stats, precision=precision or self.precision,
                      runner=runner, action_dim=self.action_dof, seed=self.seed, is_demo=self.is_demo,
                      checkpoint=self.checkpoint, action_space=self.action_space, conventions=self.conventions,
                      action_space_reason=self.action_space_reason)

    def example_state(self) -> np.ndarray:
        """Zeros of the length a robot sends (warm-ups; joint_conventions.example_state_length)."""
        size = example_state_length(self.joints.name, self.state_dim, self.max_state_values,
                                    self.action_space.delta_columns()[1])
        return np.zeros(size, np.float32)

    def recorded_observations(self, folder: str | Path) -> list[PreparedObservation]:
        """The observations recorded in `folder` (engine/recordings.py), prepared for a runner (FP8 calibration)."""
        rng = np.random.default_rng(0)  # its own noise: calibrating must not move the policy's seeded stream
        shape = (self.config.action_horizon, self.config.action_dim)
        prepared = []
        for path, (images, state, prompt) in load_observations(folder):
            try:
                prepared.append(self.prepare(images, state, prompt, rng.standard_normal(shape, dtype=np.float32)))
            except (InputError, ValueError, TypeError) as exc:  # e.g. a state of strings
                raise CheckpointError(f"recorded observation {path}: {exc}") from exc
        return prepared

    # --- properties the node and the benchmark read

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The model's image slots (LeRobot: the checkpoint's camera names; openpi: base_0_rgb, ...)."""
        return self.config.image_keys

    @property
    def camera_names(self) -> dict[str, str]:
        """Every camera name `infer` accepts -> the slot it feeds (slots, and a LeRobot checkpoint's
        `observation.images.<name>` features)."""
        return dict(self.conventions.camera_names)

    def slot_for(self, camera: str) -> str | None:
        """The model slot a camera name feeds, or None when the checkpoint has no such camera."""
        return self.conventions.slot_for(camera)

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
        expert = getattr(self.runner, "expert_path", None)
        runner = self.runner.name + (f" (denoise on {expert})" if expert else "")
        return (f"Pi0.5 [{self.config.name}] from {source} on {self.device}, {self.precision}, runner "
                f"{runner}, horizon {self.action_horizon}, state dim {self.state_dim}, "
                f"action dof {self.action_dof} ({self.action_space.describe()})")

    def describe_conventions(self) -> list[str]:
        """One line per convention: what the policy does around the network and why."""
        c = self.conventions
        return [
            f"family:         {c.family}" + (f" (LeRobot {c.lerobot_version})" if c.lerobot_version else ""),
            f"prompt format:  {c.prompt_format}: {c.reasons.get('prompt_format', '')}",
            f"normalization:  {self.norm_stats.describe()}",
            f"action space:   {self.action_space.describe()}: {self.action_space_reason}",
            f"cameras:        {c.describe_cameras()}",
            f"image resize:   {c.image_resize}: {c.reasons.get('image_resize', '')}",
            f"time grid:      {c.time_grid}",
            f"joints:         {self.joints.describe()}: {c.reasons.get('joint_convention', '')}",
        ]

    def stage_stats(self) -> dict[str, dict[str, float]]:
        """Per-stage mean/std/p50/p99 (ms) over the last inferences."""
        return self._stats.summary()

    # --- inference

    def prepare_view(self, image: np.ndarray, name: str = "image") -> PreparedView:
        """One camera image validated and resized the way this model resizes, now, so that a later `infer` (or
        `prepare`) takes it as it is: a caller that receives frames before it infers (the ROS node) resizes each
        on arrival instead of on the inference's critical path. Raises InputError as `infer` would."""
        return prepare_view(image, self.config.vision.image_size, self.conventions.image_resize, name)

    def prepare(self, images: Mapping[str, np.ndarray | PreparedView], state: np.ndarray, prompt: str,
                noise: np.ndarray | None = None, rtc: RtcRequest | None = None) -> PreparedObservation:
        """Validate and convert one observation into model units (host only); `rtc` guides the new chunk toward
        the previous one (real-time chunking, engine/rtc.py)."""
        if not images:
            raise InputError(f"no camera image given; provide at least one of {list(self.image_keys)}")
        by_slot: dict[str, np.ndarray] = {}
        for name, image in images.items():
            slot = self.slot_for(name)
            if slot is None:
                raise InputError(f"unknown camera slot {name!r}; this model's slots are {list(self.image_keys)}"
                                 + self._camera_aliases())
            if slot in by_slot:
                raise InputError(f"two images given for camera slot {slot!r} (one named {name!r}); give one per slot")
            by_slot[slot] = image
        if all(image is None for image in by_slot.values()):  # every view masked: the model would see text only
            raise InputError(f"no camera image given (every one is None); provide at least one of "
                             f"{list(self.image_keys)}")
        size = self.config.vision.image_size
        method = self.conventions.image_resize
        prepared = resize_views([by_slot.get(k) for k in self.image_keys], size, method, self.image_keys)
        state = np.asarray(state, dtype=np.float32)
        if state.ndim != 1:
            raise InputError(f"state must be a 1-D vector, got shape {state.shape}")
        if not np.all(np.isfinite(state)):
            bad = np.flatnonzero(~np.isfinite(state)).tolist()
            raise InputError(f"state has NaN/inf at index {bad}; check the joint-state source")
        if not self.state_dim <= state.shape[0] <= self.max_state_values:
            padded = (f" (then {self.max_state_values - self.state_dim} padding dims)"
                      if self.max_state_values > self.state_dim else "")
            raise InputError(f"state has {state.shape[0]} values but the norm stats describe {self.state_dim}"
                             f"{padded}; select the robot's joints in the order the model was trained with")
        if state.shape[0] < self.max_state_values:
            try:  # a delta column relative to a state value this (shorter) state does not have
                self.action_space.check_state(state.shape[0])
            except CheckpointError as exc:
                raise InputError(str(exc)) from None
        state = self.joints.state_to_model(state)  # the state as the checkpoint was trained on (flips, grippers)
        tokens, mask = self.tokenizer(prompt, self.prompt_state(state))
        shape = (self.config.action_horizon, self.config.action_dim)
        if noise is None:
            noise = self._noise_gen.standard_normal(shape, dtype=np.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise InputError(f"noise must have shape {shape}, got {noise.shape}")
        if not np.isfinite(noise).all():
            raise InputError("noise has NaN/inf values; pass standard normal noise or none")
        guidance = self.rtc_guidance(rtc, state) if rtc is not None else None
        return PreparedObservation(prepared, tokens, mask, noise, guidance)

    def rtc_guidance(self, request: RtcRequest, state: np.ndarray) -> Guidance:
        """The previous chunk in the model's units (the joint convention and the action-space step undone against
        this observation's state, given in the model's joint convention, then normalized), padded to the horizon,
        with its soft mask."""
        previous = np.asarray(request.previous, dtype=np.float32)
        if previous.ndim != 2 or previous.shape[1] != self.action_dof:
            raise InputError(f"the previous chunk must be [actions, {self.action_dof}], got {previous.shape}")
        if not np.all(np.isfinite(previous)):
            raise InputError("the previous chunk has NaN/inf values; pass the actions the robot is running")
        if request.delay < 0 or not 0 <= request.beta < math.inf or request.start < 0:  # NaN fails it too
            raise InputError(f"rtc delay ({request.delay}), beta ({request.beta}) and start ({request.start}) must "
                             "be >= 0, beta finite")
        if request.schedule not in RTC_SCHEDULES:
            raise InputError(f"unknown rtc schedule {request.schedule!r}; choose one of {', '.join(RTC_SCHEDULES)}")
        horizon, dim = self.config.action_horizon, self.config.action_dim
        start = min(request.start, horizon)
        rows = min(len(previous), horizon - start)
        model = self.norm_stats.normalize_actions(
            self.action_space.from_robot(self.joints.actions_to_model(previous[:rows]), state))
        padded = np.zeros((horizon, dim), np.float32)
        padded[start:start + rows, : self.action_dof] = model
        end = start + rows if request.end is None else min(request.end, start + rows)
        guidance = Guidance.build(padded, request.delay, end, request.beta, request.schedule, columns=self.action_dof)
        guidance.weights[:start] = 0.0  # run before this inference started: nothing left to agree with
        return guidance

    def _camera_aliases(self) -> str:
        aliases = sorted(name for name, slot in self.conventions.camera_names.items() if name != slot)
        return f" (or the checkpoint's names {aliases})" if aliases else ""

    def prompt_state(self, state: np.ndarray) -> np.ndarray:
        """The normalized state as the prompt writes it (zero-padded to max_state_dim in the pi05_padded
        format of LeRobot <= 0.4; the padded zeros print as bin 128)."""
        state_norm = self.norm_stats.normalize_state(np.asarray(state, dtype=np.float32))
        pad_to = self.conventions.max_state_dim
        if self.conventions.prompt_format == PI05_PADDED and pad_to > state_norm.shape[0]:
            state_norm = np.pad(state_norm, (0, pad_to - state_norm.shape[0]))
        return state_norm

    def prompt_tokens(self, prompt: str, state: np.ndarray) -> int:
        """How many tokens `prompt` with `state` (the robot's) encodes to (the model keeps at most max_token_len of
        them)."""
        model_state = self.joints.state_to_model(np.asarray(state, dtype=np.float32))
        return len(self.tokenizer.encode(prompt, self.prompt_state(model_state)))

    def infer(self, images: Mapping[str, np.ndarray | PreparedView], state: np.ndarray, prompt: str,
              num_steps: int = 10, noise: np.ndarray | None = None, rtc: RtcRequest | None = None) -> ActionChunk:
        """Actions for one observation. Raises InputError for input the model cannot use.

        `images`: camera slot -> uint8 HxWx3 RGB of any size, or a view `prepare_view` already resized.

        `rtc` (engine/rtc.py RtcRequest): real-time chunking, the new chunk denoised to agree with the previous
        chunk's actions that will still run; beta 0 is plain inference.
        """
        check_num_steps(num_steps)
        start = time.perf_counter()
        obs = self.prepare(images, state, prompt, noise, rtc)
        timings = {"preprocess": (time.perf_counter() - start) * 1e3}
        normalized, run_timings = self.runner.run(obs, num_steps)
        timings.update(run_timings)
        post_start = time.perf_counter()
        state = np.asarray(state, dtype=np.float32)
        actions = self.robot_actions(normalized, state)
        end = time.perf_counter()
        timings["postprocess"] = (end - post_start) * 1e3
        timings["total"] = (end - start) * 1e3
        self._stats.add(timings)
        return ActionChunk(np.ascontiguousarray(actions, dtype=np.float32), num_steps, timings,
                           int(obs.token_mask.sum()), self.action_space, state.copy())

    def robot_actions(self, normalized: np.ndarray, state: np.ndarray) -> np.ndarray:
        """A runner's normalized actions [horizon, action_dim] -> robot units [horizon, action dof] (un-normalized,
        delta columns made positions with the observed `state`, in the checkpoint's joint convention, then the
        robot's)."""
        actions = self.norm_stats.unnormalize_actions(normalized[:, : self.action_dof])
        actions = self.action_space.to_robot(actions, self.joints.state_to_model(state))
        return self.joints.actions_to_robot(actions)

    def infer_batch(self, observations: Sequence[RawObservation], num_steps: int = 10) -> list[ActionChunk]:
        """Actions for several observations run as one batch (per-row prompts, views and noise), one chunk per
        row in order. Raises InputError naming the first observation the model cannot use."""
        check_num_steps(num_steps)
        if not observations:
            raise InputError("infer_batch needs at least one observation")
        prepared, preprocess_ms = [], []
        for row, obs in enumerate(observations):
            start = time.perf_counter()
            try:
                prepared.append(self.prepare(obs.images, obs.state, obs.prompt, obs.noise, obs.rtc))
            except InputError as exc:
                raise InputError(f"observation {row}: {exc}") from exc
            preprocess_ms.append((time.perf_counter() - start) * 1e3)
        return self.infer_prepared_batch(prepared, [obs.state for obs in observations], num_steps, preprocess_ms)

    def infer_prepared_batch(self, prepared: Sequence[PreparedObservation], states: Sequence[np.ndarray],
                             num_steps: int = 10, preprocess_ms: Sequence[float] | None = None) -> list[ActionChunk]:
        """`infer_batch` for rows already made by `prepare` (a server prepares each row on its own, so that one
        client's bad input fails that client only). `states` are the rows' observed states (robot units) and
        `preprocess_ms` what each row's `prepare` took.

        Each chunk's timings: its own `preprocess` and `postprocess`, the batch's runner stages (shared by the
        rows), and `total` = its preprocess + the batch's run and postprocess.
        """
        check_num_steps(num_steps)
        if len(prepared) != len(states) or (preprocess_ms is not None and len(preprocess_ms) != len(prepared)):
            raise ValueError("infer_prepared_batch needs one state (and one preprocess time) per prepared row")
        if not prepared:
            raise InputError("infer_prepared_batch needs at least one observation")
        start = time.perf_counter()
        normalized, run_timings = self.runner.run_batch(prepared, num_steps)
        chunks = []
        for row, (obs, state) in enumerate(zip(prepared, states, strict=True)):
            post_start = time.perf_counter()
            state = np.asarray(state, dtype=np.float32)
            actions = self.robot_actions(normalized[row], state)
            end = time.perf_counter()
            preprocess = preprocess_ms[row] if preprocess_ms is not None else 0.0
            timings = {"preprocess": preprocess, **run_timings, "postprocess": (end - post_start) * 1e3,
                       "total": preprocess + (end - start) * 1e3}
            self._stats.add(timings)
            chunks.append(ActionChunk(np.ascontiguousarray(actions, dtype=np.float32), num_steps, timings,
                                      int(obs.token_mask.sum()), self.action_space, state.copy()))
        return chunks
