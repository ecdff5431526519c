"""The pip-only path of the README: `pip install .` into a fresh venv without ROS gives `import pi05_ros.engine`
and the `pi05-info` / `pi05-bench` / `pi05-serve` commands. The dependencies (torch, numpy, ...) come from this
environment instead of the registry, and ROS packages are made unimportable in the new venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROS_NAMES = ("rclpy", "rcl_interfaces", "sensor_msgs", "std_msgs", "diagnostic_msgs", "trajectory_msgs",
             "builtin_interfaces", "rosidl_runtime_py", "ament_index_python")
DEMO = """
import sys
import numpy as np
import pi05_ros
from pi05_ros.engine.policy import Policy
policy = Policy.demo(device="cpu")
chunk = policy.infer({"base_0_rgb": np.zeros((240, 320, 3), np.uint8)}, np.zeros(7), "pick up the red cube", 2)
assert chunk.actions.shape == (10, 7) and np.isfinite(chunk.actions).all()
assert "pi05_ros.ros" not in sys.modules and sys.modules["rclpy"] is None  # rclpy stayed blocked, unasked for
print(pi05_ros.__file__)
"""


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_pip_install_without_ros_gives_the_engine_and_the_clis(tmp_path: Path, tiny_checkpoint: Path) -> None:
    source = tmp_path / "src"  # a copy, so that building leaves nothing in the checkout
    shutil.copytree(REPO_ROOT / "pi05_ros", source / "pi05_ros", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     dict(os.environ)).stdout.strip())
    (site / "deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "no_ros.pth").write_text(f"import sys; sys.modules.update(dict.fromkeys({list(ROS_NAMES)}))\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "AMENT_PREFIX_PATH")}
    env["HOME"] = str(tmp_path)
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                      "--no-build-isolation", "--no-input", "--quiet", str(source)], tmp_path, env)
    assert installed.returncode == 0, installed.stderr[-3000:]

    blocked = _run([str(python), "-c", "import rclpy"], tmp_path, env)
    assert blocked.returncode != 0  # this venv really has no ROS
    for command in ("pi05-info", "pi05-bench", "pi05-serve"):
        done = _run([str(venv / "bin" / command), "--help"], tmp_path, env)
        assert done.returncode == 0 and f"usage: {command}" in done.stdout, done.stderr[-3000:]
    info = _run([str(venv / "bin" / "pi05-info"), str(tiny_checkpoint)], tmp_path, env)
    assert info.returncode == 0 and "problems:     none: the checkpoint loads" in info.stdout, info.stderr[-3000:]
    demo = _run([str(python), "-c", DEMO], tmp_path, env)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stdout.strip().startswith(str(site)), demo.stdout  # the installed copy, not the checkout's
