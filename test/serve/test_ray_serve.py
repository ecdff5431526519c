"""The Ray Serve deployment on a real local Ray instance started here (2 CPUs, no GPU): the real openpi client and
RemotePolicy through Serve's HAProxy ingress (pi05-serve --ray's default; test_ray_cli.py runs the Python proxy) get
the same answers as the local Policy.infer, with this package's batching (app at /) and with Ray's @serve.batch (app
at /ray)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serve_harness import (
    OneThreadPolicy,
    RawClient,
    all_at_once,
    assert_remote_equals_local,
    droid_observation,
    free_port,
    open_client,
    run_openpi_client,
    wait_for,
)
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import ClientConnection, connect

from pi05_ros.serve.layouts import BUILT_IN, ObservationLayout
from pi05_ros.serve.service import PolicySpec, ServeSettings
from pi05_ros.serve.wire import pack, unpack

RTOL = ATOL = 1e-5  # float32; rows batched with others differ from batch 1 by ~2e-6 (test/engine/test_batch.py)
NUM_STEPS = 3


def processes_running(text: str) -> dict[int, str]:
    """This machine's processes whose command line contains `text`: pid -> command line."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if text in line:
            found[int(cmdline.parent.name)] = line
    return found


@pytest.fixture(scope="module")
def haproxy_directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hap", dir="/tmp") as directory:  # short: see haproxy_environment_...
        yield Path(directory)


@pytest.fixture(scope="module")
def ray_port(droid_checkpoint: Path, serve_tokenizer: Path, haproxy_directory: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    import ray
    from ray import serve

    from pi05_ros.serve.ray_app import build_app, deploy_on_ray, haproxy_environment_of_its_own

    saved = dict(os.environ)
    try:
        # Ray's processes inherit the environment ray.init sees (deploy_on_ray sets the ingress variable when it
        # starts Ray itself); HAProxy's files and ports of this run's own: another run may be going on this machine
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", **haproxy_environment_of_its_own(str(haproxy_directory),
                                                                                          free_port))
        port = free_port()
        start = time.monotonic()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
        started = time.monotonic()
        spec = PolicySpec(checkpoint=str(droid_checkpoint), tokenizer=str(serve_tokenizer), device="cpu",
                          cpu_threads=1)
        settings = ServeSettings(num_steps=NUM_STEPS, window_ms=100.0)  # wide: concurrent clients do batch
        # pi05-serve --ray's own path at / (no GPU here: one CPU per replica), @serve.batch beside it at /ray
        assert deploy_on_ray(spec, settings, BUILT_IN, "droid", host="127.0.0.1", port=port) == 0.0
        serve.run(build_app(spec, settings, BUILT_IN, "droid", cpus_per_replica=1.0, batching="ray"), name="ray",
                  route_prefix="/ray")
        print(f"ray.init {started - start:.1f} s, serve.start + two serve.run {time.monotonic() - started:.1f} s")
        yield port
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_the_ingress_is_haproxy(ray_port: int, haproxy_directory: Path) -> None:
    """The answers below come through HAProxy, not through Serve's Python proxy."""
    configs = list(haproxy_directory.glob("**/haproxy.cfg"))
    assert len(configs) == 1, configs
    assert processes_running(str(configs[0])), f"no HAProxy process runs with {configs[0]}"
    assert f":{ray_port}" in configs[0].read_text()


def seeded(policy: OneThreadPolicy, obs: dict) -> np.ndarray:
    images = {"base_0_rgb": obs["observation/exterior_image_1_left"],
              "left_wrist_0_rgb": obs["observation/wrist_image_left"]}
    state = np.concatenate([obs["observation/joint_position"], obs["observation/gripper_position"]])
    noise = np.random.default_rng(obs["noise_seed"]).standard_normal((10, 32), dtype=np.float32)
    return policy.infer(images, state, obs["prompt"], NUM_STEPS, noise=noise).actions


def get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return response.status, response.read().decode()


def stats(port: int, prefix: str = "") -> dict:
    return json.loads(get(port, f"{prefix}/stats")[1])


