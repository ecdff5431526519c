# Source me (bash): `source scripts/env.sh` puts this shell in the built ROS 2 environment.
# Order matters (ROS2_WHEELS.md): venv, then AMENT_PREFIX_PATH, then the overlay; setup.bash fails under
# `set -u`, so that option is dropped while it runs.
_pi05_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$_pi05_root/install/setup.bash" ]]; then
  echo "pi05_ros: $_pi05_root/install/setup.bash is missing; run 'bash scripts/setup.sh' first" >&2
  return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
source "$_pi05_root/.venv/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV" CMAKE_PREFIX_PATH="$VIRTUAL_ENV"
_pi05_had_u=0; [[ $- == *u* ]] && _pi05_had_u=1 && set +u
# shellcheck disable=SC1091
source "$_pi05_root/install/setup.bash"
[[ $_pi05_had_u == 1 ]] && set -u
# Keep DDS traffic on this machine unless the caller already chose otherwise.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
unset _pi05_root _pi05_had_u
