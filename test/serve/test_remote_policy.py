"""RemotePolicy (what the node's `policy_backend: remote` will use) against pi05-serve on loopback: the same chunks
as the local Policy.infer, the model's facts from the metadata frame, network time as its own stage, InputError for
bad input, reconnecting after errors and timeouts, clear errors for servers that are not there."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from serve_harness import OneThreadPolicy, ServerProcess, free_port

from pi05_ros.engine.errors import InputError
from pi05_ros.serve.client import CLOSE_TIMEOUT_S, RemotePolicy, RemotePolicyError, native_url

RTOL = ATOL = 1e-5  # float32, the same operations on both sides (one torch thread each)
RNG = np.random.default_rng(12)
IMAGES = {"base_0_rgb": RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8),
          "left_wrist_0_rgb": RNG.integers(0, 256, (240, 320, 3), dtype=np.uint8)}
STATE = RNG.uniform(-2, 2, 8).astype(np.float32)


@pytest.fixture(scope="module")
def server(start_server, model_args: list[str]) -> ServerProcess:
    return start_server([*model_args, "--num-steps", "10"])  # the default layout: pi05_ros's own


@pytest.fixture(scope="module")
def remote(server: ServerProcess) -> Iterator[RemotePolicy]:
    with RemotePolicy(f"ws://{server.host}:{server.port}", timeout_s=120) as policy:
        yield policy


def test_the_same_chunks_as_local_inference(remote: RemotePolicy, local_policy: OneThreadPolicy) -> None:
    noise = RNG.standard_normal((local_policy.action_horizon, local_policy.config.action_dim)).astype(np.float32)
    for prompt, steps in (("put the cup in the sink", 10), ("stack the blocks", 3)):
        chunk = remote.infer(IMAGES, STATE, prompt, steps, noise=noise)
        local = local_policy.infer(IMAGES, STATE, prompt, steps, noise=noise)
        np.testing.assert_allclose(chunk.actions, local.actions, rtol=RTOL, atol=ATOL)
        assert chunk.actions.flags.writeable and chunk.actions.dtype == np.float32
        assert chunk.num_steps == steps and chunk.num_prompt_tokens == local.num_prompt_tokens
        assert chunk.action_space == local.action_space
        np.testing.assert_array_equal(chunk.state, STATE)
    assert set(chunk.timings) == set(remote.stage_names)
    assert {"network", "serialize", "server_queue", "denoise", "total"} <= set(chunk.timings)
    assert chunk.timings["total"] >= chunk.timings["network"] + chunk.timings["denoise"]
    assert set(remote.stage_stats()["network"]) >= {"p50", "p99"}


def test_the_model_facts_come_from_the_server(remote: RemotePolicy, local_policy: OneThreadPolicy) -> None:
    assert remote.image_keys == local_policy.image_keys
    assert remote.camera_names == local_policy.camera_names and remote.slot_for("base_0_rgb") == "base_0_rgb"
    assert remote.slot_for("top_camera") is None
    assert remote.describe_conventions() == local_policy.describe_conventions()
    assert (remote.state_dim, remote.action_dof, remote.action_horizon) == (8, 8, 10)
    assert remote.max_state_values == 8  # the metadata says how many values a state may have
    assert len(remote.example_state()) == len(local_policy.example_state())  # the node's warm-up, as the server's
    assert remote.precision == "fp32" and not remote.is_demo
    assert remote.url.endswith("/pi05_ros") and "served at ws://" in remote.describe()
    assert remote.device.startswith("remote ws://") and "(cpu)" in remote.device


def test_without_noise_the_server_draws_it(remote: RemotePolicy) -> None:
    a = remote.infer(IMAGES, STATE, "wipe the table", 2).actions
    b = remote.infer(IMAGES, STATE, "wipe the table", 2).actions
    assert np.isfinite(a).all() and not np.array_equal(a, b)


def test_bad_input_is_an_input_error_and_the_next_call_reconnects(remote: RemotePolicy) -> None:
    with pytest.raises(InputError, match="images.base_0_rgb: expected uint8 pixels, got float32"):
        remote.infer({"base_0_rgb": np.zeros((224, 224, 3), np.float32)}, STATE, "wipe the table", 2)
    with pytest.raises(InputError, match="state has 5 values but the norm stats describe 8"):
        remote.infer(IMAGES, STATE[:5], "wipe the table", 2)
    with pytest.raises(InputError, match="num_steps: expected an integer in 1..100"):
        remote.infer(IMAGES, STATE, "wipe the table", 0)
    assert remote.infer(IMAGES, STATE, "wipe the table", 2).actions.shape == (10, 8)


def test_a_timeout_drops_the_connection_so_no_late_reply_is_taken(server: ServerProcess,
                                                                  local_policy: OneThreadPolicy) -> None:
    noise = np.zeros((10, 32), np.float32)
    with RemotePolicy(server.url(), timeout_s=1e-4) as policy:
        with pytest.raises(RemotePolicyError, match="no reply from .* within"):
            policy.infer(IMAGES, STATE, "push the button", 10, noise=noise)
        policy.timeout_s = 120
        chunk = policy.infer(IMAGES, -STATE, "fold the towel", 2, noise=noise)  # not the late answer above
    np.testing.assert_allclose(chunk.actions, local_policy.infer(IMAGES, -STATE, "fold the towel", 2,
                                                                 noise=noise).actions, rtol=RTOL, atol=ATOL)


def test_a_stalled_server_holds_a_call_for_its_timeout_and_a_close_not_at_all(server: ServerProcess) -> None:
    """A server that stops answering (SIGSTOP: connected, silent). close() from another thread ends a call in
    flight at once, as the node's stop does (it must not wait out the reply timeout or a server that never
    answers); a timed-out call ends within its timeout and CLOSE_TIMEOUT_S for the close (the websockets default,
    10 s, used to be added)."""
    with RemotePolicy(server.url(), timeout_s=60) as policy:
        policy.infer(IMAGES, STATE, "wipe the table", 2)  # connected and warm
        errors: list[Exception] = []

        def call() -> None:
            try:
                policy.infer(IMAGES, STATE, "wipe the table", 2)
            except RemotePolicyError as exc:
                errors.append(exc)

        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.3)  # the request is out, its reply will not come
            start = time.monotonic()
            policy.close()
            closed = time.monotonic() - start
            caller.join(10)
            ended = time.monotonic() - start
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    assert closed < 0.5 and ended < 3.0 and not caller.is_alive(), (closed, ended)
    assert len(errors) == 1 and "was closed during this call" in str(errors[0]), errors
    with pytest.raises(RemotePolicyError, match="was closed; create a new one"):
        policy.infer(IMAGES, STATE, "wipe the table", 2)

    with RemotePolicy(server.url(), timeout_s=1.0) as policy:
        policy.infer(IMAGES, STATE, "wipe the table", 2)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(RemotePolicyError, match="no reply from .* within 1 s"):
                policy.infer(IMAGES, STATE, "wipe the table", 2)
            took = time.monotonic() - start
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    assert took < 1.0 + CLOSE_TIMEOUT_S + 1.5, took  # 1.0 + 1.0 and scheduling (11 s and more before)
    assert server.alive()


def test_servers_that_are_not_there_or_not_ours(server: ServerProcess) -> None:
    with pytest.raises(RemotePolicyError, match="cannot reach the policy server at ws://127.0.0.1:.*is pi05-serve"):
        RemotePolicy(f"ws://127.0.0.1:{free_port()}", connect_timeout_s=5)
    with pytest.raises(RemotePolicyError, match="refused the connection: HTTP 404 no observation layout at /nope"):
        RemotePolicy(server.url("/nope"))
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, then hangs up without a word of HTTP
        def hang_up() -> None:
            connection, _ = listener.accept()
            connection.close()

        threading.Thread(target=hang_up, daemon=True).start()
        # websockets reports the hang-up as either, depending on whether it sees it sending or reading
        with pytest.raises(RemotePolicyError,
                           match="cannot reach the policy server .*(InvalidMessage|ConnectionClosedError)"):
            RemotePolicy(f"ws://127.0.0.1:{listener.getsockname()[1]}", connect_timeout_s=5)
    with pytest.raises(RemotePolicyError, match="must start with ws:// or wss://"):
        native_url("http://gpu-host:8000")
    assert native_url("gpu-host:8000") == "ws://gpu-host:8000/pi05_ros"
    assert native_url("ws://gpu-host:8000/droid") == "ws://gpu-host:8000/droid"


def test_without_noise_a_fresh_server_repeats_a_local_policy_call_for_call(
        start_server, model_args: list[str], droid_checkpoint, serve_tokenizer) -> None:
    """The node with `policy_backend: remote` against a server started with the node's seed gets the chunks local
    inference would give: both draw each observation's noise from default_rng(seed) in call order."""
    from pi05_ros.engine.policy import Policy

    fresh = start_server([*model_args, "--seed", "5", "--num-steps", "2"])
    local = OneThreadPolicy(Policy.load(droid_checkpoint, serve_tokenizer, device="cpu", seed=5))
    with RemotePolicy(fresh.url(), timeout_s=120) as remote:
        for prompt, steps in (("put the cup in the sink", 2), ("stack the blocks", 3), ("fold the towel", None)):
            chunk = remote.infer(IMAGES, STATE, prompt, steps)
            # no num_steps: the server's own (--num-steps 2), as the metadata says
            assert chunk.num_steps == (steps or 2)
            np.testing.assert_allclose(chunk.actions, local.infer(IMAGES, STATE, prompt, steps or 2).actions,
                                       rtol=RTOL, atol=ATOL)


