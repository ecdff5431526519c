"""Helpers for the serving tests: `pi05-serve` in a subprocess, the real openpi client in its own venv, and a
websocket client that controls its own socket (to send without ever reading)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from pi05_ros.engine.policy import Policy
from pi05_ros.serve.wire import pack, unpack

HERE = Path(__file__).resolve().parent
# A loaded 2-core CI machine starts torch and loads the model slowly; these only bound a hang.
START_TIMEOUT_S = 180.0
DRIVER_TIMEOUT_S = 300.0
READY = re.compile(r"at ws://([\d.]+):(\d+)/")


def free_port() -> int:
    """A port free on loopback now (for servers that cannot be given port 0, like Ray's HTTP proxy)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m pi05_ros.cli.serve ARGS --port 0` until stopped; its output is drained by a thread (a full pipe
    would block the server) and kept in `lines`."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None, port: int = 0) -> None:
        """`env`: variables set for the server on top of this process's environment; `port`: 0 for a free one
        (the plain server's), a fixed one for Ray's HTTP proxy."""
        command = [sys.executable, "-m", "pi05_ros.cli.serve", *args, "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        ready = threading.Event()
        address: list[tuple[str, int]] = []

        def drain() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                match = READY.search(line)
                if match and not address:
                    address.append((match.group(1), int(match.group(2))))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or not address:
            self.stop()
            raise RuntimeError("pi05-serve did not start:\n" + "\n".join(self.lines[-40:]))
        self.host, self.port = address[0]

    def url(self, path: str = "/") -> str:
        return f"ws://{self.host}:{self.port}{path}"

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stats(self) -> dict[str, Any]:
        status, body = self.http_get("/stats")
        assert status == 200, body
        return json.loads(body)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class OneThreadPolicy:
    """The local Policy the tests compare the server with, run on one torch thread like the server: on a busy
    2-core machine two threads of OpenMP wait for each other (a tiny-model inference measured 590 ms on two
    threads against 56 ms on one)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.policy.infer(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)


def assert_remote_equals_local(url: str, local_policy: OneThreadPolicy, num_steps: int, seed: int) -> None:
    """One random observation (its noise given) through RemotePolicy at `url` gets the actions `local_policy` gives:
    float32 on both sides at batch 1, so within 1e-5."""
    from pi05_ros.serve.client import RemotePolicy

    rng = np.random.default_rng(seed)
    images = {"base_0_rgb": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)}
    state = rng.uniform(-2, 2, 8).astype(np.float32)
    noise = rng.standard_normal((10, 32)).astype(np.float32)
    with RemotePolicy(url, timeout_s=120) as remote:
        chunk = remote.infer(images, state, "put the cup in the sink", num_steps, noise=noise)
    local = local_policy.infer(images, state, "put the cup in the sink", num_steps, noise=noise)
    np.testing.assert_allclose(chunk.actions, local.actions, rtol=1e-5, atol=1e-5)


def run_openpi_client(python: str | Path, uri: str, plan: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Run openpi_driver.py (the real openpi client, in the peer venv of scripts/peers.sh) with `plan`; returns
    what it recorded. A clean environment: nothing of the project's venv or ROS overlay reaches the client."""
    plan_file, result_file = tmp_path / "plan.msgpack", tmp_path / "result.msgpack"
    plan_file.write_bytes(pack(plan))
    result_file.unlink(missing_ok=True)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
           "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    done = subprocess.run([str(python), str(HERE / "openpi_driver.py"), uri, str(plan_file), str(result_file)],
                          capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"openpi driver failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return unpack(result_file.read_bytes())


class RawClient:
    """A websocket client on a socket of its own (websockets' sans-I/O protocol): it can send frames without
    reading anything back, with a small receive buffer so that the server's unread replies back up quickly."""

    def __init__(self, host: str, port: int, path: str = "/", receive_buffer_bytes: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        self.sock.settimeout(30)
        self.sock.connect((host, port))
        self.protocol = ClientProtocol(parse_uri(f"ws://{host}:{port}{path}"), max_size=None)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while not any(isinstance(event, Response) for event in self._read()):
            pass

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.protocol.data_to_send()))

    def _read(self) -> list:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.protocol.receive_data(data)
        return self.protocol.events_received()

    def send_without_reading(self, frame: bytes, count: int, timeout_s: float) -> int:
        """Send `frame` up to `count` times; how many went out before a send blocked for `timeout_s` (the server
        stopped reading) or the server dropped the connection."""
        self.sock.settimeout(timeout_s)
        for sent in range(count):
            self.protocol.send_binary(frame)
            try:
                self._flush()
            except (TimeoutError, OSError):
                return sent
        return count

    def server_closed(self, within_s: float) -> bool:
        """Whether the server drops the connection within `within_s`, reading (and discarding) what it sent."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if not self.sock.recv(1 << 20):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def open_client(url: str, open_timeout_s: float = 60.0) -> ClientConnection:
    """A websocket to a policy server whose metadata frame (the first) has been read."""
    ws = connect(url, compression=None, max_size=None, open_timeout=open_timeout_s, legacy=True)
    assert unpack(ws.recv(timeout=open_timeout_s))["server"] == "pi05_ros"
    return ws


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Whether `condition()` comes true within `timeout_s` (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def all_at_once(count: int, run: Callable[[int], Any], join_timeout_s: float = 300.0) -> list[Any]:
    """`run(i)` for i in 0..count-1, each on a thread of its own, released together (a barrier): the results, or the
    exception a run raised in its place (reported by the caller)."""
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=120)
            results[i] = run(i)
        except Exception as exc:  # noqa: BLE001 - recorded for the caller
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=join_timeout_s)
    return results


def droid_observation(rng: np.random.Generator, prompt: str = "put the cup in the sink", seed: int | None = None,
                      size: tuple[int, int] = (224, 224)) -> dict[str, Any]:
    """An observation as openpi's DROID example sends it."""
    obs: dict[str, Any] = {
        "observation/exterior_image_1_left": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
        "observation/joint_position": rng.uniform(-2, 2, 7),
        "observation/gripper_position": rng.uniform(0, 1, 1),
        "prompt": prompt,
    }
    if seed is not None:
        obs["noise_seed"] = seed
    return obs
