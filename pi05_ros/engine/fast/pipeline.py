"""Pi05Pipeline: the fast CUDA path, a Runner for `Policy` (the contract is engine/runner.py).

Per observation: host-side token-row gather into pinned staging -> one H2D copy per input -> three CUDA
graph replays (vision; text embedding + prefix K/V prefill; all denoise steps) -> one D2H copy. Nothing is
allocated and the host does not wait on the GPU until the actions are needed.

Graphs are captured lazily and kept:
- vision: one per number of valid camera views;
- prefill: one per (views, text tokens rounded up to a tile of `text_tile`);
- denoise: ONE graph of one Euler step per number of views, replayed once per step. The step's constants
  (adaRMS modulation, the kernels' shift products) are data: a `StepTable` holds every step of the current
  schedule in fixed buffers (sized for MAX_STEPS) and the graph copies step `index` of them before running it,
  so a new step count captures nothing and costs only its schedule (a few ms; recent ones are kept, up to
  SCHEDULE_CACHE_BYTES). The suffix's K/V sit after the longest prefix those views allow, so the same graph
  serves every prompt length.
The valid text length travels as data (a device scalar): attention masks and RoPE positions read it, so a
prompt that grows by a few tokens replays the same graphs, and at most `text_tile - 1` padding tokens are
computed. Stage times come from CUDA events recorded between the replays.

FP8 scales are handed in (`fp8_scales`, e.g. read by engine/fast/build.py from a saved file), or calibrated
here on the observations handed in, or on synthetic ones; the pipeline itself reads and writes no file.

The denoise loop runs on the fused expert kernels (engine/fast/kernels/expert.py: six Triton kernels per
expert layer) where they have been measured to pay, Hopper (SM 9.0); elsewhere, or with
`expert_kernels="off"`, on the torch.compile'd layer functions. A kernel path that fails to build falls back to
the torch path with a warning.

Batches (`run_batch`, a server's dynamic batches): rows of the same number of views run together, up to
`max_batch` at a time, padded to the next batch bucket (BATCH_BUCKETS: 1, 2, 4, 8, ...), and every graph above is
kept per bucket. A row's prompt length travels as data (n_valid per row; the text is padded to the batch's longest
tile); padded rows compute on whatever their staging holds and are dropped, so a batch of 3 replays the graphs of
4. Batches of up to AUTO_KERNEL_MAX_BATCH rows denoise on the fused kernels where those run (R rows x T tiles per
GEMM program), larger ones on the torch path, measured faster there, unless `expert_kernels="on"`. Staging and the
batch K/V caches are sized for `max_batch` (default 1: what a robot needs; batch 1 keeps caches of its own). A row
with real-time chunking runs alone.

Attention (`attention`): the Gemma layers' one-K/V-head attention runs as GEMM -> masked softmax -> GEMM inside the
compiled layers, except that `"auto"` (the default) runs the prefill of batch buckets from FLASH_PREFILL_MIN_BATCH
rows through the flash-style Triton kernel of kernels/attention.py on Hopper, where it measured faster
(docs/benchmarks.md §51). `"flash"` takes the kernel in both stacks, `"gemm"` nowhere, `"sdpa"` PyTorch's SDPA.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pi05_ros.engine.fast import kernels
from pi05_ros.engine.fast.blocks import ATTENTION, FastModel, prefix_capacity
from pi05_ros.engine.fast.calibration import SYNTHETIC_COUNT, record_input_amax, synthetic_observations
from pi05_ros.engine.fast.kernels import geglu
from pi05_ros.engine.preprocess import to_uint8
from pi05_ros.engine.reference import Pi05Model, euler_schedule
from pi05_ros.engine.rtc import Guidance
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
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes graphs are captured for (those below max_batch, and it)
MAX_STEPS = 100  # the step table's capacity: Policy's limit (engine/policy.py MAX_DENOISE_STEPS)
# Computed schedules kept for switching back (kernel path ~1.2 MB per step, torch path ~0.45 MB), least recently
# used dropped first.
SCHEDULE_CACHE_BYTES = 64 << 20


# The largest batch bucket `expert_kernels="auto"` denoises on the fused kernels: they were measured faster than the
# torch path at batch 1 (H200, H100) and 2 (H100: 10.16 against 10.47 ms, 9.76 against 10.21 ms alone), slower from
# 4 rows up (docs/benchmarks.md §20, §48, §49).
AUTO_KERNEL_MAX_BATCH = 2


# The smallest batch bucket whose prefill `attention="auto"` runs on the flash kernel (kernels/attention.py); see
# docs/benchmarks.md §51.
FLASH_PREFILL_MIN_BATCH = 2


def kernels_measured(device: torch.device) -> bool:
    """Where the Triton kernels of the fast path were measured faster than the torch.compile path: Hopper (H200 and
    H100, SM 9.0). There the defaults take the fused expert kernels (batches up to AUTO_KERNEL_MAX_BATCH,
    docs/benchmarks.md §20, §48), the flash attention for batched prefills (§51) and the prefix MLP's fused FP8
    gate_up + GeGLU (§70). Other GPUs keep the torch path unless asked (`expert_kernels="on"`, ...)."""
    return kernels.measured_on(device)


def fp8_supported(device: torch.device) -> bool:
    """FP8 e4m3 GEMMs (torch._scaled_mm) need compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# Graph making (compile, warm-up, capture) one pipeline at a time in a process: lanes meet a new prompt tile or
# camera count together, torch.compile is not thread-safe, and a capture's device-wide synchronize stalls the other
# lanes anyway. Replays stay concurrent.
_GRAPH_MAKING = threading.RLock()
_claimed_streams: set[tuple[int, int]] = set()  # (device, handle) of the streams live pipelines hold as their own


