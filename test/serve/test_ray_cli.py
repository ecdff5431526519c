"""`pi05-serve --ray` as a user runs it: the command starts its own local Ray instance, serves the openpi protocol
through Serve's Python proxy (`--ray-ingress proxy`; test_ray_serve.py runs the default, HAProxy), and ends on
SIGINT with exit code 0, Ray shut down. (test_ray_serve.py drives the same deployment from a test process; this is
the command's own start and stop.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from serve_harness import OneThreadPolicy, ServerProcess, assert_remote_equals_local

NUM_STEPS = 3
STOP_TIMEOUT_S = 60.0  # Serve removes its replica and the proxy, then Ray's processes end (~5 s here)


def test_the_ray_command_serves_and_stops_on_sigint(model_args: list[str], local_policy: OneThreadPolicy,
                                                    tmp_path: Path) -> None:
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}  # a Ray of its own, nothing leaves the machine
    # --port 0: the command picks a free port (Serve's ingress takes a port as given) and its start-up line names it
    server = ServerProcess([*model_args, "--ray", "--ray-ingress", "proxy", "--num-steps", str(NUM_STEPS)],
                           cwd=tmp_path, env=env, port=0)
    port = server.port
    try:
        assert port != 0
        assert any("ours batching, proxy ingress" in line for line in server.lines), server.lines[-20:]
        assert_remote_equals_local(f"ws://127.0.0.1:{port}", local_policy, NUM_STEPS, seed=51)
    except BaseException:
        server.stop()
        raise
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    try:
        code = server.proc.wait(STOP_TIMEOUT_S)
    except Exception:
        server.proc.kill()
        pytest.fail(f"pi05-serve --ray did not end within {STOP_TIMEOUT_S} s of SIGINT:\n"
                    + "\n".join(server.lines[-40:]))
    took = time.monotonic() - sent
    time.sleep(0.5)  # the drain thread reads the last lines
    output = "\n".join(server.lines)
    assert code == 0, output[-4000:]
    assert "pi05-serve: stopped" in output, output[-4000:]
    print(f"pi05-serve --ray stopped {took:.1f} s after SIGINT")
