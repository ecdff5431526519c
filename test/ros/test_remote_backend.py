"""policy_backend remote: the node sends each observation to pi05-serve (here the demo model on loopback) and
gets the chunks local inference gives for the same inputs and seed (the server draws each request's noise from
default_rng(seed) in arrival order, as a local Policy draws it in call order)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

from ros_harness import (
    JOINTS,
    NODE_START_TIMEOUT_S,
    NodeProcess,
    assert_chunks_are_local_inference,
    installed_params_file,
    status_values,
    unique_namespace,
)

READY = re.compile(r"at ws://([\d.]+):(\d+)/")
SEED = 3


def start_server() -> tuple[subprocess.Popen, str, list[str]]:
    command = [sys.executable, "-m", "pi05_ros.cli.serve", "--demo", "--device", "cpu", "--threads", "1",
               "--seed", str(SEED), "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def drain() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match and not url:
                url.append(f"ws://{match.group(1)}:{match.group(2)}/pi05_ros")
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    assert ready.wait(180) and url, "pi05-serve did not start:\n" + "\n".join(lines[-30:])
    return proc, url[0], lines


def test_the_remote_backend_gives_the_chunks_of_local_inference(driver_factory) -> None:
    server, url, server_lines = start_server()
    namespace = unique_namespace("pi05_remote")
    driver = driver_factory(namespace)
    driver.say("stack the blocks")
    node = NodeProcess("policy_node", namespace, "-p", "policy_backend:=remote", "-p", f"policy_server_url:={url}",
                       "-p", f"seed:={SEED}", "-p", "warmup:=0", "-p", "rate_hz:=4.0",
                       "-p", f"state_joint_names:=[{', '.join(JOINTS)}]", params_file=installed_params_file())
    try:
        chunks = driver.wait_for_chunks(3, 0.0, NODE_START_TIMEOUT_S)
        assert len(chunks) >= 3, node.output() + "\n".join(server_lines[-20:])
        status = driver.wait_for_status(0.0, 10.0, lambda s: "network" in " ".join(status_values(s)))
        assert status is not None, "no network stage on /diagnostics"
    finally:
        node.stop()
        server.terminate()
        server.wait(10)
    assert_chunks_are_local_inference(chunks, SEED, "stack the blocks")


def test_a_stop_does_not_wait_for_a_server_that_stopped_answering(driver_factory) -> None:
    """The server stalls (SIGSTOP: connected, silent) while the node waits for a reply (policy_server_timeout_s,
    5 s): SIGINT still ends the node within its second, without a traceback: the stop shuts the connection down
    instead of waiting for the call in flight."""
    server, url, server_lines = start_server()
    namespace = unique_namespace("pi05_remote_stall")
    driver = driver_factory(namespace)
    driver.say("stack the blocks")
    node = NodeProcess("policy_node", namespace, "-p", "policy_backend:=remote", "-p", f"policy_server_url:={url}",
                       "-p", "warmup:=0", "-p", "rate_hz:=4.0", "-p", "policy_server_timeout_s:=5.0",
                       "-p", f"state_joint_names:=[{', '.join(JOINTS)}]", params_file=installed_params_file())
    try:
        assert len(driver.wait_for_chunks(2, 0.0, NODE_START_TIMEOUT_S)) >= 2, node.output()
        os.kill(server.pid, signal.SIGSTOP)
        time.sleep(1.0)  # a 4 Hz tick has sent its observation and waits for the reply
        node.assert_stopped_within(signal.SIGINT, 1.0)
        assert "Traceback" not in node.output(), node.output()[-3000:]
    finally:
        node.stop()
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(10)
