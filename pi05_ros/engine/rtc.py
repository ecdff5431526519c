"""Real-time chunking (Black, Galliker, Levine 2025): a new chunk that agrees with the previous one while it is
being denoised, for any flow policy, without retraining.

At each Euler step (openpi's time: t runs from 1, noise, to 0, data; x_t = t * noise + (1 - t) * actions), the
one-step estimate of the clean chunk is `clean = x_t - t * v(x_t)`. Its disagreement with the previous chunk's
not-yet-executed actions, weighted by a soft mask W, is pulled back through the network:

    err = W * (previous - clean)
    g   = (d clean / d x_t)^T err                        a vector-Jacobian product through the expert
    v  <- v - min(beta, ((1 - t)^2 + t^2) / (t (1 - t))) * g

(minus: openpi's velocity points from data to noise and its dt is negative). The guidance weight is Kinetix's
`min(beta, (1 - tau) / tau * inv_r2)` with tau = 1 - t; it reads the same in either time convention. beta = 0 is
plain sampling.

W has one row per action: 1 for the `delay` actions that will run before the new chunk can arrive, decaying
(linear or exponential) to 0 at `end` (the end of the overlap with the previous chunk), 0 beyond; columns the
robot does not use (padding up to the model's action dimension) are 0.

The previous chunk enters in the model's normalized units: `Policy` undoes the action-space transform and the
normalization before handing it here (engine/policy.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SCHEDULES = ("linear", "exp", "ones", "zeros")


def prefix_weights(delay: int, end: int, horizon: int, schedule: str = "exp") -> np.ndarray:
    """W [horizon]: 1 before `delay`, decaying over [delay, end), 0 from `end` on (Kinetix's get_prefix_weights).

    linear: (end - i) / (end - delay + 1); exp: that value c mapped to c * (e^c - 1) / (e - 1);
    ones: 1 up to `end`; zeros: 1 up to `delay` only.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown RTC schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if delay < 0 or end < 0:
        raise ValueError(f"delay ({delay}) and end ({end}) must be >= 0")
    end = min(end, horizon)
    delay = min(delay, end)
    i = np.arange(horizon, dtype=np.float64)
    if schedule == "ones":
        w = (i < end).astype(np.float64)
    elif schedule == "zeros":
        w = (i < delay).astype(np.float64)
    else:
        w = np.clip((end - i) / (end - delay + 1), 0.0, 1.0)
        if schedule == "exp":
            w = w * np.expm1(w) / (math.e - 1)
        w = np.where(i < delay, 1.0, w)
        w = np.where(i >= end, 0.0, w)
    return w.astype(np.float32)


def guidance_weight(t: float, beta: float) -> float:
    """min(beta, ((1 - t)^2 + t^2) / (t (1 - t))); beta where that is infinite (t = 1 or t = 0)."""
    if t <= 0.0 or t >= 1.0:
        return float(beta)
    return float(min(beta, ((1.0 - t) ** 2 + t**2) / (t * (1.0 - t))))


def guidance_weight_tensor(t: Tensor, beta: Tensor) -> Tensor:
    """The same on device scalars (for the CUDA-graph path: t and beta are data there)."""
    ratio = ((1.0 - t) ** 2 + t**2) / (t * (1.0 - t))  # inf at t = 1 or 0, and min(inf, beta) = beta
    return torch.minimum(ratio, beta)


@dataclass(frozen=True)
class RtcRequest:
    """What a caller of `Policy.infer` asks for, in robot terms.

    `previous` [n, dof]: the previous chunk's actions still to come, as the robot runs them (positions for
    position and delta columns, velocities for velocity columns), row j = the new chunk's action start + j
    (action i is due at the new observation's stamp + (i + 1) action periods; the actions before `start` have
    already run and are not guided); `delay`: how many of the new chunk's actions will be due before it can
    arrive (the inference's latency in actions); `end`: the new chunk's action where the soft mask reaches 0
    (default: start + n).
    """

    previous: np.ndarray
    delay: int
    beta: float = 5.0
    end: int | None = None
    schedule: str = "exp"
    start: int = 0


@dataclass
class Guidance:
    """What RTC needs for one inference, in model units: `previous` [H, A] and `weights` [H, A] (the soft mask
    times the used-column mask), and the clip `beta` (0: plain sampling)."""

    previous: np.ndarray
    weights: np.ndarray
    beta: float

    @classmethod
    def build(cls, previous: np.ndarray, delay: int, end: int, beta: float, schedule: str = "exp",
              columns: int | None = None) -> Guidance:
        """previous [H, A] (model units, row 0 = the action due at the first tick after the inference starts);
        only its first `columns` columns are guided (the robot's own; None: all)."""
        previous = np.asarray(previous, dtype=np.float32)
        horizon, dim = previous.shape
        if beta < 0:
            raise ValueError(f"rtc beta must be >= 0, got {beta}")
        rows = prefix_weights(delay, end, horizon, schedule)
        cols = np.zeros(dim, np.float32)
        cols[: dim if columns is None else columns] = 1.0
        return cls(previous, rows[:, None] * cols[None, :], float(beta))

    @property
    def active(self) -> bool:
        return self.beta > 0


def guided_velocity(velocity: Callable[[Tensor], Tensor], x: Tensor, t: float, previous: Tensor, weights: Tensor,
                    beta: float) -> Tensor:
    """v(x) pulled toward `previous` (see the module docstring); x [..., H, A], previous / weights broadcast."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        v = velocity(x_in)
        clean = x_in - t * v
        err = weights * (previous - clean)
        (g,) = torch.autograd.grad(clean, x_in, grad_outputs=err.detach())
    return (v - guidance_weight(t, beta) * g).detach()
