"""The runner contract: what `Policy` hands a runner, what it gets back, and the plain PyTorch runner.

A runner runs the network only: a `PreparedObservation` (host arrays in model units) and a step count in,
normalized actions [horizon, action_dim] and per-stage milliseconds out. `Policy` (engine/policy.py) does
everything around it; the runners are `ReferenceRunner` here and the fast CUDA pipeline (engine/fast/).

Stage names mean one thing whichever runner reports them:
- `vision`: SigLIP + projector over the valid views;
- `embed_prefix`: token-table look-up and assembly of the prefix (reference; the fast path gathers the rows
  in `host_staging` and scales them into the prefix inside `prefill_kv`);
- `prefill_kv`: Gemma 2B over the prefix, keeping each layer's K/V;
- `denoise`: every Euler step of the action expert;
- fast path only: `host_staging` (token-row gather, images and noise into pinned buffers), `host_copy_in`,
  `host_copy_out`, and the parts `vision_per_view` (vision / views) and `denoise_step` (denoise / steps).
`Policy` adds `preprocess`, `postprocess` and `total`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pi05_ros.engine.action_space import ActionSpace
from pi05_ros.engine.preprocess import to_model_range
from pi05_ros.engine.reference import ModelInputs, Pi05Model
from pi05_ros.engine.rtc import Guidance
from pi05_ros.engine.timing import StageClock


@dataclass
class ActionChunk:
    """One inference's result."""

    actions: np.ndarray  # [horizon, action_dof] float32, robot units (delta columns already made positions)
    num_steps: int
    timings: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds
    num_prompt_tokens: int = 0
    action_space: ActionSpace | None = None  # what each column means (engine/action_space.py)
    state: np.ndarray | None = None  # the observed state the chunk was computed from (robot units)


@dataclass
class PreparedObservation:
    """What a runner consumes: everything already on the host in model units."""

    # per model slot: uint8 224x224x3, or float32 224x224x3 in [-1, 1] (a family that resizes floats:
    # LeRobot), or None when the view is masked
    images: list[np.ndarray | None]
    tokens: np.ndarray  # int64 [max_len]
    token_mask: np.ndarray  # bool [max_len]
    noise: np.ndarray  # float32 [horizon, action_dim]
    guidance: Guidance | None = None  # real-time chunking toward the previous chunk (engine/rtc.py)


class Runner(Protocol):
    """Runs the network: prepared observation -> normalized actions [horizon, action_dim] and stage timings.

    `stage_names` lists every key `run` may return (see the module docstring), so monitors can show them all.
    """

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
        guidance = None
        if obs.guidance is not None and obs.guidance.active:
            g = obs.guidance
            guidance = (torch.from_numpy(g.previous)[None], torch.from_numpy(g.weights)[None], g.beta)
        actions = self.model.sample_actions(inputs, num_steps, hook=clock.mark, guidance=guidance)
        out = actions[0].cpu().numpy()
        timings = clock.finish()
        timings.pop("total")
        return out, timings
