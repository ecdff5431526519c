"""The Ray Serve deployment on a real local Ray instance started here (2 CPUs, no GPU): the real openpi client and
RemotePolicy through Serve's HAProxy ingress (pi05-serve --ray's default; test_ray_cli.py runs the Python proxy) get
the same answers as the local Policy.infer, with this package's batching (app at /) and with Ray's @serve.batch (app
at /ray)."""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serve_harness import (
    OneThreadPolicy,
    assert_remote_equals_local,
    droid_observation,
    free_port,
    run_openpi_client,
)

from pi05_ros.serve.layouts import BUILT_IN, ObservationLayout
from pi05_ros.serve.service import PolicySpec, ServeSettings

RTOL = ATOL = 1e-5  # float32; rows batched with others differ from batch 1 by ~2e-6 (test/engine/test_batch.py)
NUM_STEPS = 3


def haproxy_environment(directory: Path) -> dict[str, str]:
    """Serve's HAProxy ingress with its files and metrics port of its own: Serve's defaults (/tmp/haproxy-serve/,
    port 9101) are one per host, and two test runs (two clones' CI) may run at once on one machine."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state")}


def processes_running(text: str) -> list[str]:
    """Command lines of this machine's processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if text in line:
            found.append(line)
    return found


@pytest.fixture(scope="module")
def haproxy_directory() -> Iterator[Path]:
    # short: Serve puts the admin socket in a 40-character subfolder of it, and HAProxy takes 97 characters at most
    with tempfile.TemporaryDirectory(prefix="hap", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def ray_port(droid_checkpoint: Path, serve_tokenizer: Path, haproxy_directory: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    import ray
    from ray import serve

    from pi05_ros.serve.ray_app import build_app, deploy_on_ray

    saved = dict(os.environ)
    # Ray's processes inherit the environment ray.init sees (deploy_on_ray would set the ingress variable had it
    # started Ray itself)
    os.environ.update(haproxy_environment(haproxy_directory))
    port = free_port()
    start = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    started = time.monotonic()
    spec = PolicySpec(checkpoint=str(droid_checkpoint), tokenizer=str(serve_tokenizer), device="cpu", cpu_threads=1)
    settings = ServeSettings(num_steps=NUM_STEPS, window_ms=100.0)  # wide: concurrent clients do batch
    # pi05-serve --ray's own path at / (no GPU here: one CPU per replica), @serve.batch beside it at /ray
    assert deploy_on_ray(spec, settings, BUILT_IN, "droid", host="127.0.0.1", port=port) == 0.0
    serve.run(build_app(spec, settings, BUILT_IN, "droid", cpus_per_replica=1.0, batching="ray"), name="ray",
              route_prefix="/ray")
    print(f"ray.init {started - start:.1f} s, serve.start + two serve.run {time.monotonic() - started:.1f} s")
    try:
        yield port
    finally:
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
    sizes = json.loads(get(ray_port, f"{prefix}/stats")[1])["batch_sizes"]
    assert max(int(size) for size in sizes) >= 2, sizes


def test_remote_policy_through_ray(ray_port: int, local_policy: OneThreadPolicy) -> None:
    assert_remote_equals_local(f"ws://127.0.0.1:{ray_port}", local_policy, NUM_STEPS, seed=50)


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
