#!/usr/bin/env bash
# The main job: the whole ROS loop on the built-in random-weight demo model.
#   bash scripts/demo.sh [SECONDS]      (default 20; PI05_DEVICE=cuda to use a GPU, default cpu)
# Builds (scripts/setup.sh), starts demo_sources (synthetic cameras, joint states, an instruction) and
# policy_node, prints what the node reports on /diagnostics and a table of its stage timings, then stops both.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_TO_WATCH="${1:-20}"
DEVICE="${PI05_DEVICE:-cpu}"
if ! [[ "$SECONDS_TO_WATCH" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "usage: bash scripts/demo.sh [SECONDS]   (a number of seconds, got '$SECONDS_TO_WATCH')" >&2
  exit 2
fi

bash scripts/setup.sh
# shellcheck disable=SC1091
source scripts/env.sh
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 100 + 1))}"
NAMESPACE=/pi05_demo
EXE="$ROOT/install/pi05_ros/lib/pi05_ros"
LOGS="$ROOT/log/demo"
mkdir -p "$LOGS"

pids=()
monitor=""
stop_nodes() {
  # the monitor runs in the background (started with SIGINT ignored, as every background job of a script): a
  # Ctrl-C of the demo ends it here
  [[ -n "$monitor" ]] && kill -TERM "$monitor" 2>/dev/null || true
  # SIGTERM, not SIGINT: bash starts background jobs of a script with SIGINT ignored, so a SIGINT sent
  # before a node has installed its own handler would be lost. Both nodes stop cleanly on either.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
trap stop_nodes EXIT

echo "[demo] ROS_DOMAIN_ID=$ROS_DOMAIN_ID namespace $NAMESPACE device $DEVICE; node logs in $LOGS/"
"$EXE/demo_sources" --ros-args -r __ns:=$NAMESPACE > "$LOGS/demo_sources.log" 2>&1 &
pids+=($!)
"$EXE/policy_node" --ros-args --params-file "$ROOT/install/pi05_ros/share/pi05_ros/config/pi05.yaml" \
  -p allow_demo_commands:=true \
  -r __ns:=$NAMESPACE -p demo:=true -p "device:=$DEVICE" \
  -p "state_joint_names:=[joint_1, joint_2, joint_3, joint_4, joint_5, joint_6, gripper]" \
  > "$LOGS/policy_node.log" 2>&1 &
node=$!
pids+=("$node")

status=0
"$EXE/policy_monitor" --namespace "$NAMESPACE" --duration "$SECONDS_TO_WATCH" &
monitor=$!
# The monitor waits minutes for a first chunk (a cold GPU compile): stop waiting as soon as the node has exited.
node_exited=0
while kill -0 "$monitor" 2>/dev/null; do
  if ! kill -0 "$node" 2>/dev/null; then
    node_exited=1
    kill -TERM "$monitor" 2>/dev/null || true
    break
  fi
  sleep 1
done
wait "$monitor" || status=$?
stop_nodes
if [[ $node_exited == 1 ]]; then
  echo "[demo] the policy node exited; its log:" >&2
  tail -30 "$LOGS/policy_node.log" >&2
  exit 1
elif [[ $status != 0 ]]; then
  echo "[demo] no action chunks arrived; the policy node's log:" >&2
  tail -30 "$LOGS/policy_node.log" >&2
fi
exit $status
