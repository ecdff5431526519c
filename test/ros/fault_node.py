#!/usr/bin/env python3
"""The policy node with a fault injector in its runner, for test/ros/test_faults.py (never installed).

While the file named by PI05_FAULT_FILE exists, every inference raises, from inside the runner (where a GPU error
surfaces), the RuntimeError PI05_FAULT_MESSAGE names (default: an illegal memory access, as CUDA reports one); when
the file says `nan`, the runner returns NaN actions instead (a numeric fault); when it says `callback`, inference
runs and the instruction subscription's callback raises instead (a bug in a callback, which rclpy re-raises from
the executor's spin); when it says `alternate`, every second inference raises (an intermittent fault, such as a
policy server's timeouts); when it says `slow S`, every inference takes S seconds more.
PI05_LOAD_DELAY_S makes the model load take that long. Everything else is the installed node, started as
`policy_node` is.
"""

from __future__ import annotations

import os
from typing import Any

from pi05_ros.engine import policy as policy_module

FAULT_FILE = os.environ["PI05_FAULT_FILE"]
MESSAGE = os.environ.get("PI05_FAULT_MESSAGE", "CUDA error: an illegal memory access was encountered")


def _with_faults(policy: Any) -> Any:
    runner = policy.runner
    run = runner.run
    calls = [0]

    def faulty_run(observation: Any, num_steps: int) -> Any:
        try:
            with open(FAULT_FILE) as fault:
                kind = fault.read().strip()
        except FileNotFoundError:
            return run(observation, num_steps)
        if kind == "callback":
            return run(observation, num_steps)
        if kind.startswith("slow"):
            import time

            time.sleep(float(kind.split()[1]))
            return run(observation, num_steps)
        if kind == "alternate":
            calls[0] += 1
            if calls[0] % 2:
                return run(observation, num_steps)
        if kind == "nan":
            actions, timings = run(observation, num_steps)
            return actions * float("nan"), timings
        raise RuntimeError(MESSAGE)

    runner.run = faulty_run
    return policy


_demo = policy_module.Policy.demo
LOAD_DELAY_S = float(os.environ.get("PI05_LOAD_DELAY_S", "0"))  # a slow model load (a GPU compile, a big checkpoint)


def _slow_demo(*args: Any, **kwargs: Any) -> Any:
    if LOAD_DELAY_S:
        import time

        time.sleep(LOAD_DELAY_S)
    return _with_faults(_demo(*args, **kwargs))


policy_module.Policy.demo = staticmethod(_slow_demo)

if __name__ == "__main__":
    from pi05_ros.ros import node as node_module

    on_instruction = node_module.PolicyNode._on_instruction

    def faulty_instruction(self: Any, msg: Any) -> None:
        try:
            with open(FAULT_FILE) as fault:
                if fault.read().strip() == "callback":
                    raise RuntimeError("injected callback fault")
        except FileNotFoundError:
            pass
        on_instruction(self, msg)

    node_module.PolicyNode._on_instruction = faulty_instruction  # before the node subscribes with it
    node_module.main()
