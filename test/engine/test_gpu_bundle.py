"""tools/gpu_ros_bundle.sh's handling of Ray's two carried parts, as tools/gpu_session.sh sources it on the GPU
machine (`set -uo pipefail`): a mistake there costs a device call, or empties the carried bundle. `python3` is a
stand-in on PATH that records pip's calls (nothing is installed here) and answers that Ray is not installed."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_ros_bundle.sh"
WHEEL = "ray-9.9.0-cp312-cp312-manylinux2014_x86_64.whl"
STAND_IN = """#!/usr/bin/env bash
# records what pip is asked to install (and a copy of a joined Ray wheel); `-c`: Ray is not installed
if [[ "$1" == "-m" && "$2" == "pip" ]]; then
  for arg in "$@"; do
    echo "$arg" >> "$PIP_LOG"
    [[ "$(basename "$arg")" == ray-[0-9]*.whl ]] && cp "$arg" "$PIP_LOG.ray.whl"
  done
  exit 0
fi
exit 1
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "tools").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "tools" / SCRIPT.name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(STAND_IN)
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    return root


def make_parts(root: Path, content: bytes, parts: str = "ab", wrong_sum_in: str = "") -> None:
    checksum = hashlib.sha256(content).hexdigest()
    half = len(content) // 2
    for part, data in (("a", content[:half]), ("b", content[half:])):
        if part not in parts:
            continue
        folder = root / ".gpu_ros" / "wheels" / f"ray-{part}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{WHEEL}.part").write_bytes(data)
        (folder / "ray.sha256").write_text(f"{'0' * 64 if part in wrong_sum_in else checksum}  {WHEEL}\n")
        (folder / f"dep_{part}-1.0-py3-none-any.whl").write_bytes(b"wheel")


def activate(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{root.parent / 'bin'}:{os.environ['PATH']}", "PIP_LOG": str(root / "pip.log")}
    return subprocess.run(["bash", "-c", "set -uo pipefail; source tools/gpu_ros_bundle.sh --activate; "
                           "echo rc=$?; ls .gpu_ros/wheels"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60)


def test_both_parts_join_into_the_wheel_and_install(tree: Path) -> None:
    content = os.urandom(100_000)
    make_parts(tree, content)
    result = activate(tree)
    assert "rc=0" in result.stdout, result.stdout + result.stderr
    assert f"installed {WHEEL} from its two parts" in result.stdout
    assert (tree / "pip.log.ray.whl").read_bytes() == content  # byte for byte
    logged = (tree / "pip.log").read_text()
    assert "dep_a-1.0-py3-none-any.whl" in logged and "dep_b-1.0-py3-none-any.whl" in logged


def test_one_part_is_not_an_error_and_nothing_is_removed(tree: Path) -> None:
    make_parts(tree, os.urandom(1000), parts="a")
    result = activate(tree)
    assert "rc=0" in result.stdout, result.stdout + result.stderr
    assert "only part ray-a" in result.stdout and "carry ray-a and then ray-b" in result.stdout
    assert result.stdout.strip().endswith("ray-a")  # the carried part is still there for the next call
    assert not (tree / "pip.log.ray.whl").exists()


@pytest.mark.parametrize(("wrong_sum_in", "message"), [
    ("a", "ray-a and ray-b come from two different --ray builds"),
    ("ab", "does not match its sha256"),
])
def test_parts_that_do_not_make_the_wheel_fail(tree: Path, wrong_sum_in: str, message: str) -> None:
    make_parts(tree, os.urandom(1000), wrong_sum_in=wrong_sum_in)
    result = activate(tree)
    assert "rc=1" in result.stdout and message in result.stderr, result.stdout + result.stderr
    assert not (tree / "pip.log.ray.whl").exists()
    assert "ray-a" in result.stdout and "ray-b" in result.stdout  # the bundle is left as it was


@pytest.mark.parametrize("args", [["--activate"], ["--actvate"]])
def test_running_it_with_a_wrong_option_builds_nothing(tree: Path, args: list[str]) -> None:
    make_parts(tree, os.urandom(1000))
    result = subprocess.run(["bash", "tools/gpu_ros_bundle.sh", *args], cwd=tree, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert sorted(p.name for p in (tree / ".gpu_ros" / "wheels").iterdir()) == ["ray-a", "ray-b"]
