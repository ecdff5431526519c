"""The newest-value buffers between ROS callbacks and the inference thread."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from pi05_ros.engine.errors import InputError
from pi05_ros.engine.preprocess import PreparedView, prepare_view, resize_with_pad
from pi05_ros.ros.inputs import CameraBuffer, InputBuffers, LatestBuffer, LatestText, Sample


def write(buffer: LatestBuffer, value: int, shape: tuple[int, ...] = (4, 5, 3), stamp: int = 0) -> np.ndarray:
    spare = buffer.spare(shape)
    spare.fill(value)
    buffer.commit(spare, stamp)
    return spare


def test_take_returns_newest_value_and_keeps_it_until_a_newer_one() -> None:
    buffer = LatestBuffer("cam")
    assert buffer.take() is None
    write(buffer, 1, stamp=10)
    write(buffer, 2, stamp=20)
    first = buffer.take()
    assert first is not None and first.stamp_ns == 20 and first.sequence == 2
    assert np.all(first.data == 2)
    again = buffer.take()
    assert again is not None and again.data is first.data and again.stamp_ns == 20  # nothing newer: same
    write(buffer, 3, stamp=30)
    newer = buffer.take()
    assert newer is not None and np.all(newer.data == 3) and newer.stamp_ns == 30
    assert np.all(first.data == 2) or first.data is not newer.data


def test_buffers_are_reused_not_reallocated() -> None:
    buffer = LatestBuffer("cam")
    seen: set[int] = set()
    for value in range(20):
        seen.add(id(write(buffer, value)))
        if value % 3 == 0:
            buffer.take()
    assert len(seen) <= 3  # triple buffering: three arrays in all, whatever the interleaving


def test_shape_change_allocates_a_new_buffer() -> None:
    buffer = LatestBuffer("cam")
    write(buffer, 1, (4, 5, 3))
    write(buffer, 2, (6, 7, 3))
    sample = buffer.take()
    assert sample is not None and sample.data.shape == (6, 7, 3)


def test_dropped_counts_values_no_reader_took() -> None:
    buffer = LatestBuffer("cam")
    write(buffer, 1)
    write(buffer, 2)  # 1 never taken
    write(buffer, 3)  # 2 never taken
    buffer.take()
    write(buffer, 4)
    assert buffer.state().dropped == 2
    assert buffer.state().messages == 4


def test_failure_marks_input_until_a_good_message() -> None:
    buffer = LatestBuffer("cam")
    write(buffer, 1)
    buffer.fail("bad encoding")
    assert buffer.error == "bad encoding" and buffer.state().error == "bad encoding"
    write(buffer, 2)
    assert buffer.error is None


def test_age_grows_from_arrival() -> None:
    buffer = LatestBuffer("cam")
    assert buffer.state().age_s is None
    write(buffer, 1)
    time.sleep(0.05)
    age = buffer.state().age_s
    assert age is not None and 0.04 <= age < 1.0  # sleep granularity: >= 40 ms, well under a second


def test_trigger_callback_runs_after_each_commit() -> None:
    buffer = LatestBuffer("cam")
    calls: list[int] = []
    buffer.on_new_value(lambda: calls.append(1))
    write(buffer, 1)
    write(buffer, 2)
    assert len(calls) == 2


def torn_reads(buffer: LatestBuffer, write_next: Callable[[int], object], whole: Callable[[Sample], bool],
               hold_s: float = 0.0) -> tuple[int, list[int]]:
    """For 0.5 s a thread writes values 1, 2, ... (mod 256) while this one takes: how many reads, and which of them
    `whole` refused. `hold_s`: how long each read holds its value before it is checked."""
    stop = threading.Event()
    torn: list[int] = []

    def writer() -> None:
        value = 0
        while not stop.is_set():
            value = (value + 1) % 256
            write_next(value)

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 0.5
    reads = 0
    while time.monotonic() < deadline:
        sample = buffer.take()
        if sample is None:
            continue
        reads += 1
        if hold_s:
            time.sleep(hold_s)
        if not whole(sample):
            torn.append(reads)
    stop.set()
    thread.join()
    return reads, torn


def test_reader_never_sees_a_torn_frame_under_concurrent_writes() -> None:
    # The writer fills each frame with one value; a frame mixing values would mean a half-written buffer.
    buffer = LatestBuffer("cam")
    reads, torn = torn_reads(buffer, lambda value: write(buffer, value, (64, 64, 3)),
                             lambda sample: bool(np.all(sample.data == sample.data.flat[0])))
    assert reads > 10 and not torn


def test_text_and_all_inputs_state() -> None:
    inputs = InputBuffers(["base_image", "wrist_image"])
    text = inputs.instruction
    assert isinstance(text, LatestText) and text.get() is None
    text.set("pick")
    assert text.get() == "pick"
    names = [state.name for state in inputs.states()]
    assert names == ["base_image", "wrist_image", "joint_states", "instruction"]


def test_inputs_worker_and_conversions_import_without_ros() -> None:
    # They hold no ROS code, so they can run (and be tested) where rclpy is missing, e.g. on a GPU machine.
    code = ("import sys; sys.modules.update(rclpy=None, rcl_interfaces=None, sensor_msgs=None, "
            "builtin_interfaces=None, trajectory_msgs=None, diagnostic_msgs=None); "
            "import pi05_ros.ros.inputs, pi05_ros.ros.worker, pi05_ros.ros.conversions, pi05_ros.ros.observation, "
            "pi05_ros.ros.schedule, pi05_ros.ros.problems, pi05_ros.ros.settings, pi05_ros.ros.input_rules, "
            "pi05_ros.ros.problem_log, pi05_ros.ros.memory")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


def test_held_bytes_follow_the_frames_and_drop_after_they_shrink() -> None:
    buffer = LatestBuffer("cam")
    write(buffer, 1, (3000, 4000, 3))
    buffer.take()
    write(buffer, 2, (3000, 4000, 3))
    write(buffer, 3, (3000, 4000, 3))
    assert buffer.held_bytes() == 3 * 36_000_000
    for value in range(3):  # three small frames (each taken) replace every large buffer
        write(buffer, value, (480, 640, 3))
        buffer.take()
    assert buffer.held_bytes() <= 3 * 480 * 640 * 3


def test_heap_trimmer_trims_once_after_a_drop() -> None:
    from pi05_ros.ros.memory import HeapTrimmer

    trimmer = HeapTrimmer(min_drop_bytes=10)
    assert not trimmer.check(100) and not trimmer.check(200)
    assert not trimmer.check(195)  # less than the minimum drop
    assert trimmer.check(50) and trimmer.trims == 1  # glibc here: malloc_trim exists
    assert not trimmer.check(50) and trimmer.trims == 1


def write_frame(buffer: CameraBuffer, value: int, shape: tuple[int, ...] = (48, 64, 3), stamp: int = 0) -> np.ndarray:
    frame = buffer.frame_buffer(shape)
    frame.fill(value)
    buffer.commit_frame(frame, stamp)
    return frame


def test_a_camera_that_prepares_holds_model_size_views_of_its_frames() -> None:
    """With the policy's prepare_view set, each frame is resized as it is committed: the reader takes the view the
    engine would have made, the writer converts every frame into one scratch array of its own, and the view taken
    stays as it was when the writer overwrites that array."""
    buffer = CameraBuffer("cam")
    buffer.set_preparer(lambda frame: prepare_view(frame, 224, "openpi_client", "cam"))
    rng = np.random.default_rng(1)
    frame = buffer.frame_buffer((480, 640, 3))
    frame[...] = rng.integers(0, 256, frame.shape, dtype=np.uint8)
    expected = resize_with_pad(frame.copy(), 224, "openpi_client")
    buffer.commit_frame(frame, 10)
    sample = buffer.take()
    assert sample is not None and isinstance(sample.data, PreparedView) and sample.stamp_ns == 10
    assert buffer.frame_buffer((480, 640, 3)) is frame  # the scratch array is reused, never handed to the reader
    frame.fill(7)
    np.testing.assert_array_equal(sample.data.pixels, expected)
    assert sample.data.source_shape == (480, 640)
    state = buffer.state()
    assert state.prepare_ms is not None and state.prepare_ms > 0
    assert buffer.held_bytes() == 480 * 640 * 3 + 224 * 224 * 3  # the scratch + the one view held
    for value in range(5):
        write_frame(buffer, value, (480, 640, 3))
    assert buffer.held_bytes() == 480 * 640 * 3 + 3 * 224 * 224 * 3


def test_a_camera_stops_preparing_when_the_preparer_goes() -> None:
    buffer = CameraBuffer("cam")
    buffer.set_preparer(lambda frame: prepare_view(frame, 224, "openpi_client"))
    for value in range(3):
        write_frame(buffer, value)
    held = buffer.take()
    assert held is not None and isinstance(held.data, PreparedView)
    buffer.set_preparer(None)  # deactivate, cleanup, or a remote policy: frames as they come
    assert buffer.state().prepare_ms is None
    frame = write_frame(buffer, 9)
    assert buffer._scratch is None  # the frame-sized scratch array is let go
    assert not np.shares_memory(frame, held.data.pixels)
    sample = buffer.take()
    assert sample is not None and sample.data is frame and np.all(sample.data == 9)
    assert buffer.held_bytes() <= 48 * 64 * 3 + 2 * 224 * 224 * 3  # the raw frame beside views still held


def test_a_preparer_that_changes_between_convert_and_commit_never_aliases_the_reader() -> None:
    """set_preparer runs on another thread than the writer: a change between frame_buffer and commit_frame must
    neither hand the reader an array the writer converts into next nor keep a stale scratch array."""
    buffer = CameraBuffer("cam")
    prepare = lambda frame: prepare_view(frame, 224, "openpi_client")  # noqa: E731
    buffer.set_preparer(prepare)
    frame = buffer.frame_buffer((64, 64, 3))
    frame.fill(1)
    buffer.set_preparer(None)  # between the writer's two steps
    buffer.commit_frame(frame, 1)
    raw = buffer.take()
    assert raw is not None and raw.data is frame and buffer._scratch is None
    buffer.set_preparer(prepare)
    write_frame(buffer, 2)
    assert not np.shares_memory(buffer.frame_buffer((64, 64, 3)), raw.data)
    assert np.all(raw.data == 1)  # what the reader took is untouched by the frames after it
    spare = buffer.frame_buffer((64, 64, 3))
    buffer.set_preparer(None)
    spare_raw = buffer.frame_buffer((64, 64, 3))
    buffer.set_preparer(prepare)  # the other way round: a ring spare converted, then prepared
    spare_raw.fill(3)
    buffer.commit_frame(spare_raw, 3)
    view = buffer.take()
    assert view is not None and isinstance(view.data, PreparedView) and np.all(view.data.pixels == 3)
    assert spare is not None and buffer.held_bytes() <= 64 * 64 * 3 + 3 * 224 * 224 * 3


def test_a_frame_the_preparer_refuses_is_not_committed() -> None:
    buffer = CameraBuffer("cam")
    write_frame(buffer, 1, stamp=5)

    def refuse(frame: np.ndarray) -> PreparedView:
        raise InputError("cam: refused")

    buffer.set_preparer(refuse)
    with pytest.raises(InputError, match="refused"):
        write_frame(buffer, 2, stamp=6)
    sample = buffer.take()
    assert sample is not None and sample.stamp_ns == 5 and np.all(sample.data == 1)


def test_prepared_views_are_never_torn_under_concurrent_writes() -> None:
    buffer = CameraBuffer("cam")
    buffer.set_preparer(lambda frame: prepare_view(frame, 224, "openpi_client"))
    # Model-size frames: prepare_view must copy them, or the reader's view is the writer's scratch array. Each read
    # holds its view while the writer converts the next frames; frame k is filled with k % 256.
    reads, torn = torn_reads(buffer, lambda value: write_frame(buffer, value, (224, 224, 3)),
                             lambda sample: bool(np.all(sample.data.pixels == sample.sequence % 256)), hold_s=0.001)
    assert reads > 10 and not torn
