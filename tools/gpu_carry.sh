#!/usr/bin/env bash
# What to name in a device call's `carry` for a gpu_session.sh step, as JSON: the device copies at most 64 MiB
# (the tree and the carried paths), and the tree with the whole .gpu_ros bundle passes that.
#   bash tools/gpu_carry.sh serve   -> the websockets and uvloop wheels (serve, serve-kernels; ~4.5 MiB)
#   bash tools/gpu_carry.sh ros     -> the colcon build and the ROS wheels (soak-arrival, soak-inference; ~42 MiB)
#   bash tools/gpu_carry.sh ray-a   -> Ray's wheel, first part, HAProxy and websockets (serve-batched; ~44 MiB)
#   bash tools/gpu_carry.sh ray-b   -> its second part and ray[serve]'s other wheels (serve-ray; ~44 MiB): the call
#                                      right after ray-a's, on the same warm machine (gpu_ros_bundle.sh --ray)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:?usage: gpu_carry.sh serve|ros|ray-a|ray-b}" in
  serve) paths=(.gpu_ros/wheels/serve) ;;
  ros) paths=(.gpu_ros/install .gpu_ros/wheels/ros) ;;
  ray-a|ray-b) paths=(".gpu_ros/wheels/$1") ;;
  *) echo "gpu_carry.sh: serve, ros, ray-a or ray-b" >&2; exit 2 ;;
esac
build="PYENV_VERSION=3.12.1 bash tools/gpu_ros_bundle.sh"
[[ "$1" == ray-* ]] && build="$build --ray"
for path in "${paths[@]}"; do [[ -e "$path" ]] || { echo "gpu_carry.sh: $path is missing: $build" >&2; exit 1; }; done
# The device copies the tree (tracked files and untracked ones git does not ignore) and the carried paths: 64 MiB
tree="$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')"
carried="$(du -sb "${paths[@]}" | awk '{s += $1} END {print s + 0}')"
limit=$((64 * 1024 * 1024))
if (( tree + carried > limit )); then
  echo "gpu_carry.sh: the tree ($((tree >> 20)) MiB) and ${paths[*]} ($((carried >> 20)) MiB) pass the device's" \
    "64 MiB carry limit" >&2
  exit 1
fi
echo "gpu_carry.sh: $(((limit - tree - carried) >> 20)) MiB to spare under the 64 MiB limit" >&2
printf '%s\n' "${paths[@]}" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read().split()))'