def client(port: int) -> ClientConnection:
    return open_client(f"ws://127.0.0.1:{port}/", open_timeout_s=120.0)  # 100 at once through Ray on 2 cores


@pytest.mark.parametrize("prefix", ["", "/ray"], ids=["our batching", "ray batching"])
def test_the_openpi_client_through_ray(ray_port: int, prefix: str, local_policy: OneThreadPolicy,
                                       openpi_client_python: Path, tmp_path: Path) -> None:
    assert get(ray_port, f"{prefix}/healthz") == (200, "OK\n")
    rng = np.random.default_rng(30)
    sequence = [droid_observation(rng, "stack the blocks", seed=31), {"observation/state": np.zeros(8)},
                droid_observation(rng, "push the button", seed=32)]
    result = run_openpi_client(openpi_client_python, f"ws://127.0.0.1:{ray_port}{prefix}/",
                               {"mode": "sequence", "observations": sequence}, tmp_path)
    assert result["metadata"]["server"] == "pi05_ros" and result["metadata"]["layout"]["name"] == "droid"
    first, error, last = result["results"]
    np.testing.assert_allclose(first["reply"]["actions"], seeded(local_policy, sequence[0]), rtol=RTOL, atol=ATOL)
    assert error["error"].startswith("Error in inference server:\nInputError: unexpected key(s) "
                                     "['observation/state']")
    assert error["after_error"] == "ConnectionClosedError"  # closed with 1011, as openpi's server does
    np.testing.assert_allclose(last["reply"]["actions"], seeded(local_policy, sequence[2]), rtol=RTOL, atol=ATOL)

    together = [droid_observation(rng, prompt, seed=40 + i) for i, prompt in
                enumerate(("open the drawer", "close the gripper", "wipe the table"))]
    result = run_openpi_client(openpi_client_python, f"ws://127.0.0.1:{ray_port}{prefix}/",
                               {"mode": "concurrent", "observations": together, "repeat": 2}, tmp_path)
    for obs, rounds in zip(together, result["results"], strict=True):
        for entry in rounds:
            np.testing.assert_allclose(entry["reply"]["actions"], seeded(local_policy, obs), rtol=RTOL, atol=ATOL)
    sizes = stats(ray_port, prefix)["batch_sizes"]
    assert max(int(size) for size in sizes) >= 2, sizes


def test_remote_policy_through_ray(ray_port: int, local_policy: OneThreadPolicy) -> None:
    assert_remote_equals_local(f"ws://127.0.0.1:{ray_port}", local_policy, NUM_STEPS, seed=50)


def test_the_replica_names_itself_and_every_counter_is_there(ray_port: int) -> None:
    """/stats comes from whichever replica the ingress picks: it says which (its rank, also in the metadata; the rank
    is added to --seed for the replica's noise, so replica 0 draws the one-process server's); a fresh replica's
    counters are all there, at 0 where nothing was counted yet."""
    from pi05_ros.serve.service import STAT_COUNTERS

    with connect(f"ws://127.0.0.1:{ray_port}/", open_timeout=120, legacy=True) as ws:
        assert unpack(ws.recv(timeout=120))["replica"] == 0
    for prefix in ("", "/ray"):
        counters = stats(ray_port, prefix)
        assert counters["replica"] == 0 and set(STAT_COUNTERS) <= set(counters), counters


