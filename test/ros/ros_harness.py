"""Helpers for the ROS tests (imported by the test modules; test/ros/conftest.py puts this folder on sys.path).

Real rclpy over DDS on loopback, the node as an installed executable in a subprocess, no mocks.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# Generous on purpose: CI has 2 cores and the node imports torch and builds the demo model at startup.
NODE_START_TIMEOUT_S = 90.0


def package_prefix() -> Path:
    from ament_index_python.packages import get_package_prefix

    return Path(get_package_prefix("pi05_ros"))


def installed_executable(name: str) -> Path:
    return package_prefix() / "lib" / "pi05_ros" / name


def installed_params_file() -> Path:
    return package_prefix() / "share" / "pi05_ros" / "config" / "pi05.yaml"


# Resolved here, not in the forked child: a dlopen after fork in a threaded parent can deadlock.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1
_TEST_PID = os.getpid()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it (the node's clean stop) when the test process dies, even if pytest
    itself is killed, so no node outlives its test run. (If the parent died before prctl ran, leave at once.)"""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != _TEST_PID:
        os._exit(1)


# Variables this process set for its own participants only, with the value each had before: NodeProcess starts the
# node with that value (or without the variable), so the node picks its Fast DDS profile as users run it.
_PEER_ONLY_ENV: dict[str, str | None] = {}


def publish_large_frames(segment_mib: int | None = None) -> Path:
    """Make this process's DDS participants (created after this call) able to publish large frames without loss:
    the package's config/fastdds_large_frames.xml (a 16 MiB shared-memory segment), or a copy with another segment
    size. For tools that publish 640x480 or larger frames; the tests' frames are small. Nodes started by
    NodeProcess do not inherit it: the policy node keeps its own profile (config/fastdds_profile.xml)."""
    profile = package_prefix() / "share" / "pi05_ros" / "config" / "fastdds_large_frames.xml"
    if segment_mib is not None:
        text = profile.read_text().replace("<segment_size>16777216</segment_size>",
                                           f"<segment_size>{segment_mib * 2**20}</segment_size>")
        profile = Path(f"/tmp/pi05_large_frames_{os.getpid()}_{segment_mib}.xml")
        profile.write_text(text)
    _PEER_ONLY_ENV.setdefault("FASTRTPS_DEFAULT_PROFILES_FILE", os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE"))
    os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(profile)
    return profile


def node_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a node process starts with: this process's, less what publish_large_frames set for this
    process alone, plus `env`."""
    # PYTHONFAULTHANDLER: a node that hangs can be made to print every thread's stack (NodeProcess.dump_stacks)
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    for name, before in _PEER_ONLY_ENV.items():
        if before is None:
            base.pop(name, None)
        else:
            base[name] = before
    return {**base, **(env or {})}


def unique_namespace(prefix: str) -> str:
    return f"/{prefix}_{uuid.uuid4().hex[:8]}"


class NodeProcess:
    """An installed executable run as users run it: `<exe> --ros-args --params-file ... -p k:=v`."""

    def __init__(self, executable: str | Path, namespace: str, *ros_args: str, params_file: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        """`executable`: an installed executable's name, or the path of a script (test/ros/fault_node.py)."""
        self.namespace = namespace
        program = executable if isinstance(executable, Path) else installed_executable(executable)
        args = [sys.executable, str(program), "--ros-args"]
        if params_file is not None:
            args += ["--params-file", str(params_file)]
        args += ["-r", f"__ns:={namespace}", *ros_args]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=node_environment(env),
                                        preexec_fn=_die_with_parent)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._lines.append(line)

    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for_output(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.process.poll() is not None:
                return text in self.output()
            time.sleep(0.05)
        return False

    def wait_for_log(self, since: int, check: Callable[[str], bool], timeout: float) -> bool:
        """Wait until `check` holds for the output after character `since`. The output arrives through a pipe a
        reader thread drains, so on a loaded machine it can trail what the node already published."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(self.output()[since:]):
                return True
            time.sleep(0.1)
        return check(self.output()[since:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def dump_stacks(self) -> None:
        """A node that will not end: SIGABRT, which Python's fault handler (on in node_environment) answers with
        every thread's stack on stderr (merged into the output) before the process dies."""
        self._end_with(signal.SIGABRT)

    def _end_with(self, sig: int) -> None:
        """Send `sig` if the process still runs, kill it if it has not ended 5 s later; then its output is read."""
        if self.alive():
            self.process.send_signal(sig)
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5.0)
        self._reader.join(2.0)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(2.0)
        return code

    def signal_and_wait(self, sig: int, timeout: float = 10.0) -> tuple[int, float]:
        """Send `sig`; (exit code, seconds until the process ended, as this process saw it)."""
        start = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.wait(timeout)
        except subprocess.TimeoutExpired:
            # still running: what it printed since (its last log lines, a stack dump) says where it hangs
            self.dump_stacks()
            raise AssertionError(f"the process did not end within {timeout} s of signal {sig}; its output:\n"
                                 f"{self.output()[-6000:]}") from None
        return code, time.monotonic() - start

    def assert_stopped_within(self, sig: int, seconds: float) -> None:
        """Send `sig`: the node exits with 0, and from the signal being sent to the node's last line (just before
        its os._exit) less than `seconds` pass, on the machine-wide monotonic clock. Reaping the process is this
        test process's scheduling on a loaded CI machine, so its own wall time only has to be close."""
        sent = time.monotonic()
        code, elapsed = self.signal_and_wait(sig)
        self._reader.join(2.0)
        output = self.output()
        assert code == 0, output[-3000:]
        match = re.search(r"stopped (\d+\.\d+) s after the signal \(monotonic (\d+\.\d+)\)", output)
        assert match, f"no stop report in the node's output:\n{output[-3000:]}"
        took = float(match.group(2)) - sent
        assert took < seconds, f"the node took {took:.3f} s from the signal to its exit (own view {match.group(1)} s)"
        assert elapsed < seconds + 2.0, f"the process took {elapsed:.2f} s to end"

    def stop(self) -> None:
        self._end_with(signal.SIGINT)