def _private_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream:
    """A stream no other live pipeline holds. torch.cuda.Stream() does not create a stream: it hands out torch's
    pooled streams (32 a priority) in turn, so two draws can return the same one, and a lane's capture stream must
    be nobody else's (what is launched on it during a capture is captured)."""
    with _GRAPH_MAKING:
        for _ in range(64):
            stream = torch.cuda.Stream(device, priority=priority)
            key = (stream.device_index, stream.cuda_stream)
            if key not in _claimed_streams:
                _claimed_streams.add(key)
                return stream
    raise RuntimeError("every CUDA stream of torch's pool is held by a live pipeline: fewer pipelines (lanes) at once")


def _release_streams(keys: list[tuple[int, int]]) -> None:
    with _GRAPH_MAKING:
        _claimed_streams.difference_update(keys)


class _Graph:
    """A CUDA graph of `fn`, warmed up on a side stream first (so lazy initialisation stays out of it)."""

    def __init__(self, fn: Callable[[], None], pool: object, capture_stream: torch.cuda.Stream | None = None,
                 warm_stream: torch.cuda.Stream | None = None) -> None:
        stream = warm_stream or torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # Captured on the pipeline's own stream: cuBLAS keeps a workspace per stream, and a graph keeps the one it
        # was captured with. On torch's shared default capture stream, two pipelines' graphs would share one
        # workspace and race when replayed at once (docs/benchmarks.md §48 saw their actions differ).
        # thread_local: another lane's thread may synchronize or allocate while this one captures; only this
        # thread's own unsafe calls would break this capture. Nobody else launches on a pipeline's capture stream
        # (_private_stream), so nothing of theirs is captured.
        with torch.cuda.graph(self.graph, pool=pool, stream=capture_stream, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class _HostTimer:
    """torch.cuda.Event's timing interface on the host clock: the pipeline without a GPU (use_graphs=False, for
    tests of its staging and batching on the CPU)."""

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: _HostTimer) -> float:
        return (end.time - self.time) * 1e3

    def synchronize(self) -> None:
        pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTable:
    """The denoise loop's per-step constants in fixed device buffers, so that one CUDA graph of one Euler step
    serves every step count.

    A schedule is a tuple whose entries at PER_STEP have one row per step (the rest are per count, e.g. the
    dt-folded action head). `load` (outside any graph, when the count changes) fills one flat float32 table, a
    row per step; `select` (inside the step graph) copies row `index` into `current` (views of one flat buffer)
    and advances `index`: two small kernels per step.
    """

    PER_STEP = (0, 1, 4, 5)  # mods, final mods [, the kernels' bias_qkv, bias_gu]

    def __init__(self, schedule: tuple[torch.Tensor, ...], capacity: int,
                 per_step: tuple[int, ...] = PER_STEP) -> None:
        self.capacity = capacity
        self.per_step = [i in per_step for i in range(len(schedule))]
        if any(t.dtype != torch.float32 for t, step in zip(schedule, self.per_step, strict=True) if step):
            raise ValueError("StepTable holds float32 per-step constants")
        device = schedule[0].device
        self.shapes = [t.shape[1:] if step else t.shape for t, step in zip(schedule, self.per_step, strict=True)]
        sizes = [t[0].numel() if step else 0 for t, step in zip(schedule, self.per_step, strict=True)]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.table = torch.zeros(capacity, sum(sizes), device=device)
        self._row = torch.zeros(1, sum(sizes), device=device)
        self.current = [self._row[0, o:o + n].view(shape) if step else torch.zeros_like(t)
                        for t, step, o, n, shape in zip(schedule, self.per_step, self.offsets, sizes, self.shapes,
                                                        strict=True)]
        self.index = torch.zeros(1, dtype=torch.int64, device=device)
        self.holds: int | None = None  # the step count loaded

    def fits(self, schedule: tuple[torch.Tensor, ...]) -> bool:
        return len(schedule) == len(self.shapes) and schedule[0].shape[0] <= self.capacity and all(
            (t.shape[1:] if step else t.shape) == shape
            for t, step, shape in zip(schedule, self.per_step, self.shapes, strict=True))

    def load(self, schedule: tuple[torch.Tensor, ...]) -> None:
        steps = schedule[0].shape[0]
        for t, step, offset, current in zip(schedule, self.per_step, self.offsets, self.current, strict=True):
            if step:
                self.table[:steps, offset:offset + current.numel()].copy_(t.reshape(steps, -1))
            else:
                current.copy_(t)
        self.holds = steps

    def select(self) -> None:
        torch.index_select(self.table, 0, self.index, out=self._row)
        self.index += 1