def test_a_wrong_warm_up_count_fails_in_the_driver_before_ray_starts(monkeypatch: pytest.MonkeyPatch,
                                                                    droid_checkpoint: Path) -> None:
    """Not in each replica after its model load (a real checkpoint's load is minutes, and Serve retries a failed
    replica): the layout's own cameras are known before any model is, the model's slots from its files."""
    import ray

    from pi05_ros.engine.errors import CheckpointError, InputError
    from pi05_ros.serve.ray_app import deploy_on_ray

    def no_ray(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise AssertionError("Ray must not be started for a request that cannot deploy")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    spec = PolicySpec(device="cpu")  # never loaded
    for views, message in (((3,), r"in 1\.\.2 \(the cameras this layout names\), got \[3\]"),
                           ((1,), "layout 'droid' requires every one of its 2 cameras")):
        with pytest.raises(InputError, match=message):
            deploy_on_ray(spec, ServeSettings(warm_up_views=views), BUILT_IN, "droid", host="127.0.0.1", port=1)
    # a layout that feeds a camera slot the model does not have (read from the checkpoint without loading it), and
    # a checkpoint that is not there: both before Ray too
    odd = ObservationLayout("odd", {"cam_high": ("observation/image",)}, (("observation/state",),))
    with pytest.raises(InputError, match=r"feeds camera slot\(s\) \['cam_high'\]"):
        deploy_on_ray(spec, ServeSettings(), {"odd": odd}, "odd", host="127.0.0.1", port=1)
    with pytest.raises(InputError, match=r"feeds camera slot\(s\) \['cam_high'\]"):
        deploy_on_ray(PolicySpec(checkpoint=str(droid_checkpoint), device="cpu"), ServeSettings(), {"odd": odd},
                      "odd", host="127.0.0.1", port=1)
    with pytest.raises(CheckpointError):
        deploy_on_ray(PolicySpec(checkpoint=str(droid_checkpoint / "nowhere"), device="cpu"), ServeSettings(),
                      BUILT_IN, "droid", host="127.0.0.1", port=1)
    with pytest.raises(ValueError, match=r"ingress must be one of \('haproxy', 'proxy'\), got 'nginx'"):
        deploy_on_ray(spec, ServeSettings(), BUILT_IN, "droid", host="127.0.0.1", port=1, ingress="nginx")


def deploy_droid(checkpoint: Path, **options) -> float:  # noqa: ANN003
    """deploy_on_ray with the droid layout and a checkpoint that is never loaded (Ray is a stand-in here); the
    tokenizer path must name a file, so the checkpoint's config stands in for one."""
    from pi05_ros.serve.ray_app import deploy_on_ray

    spec = PolicySpec(checkpoint=str(checkpoint), tokenizer=str(checkpoint / "config.json"), device="cpu")
    return deploy_on_ray(spec, ServeSettings(), BUILT_IN, "droid", host="127.0.0.1", **options)


class RayStarted(Exception):
    """Raised by the stand-in ray.init once it has recorded what Ray would start with."""


@pytest.mark.parametrize(("ingress", "variable", "expected"), [
    ("haproxy", None, "1"), ("proxy", None, "0"), (None, None, "1"), (None, "0", "0"), (None, "1", "1"),
    ("haproxy", "0", "1"),
])
def test_a_ray_started_here_gets_the_chosen_ingress(monkeypatch: pytest.MonkeyPatch, droid_checkpoint: Path,
                                                    ingress: str | None, variable: str | None,
                                                    expected: str) -> None:
    """What Serve's processes will read is the environment ray.init starts them with; after the call this
    process's own environment is as it was."""
    import ray

    from pi05_ros.serve.ray_app import HAPROXY_VARIABLE

    seen: dict = {}

    def record(address: str | None = None, **kwargs) -> None:  # noqa: ANN003
        seen.update(address=address, variable=os.environ.get(HAPROXY_VARIABLE))
        raise RayStarted

    monkeypatch.setattr(ray, "init", record)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    if variable is None:
        monkeypatch.delenv(HAPROXY_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(HAPROXY_VARIABLE, variable)
    with pytest.raises(RayStarted):
        deploy_droid(droid_checkpoint, port=1, ingress=ingress)
    assert seen == {"address": "local", "variable": expected}  # "local": a new Ray, never one RAY_ADDRESS names
    assert os.environ.get(HAPROXY_VARIABLE) == variable
    # a cluster's address: its processes run already, with their own environment; nothing is set here
    seen.clear()
    with pytest.raises(RayStarted):
        deploy_droid(droid_checkpoint, port=1, address="ray-head:6379", ingress=ingress)
    assert seen == {"address": "ray-head:6379", "variable": variable}


def test_an_haproxy_that_cannot_start_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                       droid_checkpoint: Path) -> None:
    """Serve's HAProxy start-up failure (as Ray 2.60 raised it on this machine with port 8404 taken, docs/serving.md)
    becomes an InputError naming the ports and the way out, with the Ray started here shut down."""
    import ray
    from ray import serve

    from pi05_ros.engine.errors import InputError

    calls = []
    crash = RuntimeError(
        "HAProxy crashed during startup: [NOTICE]   (1106) : haproxy version is 2.8.25-5cf5d0683\n"
        "[ALERT]    (1106) : Binding [/tmp/haproxy-serve/a0/haproxy.cfg:95] for proxy stats: cannot bind socket "
        "(Address already in use) for [0.0.0.0:8404]\n[ALERT]    (1106) : Some protocols failed to start")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append("init"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))

    def start(**kwargs) -> None:  # noqa: ANN003
        raise crash

    monkeypatch.setattr(serve, "start", start)
    with pytest.raises(InputError, match=r"HAProxy ingress did not start: \[ALERT\].*0\.0\.0\.0:8404.*"
                                         r"--ray-ingress proxy") as error:
        deploy_droid(droid_checkpoint, port=8000, ingress="haproxy")
    assert error.value.__cause__ is crash
    assert calls == ["init", "serve.shutdown", "ray.shutdown"]
    # another RuntimeError is not HAProxy's: it is not dressed up
    monkeypatch.setattr(serve, "start", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        deploy_droid(droid_checkpoint, port=8000, ingress="haproxy")


def test_haproxy_needs_a_ray_that_has_it(monkeypatch: pytest.MonkeyPatch, droid_checkpoint: Path) -> None:
    import ray

    from pi05_ros.engine.errors import InputError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("Ray must not start"))
    monkeypatch.setattr(ray, "__version__", "2.55.0")
    with pytest.raises(InputError, match=r"needs Ray >= 2\.56 .*this is Ray 2\.55\.0.*--ray-ingress proxy"):
        deploy_droid(droid_checkpoint, port=1, ingress="haproxy")