SHM_DIR = Path("/dev/shm")


def dds_shm_segments(pid: int) -> set[str]:
    """The Fast DDS shared-memory files (in /dev/shm) a process maps or holds open: its participant's segment and
    the port segments it uses, with their `_el` lock files."""
    names: set[str] = set()
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if "/dev/shm/fastrtps_" in line:
                names.add(line.split("/dev/shm/", 1)[1].replace(" (deleted)", "").strip())
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("/dev/shm/fastrtps_"):
                names.add(target[len("/dev/shm/"):].replace(" (deleted)", ""))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return names


def shm_users(name: str, exclude_pid: int | None = None) -> list[int]:
    """Live processes that map /dev/shm/<name> (a port segment is shared by every participant on that port)."""
    users = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == exclude_pid:
            continue
        try:
            if f"/dev/shm/{name}" in (proc / "maps").read_text():
                users.append(int(proc.name))
        except OSError:
            continue
    return users


def leftover_shm(segments: set[str], pid: int) -> list[str]:
    """Of a stopped process's DDS segments, those still in /dev/shm that no other live process uses."""
    return sorted(name for name in segments if (SHM_DIR / name).exists()
                  and not shm_users(name.removesuffix("_el"), exclude_pid=pid))


def make_image(height: int, width: int, encoding: str = "rgb8", stamp_ns: int = 0,
               pixels: np.ndarray | None = None, pad: int = 0) -> Any:
    """A sensor_msgs/Image; RGB `pixels` (or a gradient) converted to `encoding`, rows padded by `pad` bytes."""
    from sensor_msgs.msg import Image

    if pixels is None:
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    opaque = np.full_like(pixels[:, :, :1], 255)
    channels = {
        "rgb8": pixels,
        "bgr8": pixels[:, :, ::-1],
        "rgba8": np.dstack([pixels, opaque]),
        "bgra8": np.dstack([pixels[:, :, ::-1], opaque]),
        "mono8": pixels[:, :, :1],
    }[encoding]
    row = channels.reshape(height, -1)
    padded = np.concatenate([row, np.full((height, pad), 0xAB, np.uint8)], axis=1) if pad else row
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=0, step=padded.shape[1])
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.data = np.ascontiguousarray(padded).tobytes()
    return msg


