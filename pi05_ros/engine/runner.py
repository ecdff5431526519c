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

`run_batch` runs several observations at once (a server's dynamic batch): actions [B, horizon, action_dim] and
one set of stage timings for the whole batch. The reference runs the B rows as one model batch; a runner that
cannot batch yet loops `run` over the rows (`run_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
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

    @property
    def guided(self) -> bool:
        """Whether this row asks for real-time chunking (guidance given and active)."""
        return self.guidance is not None and self.guidance.active

    @property
    def num_views(self) -> int:
        """Camera views present (slots not masked)."""
        return sum(image is not None for image in self.images)


class Runner(Protocol):
    """Runs the network: prepared observation -> normalized actions [horizon, action_dim] and stage timings.

    `stage_names` lists every key `run` may return (see the module docstring), so monitors can show them all.
    """

    name: str
    stage_names: tuple[str, ...]

    def run(self, obs: PreparedObservation, num_steps: int) -> tuple[np.ndarray, dict[str, float]]: ...

    def run_batch(self, observations: Sequence[PreparedObservation],
                  num_steps: int) -> tuple[np.ndarray, dict[str, float]]: ...


def run_rows(runner: Runner, observations: Sequence[PreparedObservation],
             num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
    """`run_batch` for a runner that runs one observation at a time: `run` per row, actions stacked, each stage's
    milliseconds summed over the rows (the time the batch spent in it)."""
    if not observations:
        raise ValueError("run_batch needs at least one observation")
    rows, timings = [], {}
    for obs in observations:
        actions, row_timings = runner.run(obs, num_steps)
        rows.append(actions)
        for stage, ms in row_timings.items():
            timings[stage] = timings.get(stage, 0.0) + ms
    return np.stack(rows), timings


class ReferenceRunner:
    """The plain PyTorch model, synchronizing at stage ends to time them."""

    name = "reference"
    stage_names = ("vision", "embed_prefix", "prefill_kv", "denoise")

    def __init__(self, model: Pi05Model) -> None:
        self.model = model

    def run(self, obs: PreparedObservation, num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        actions, timings = self.run_batch([obs], num_steps)
        return actions[0], timings

    def run_batch(self, observations: Sequence[PreparedObservation],
                  num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """The rows as one model batch: each keeps its own views, prompt length and noise (Pi05Model packs every
        row's valid tokens and masks the rest)."""
        if not observations:
            raise ValueError("run_batch needs at least one observation")
        guided = {obs.guidance.beta if obs.guided else 0.0 for obs in observations}
        if len(guided) > 1:  # RTC guides a whole batch with one beta: rows guided otherwise run one by one
            return run_rows(self, observations, num_steps)
        device = self.model.device
        clock = StageClock(device)
        size = self.model.cfg.vision.image_size
        masked = np.full((3, size, size), -1.0, np.float32)
        images = np.stack([np.stack([to_model_range(im) if im is not None else masked for im in obs.images])
                           for obs in observations])
        inputs = ModelInputs(
            images=torch.from_numpy(images),
            image_masks=torch.tensor([[im is not None for im in obs.images] for obs in observations]),
            tokens=torch.from_numpy(np.stack([obs.tokens for obs in observations])),
            token_mask=torch.from_numpy(np.stack([obs.token_mask for obs in observations])),
            noise=torch.from_numpy(np.stack([obs.noise for obs in observations])).to(device),
        )
        actions = self.model.sample_actions(inputs, num_steps, hook=clock.mark, guidance=self._guidance(observations))
        out = actions.cpu().numpy()
        timings = clock.finish()
        timings.pop("total")
        return out, timings

    @staticmethod
    def _guidance(observations: Sequence[PreparedObservation]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The batch's RTC guidance (previous chunks, weights, beta), or None; run_batch made sure every row is
        guided alike."""
        first = observations[0].guidance
        if first is None or not first.active:
            return None
        return (torch.from_numpy(np.stack([obs.guidance.previous for obs in observations])),
                torch.from_numpy(np.stack([obs.guidance.weights for obs in observations])), first.beta)