def parent_pid(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    try:
        while pid > 1:
            pid = parent_pid(pid)
            if pid == ancestor:
                return True
    except OSError:  # ended meanwhile
        pass
    return False


def replica_pids(app: str) -> list[int]:
    """Process ids of the Serve replicas of application `app` (Ray titles them ray::ServeReplica:<app>:...) in the
    Ray this test process started (its raylet is our child): another test run's Ray may be on the machine too."""
    return [pid for pid in processes_running(f"ServeReplica:{app}:") if descends_from(pid, os.getpid())]


def peak_rss_mib(pid: int, reset: bool = False) -> float:
    """The process's peak resident memory (VmHWM) so far; `reset`: start a new peak from its present size (writing
    5 to clear_refs), so that an earlier test's higher peak cannot hide what comes next."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


FLOOD_FRAMES = 1000  # of ~1 MB: without the replica's reader Ray took them all in (+184-220 MiB for 200 frames)
FLOOD_GROWTH_MIB = 256  # with it, what Ray reads before the close lands: +0-84 MiB measured on the 2-core machine


def test_a_client_that_floods_without_reading_is_closed_and_memory_stays_bounded(
        ray_port: int, local_policy: OneThreadPolicy) -> None:
    """Ray's replica reads a websocket as fast as the client sends (before this transport's reader, 200 frames of
    1 MB sent without reading were in the replica within 0.4 s, +184-220 MiB); the connection must be closed after a
    few frames ahead of their replies, the replica's memory stay far below what was sent, and others be answered
    meanwhile."""
    (pid,) = replica_pids("pi05")
    frame = pack(droid_observation(np.random.default_rng(60), seed=61, size=(390, 430)) | {"num_steps": 1})
    closed_before = stats(ray_port).get("clients_closed_sending_ahead", 0)
    peak_before = peak_rss_mib(pid, reset=True)
    flood = RawClient("127.0.0.1", ray_port)
    sent: list[int] = []
    flooding = threading.Thread(
        target=lambda: sent.append(flood.send_without_reading(frame, FLOOD_FRAMES, timeout_s=20)))
    flooding.start()
    assert_remote_equals_local(f"ws://127.0.0.1:{ray_port}", local_policy, NUM_STEPS, seed=62)  # others served
    flooding.join(timeout=120)
    assert flood.server_closed(within_s=60)
    flood.close()
    assert sent, "the flooding thread did not finish"  # (HAProxy may take and drop the rest once the replica closed)
    grown = peak_rss_mib(pid) - peak_before
    print(f"{sent[0]} frames of {len(frame)} bytes sent; replica peak memory +{grown:.1f} MiB")
    assert grown < FLOOD_GROWTH_MIB, grown
    after = stats(ray_port)
    assert after["clients_closed_sending_ahead"] == closed_before + 1, after
    assert_remote_equals_local(f"ws://127.0.0.1:{ray_port}", local_policy, NUM_STEPS, seed=63)


def test_two_observations_sent_ahead_are_answered(ray_port: int, local_policy: OneThreadPolicy) -> None:
    """The rule closes past 2 observations waiting behind the one being answered, not at 3 unanswered: three sent at
    once are all answered, in order (five rounds: the reader may get all three before the first is taken)."""
    rng = np.random.default_rng(90)
    for round_ in range(5):
        observations = [droid_observation(rng, seed=900 + 3 * round_ + i) for i in range(3)]
        with client(ray_port) as ws:
            for obs in observations:
                ws.send(pack(obs))
            for obs in observations:
                reply = ws.recv(timeout=120)
                assert isinstance(reply, bytes), reply
                np.testing.assert_allclose(unpack(reply)["actions"], seeded(local_policy, obs), rtol=RTOL, atol=ATOL)


def test_100_clients_at_once_through_haproxy_each_get_their_own_answer(ray_port: int,
                                                                        local_policy: OneThreadPolicy) -> None:
    count = 100
    rng = np.random.default_rng(70)
    observations = [droid_observation(rng, seed=700 + i) for i in range(count)]

    def run(i: int) -> dict:
        with client(ray_port) as ws:
            ws.send(pack(observations[i]))
            return unpack(ws.recv(timeout=240))

    before = stats(ray_port)["batch_sizes"]
    replies = all_at_once(count, run)
    failures = [reply for reply in replies if not isinstance(reply, dict)]
    assert not failures, failures[:3]
    for obs, reply in zip(observations, replies, strict=True):
        np.testing.assert_allclose(reply["actions"], seeded(local_policy, obs), rtol=RTOL, atol=ATOL)
    new_batches = {int(size): n - before.get(size, 0) for size, n in stats(ray_port)["batch_sizes"].items()}
    assert max(size for size, n in new_batches.items() if n > 0) > 1, new_batches  # they did batch
    assert wait_for(lambda: stats(ray_port)["connections_open"] == 0, 30.0)


def test_clients_that_leave_mid_request_through_haproxy(ray_port: int, local_policy: OneThreadPolicy) -> None:
    """As test_robustness.py's: whether a request sent just before its client left still runs is a race; the
    replica must clean up after each (no connection or queued request left behind) and serve the next client."""
    good = pack(droid_observation(np.random.default_rng(80), seed=81))
    with client(ray_port) as ws:
        ws.send(good)  # a clean close right after sending
    raw = RawClient("127.0.0.1", ray_port)  # a dropped socket right after sending, no close frame
    raw.send_without_reading(good, 1, timeout_s=30)
    raw.close()
    half = RawClient("127.0.0.1", ray_port)  # a socket dropped halfway through a frame
    half.protocol.send_binary(good)
    data = b"".join(half.protocol.data_to_send())
    half.sock.sendall(data[: len(data) // 2])
    half.close()
    assert wait_for(lambda: stats(ray_port)["connections_open"] == 0, 30.0)
    assert stats(ray_port)["pending"] == 0
    assert_remote_equals_local(f"ws://127.0.0.1:{ray_port}", local_policy, NUM_STEPS, seed=82)


def test_rays_disconnect_disabled_header_is_refused_with_a_reason(ray_port: int) -> None:
    with connect(f"ws://127.0.0.1:{ray_port}/", open_timeout=60,
                 additional_headers={"x-request-disconnect-disabled": "?1"}) as ws:
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=60)
    assert closed.value.rcvd.code == 1008
    assert "x-request-disconnect-disabled" in closed.value.rcvd.reason
