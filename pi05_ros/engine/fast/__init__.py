"""The fast path, one wing beside the reference it must equal (engine/reference.py):

- `blocks`: the reference weights re-packed for inference (FastModel) and the math over them;
- `pipeline`: Pi05Pipeline, the CUDA runner (static buffers, CUDA graphs, FP8, stage timings); no file I/O;
- `calibration`: FP8 scales (amax recorder, synthetic observations, the scales file);
- `build`: build_fast_runner, a pipeline for an already-loaded model with its scales file;
- `kernels/` (to come): fused kernels.

Nothing here imports engine/policy.py; the runner contract it implements is engine/runner.py.
"""