def make_png(height: int, width: int, stamp_ns: int = 0) -> Any:
    """A sensor_msgs/CompressedImage holding a PNG of a gradient."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    y, x = np.mgrid[0:height, 0:width]
    bgr = np.stack([(x + y) % 256, y % 256, x % 256], axis=-1).astype(np.uint8)
    ok, png = cv2.imencode(".png", bgr)
    assert ok
    msg = CompressedImage(format="png", data=png.tobytes())
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    return msg


def stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


JOINTS = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper"]


def assert_chunks_are_local_inference(chunks: list[Any], seed: int, prompt: str, count: int = 3) -> None:
    """The first `count` chunks (by sequence) of a node fed by a default Driver are what `Policy.demo(seed)` infers
    on the CPU from the same inputs: they never change (two raw gradient images of 120x160 and 120x176, joint j at
    0.1 j, `prompt`), and both draw noise from default_rng(seed) in order."""
    from pi05_ros.engine.policy import Policy

    def pixels(height: int, width: int) -> np.ndarray:
        return np.frombuffer(bytes(make_image(height, width).data), np.uint8).reshape(height, width, 3)

    images = {"base_0_rgb": pixels(120, 160), "left_wrist_0_rgb": pixels(120, 176)}
    state = np.array([0.1 * i for i in range(len(JOINTS))], np.float32)
    local = Policy.demo(device="cpu", seed=seed)
    for chunk in sorted(chunks, key=lambda c: c.sequence)[:count]:
        want = local.infer(images, state, prompt, chunk.denoise_steps).actions
        got = np.asarray(chunk.actions, np.float32).reshape(chunk.horizon, chunk.action_dim)
        # the same float32 model on the same CPU; thread counts differ between the two processes: ~1e-6
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class Driver:
    """The robot side of a test: publishes inputs at ~20 Hz from a feeder thread, records what the policy
    node publishes, and sets its parameters through the real parameter services."""

    def __init__(self, namespace: str, cameras: dict[str, str] | None = None, feed_period_s: float = 0.05,
                 sim_clock_ns: int | None = None, on_chunk: Callable[[float, Any], None] | None = None) -> None:
        """`cameras`: input name -> transport ('raw' or 'compressed'), as the node under test is configured.
        `sim_clock_ns`: publish /clock (rosgraph_msgs/Clock) at this time, for a node with use_sim_time; it stays
        put until the test moves it (`clock_ns`), and the feeder then stamps inputs from it.
        `on_chunk`: called with (arrival, chunk) for each action chunk instead of keeping chunks, trajectories and
        commands (a soak of 100,000 chunks would otherwise hold them all); `received` counts them either way."""
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import ChangeState, GetState
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter_client import AsyncParameterClient
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CompressedImage, Image, JointState
        from std_msgs.msg import Float64MultiArray, String
        from trajectory_msgs.msg import JointTrajectory

        from pi05_ros.msg import ActionChunk

        self.namespace = namespace
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"test_driver_{uuid.uuid4().hex[:6]}", namespace=namespace,
                                      context=self.context)
        self._lock = threading.Lock()
        self.chunks: list[tuple[float, Any]] = []
        self.trajectories: list[tuple[float, Any]] = []
        self.statuses: list[tuple[float, Any]] = []
        self.commands: list[tuple[float, Any]] = []
        self.clock_ns = sim_clock_ns
        # stamp (ns) of the next input messages: None = the feeder's synthetic increasing stamps
        self.stamp_override: Callable[[], int] | None = None
        self.published_stamps: set[int] = set()
        self.frames_published = 0
        status_name = f"{namespace}/pi05_policy: policy"

        self.received = {"chunks": 0, "trajectories": 0, "commands": 0}

        def record(store: list[tuple[float, Any]], kind: str) -> Callable[[Any], None]:
            def callback(msg: Any) -> None:
                now = time.monotonic()
                with self._lock:
                    self.received[kind] += 1
                    if on_chunk is None:
                        store.append((now, msg))
                if on_chunk is not None and kind == "chunks":
                    on_chunk(now, msg)
            return callback

        def on_diagnostics(msg: Any) -> None:
            for status in msg.status:
                if status.name == status_name:
                    with self._lock:
                        self.statuses.append((time.monotonic(), status))

        self.node.create_subscription(ActionChunk, "action_chunk", record(self.chunks, "chunks"), 50)
        self.node.create_subscription(JointTrajectory, "joint_trajectory",
                                      record(self.trajectories, "trajectories"), 50)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 50)
        self.node.create_subscription(Float64MultiArray, "commands", record(self.commands, "commands"), 50)
        self.clock_pub = self.node.create_publisher(Clock, "/clock", 10) if sim_clock_ns is not None else None
        self.change_state = self.node.create_client(ChangeState, f"{namespace}/pi05_policy/change_state")
        self.get_state = self.node.create_client(GetState, f"{namespace}/pi05_policy/get_state")
        cameras = {"base_image": "raw", "wrist_image": "raw"} if cameras is None else cameras
        self.feed_period_s = feed_period_s
        self.image_pubs = {
            name: self.node.create_publisher(Image, name, qos_profile_sensor_data) if transport == "raw"
            else self.node.create_publisher(CompressedImage, f"{name}/compressed", qos_profile_sensor_data)
            for name, transport in cameras.items()
        }
        self.joint_pub = self.node.create_publisher(JointState, "joint_states", qos_profile_sensor_data)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.instruction_pub = self.node.create_publisher(String, "instruction", latched)
        self.params = AsyncParameterClient(self.node, f"{namespace}/pi05_policy")

        # What the feeder publishes; tests swap these factories for bad ones and back.
        self.image_factory: dict[str, Callable[[int], Any]] = {
            name: (lambda stamp, i=i: make_image(120, 160 + 16 * i, "rgb8", stamp)) if transport == "raw"
            else (lambda stamp: make_png(120, 160, stamp))
            for i, (name, transport) in enumerate(cameras.items())
        }
        self.joint_factory: Callable[[int], Any] = self.good_joints
        self.paused_cameras: set[str] = set()  # cameras the feeder skips (a camera that stops), by input name
        self.feeding = threading.Event()
        self.feeding.set()
        self.last_feed_ns = 0  # time.time_ns() when the feeder last published inputs
        self.last_feed_monotonic = 0.0

        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._stop = threading.Event()
        self._spinner = threading.Thread(target=self._spin, daemon=True)
        self._spinner.start()
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()

    @staticmethod
    def good_joints(stamp: int) -> Any:
        from sensor_msgs.msg import JointState

        # Published in an order different from state_joint_names, plus an extra joint, to prove selection.
        names = ["extra_joint", *reversed(JOINTS)]
        msg = JointState(name=names, position=[9.0, *[0.1 * i for i in reversed(range(len(JOINTS)))]])
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        return msg

    def _spin(self) -> None:
        while not self._stop.is_set():
            self._executor.spin_once(timeout_sec=0.05)

    def _feed(self) -> None:
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock

        tick = 0
        while not self._stop.wait(self.feed_period_s):
            if self.clock_pub is not None and self.clock_ns is not None:
                self.clock_pub.publish(Clock(clock=Time(sec=self.clock_ns // 10**9, nanosec=self.clock_ns % 10**9)))
            if not self.feeding.is_set():
                continue
            tick += 1
            # Capture times as a driver stamps them, on the node's clock (system time, or the sim clock): the
            # node refuses stamps further in the past than max_input_age_s (the stamp rule). Joints 0.5 ms older.
            image_stamp = self.clock_ns if self.clock_ns is not None else time.time_ns()
            joint_stamp = image_stamp - 500_000
            if self.stamp_override is not None:
                image_stamp = joint_stamp = self.stamp_override()
            self.last_feed_ns, self.last_feed_monotonic = time.time_ns(), time.monotonic()
            with self._lock:  # recorded first: a chunk may come back before this loop ends
                self.published_stamps.update((image_stamp, joint_stamp))
                self.frames_published += 1
            for name, publisher in self.image_pubs.items():
                if name not in self.paused_cameras:
                    publisher.publish(self.image_factory[name](image_stamp))
            self.joint_pub.publish(self.joint_factory(joint_stamp))

    def lifecycle(self, transition: str, timeout: float = 60.0) -> bool:
        """Request a lifecycle transition by label (configure, activate, ...) through the node's service."""
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request()
        request.transition.label = transition
        return self._call(self.change_state, request, timeout).success

    def lifecycle_state(self, timeout: float = 10.0) -> str:
        from lifecycle_msgs.srv import GetState

        return self._call(self.get_state, GetState.Request(), timeout).current_state.label

    def _call(self, client: Any, request: Any, timeout: float) -> Any:
        assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not found"
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), f"{client.srv_name} did not answer in {timeout} s"
        return future.result()

    def sees_node(self, name: str = "pi05_policy") -> bool:
        return any(n == name and ns == self.namespace for n, ns in self.node.get_node_names_and_namespaces())

    def commands_since(self, t: float) -> list[Any]:
        with self._lock:
            return [msg for when, msg in self.commands if when >= t]

    def say(self, text: str) -> None:
        from std_msgs.msg import String

        self.instruction_pub.publish(String(data=text))

    # --- reading what arrived

    def snapshot(self) -> tuple[list[Any], list[Any], list[Any]]:
        with self._lock:
            return list(self.chunks), list(self.trajectories), list(self.statuses)

    def chunks_since(self, t: float) -> list[Any]:
        with self._lock:
            return [msg for when, msg in self.chunks if when >= t]

    def trajectories_since(self, t: float) -> list[Any]:
        with self._lock:
            return [msg for when, msg in self.trajectories if when >= t]

    def statuses_since(self, t: float) -> list[Any]:
        with self._lock:
            return [msg for when, msg in self.statuses if when >= t]

    def wait_for_chunks(self, count: int, since: float, timeout: float,
                        where: Callable[[Any], bool] = lambda _: True) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [c for c in self.chunks_since(since) if where(c)]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return [c for c in self.chunks_since(since) if where(c)]

    def wait_for_status(self, since: float, timeout: float, where: Callable[[Any], bool]) -> Any | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for status in self.statuses_since(since):
                if where(status):
                    return status
            time.sleep(0.05)
        return None

    # --- parameters, through the node's real parameter services (what `ros2 param set` does)

    def set_parameter(self, name: str, value: Any, timeout: float = 10.0) -> Any:
        from rclpy.parameter import Parameter

        assert self.params.wait_for_services(timeout), "parameter services of the policy node not found"
        future = self.params.set_parameters([Parameter(name, value=value)])
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), f"set_parameters({name}) got no answer in {timeout} s"
        return future.result().results[0]

    @contextmanager
    def parameter_set_to(self, name: str, value: Any) -> Iterator[None]:
        """`name` at `value` within the block, its old value back after it, also when the block fails: the
        node of a module is shared by its tests."""
        old = self.get_parameter(name)
        result = self.set_parameter(name, value)
        assert result.successful, result.reason
        try:
            yield
        finally:
            assert self.set_parameter(name, old).successful

    def get_parameter(self, name: str, timeout: float = 10.0) -> Any:
        from rclpy.parameter import parameter_value_to_python

        future = self.params.get_parameters([name])
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), f"get_parameters({name}) got no answer in {timeout} s"
        return parameter_value_to_python(future.result().values[0])

    def close(self) -> None:
        import rclpy

        self._stop.set()
        self._feeder.join(2.0)
        self._spinner.join(2.0)
        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def status_values(status: Any) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def status_level(status: Any) -> int:
    return status.level[0] if isinstance(status.level, bytes | bytearray) else int(status.level)


def stop_and_watch_graph(node: NodeProcess, driver: Driver, sig: int, watch_s: float = 30.0) -> dict[str, Any]:
    """Send `sig` to a running policy node and measure what a clean leave needs: seconds from the signal until
    `driver` (a peer) no longer sees the node in its graph (None: still there after `watch_s`), until the node's
    own last line (its stop report, on the machine-wide monotonic clock), its exit code, and which of its DDS
    shared-memory files remain that no other live process uses."""
    pid = node.process.pid
    segments = dds_shm_segments(pid)
    sent = time.monotonic()
    node.process.send_signal(sig)
    gone: float | None = None
    while time.monotonic() - sent < watch_s:
        if not driver.sees_node():
            gone = time.monotonic() - sent
            break
        time.sleep(0.01)
    code = node.wait(10.0)
    match = re.search(r"stopped \d+\.\d+ s after the signal \(monotonic (\d+\.\d+)\)", node.output())
    return {"gone_s": gone, "stop_s": float(match.group(1)) - sent if match else None, "exit_code": code,
            "segments": sorted(segments), "leftover_shm": leftover_shm(segments, pid)}
