"""Pi05Pipeline: the fast CUDA path, a Runner for `Policy` (the contract is engine/runner.py).

Per observation: host-side token-row gather into pinned staging -> one H2D copy per input -> three CUDA
graph replays (vision; text embedding + prefix K/V prefill; all denoise steps) -> one D2H copy. Nothing is
allocated and the host does not wait on the GPU until the actions are needed.

Graphs are captured lazily and kept:
- vision: one per number of valid camera views;
- prefill: one per (views, text tokens rounded up to a tile of `text_tile`);
- denoise: one per (denoise steps, views) (the suffix's K/V sit after the longest prefix those views allow,
  so the same graph serves every prompt length).
The valid text length travels as data (a device scalar): attention masks and RoPE positions read it, so a
prompt that grows by a few tokens replays the same graphs, and at most `text_tile - 1` padding tokens are
computed. Stage times come from CUDA events recorded between the replays.

FP8 scales are handed in (`fp8_scales`, e.g. read by engine/fast/build.py from a saved file), or calibrated
here on the observations handed in, or on synthetic ones; the pipeline itself reads and writes no file.

The denoise loop runs on the fused expert kernels (engine/fast/kernels/expert.py: six Triton kernels per
expert layer) where they have been measured to pay, Hopper (SM 9.0); elsewhere, or with
`expert_kernels="off"`, on the torch.compile'd layer functions. A kernel path that fails to build falls back to
the torch path with a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from pi05_ros.engine.fast import kernels
from pi05_ros.engine.fast.blocks import FastModel, prefix_capacity
from pi05_ros.engine.fast.calibration import SYNTHETIC_COUNT, record_input_amax, synthetic_observations
from pi05_ros.engine.preprocess import to_uint8
from pi05_ros.engine.reference import Pi05Model
from pi05_ros.engine.runner import PreparedObservation

if TYPE_CHECKING:
    from pi05_ros.engine.fast.kernels.expert import KernelConfig

log = logging.getLogger(__name__)

# Linear layers that run in FP8 (patterns over FastModel's module names). Measured on an H100 with
# full-size random weights (docs/benchmarks.md, 2026-11-26): Gemma 2B's MLP in FP8 keeps the action error
# at 1.9e-2 (1 step) / 1.2e-2 (10 steps) and takes most of the gain; adding its attention projections and
# the expert's linears saves another 0.4 ms (1 step) / 1.3 ms (10 steps) but costs 4.2e-2 / 2.0e-2, over
# the 3e-2 budget. FP8_ALL_LAYERS is there for who prefers the speed; SigLIP joins with fp8_vision=True.
FP8_DEFAULT_LAYERS: tuple[str, ...] = ("prefix_blocks.*.gate_up", "prefix_blocks.*.down")
FP8_ALL_LAYERS: tuple[str, ...] = ("prefix_blocks.*", "expert_blocks.*")
# SigLIP's MLP in FP8 saves 0.27 ms (2 views) at 3.4e-2 total error; all its linears save no more and cost
# 5.6e-2 (over the 5e-2 budget for FP8 with SigLIP): measured as above.
FP8_VISION_LAYERS: tuple[str, ...] = ("vision_blocks.*.fc1", "vision_blocks.*.fc2")


EXPERT_KERNELS = ("auto", "on", "off")


def expert_kernels_measured(device: torch.device) -> bool:
    """Where the fused expert kernels were measured faster than the torch.compile path: Hopper (H200, SM 9.0;
    docs/benchmarks.md §20). Other GPUs keep the torch path unless asked (`expert_kernels="on"`)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def fp8_supported(device: torch.device) -> bool:
    """FP8 e4m3 GEMMs (torch._scaled_mm) need compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class _Graph:
    """A CUDA graph of `fn`, warmed up on a side stream first (so lazy initialisation stays out of it)."""

    def __init__(self, fn: Callable[[], None], pool: object) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class Pi05Pipeline:
    """Fast inference of a loaded Pi05Model on a CUDA GPU. Implements the `Runner` protocol.

    `model` is the loaded reference model (packed here) or an already packed FastModel. With precision fp8,
    `fp8_scales` (amax per linear layer) are used as given; without them the pipeline calibrates on
    `calibration_observations`, or on synthetic observations, and keeps what it found in `fp8_scales`
    (`calibrated_on` then says on what).
    """

    name = "fast"
    # vision_per_view and denoise_step are parts of vision / denoise (per view, per step), not extra time.
    stage_names = ("host_staging", "host_copy_in", "vision", "vision_per_view", "prefill_kv", "denoise",
                   "denoise_step", "host_copy_out")

    def __init__(
        self,
        model: Pi05Model | FastModel,
        precision: str = "bf16",
        max_views: int = 3,
        fp8_scales: Mapping[str, float] | None = None,
        calibration_observations: Iterable[PreparedObservation] | None = None,
        text_tile: int = 16,
        fp8_vision: bool = False,
        use_graphs: bool = True,
        fp8_headroom: float = 4.0,
        compile: bool = True,
        attention: str = "gemm",
        fp8_layers: tuple[str, ...] = FP8_DEFAULT_LAYERS,
        fp8_vision_layers: tuple[str, ...] = FP8_VISION_LAYERS,
        release_reference: bool = False,
        expert_kernels: str = "auto",
        expert_kernel_config: KernelConfig | None = None,
    ) -> None:
        if expert_kernels not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got {expert_kernels!r}")
        if precision not in ("bf16", "fp8"):
            raise ValueError(f"precision must be bf16 or fp8, got {precision!r}")
        self.device = model.pos_embed.device if isinstance(model, FastModel) else model.device
        if self.device.type != "cuda":
            raise ValueError("Pi05Pipeline needs a CUDA GPU; use the reference runner on CPU")
        if precision == "fp8" and not fp8_supported(self.device):
            log.warning("this GPU has no FP8 GEMMs (needs SM 8.9+): running bf16")
            precision = "bf16"
        self.precision, self.text_tile, self.use_graphs = precision, text_tile, use_graphs
        self.fp8_headroom = fp8_headroom
        self.setup_times: dict[str, float] = {}
        self.cfg = model.cfg
        if isinstance(model, FastModel):
            self.fast = model
        else:
            # release_reference: free the reference copy layer by layer while packing (the Policy does; the
            # benchmark keeps it to run the baseline beside the fast path).
            self.fast = FastModel(model, torch.bfloat16, attention=attention, release_reference=release_reference)
        start = time.perf_counter()
        self.fp8_layers = fp8_layers + (fp8_vision_layers if fp8_vision else ())
        self.embed_table = self.fast.token_table  # host memory: rows are gathered on the CPU
        self._allocate(max_views)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self._schedules: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
        torch.cuda.synchronize()
        self.setup_times["prepare_weights"] = self.fast.build_seconds + time.perf_counter() - start
        self.fp8_scales: dict[str, float] | None = None
        self.calibrated_on: str | None = None
        if precision == "fp8":
            start = time.perf_counter()
            if fp8_scales is None:
                if calibration_observations is None:
                    data = list(synthetic_observations(self.cfg, SYNTHETIC_COUNT, views=min(2, self.max_views)))
                    self.calibrated_on = f"synthetic x{len(data)}"
                else:
                    data = list(calibration_observations)
                    self.calibrated_on = f"recorded x{len(data)}"
                log.info("calibrating FP8 activation scales on %s observations", self.calibrated_on)
                fp8_scales = self.calibrate(data)
            self.fp8_scales = dict(fp8_scales)
            self.fast.quantize_fp8(self.fp8_scales, self.fp8_layers, self.fp8_headroom)
            torch.cuda.synchronize()
            self.setup_times["calibrate_fp8"] = time.perf_counter() - start
        if compile:
            self.fast.compile()
        self.expert_kernels = None  # set below; calibration above ran the torch path, which records every linear
        if expert_kernels == "on" or (expert_kernels == "auto" and expert_kernels_measured(self.device)):
            if not kernels.available(self.device):
                if expert_kernels == "on":
                    raise ValueError("expert_kernels='on' needs Triton and a CUDA GPU of SM 8.0 or newer; "
                                     "use expert_kernels='auto' or 'off'")
                log.warning("Triton is not installed: the denoise loop runs on the torch path")
            else:
                from pi05_ros.engine.fast.kernels.expert import ExpertKernels

                self.expert_kernels = ExpertKernels(self.fast, expert_kernel_config)
        self.setup_times["capture"] = 0.0  # includes torch.compile's first compilation of each stage

    @property
    def expert_path(self) -> str:
        """What runs the denoise loop: "kernels" (fused Triton) or "torch" (torch.compile'd layers)."""
        return "kernels" if self.expert_kernels is not None else "torch"

    # --- setup

    def _allocate(self, max_views: int) -> None:
        cfg, dev = self.cfg, self.device
        d, width = cfg.vlm.head_dim, cfg.vlm.width
        self.max_views = max_views
        max_text, max_prefix = prefix_capacity(cfg, max_views, cfg.max_token_len, self.text_tile)
        size = cfg.vision.image_size
        pin = dict(pin_memory=True)
        self.h_images = torch.zeros(max_views, size, size, 3, dtype=torch.uint8, **pin)
        self.h_text = torch.zeros(max_text, width, dtype=self.embed_table.dtype, **pin)
        self._table_bytes = self.embed_table.contiguous().view(torch.uint8).numpy()
        self._h_text_bytes = self.h_text.view(torch.uint8).numpy()
        self.h_noise = torch.zeros(1, cfg.action_horizon, cfg.action_dim, dtype=torch.float32, **pin)
        self.h_n_valid = torch.zeros((), dtype=torch.int64, **pin)
        self.h_actions = torch.zeros(cfg.action_horizon, cfg.action_dim, dtype=torch.float32, **pin)
        self.d_images = torch.zeros(max_views, size, size, 3, dtype=torch.uint8, device=dev)
        self.d_text = torch.zeros(max_text, width, dtype=self.embed_table.dtype, device=dev)
        self.d_noise = torch.zeros_like(self.h_noise, device=dev)
        self.d_n_valid = torch.zeros((), dtype=torch.int64, device=dev)
        self.d_x = torch.zeros_like(self.d_noise)
        self.d_prefix = torch.zeros(1, max_prefix, width, dtype=torch.float32, device=dev)
        total = self._cache_rows(max_prefix)
        self.d_keys = [torch.zeros(1, 1, total, d, dtype=torch.bfloat16, device=dev) for _ in range(cfg.vlm.depth)]
        self.d_values = [torch.zeros_like(k) for k in self.d_keys]

    def calibrate(self, observations: Iterable[PreparedObservation], num_steps: int = 10) -> dict[str, float]:
        """Largest |input| of every linear layer over the observations (bf16 path, eager, all denoise steps)."""
        use_graphs, self.use_graphs = self.use_graphs, False
        # the torch path, whose linears the recorder sees (the fused kernels bypass them)
        expert_kernels, self.expert_kernels = getattr(self, "expert_kernels", None), None
        try:
            with record_input_amax(self.fast) as amax:
                for obs in observations:
                    self.run(obs, num_steps)
        finally:
            self.use_graphs = use_graphs
            self.expert_kernels = expert_kernels
        return dict(amax)

    def schedule(self, num_steps: int) -> tuple[torch.Tensor, ...]:
        """The step schedule's constants for `num_steps`, with the fused kernels' extras when they run."""
        key = (num_steps, self.expert_path)
        if key not in self._schedules:
            schedule = self.fast.step_schedule(num_steps)
            self._schedules[key] = self.expert_kernels.schedule(schedule) if self.expert_kernels else schedule
        return self._schedules[key]

    # --- the three stages as closures over static buffers

    def _vision_fn(self, views: int) -> Callable[[], None]:
        out = self.d_prefix[0, : views * self.cfg.vision.num_patches]
        return lambda: self.fast.vision(self.d_images[:views], out)

    def _capacity(self, views: int) -> int:
        """Prefix rows of the K/V cache for this many views (the longest prompt's); the suffix's rows follow.

        Sized per view count, not for the maximum: attention never scans rows no prompt can fill.
        """
        return prefix_capacity(self.cfg, views, self.cfg.max_token_len, self.text_tile)[1]

    def _prefill_fn(self, views: int, text_len: int) -> Callable[[], None]:
        start = views * self.cfg.vision.num_patches
        length = start + text_len
        prefix = self.d_prefix[:, :length]
        capacity = self._capacity(views)
        keys = [k[:, :, :capacity] for k in self.d_keys]
        values = [v[:, :, :capacity] for v in self.d_values]

        def run() -> None:
            self.fast.embed_text_rows(self.d_text[:text_len], self.d_prefix[0, start:length])
            self.fast.prefill(prefix, self.d_n_valid, keys, values)

        return run

    def _cache_rows(self, capacity: int) -> int:
        """Prefix capacity + the suffix's rows, rounded up to 64: cuBLAS takes its Hopper kernels for the
        attention GEMMs only with aligned sizes (770 keys fell back to sm80 kernels). The rows between are
        masked out."""
        return -(-(capacity + self.cfg.action_horizon) // 64) * 64

    def _denoise_fn(self, num_steps: int, views: int) -> Callable[[], None]:
        schedule = self.schedule(num_steps)
        total = self._cache_rows(self._capacity(views))
        keys = [k[:, :, :total] for k in self.d_keys]
        values = [v[:, :, :total] for v in self.d_values]

        loop = self.expert_kernels or self.fast

        def run() -> None:
            self.d_x.copy_(self.d_noise)  # the noise buffer stays intact: warm-up and replays start alike
            loop.denoise(self.d_x, self.d_n_valid, keys, values, schedule)

        return run

    def _stage(self, key: tuple, make: Callable[[], Callable[[], None]]) -> Callable[[], None]:
        if not self.use_graphs:
            return make()
        graph = self._graphs.get(key)
        if graph is None:
            start = time.perf_counter()
            fn = make()
            fn()  # first run on the current stream: torch.compile compiles here, outside any capture
            graph = _Graph(fn, self._pool)
            self._graphs[key] = graph
            self.setup_times["capture"] += time.perf_counter() - start
            log.info("captured CUDA graph %s in %.2f s", key, time.perf_counter() - start)
        return graph.replay

    def _denoise_stage(self, num_steps: int, views: int) -> Callable[[], None]:
        key = ("denoise", num_steps, views, self.expert_path)
        if self.expert_kernels is None:
            return self._stage(key, lambda: self._denoise_fn(num_steps, views))
        try:
            return self._stage(key, lambda: self._denoise_fn(num_steps, views))
        except Exception as exc:  # a Triton build or launch failure on this GPU: keep serving on the torch path
            log.warning("the fused expert kernels failed on this GPU (%s: %s); the denoise loop runs on the torch "
                        "path from now on", type(exc).__name__, exc)
            self.expert_kernels = None
            torch.cuda.synchronize()
            return self._stage(("denoise", num_steps, views, "torch"), lambda: self._denoise_fn(num_steps, views))

    # --- Runner protocol

    @torch.no_grad()
    def run(self, obs: PreparedObservation, num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        host_start = time.perf_counter()
        views = [im for im in obs.images if im is not None]
        n_views = len(views)
        if not 1 <= n_views <= self.max_views:
            raise ValueError(f"{n_views} camera views; this pipeline was built for 1..{self.max_views}")
        ids = obs.tokens[obs.token_mask]
        text_len, _ = prefix_capacity(self.cfg, n_views, len(ids), self.text_tile)
        # Host staging: token-table rows gathered here (the table stays in host memory), images, noise.
        # numpy row gather over byte views: single-threaded, where torch's CPU index_select woke its thread
        # pool and made this staging step the one source of latency spikes (p99 2.8 ms vs p50 0.16 ms).
        np.take(self._table_bytes, ids, axis=0, out=self._h_text_bytes[: len(ids)])
        self._h_text_bytes[len(ids):text_len] = 0
        for i, image in enumerate(views):
            # a float (LeRobot-resized) view is rounded to uint8 here: finer than the bf16 the vision tower runs in
            self.h_images[i].numpy()[...] = to_uint8(image)
        self.h_noise[0].numpy()[...] = obs.noise
        self.h_n_valid.fill_(n_views * self.cfg.vision.num_patches + len(ids))
        vision = self._stage(("vision", n_views), lambda: self._vision_fn(n_views))
        prefill = self._stage(("prefill", n_views, text_len), lambda: self._prefill_fn(n_views, text_len))
        denoise = self._denoise_stage(num_steps, n_views)
        host_ms = (time.perf_counter() - host_start) * 1e3
        ev = self._events
        ev[0].record()
        self.d_images[:n_views].copy_(self.h_images[:n_views], non_blocking=True)
        self.d_text[:text_len].copy_(self.h_text[:text_len], non_blocking=True)
        self.d_noise.copy_(self.h_noise, non_blocking=True)
        self.d_n_valid.copy_(self.h_n_valid, non_blocking=True)
        ev[1].record()
        vision()
        ev[2].record()
        prefill()
        ev[3].record()
        denoise()
        ev[4].record()
        self.h_actions.copy_(self.d_x[0], non_blocking=True)
        ev[5].record()
        ev[5].synchronize()
        names = ("host_copy_in", "vision", "prefill_kv", "denoise", "host_copy_out")
        timings = {"host_staging": host_ms}
        timings.update({n: ev[i].elapsed_time(ev[i + 1]) for i, n in enumerate(names)})
        timings["vision_per_view"] = timings["vision"] / n_views
        timings["denoise_step"] = timings["denoise"] / num_steps
        return self.h_actions.numpy().copy(), timings
