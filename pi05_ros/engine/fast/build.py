"""A fast runner for an already-loaded model, with its FP8 scales kept in a file between starts.

    runner = build_fast_runner(model, "fp8", scales_file=Path("ckpt/pi05_ros_fp8_calibration.json"))

Packs the weights, reads the scales file when it fits these weights, otherwise lets the pipeline calibrate
(on `calibration_observations()` when given, e.g. the robot's recordings, else on synthetic observations)
and saves what it found. The only place of the fast path that touches files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from pi05_ros.engine.fast.blocks import FastModel
from pi05_ros.engine.fast.calibration import load_scales, save_scales, weights_fingerprint
from pi05_ros.engine.fast.pipeline import Pi05Pipeline, fp8_supported
from pi05_ros.engine.reference import Pi05Model
from pi05_ros.engine.runner import PreparedObservation


def build_fast_runner(
    model: Pi05Model,
    precision: str,
    *,
    scales_file: Path | None = None,
    calibration_observations: Callable[[], Iterable[PreparedObservation]] | None = None,
    release_reference: bool = False,
    attention: str = "auto",
    **pipeline_options: Any,
) -> Pi05Pipeline:
    """Pi05Pipeline for `model` (bf16 or fp8). `calibration_observations` is called only if calibration runs.

    `release_reference` frees the reference weights while packing (the model cannot run afterwards);
    `pipeline_options` go to Pi05Pipeline (max_views, fp8_layers, fp8_vision, use_graphs, ...).
    """
    fast = FastModel(model, torch.bfloat16, release_reference=release_reference)
    scales = observations = None
    wants_fp8 = precision == "fp8" and fp8_supported(fast.pos_embed.device)
    if wants_fp8:
        fingerprint = weights_fingerprint(fast)  # before quantization changes the weights
        scales = load_scales(scales_file, fast)
        if scales is None and calibration_observations is not None:
            observations = calibration_observations()
    pipeline = Pi05Pipeline(fast, precision, fp8_scales=scales, calibration_observations=observations,
                            attention=attention, **pipeline_options)
    if wants_fp8 and scales_file is not None and pipeline.calibrated_on is not None:
        save_scales(scales_file, pipeline.fp8_scales or {}, fingerprint, pipeline.calibrated_on)
    return pipeline
