"""The newest message of each input, in preallocated host buffers, with stamps and ages.

Writers are ROS subscription callbacks; the one reader is the inference thread. Each input is triple
buffered: the callback converts into a spare buffer outside the lock and then swaps it in, the reader swaps
the newest buffer out. The lock only guards a few reference swaps, so a callback never waits for the reader
to copy or infer, and the reader never sees a half-written frame. A camera's buffer can also prepare each frame
for the model as it arrives (CameraBuffer: the policy's resize, in the callback), so the inference that takes
it starts from the model-size view. Arrival times and ages are on the clock the
node gives (the ROS clock, so use_sim_time works); each stamp is judged by the rule of execution/stamps.py.
No ROS imports.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pi05_ros.engine.preprocess import PreparedView
from pi05_ros.execution.stamps import judge_stamp

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class StampRule:
    """The tolerances of the stamp rule (execution/stamps.py)."""

    future_tolerance_ns: int
    max_age_ns: int


@dataclass(frozen=True)
class Sample:
    """One input value as the reader got it. `data` stays valid until the reader's next `take()`."""

    data: np.ndarray | PreparedView  # a PreparedView from a CameraBuffer that prepares its frames
    stamp_ns: int  # the stamp used for timing (ROS time, ns): the header stamp, or the arrival when untrusted
    received_ns: int  # the clock at arrival (ROS time, ns)
    sequence: int  # 1 for the first message of this input, +1 for each later one


@dataclass(frozen=True)
class InputState:
    """What diagnostics shows of one input."""

    name: str
    messages: int
    age_s: float | None  # since the newest good message arrived (< 0: the clock went back since); None: none yet
    error: str | None  # why the newest message could not be used; None when it was fine
    dropped: int  # good messages replaced before any inference used them
    stamp_issue: str | None = None  # why the newest message's stamp was not used as is (stamps.py)
    bad_stamps: int = 0  # messages whose stamp was not used as is
    prepare_ms: float | None = None  # a camera that prepares its frames: mean time per frame (recent frames)