class Pi05Pipeline:
    """Fast inference of a loaded Pi05Model on a CUDA GPU. Implements the `Runner` protocol.

    `model` is the loaded reference model (packed here) or an already packed FastModel. With precision fp8,
    `fp8_scales` (amax per linear layer) are used as given; without them the pipeline calibrates on
    `calibration_observations`, or on synthetic observations, and keeps what it found in `fp8_scales`
    (`calibrated_on` then says on what). `prefix_fused_mlp` runs the prefix MLP's FP8 gate_up, GeGLU and down's
    input quantization as one kernel (kernels/geglu.py); None (the default) takes it with precision fp8 on Hopper,
    where it was measured faster (a batch of 8's prefill -0.2 ms, batch 1 level: docs/benchmarks.md §70).
    `vision_fused_mlp` does the same for SigLIP's FP8 fc1 (bias + GELU) where fp8_vision is on (opt-in: its error is
    over the plain fp8 budget); None takes it there on Hopper (vision 0.3 ms faster at a batch of 8, §70).
    `carry_residual` (default on) has each layer's last residual add done in the next layer's first norm
    (blocks.vision_layer): the same sums, one pass over the residual stream less a layer. A FastModel passed in gets
    these three options set as the pipeline resolves them, whatever they were.

    One pipeline runs one call at a time. Pipelines that run at once, on threads of their own, are lanes (`lane()`:
    the same weights, their own buffers, graphs, memory pool and capture stream; `use_own_streams()`): each captures
    its graphs on a stream of its own, since cuBLAS keeps a workspace per stream and a graph keeps the one it was
    captured with (§48's two pipelines captured on torch's shared capture stream, and their actions differed when
    replayed at once). test/gpu/test_pipeline.py checks two lanes at once against each alone, bit for bit. Lanes
    gain nothing over one batch of their rows (docs/benchmarks.md §86: two lanes of 4 took 45.3 ms a call, one
    batch of 8 41.4, on an H100): the server runs one batch at a time; tools/concurrent_lanes_gpu.py times them.
    """

    name = "fast"
    # vision_per_view and denoise_step are parts of vision / denoise (per view, per step), not extra time.
    stage_names = ("host_staging", "host_copy_in", "vision", "vision_per_view", "prefill_kv", "denoise",
                   "denoise_step", "host_copy_out")

    def __init__(
        self,
        model: Pi05Model | FastModel,
        precision: str = "bf16",
        max_views: int | None = None,
        fp8_scales: Mapping[str, float] | None = None,
        calibration_observations: Iterable[PreparedObservation] | None = None,
        text_tile: int = 16,
        fp8_vision: bool = False,
        use_graphs: bool = True,
        fp8_headroom: float = 4.0,
        compile: bool = True,
        attention: str = "auto",
        fp8_layers: tuple[str, ...] = FP8_DEFAULT_LAYERS,
        fp8_vision_layers: tuple[str, ...] = FP8_VISION_LAYERS,
        release_reference: bool = False,
        expert_kernels: str = "auto",
        expert_kernel_config: KernelConfig | None = None,
        max_batch: int = 1,
        prefix_fused_mlp: bool | None = None,
        vision_fused_mlp: bool | None = None,
        carry_residual: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= text_tile <= 64:  # FastModel's RoPE table has room for 64 positions of text padding
            raise ValueError(f"text_tile must be in 1..64, got {text_tile}")
        if expert_kernels not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernels must be one of {', '.join(EXPERT_KERNELS)}, got {expert_kernels!r}")
        if precision not in ("bf16", "fp8"):
            raise ValueError(f"precision must be bf16 or fp8, got {precision!r}")
        if attention != "auto" and attention not in ATTENTION:
            raise ValueError(f"attention must be auto or one of {', '.join(ATTENTION)}, got {attention!r}")
        self.device = model.pos_embed.device if isinstance(model, FastModel) else model.device
        if attention == "flash" and not kernels.available(self.device):
            raise ValueError("attention='flash' needs Triton and a CUDA GPU of SM 8.0 or newer; use 'gemm'")
        if self.device.type != "cuda" and use_graphs:
            # Without graphs it runs anywhere (slowly): tests use that to check its staging and batching on the CPU.
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
            self.fast = FastModel(model, torch.bfloat16, release_reference=release_reference)
        if attention != "auto":  # both stacks; auto keeps the GEMM attention but for the prefill of large batches
            self.fast.prefix_attention = self.fast.expert_attention = attention
        # kernels/geglu.py's MLPs by default where they were measured (H100) to pay: fp8 on Hopper (SigLIP's only
        # where fp8_vision, which is opt-in, puts its MLP in FP8)
        fused_mlp_measured = precision == "fp8" and kernels_measured(self.device) and geglu.supported(self.device)
        if prefix_fused_mlp is None:
            prefix_fused_mlp = fused_mlp_measured
        if prefix_fused_mlp:
            if precision != "fp8" or not geglu.supported(self.device):
                raise ValueError("prefix_fused_mlp needs precision fp8 (the FP8 MLP it fuses) on a GPU with FP8 "
                                 "tensor cores (SM 8.9+) and Triton; leave it off here")
        self.fast.prefix_fused_mlp = prefix_fused_mlp
        if vision_fused_mlp is None:
            vision_fused_mlp = fused_mlp_measured and fp8_vision
        if vision_fused_mlp:
            if precision != "fp8" or not fp8_vision or not geglu.supported(self.device):
                raise ValueError("vision_fused_mlp needs precision fp8 with fp8_vision (SigLIP's FP8 MLP it fuses) on "
                                 "a GPU with FP8 tensor cores (SM 8.9+) and Triton; leave it off here")
        self.fast.vision_fused_mlp = vision_fused_mlp
        # blocks.vision_layer's residual carry, read when graphs are made: a batch of 8 0.3 ms faster on an H100
        # (§70), the same sums
        self.fast.carry_residual = carry_residual
        self.attention = attention
        start = time.perf_counter()
        self.fp8_layers = fp8_layers + (fp8_vision_layers if fp8_vision else ())
        self.embed_table = self.fast.token_table  # host memory: rows are gathered on the CPU
        self.max_batch = max_batch
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self._rtc_mode = "compiled" if compile else "plain"  # -> "plain" layers -> "eager" (no graph) on failure
        self._rtc_tried: set[tuple[int, str]] = set()
        # every camera slot the model has (a LeRobot checkpoint names its own: an ALOHA one has 4)
        self._fresh_run_state(max_views or len(self.cfg.image_keys))
        _synchronize(self.device)
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
            _synchronize(self.device)
            self.setup_times["calibrate_fp8"] = time.perf_counter() - start
        if compile:
            self.fast.compile()
        self.expert_kernels = None  # set below; calibration above ran the torch path, which records every linear
        self.kernel_max_batch = 1  # the largest batch that denoises on the kernels, where they run
        if expert_kernels == "on" or (expert_kernels == "auto" and kernels_measured(self.device)):
            if not kernels.available(self.device):
                if expert_kernels == "on":
                    raise ValueError("expert_kernels='on' needs Triton and a CUDA GPU of SM 8.0 or newer; "
                                     "use expert_kernels='auto' or 'off'")
                log.warning("Triton is not installed: the denoise loop runs on the torch path")
            else:
                from pi05_ros.engine.fast.kernels.expert import ExpertKernels

                # "on" puts every batch on the kernels; "auto" those where they measured faster (see path_for)
                self.kernel_max_batch = (self.max_batch if expert_kernels == "on"
                                         else min(self.max_batch, AUTO_KERNEL_MAX_BATCH))
                self.expert_kernels = ExpertKernels(self.fast, expert_kernel_config, max_batch=self.kernel_max_batch)
        self.setup_times["capture"] = 0.0  # includes torch.compile's first compilation of each stage

    @property
    def expert_path(self) -> str:
        """What runs the denoise loop: "kernels" (fused Triton) or "torch" (torch.compile'd layers)."""
        return "kernels" if self.expert_kernels is not None else "torch"

    def lane(self) -> Pi05Pipeline:
        """Another pipeline over the same weights, to run beside this one in the same process
        (tools/concurrent_lanes_gpu.py): the packed and FP8-quantized model, its compiled layers and the fused
        kernels' packed weights are shared; input and output buffers, K/V caches, step tables, kernel workspaces,
        CUDA graphs, their memory pool and capture stream are the lane's own. Each lane runs on its own thread and
        CUDA stream."""
        other = copy.copy(self)
        other.setup_times = {**self.setup_times, "capture": 0.0}
        other._rtc_tried = set(self._rtc_tried)
        other._fresh_run_state(self.max_views)
        if self.expert_kernels is not None:
            other.expert_kernels = self.expert_kernels.lane()
        return other

    def use_own_streams(self, denoise_priority: bool = True) -> None:
        """Run every call on a CUDA stream of this pipeline's own, and with `denoise_priority` its denoise loop on
        one of higher priority: for lanes at once, where one lane's chain of small denoise kernels should get an SM
        as soon as one frees, before the next tiles of another lane's compute-bound prefill GEMMs."""
        if self.device.type != "cuda":
            return
        if self._lane_streams is None:  # claimed once: a second call switches the priority on or off
            self._lane_streams = (self._claim_stream(), self._claim_stream(priority=-1))
        self.stream = self._lane_streams[0]
        self.denoise_stream = self._lane_streams[1] if denoise_priority else None

    def _claim_stream(self, priority: int = 0) -> torch.cuda.Stream:
        """A stream of this pipeline's own (_private_stream), given back when the pipeline is collected."""
        stream = _private_stream(self.device, priority)
        key = (stream.device_index, stream.cuda_stream)
        weakref.finalize(self, _release_streams, [key])
        return stream

    # --- setup

    def _fresh_run_state(self, max_views: int) -> None:
        """Everything one call writes: buffers, caches, graphs (and their pool and capture stream), step tables."""
        use_graphs = self.use_graphs
        self._allocate(max_views)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None
        # graphs warm up and capture on streams of this pipeline's own, drawn once (see _private_stream)
        self._capture_stream = self._claim_stream() if use_graphs else None
        self._warm_stream = self._claim_stream() if use_graphs else None
        # Where calls run: None, the caller's current stream (use_own_streams: a lane's own), and the denoise loop
        # on the same, or on a stream of higher priority.
        self.stream: torch.cuda.Stream | None = None
        self.denoise_stream: torch.cuda.Stream | None = None
        self._lane_streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None
        self._schedules: OrderedDict[tuple[int, str], tuple[torch.Tensor, ...]] = OrderedDict()
        self._tables: dict[str, StepTable] = {}
        self._suffix_refresh: dict[tuple[int, str], Callable[[], None]] = {}
        self._rtc_host: list[torch.Tensor] = []  # previous chunk, soft mask, beta (pinned), and their device twins
        self._rtc_device: list[torch.Tensor] = []
        self._events = ([torch.cuda.Event(enable_timing=True) for _ in range(8)] if self.device.type == "cuda"
                        else [_HostTimer() for _ in range(8)])

    def _allocate(self, max_views: int) -> None:
        cfg, dev = self.cfg, self.device
        d, width = cfg.vlm.head_dim, cfg.vlm.width
        self.max_views = max_views
        max_text, max_prefix = prefix_capacity(cfg, max_views, cfg.max_token_len, self.text_tile)
        size = cfg.vision.image_size
        pin = dict(pin_memory=dev.type == "cuda")
        rows = self.max_batch  # room for every batch row; batch 1 uses the first
        # Images and text rows are staged packed (row after row, as many views / text rows as this batch has), so
        # a batch's inputs are one contiguous block: one asynchronous copy from pinned memory each.
        self.h_images = torch.zeros(rows * max_views, size, size, 3, dtype=torch.uint8, **pin)
        self.h_text = torch.zeros(rows * max_text, width, dtype=self.embed_table.dtype, **pin)
        self._table_bytes = self.embed_table.contiguous().view(torch.uint8).numpy()
        self._h_text_bytes = self.h_text.view(torch.uint8).numpy()
        self.h_noise = torch.zeros(rows, cfg.action_horizon, cfg.action_dim, dtype=torch.float32, **pin)
        self.h_n_valid = torch.zeros(rows, dtype=torch.int64, **pin)
        self.h_actions = torch.zeros(rows, cfg.action_horizon, cfg.action_dim, dtype=torch.float32, **pin)
        self.d_images = torch.zeros_like(self.h_images, device=dev)
        self.d_text = torch.zeros_like(self.h_text, device=dev)
        self.d_noise = torch.zeros_like(self.h_noise, device=dev)
        self.d_n_valid = torch.zeros_like(self.h_n_valid, device=dev)
        self.d_x = torch.zeros_like(self.d_noise)
        self.d_prefix = torch.zeros(rows, max_prefix, width, dtype=torch.float32, device=dev)
        total = self._cache_rows(max_prefix)
        # Batch 1 has caches of its own: real-time chunking differentiates through writes into them, and autograd
        # would carry gradients the size of a whole batch cache. Batches of 2+ share the batch caches.
        self.d_keys = [torch.zeros(1, 1, total, d, dtype=self.fast.dtype, device=dev) for _ in range(cfg.vlm.depth)]
        self.d_values = [torch.zeros_like(k) for k in self.d_keys]
        self.d_batch_keys = [torch.zeros(rows, 1, total, d, dtype=self.fast.dtype, device=dev)
                             for _ in range(cfg.vlm.depth)] if rows > 1 else []
        self.d_batch_values = [torch.zeros_like(k) for k in self.d_batch_keys]

    def calibrate(self, observations: Iterable[PreparedObservation], num_steps: int = 10) -> dict[str, float]:
        """Largest |input| of every linear layer over the observations (bf16 path, eager, all denoise steps).
        Only before any graph is made: its eager runs replace buffers that captured graphs would go on reading."""
        if self._graphs:
            raise RuntimeError("calibrate() must run before any CUDA graph is made (a captured graph would keep "
                               "reading buffers it replaces); build a new Pi05Pipeline with fp8_scales instead")
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

    def path_for(self, batch: int) -> str:
        """What denoises a batch of this size: "kernels" (where they run: up to AUTO_KERNEL_MAX_BATCH rows, every
        batch with expert_kernels="on"; after a batch failed on them, batch 1 only) or "torch"."""
        on_kernels = self.expert_kernels is not None and batch <= self.kernel_max_batch
        return "kernels" if on_kernels else "torch"

    def schedule(self, num_steps: int, path: str | None = None) -> tuple[torch.Tensor, ...]:
        """The step schedule's constants for `num_steps`, with the fused kernels' extras for their path (default:
        the batch-1 path); recent ones stay computed up to SCHEDULE_CACHE_BYTES."""
        path = path or self.expert_path
        key = (num_steps, path)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        schedule = self.fast.step_schedule(num_steps)
        schedule = self.expert_kernels.schedule(schedule) if path == "kernels" else schedule
        self._schedules[key] = schedule

        def size(entry: tuple[torch.Tensor, ...]) -> int:
            return sum(t.numel() * t.element_size() for t in entry)

        while len(self._schedules) > 1 and sum(size(e) for e in self._schedules.values()) > SCHEDULE_CACHE_BYTES:
            self._schedules.popitem(last=False)
        return schedule

    def step_table(self, num_steps: int, path: str | None = None) -> StepTable:
        """A path's StepTable (room for MAX_STEPS: made once), holding `num_steps`'s schedule."""
        if not 1 <= num_steps <= MAX_STEPS:
            raise ValueError(f"num_steps must be within 1..{MAX_STEPS}, got {num_steps}")
        path = path or self.expert_path
        schedule = self.schedule(num_steps, path)
        table = self._tables.get(path)
        if table is None:
            table = self._tables[path] = StepTable(schedule, MAX_STEPS)
        if table.holds != num_steps:
            table.load(schedule)
        return table

    # --- the three stages as closures over static buffers

    def _caches(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The K/V caches a batch of this size runs on: batch 1's own, or the first rows of the batch caches."""
        if batch == 1:
            return self.d_keys, self.d_values
        return [k[:batch] for k in self.d_batch_keys], [v[:batch] for v in self.d_batch_values]

    def _vision_fn(self, views: int, batch: int) -> Callable[[], None]:
        out = self.d_prefix[:batch, : views * self.cfg.vision.num_patches]
        images = self.d_images[: batch * views]  # packed: row after row
        return lambda: self.fast.vision(images, out)

    def _capacity(self, views: int) -> int:
        """Prefix rows of the K/V cache for this many views (the longest prompt's); the suffix's rows follow.

        Sized per view count, not for the maximum: attention never scans rows no prompt can fill.
        """
        return prefix_capacity(self.cfg, views, self.cfg.max_token_len, self.text_tile)[1]

    def _prefill_fn(self, views: int, text_len: int, batch: int) -> Callable[[], None]:
        start = views * self.cfg.vision.num_patches
        length = start + text_len
        prefix = self.d_prefix[:batch, :length]
        capacity = self._capacity(views)
        key_caches, value_caches = self._caches(batch)
        keys = [k[:, :, :capacity] for k in key_caches]
        values = [v[:, :, :capacity] for v in value_caches]
        n_valid = self.d_n_valid[:batch]
        text = self.d_text[: batch * text_len].view(batch, text_len, -1)  # packed: row after row
        attention = self.prefill_attention(batch)

        def run() -> None:
            self.fast.embed_text_rows(text, self.d_prefix[:batch, start:length])
            self.fast.prefill(prefix, n_valid, keys, values, attention)

        return run

    def prefill_attention(self, batch: int) -> str:
        """The prefill's attention for a batch bucket: with `attention="auto"`, the flash kernel from
        FLASH_PREFILL_MIN_BATCH rows where it was measured faster (Hopper), else the FastModel's own."""
        if (self.attention == "auto" and batch >= FLASH_PREFILL_MIN_BATCH and kernels_measured(self.device)
                and kernels.available(self.device)):
            return "flash"
        return self.fast.prefix_attention

    def _cache_rows(self, capacity: int) -> int:
        """Prefix capacity + the suffix's rows, rounded up to 64: cuBLAS takes its Hopper kernels for the
        attention GEMMs only with aligned sizes (770 keys fell back to sm80 kernels). The rows between are
        masked out."""
        return -(-(capacity + self.cfg.action_horizon) // 64) * 64

    def _step_fn(self, views: int, table: StepTable, batch: int) -> Callable[[], None]:
        """One Euler step on d_x's first `batch` rows with the table's current row (graph-captured once per views,
        path and batch)."""
        # Making its graph runs the step three times, each moving the table's index on: from where the last
        # inference left it (up to MAX_STEPS) that would read past the table's end, a device-side assert.
        table.index.zero_()
        total = self._cache_rows(self._capacity(views))
        key_caches, value_caches = self._caches(batch)
        keys = [k[:, :, :total] for k in key_caches]
        values = [v[:, :, :total] for v in value_caches]
        x, n_valid = self.d_x[:batch], self.d_n_valid[:batch]
        if self.path_for(batch) == "kernels":  # the kernels take positions and the key mask from n_valid
            kernels = self.expert_kernels

            def run() -> None:
                table.select()
                kernels.denoise_step(x, n_valid, keys, values, *table.current)

            return run
        where = self._suffix_buffers(views, "torch", keys, batch)

        def step() -> None:
            table.select()
            self.fast.denoise_step(x, n_valid, keys, values, *table.current, where=where)

        return step

    def _suffix_buffers(self, views: int, kind: str, keys: list[torch.Tensor],
                        batch: int) -> tuple[torch.Tensor, ...]:
        """The torch path's RoPE rows and key mask depend on n_valid only: fixed buffers, refreshed once per
        inference outside the step graph (`_suffix_refresh[(views, kind, batch)]`), read by every step."""
        x, n_valid = self.d_x[:batch], self.d_n_valid[:batch]
        where = tuple(t.clone() for t in self.fast.suffix_inputs(x, n_valid, keys))

        def refresh() -> None:
            for buffer, value in zip(where, self.fast.suffix_inputs(x, n_valid, keys), strict=True):
                buffer.copy_(value)

        self._suffix_refresh[(views, kind, batch)] = refresh
        return where

    def _stage(self, key: tuple, make: Callable[[], Callable[[], None]]) -> Callable[[], None]:
        if not self.use_graphs:
            return make()
        graph = self._graphs.get(key)
        if graph is None:
            start = time.perf_counter()
            with _GRAPH_MAKING:
                fn = make()
                fn()  # first run on the current stream: torch.compile compiles here, outside any capture
                graph = _Graph(fn, self._pool, self._capture_stream, self._warm_stream)
            self._graphs[key] = graph
            self.setup_times["capture"] += time.perf_counter() - start
            log.info("captured CUDA graph %s in %.2f s", key, time.perf_counter() - start)
        return graph.replay

    def _denoise_stage(self, num_steps: int, views: int, batch: int) -> Callable[[], None]:
        """All steps: the noise into d_x, the table's index to 0, then the step graph once per step."""
        try:
            step = self._step_stage(num_steps, views, batch)
        except Exception as exc:  # a Triton build or launch failure on this GPU: keep serving on the torch path
            if self.path_for(batch) != "kernels":
                raise
            if batch > 1:  # e.g. a batch shape that needs more shared memory than this GPU has: batch 1 may still run
                log.warning("the fused expert kernels failed for a batch of %d on this GPU (%s: %s); batches denoise "
                            "on the torch path from now on, batch 1 stays on the kernels", batch, type(exc).__name__,
                            exc)
                self.kernel_max_batch = 1
            else:
                log.warning("the fused expert kernels failed on this GPU (%s: %s); the denoise loop runs on the torch "
                            "path from now on", type(exc).__name__, exc)
                self.expert_kernels = None
            _synchronize(self.device)
            step = self._step_stage(num_steps, views, batch)
        path = self.path_for(batch)
        table = self._tables[path]
        refresh = self._suffix_refresh.get((views, "torch", batch)) if path == "torch" else None
        x, noise = self.d_x[:batch], self.d_noise[:batch]

        def run() -> None:
            x.copy_(noise)  # the noise buffer stays intact: warm-up and replays start alike
            table.index.zero_()
            if refresh is not None:
                refresh()
            for _ in range(num_steps):
                step()

        return run

    def _step_stage(self, num_steps: int, views: int, batch: int) -> Callable[[], None]:
        path = self.path_for(batch)
        table = self.step_table(num_steps, path)
        key = ("denoise_step", views, path, batch)
        return self._stage(key, lambda: self._step_fn(views, table, batch))

    # --- real-time chunking (engine/rtc.py): the torch path's layers with their VJP, one step graph

    def _stage_guidance(self, guidance: Guidance) -> None:
        """The previous chunk, the soft mask and beta into pinned staging (their device twins are copied in)."""
        if not self._rtc_host:
            cfg = self.cfg
            shape = (1, cfg.action_horizon, cfg.action_dim)
            pin = self.device.type == "cuda"
            self._rtc_host = [torch.zeros(shape, pin_memory=pin), torch.zeros(shape, pin_memory=pin),
                              torch.zeros((), pin_memory=pin)]
            self._rtc_device = [t.to(self.device) for t in self._rtc_host]
        previous, weights, beta = self._rtc_host
        previous[0].numpy()[...] = guidance.previous
        weights[0].numpy()[...] = guidance.weights
        beta.fill_(guidance.beta)

    def _rtc_stage(self, num_steps: int, views: int) -> Callable[[], None]:
        """All guided steps: noise into d_x, the table's index to 0, then the guided step once per step.

        The step runs the torch path's layers (the fused kernels have no backward) in one CUDA graph with the
        backward pass inside; t, dt and beta are data. Where torch.compile cannot differentiate a layer or a
        graph cannot hold the backward, it falls back (plain layer functions, then no graph) with a warning.
        """
        key = (num_steps, "rtc")
        if key not in self._schedules:
            steps = euler_schedule(num_steps, self.cfg.time_grid)
            times = torch.tensor([[t] for t, _ in steps], dtype=torch.float32, device=self.device)
            dt = torch.tensor([steps[0][1]], dtype=torch.float32, device=self.device)
            self._schedules[key] = (*self.fast.step_schedule(num_steps), times, dt)
        schedule = self._schedules[key]
        table = self._tables.get("rtc")
        if table is None:
            table = self._tables["rtc"] = StepTable(schedule, MAX_STEPS, per_step=(0, 1, 4))
        if table.holds != num_steps:
            table.load(schedule)
        while True:
            try:
                step = self._rtc_step(views, table)
                break
            except Exception as exc:  # torch.compile or graph capture could not take the backward pass
                if self._rtc_mode == "eager":
                    raise
                fallback = "plain layers" if self._rtc_mode == "compiled" else "eager"
                log.warning("RTC on the fast path (%s) failed (%s: %s); trying %s", self._rtc_mode,
                            type(exc).__name__, exc, fallback)
                self._rtc_mode = "plain" if self._rtc_mode == "compiled" else "eager"
                self._graphs.pop(("rtc_step", views), None)
                _synchronize(self.device)
        refresh = self._suffix_refresh[(views, "rtc", 1)]

        def run() -> None:
            self.d_x[:1].copy_(self.d_noise[:1])
            table.index.zero_()
            refresh()
            for _ in range(num_steps):
                step()

        return run

    def _rtc_step(self, views: int, table: StepTable) -> Callable[[], None]:
        make = lambda: self._rtc_step_fn(views, table)  # noqa: E731
        if self._rtc_mode != "eager" and self.use_graphs:
            return self._stage(("rtc_step", views), make)  # its warm-up runs fail here if this mode cannot
        fn = make()
        if (views, self._rtc_mode) not in self._rtc_tried:
            with _GRAPH_MAKING:
                fn()  # once: fail here, where the next mode can still be tried, not inside the inference
            self._rtc_tried.add((views, self._rtc_mode))
        return fn

    def _rtc_step_fn(self, views: int, table: StepTable) -> Callable[[], None]:
        table.index.zero_()  # a capture or a first eager run steps it on (see _step_fn)
        total = self._cache_rows(self._capacity(views))
        where = self._suffix_buffers(views, "rtc", [k[:1, :, :total] for k in self.d_keys], 1)
        previous, weights, beta = self._rtc_device
        compiled = self._rtc_mode == "compiled"

        def step() -> None:
            table.select()
            mods, final, out_w, out_b, t, dt = table.current
            self.fast.guided_step_in_cache(self.d_x[:1], self.d_n_valid[:1], self.d_keys, self.d_values, total,
                                           mods, final, out_w, out_b, t, dt, previous, weights, beta, where=where,
                                           compiled=compiled)

        return step

    # --- Runner protocol

    @torch.no_grad()
    def run(self, obs: PreparedObservation, num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        with self._on_own_stream():
            actions, timings = self._run_group([obs], num_steps)
        return actions[0], timings

    def _on_own_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @torch.no_grad()
    def run_batch(self, observations: Sequence[PreparedObservation],
                  num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """The rows in batches (see the module docstring): grouped by their number of views, up to `max_batch` at a
        time. Each stage's time is summed over the batches run (the time the whole call spent in it); a row that
        asks for real-time chunking runs alone."""
        if not observations:
            raise ValueError("run_batch needs at least one observation")
        groups: dict[int | str, list[int]] = {}
        for index, obs in enumerate(observations):
            key = f"rtc{index}" if obs.guided else obs.num_views  # guided rows: alone
            groups.setdefault(key, []).append(index)
        actions = np.zeros((len(observations), self.cfg.action_horizon, self.cfg.action_dim), np.float32)
        timings: dict[str, float] = {}
        for indices in groups.values():
            for first in range(0, len(indices), self.max_batch):
                chunk = indices[first:first + self.max_batch]
                with self._on_own_stream():
                    rows, row_timings = self._run_group([observations[i] for i in chunk], num_steps)
                actions[chunk] = rows
                for stage, ms in row_timings.items():
                    timings[stage] = timings.get(stage, 0.0) + ms
        views = sum(obs.num_views for obs in observations)
        timings["vision_per_view"] = timings["vision"] / views
        timings["denoise_step"] = timings["denoise"] / num_steps
        return actions, timings

    def bucket(self, rows: int) -> int:
        """The batch size whose graphs serve `rows` rows (the smallest bucket that holds them)."""
        return next(b for b in self.batch_buckets if b >= rows)

    def _run_group(self, observations: Sequence[PreparedObservation],
                   num_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """Rows with the same number of views, at most max_batch, through the graphs of their bucket."""
        host_start = time.perf_counter()
        rows = len(observations)
        if not 1 <= rows <= self.max_batch:
            raise ValueError(f"{rows} rows in one batch; this pipeline was built for 1..{self.max_batch}")
        batch = self.bucket(rows)
        patches = self.cfg.vision.num_patches
        n_views = observations[0].num_views
        if not 1 <= n_views <= self.max_views:
            raise ValueError(f"{n_views} camera views; this pipeline was built for 1..{self.max_views}")
        token_ids = [obs.tokens[obs.token_mask] for obs in observations]
        longest = max(len(ids) for ids in token_ids)
        if longest > self.cfg.max_token_len:  # its rows would run into the next row's; the tokenizer truncates
            raise ValueError(f"a prompt of {longest} tokens; this model takes at most {self.cfg.max_token_len}")
        text_len = max(prefix_capacity(self.cfg, n_views, len(ids), self.text_tile)[0] for ids in token_ids)
        if rows > 1 and any(obs.guided for obs in observations):
            raise ValueError("a row with real-time chunking runs alone (run_batch keeps it apart)")
        # Host staging in two parts. The images first: the vision tower needs nothing else, so it starts on the GPU
        # while the host gathers the text rows, noise and prefix lengths (the second part), which only the prefill
        # and the denoise read. Every check that can refuse the batch runs before anything is sent.
        for row, obs in enumerate(observations):
            views = [im for im in obs.images if im is not None]
            if len(views) != n_views:
                raise ValueError("rows of one batch need the same number of camera views (run_batch groups them)")
            for i, image in enumerate(views):
                # a float (LeRobot-resized) view is rounded to uint8 here: finer than the bf16 the vision tower runs
                self.h_images[row * n_views + i].numpy()[...] = to_uint8(image)
        host_ms = (time.perf_counter() - host_start) * 1e3
        ev = self._events
        ev[0].record()
        self.d_images[: batch * n_views].copy_(self.h_images[: batch * n_views], non_blocking=True)
        # A graph made now (first use of a bucket, view count, text tile) warms up on this observation's inputs,
        # not on rows never written (n_valid 0: every key masked, NaN K/V): each stage is made after its inputs
        # are sent. A first use's warm-up and capture fall outside the stages' times (the vision's in host_copy_in).
        vision = self._stage(("vision", n_views, batch), lambda: self._vision_fn(n_views, batch))
        ev[1].record()
        vision()
        ev[2].record()
        text_start = time.perf_counter()
        for row, (obs, ids) in enumerate(zip(observations, token_ids, strict=True)):
            # Token-table rows gathered here (the table stays in host memory). numpy row gather over byte views:
            # single-threaded, where torch's CPU index_select woke its thread pool and made this staging step the
            # one source of latency spikes (p99 2.8 ms vs p50 0.16 ms).
            text_row = row * text_len
            np.take(self._table_bytes, ids, axis=0, out=self._h_text_bytes[text_row:text_row + len(ids)])
            self._h_text_bytes[text_row + len(ids):text_row + text_len] = 0
            self.h_noise[row].numpy()[...] = obs.noise
            self.h_n_valid[row] = n_views * patches + len(ids)
        # Padded rows (up to the bucket) keep whatever their staging held: rows are independent, their results are
        # dropped, and only a valid prefix length is needed (every buffer was zeroed at allocation).
        self.h_n_valid[rows:batch] = n_views * patches
        guided = observations[0].guided
        if guided:
            self._stage_guidance(observations[0].guidance)
        host_ms += (time.perf_counter() - text_start) * 1e3
        self.d_text[: batch * text_len].copy_(self.h_text[: batch * text_len], non_blocking=True)
        self.d_noise[:batch].copy_(self.h_noise[:batch], non_blocking=True)
        self.d_n_valid[:batch].copy_(self.h_n_valid[:batch], non_blocking=True)
        if guided:
            for device, host in zip(self._rtc_device, self._rtc_host, strict=True):
                device.copy_(host, non_blocking=True)
        ev[3].record()
        prefill = self._stage(("prefill", n_views, text_len, batch),
                              lambda: self._prefill_fn(n_views, text_len, batch))
        denoise = self._rtc_stage(num_steps, n_views) if guided else self._denoise_stage(num_steps, n_views, batch)
        ev[4].record()
        prefill()
        ev[5].record()
        if self.denoise_stream is None:
            denoise()
            ev[6].record()
        else:
            main = torch.cuda.current_stream(self.device)
            self.denoise_stream.wait_stream(main)
            with torch.cuda.stream(self.denoise_stream):
                denoise()
                ev[6].record()
            main.wait_stream(self.denoise_stream)
        self.h_actions[:rows].copy_(self.d_x[:rows], non_blocking=True)
        ev[7].record()
        ev[7].synchronize()
        timings = {"host_staging": host_ms,
                   "host_copy_in": ev[0].elapsed_time(ev[1]) + ev[2].elapsed_time(ev[3]),
                   "vision": ev[1].elapsed_time(ev[2]), "prefill_kv": ev[4].elapsed_time(ev[5]),
                   "denoise": ev[5].elapsed_time(ev[6]), "host_copy_out": ev[6].elapsed_time(ev[7])}
        timings["vision_per_view"] = timings["vision"] / (n_views * rows)
        timings["denoise_step"] = timings["denoise"] / num_steps
        return self.h_actions[:rows].numpy().copy(), timings
