#!/usr/bin/env bash
# What to name in a device call's `carry` for a gpu_session.sh step, as JSON: the device copies at most 64 MiB
# (the tree and the carried paths), and the tree with the whole .gpu_ros bundle passes that.
#   bash tools/gpu_carry.sh serve   -> the websockets and uvloop wheels (serve, serve-kernels)
#   bash tools/gpu_carry.sh ros     -> the whole bundle (soak-arrival, soak-inference)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:?usage: gpu_carry.sh serve|ros}" in
  serve) paths=(.gpu_ros/wheels/websockets-*.whl .gpu_ros/wheels/uvloop-*.whl) ;;
  ros) paths=(.gpu_ros) ;;
  *) echo "gpu_carry.sh: serve or ros" >&2; exit 2 ;;
esac
for path in "${paths[@]}"; do [[ -e "$path" ]] || { echo "gpu_carry.sh: $path is missing: PYENV_VERSION=3.12.1 bash tools/gpu_ros_bundle.sh" >&2; exit 1; }; done
printf '%s\n' "${paths[@]}" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read().split()))'