class LatestBuffer:
    """Newest value of one input. One writer thread at a time, one reader thread."""

    def __init__(self, name: str, dtype: np.dtype | type = np.uint8, clock_ns: Callable[[], int] = time.monotonic_ns,
                 stamp_rule: StampRule | None = None) -> None:
        self.name = name
        self._dtype = np.dtype(dtype)
        self._clock_ns = clock_ns
        self._stamp_rule = stamp_rule
        self._stamp_issue: str | None = None
        self._bad_stamps = 0
        self._lock = threading.Lock()
        # Three buffers: the writer fills `_spare`; `_newest` holds the newest complete value; the reader
        # owns `_reading`. Swaps keep at most one allocation per shape change.
        self._spare: np.ndarray | None = None
        self._newest: np.ndarray | None = None
        self._reading: np.ndarray | None = None
        self._newest_meta: tuple[int, int, int] | None = None  # stamp_ns, received_ns, sequence
        self._reading_meta: tuple[int, int, int] | None = None
        self._newest_taken = True
        self._messages = 0
        self._dropped = 0
        self._error: str | None = None
        self._on_new: Callable[[], None] | None = None

    def on_new_value(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` (cheap, non-blocking) after each new value; used for the trigger camera."""
        self._on_new = callback

    def spare(self, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """Writer: a buffer of `shape` to fill before `commit()`; reused while the shape stays the same.
        With no shape (not known before decoding): the current spare buffer, or None."""
        buffer = self._spare
        if not isinstance(buffer, np.ndarray):  # a PreparedView (CameraBuffer) is never written into
            buffer = None
        if shape is None:
            return buffer
        if buffer is None or buffer.shape != shape:
            buffer = np.empty(shape, dtype=self._dtype)
            self._spare = buffer
        return buffer

    def commit(self, filled: np.ndarray | PreparedView, stamp_ns: int) -> None:
        """Writer: make `filled` (normally the array `spare()` returned) the newest value, stamped `stamp_ns`
        (the header stamp; with a stamp rule an untrusted one is replaced or the value refused)."""
        received = self._clock_ns()
        issue = None
        if self._stamp_rule is not None:
            verdict = judge_stamp(stamp_ns, received, future_tolerance_ns=self._stamp_rule.future_tolerance_ns,
                                  max_age_ns=self._stamp_rule.max_age_ns)
            issue = verdict.describe(self.name) or None
            stamp_ns = verdict.stamp_ns
            if not verdict.usable:
                with self._lock:
                    self._messages += 1
                    self._bad_stamps += 1
                    self._stamp_issue = issue
                return
        with self._lock:
            if issue is not None:
                self._bad_stamps += 1
            self._stamp_issue = issue
            self._messages += 1
            if not self._newest_taken:
                self._dropped += 1
            self._spare, self._newest = self._newest, filled
            self._newest_meta = (stamp_ns, received, self._messages)
            self._newest_taken = False
            self._error = None
        if self._on_new is not None:
            self._on_new()

    def fail(self, reason: str) -> None:
        """Writer: the newest message could not be converted; the input is unusable until a good one."""
        with self._lock:
            self._messages += 1
            self._error = reason

    def take(self) -> Sample | None:
        """Reader: the newest good value (the same one again if nothing newer came), None before the first."""
        with self._lock:
            if not self._newest_taken:
                self._reading, self._newest = self._newest, self._reading
                self._reading_meta = self._newest_meta
                self._newest_taken = True
            data, meta = self._reading, self._reading_meta
        if data is None or meta is None:
            return None
        return Sample(data, *meta)

    def state(self, now_ns: int | None = None) -> InputState:
        now_ns = self._clock_ns() if now_ns is None else now_ns
        with self._lock:
            meta = self._reading_meta if self._newest_taken else self._newest_meta
            age = None if meta is None else (now_ns - meta[1]) / NS_PER_S  # < 0: the clock went back since
            return InputState(self.name, self._messages, age, self._error, self._dropped, self._stamp_issue,
                              self._bad_stamps)

    def held_bytes(self) -> int:
        """Bytes of the three buffers (each holds one message of its size, so a huge frame grows them until three
        smaller frames have replaced it: ros/memory.py then gives the memory back)."""
        with self._lock:
            return sum(buffer.nbytes for buffer in (self._spare, self._newest, self._reading) if buffer is not None)

    def latest_copy(self) -> np.ndarray | None:
        """Any thread: a copy of the newest good value (for reading the joint state beside the inference)."""
        with self._lock:
            data = self._reading if self._newest_taken else self._newest
            if isinstance(data, PreparedView):
                data = data.pixels
            return None if data is None else data.copy()

    @property
    def error(self) -> str | None:
        with self._lock:
            return self._error


PREPARE_WINDOW = 100  # frames the prepare time is averaged over


class CameraBuffer(LatestBuffer):
    """Newest frame of one camera. With a preparer (the policy's `prepare_view`), the writer converts each frame
    into a scratch array of its own and the preparer resizes it for the model before the commit, so the buffers
    hold model-size views and the inference that takes one skips the resize. Without one (no policy loaded yet, a
    remote policy, or prepare_views in_inference), frames are stored as they come."""

    def __init__(self, name: str, clock_ns: Callable[[], int] = time.monotonic_ns,
                 stamp_rule: StampRule | None = None) -> None:
        super().__init__(name, np.uint8, clock_ns, stamp_rule)
        self._preparer: Callable[[np.ndarray], PreparedView] | None = None
        self._scratch: np.ndarray | None = None  # the writer's converted frame, before it is prepared
        self._prepare_ms: deque[float] = deque(maxlen=PREPARE_WINDOW)

    def set_preparer(self, preparer: Callable[[np.ndarray], PreparedView] | None) -> None:
        """Any thread: prepare the frames that arrive from now on with `preparer` (None: store them as they are).
        Values already held stay as they are; the engine refuses a view prepared for another model by name. Only
        the writer touches its scratch array (it reads the preparer once per step), so a change between its
        `frame_buffer` and `commit_frame` never leaves one array both scratch and held."""
        with self._lock:
            self._preparer = preparer
            self._prepare_ms.clear()

    def frame_buffer(self, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """Writer: the array to convert the next frame into (as `spare`): the scratch array when frames are
        prepared (the buffers then hold prepared views, not frames), else the spare buffer itself."""
        if self._preparer is None:
            self._scratch = None  # frames go into the buffers themselves again: let a large scratch array go
            return self.spare(shape)
        if shape is None:
            return self._scratch
        if self._scratch is None or self._scratch.shape != shape:
            self._scratch = np.empty(shape, dtype=np.uint8)
        return self._scratch

    def commit_frame(self, frame: np.ndarray, stamp_ns: int) -> None:
        """Writer: prepare `frame` (when a preparer is set) and commit it. Raises what the preparer raises (the
        engine's InputError), committing nothing."""
        preparer = self._preparer
        if preparer is None:
            if frame is self._scratch:  # converted for a preparer that has gone since: the buffers own it now
                self._scratch = None
            self.commit(frame, stamp_ns)
            return
        self._scratch = frame  # the scratch array, a decoder's own array, or a spare from before the preparer
        start = time.perf_counter()
        view = preparer(frame)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        with self._lock:
            self._prepare_ms.append(elapsed_ms)
        self.commit(view, stamp_ns)

    def state(self, now_ns: int | None = None) -> InputState:
        state = super().state(now_ns)
        with self._lock:
            prepare_ms = sum(self._prepare_ms) / len(self._prepare_ms) if self._prepare_ms else None
        return dataclasses.replace(state, prepare_ms=prepare_ms)

    def held_bytes(self) -> int:
        """The three buffers (prepared views while preparing) and the writer's frame-sized scratch array, which the
        next frame of another size replaces and which goes when preparing stops."""
        scratch = self._scratch
        return super().held_bytes() + (scratch.nbytes if scratch is not None else 0)


class LatestText:
    """Newest string of an input without a header (the instruction)."""

    def __init__(self, name: str, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.name = name
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._text: str | None = None
        self._received: int | None = None
        self._messages = 0

    def set(self, text: str) -> None:
        with self._lock:
            self._text, self._received = text, self._clock_ns()
            self._messages += 1

    def get(self) -> str | None:
        with self._lock:
            return self._text

    def state(self, now_ns: int | None = None) -> InputState:
        now_ns = self._clock_ns() if now_ns is None else now_ns
        with self._lock:
            age = None if self._received is None else max(0.0, (now_ns - self._received) / NS_PER_S)
            return InputState(self.name, self._messages, age, None, 0)


class InputBuffers:
    """All inputs of the policy: one `LatestBuffer` per camera, one for the joint state, the instruction."""

    def __init__(self, camera_names: Iterable[str], joint_input: str = "joint_states",
                 instruction_input: str = "instruction", *, clock_ns: Callable[[], int] = time.monotonic_ns,
                 stamp_rule: StampRule | None = None) -> None:
        self.clock_ns = clock_ns
        self.cameras: dict[str, CameraBuffer] = {name: CameraBuffer(name, clock_ns, stamp_rule)
                                                 for name in camera_names}
        self.joints = LatestBuffer(joint_input, np.float32, clock_ns, stamp_rule)
        self.instruction = LatestText(instruction_input, clock_ns)

    def held_bytes(self) -> int:
        """Bytes all input buffers hold."""
        return sum(buffer.held_bytes() for buffer in (*self.cameras.values(), self.joints))

    def states(self, now_ns: int | None = None) -> list[InputState]:
        now_ns = self.clock_ns() if now_ns is None else now_ns
        buffers: list[LatestBuffer | LatestText] = [*self.cameras.values(), self.joints, self.instruction]
        return [buffer.state(now_ns) for buffer in buffers]