def test_real_time_chunking_travels_with_the_request(remote: RemotePolicy, local_policy: OneThreadPolicy) -> None:
    """The node's `blend: rtc` with a remote backend: the previous chunk goes over the wire as an `rtc` map."""
    from pi05_ros.engine.rtc import RtcRequest

    noise = RNG.standard_normal((10, 32)).astype(np.float32)
    plain = local_policy.infer(IMAGES, STATE, "open the drawer", 3, noise=noise).actions
    rtc = RtcRequest(plain[2:] + 0.05, delay=2, beta=5.0, start=0)
    chunk = remote.infer(IMAGES, STATE, "open the drawer", 3, noise=noise, rtc=rtc)
    local = local_policy.infer(IMAGES, STATE, "open the drawer", 3, noise=noise, rtc=rtc)
    np.testing.assert_allclose(chunk.actions, local.actions, rtol=RTOL, atol=ATOL)
    assert not np.allclose(chunk.actions, plain)  # guided, not the plain chunk
    with pytest.raises(InputError, match=r"the previous chunk must be \[actions, 8\]"):
        remote.infer(IMAGES, STATE, "open the drawer", 3, rtc=RtcRequest(np.zeros((4, 3)), delay=1))


def test_the_load_tool_reports_where_a_request_s_time_goes(server: ServerProcess, tmp_path) -> None:
    """tools/serve_load.py (the GPU serving figures come from it), its robots as processes, against this server:
    every reply counted, and the parts of a request's time nest and add up within the server's time."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "serve_load.py"
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, str(tool), "--url", server.url(), "--clients", "2", "--requests", "2",
                             "--warmup", "1", "--num-steps", "2", "--json", str(out)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| clients | server | prepare | queued | batch run | wake | outside the server |" in result.stdout
    (row,) = json.loads(out.read_text())
    assert row["requests"] == 4 and sum(row["batch_sizes"].values()) == 4 and 1 <= row["mean_batch"] <= 2
    assert 0 < row["run_p50_ms"] <= row["server_p50_ms"] <= row["p50_ms"], row
    assert min(row["prepare_p50_ms"], row["queue_p50_ms"], row["wake_p50_ms"]) >= 0 and row["outside_p50_ms"] > 0
    # the parts are consecutive intervals of the server's time: what they leave out is >= 0 (clock rounding aside)
    # and small beside the batch's run
    assert -0.01 <= row["unaccounted_p50_ms"] < 0.5 * row["run_p50_ms"], row
