#!/usr/bin/env bash
# Issue 9's serving figures in one command: pi05-serve on this machine's GPU (or CPU), N robots in closed loop
# over loopback (tools/serve_load.py), batched (--max-batch 8) and unbatched (--max-batch 1), in one run.
#
#   bash tools/serve_bench.sh OUT_DIR [--device cuda --precision fp8] [--clients "1 2 4 8"] [--requests 100]
#       [--window-ms 10] [--views 2] [--modes "batched unbatched"] [--server-args "--expert-kernels on --fp8-vision"]
#
# Two GPUs under Ray Serve (issue 9's 8 robots, 4 a GPU): --modes batched --server-args "--ray --replicas 2"
# (ray[serve] must be installed there).
#
# Runs from a source tree (PYTHONPATH=., no install needed: the GPU machine's way); writes OUT_DIR/serve_<mode>.json
# and .log per server and prints the tables. Needs websockets and msgpack (the GPU machine lacks websockets: carry
# its wheel, see ../.library/device/README.md).
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: serve_bench.sh OUT_DIR [options]}"
shift
DEVICE=cuda PRECISION=fp8 CLIENTS="1 2 4 8" REQUESTS=100 STEPS=10 PORT=8791 MODES="batched unbatched" WINDOW_MS=10
VIEWS=2  # cameras per request (one count); the server is warmed for it (the pi05_ros layout has three slots)
SERVER_ARGS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --precision) PRECISION="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --num-steps) STEPS="$2"; shift 2 ;;
    --modes) MODES="$2"; shift 2 ;;
    --window-ms) WINDOW_MS="$2"; shift 2 ;;
    --views) VIEWS="$2"; shift 2 ;;
    --server-args) SERVER_ARGS="$2"; shift 2 ;;  # more pi05-serve options, word-split
    *) echo "serve_bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
for mode in $MODES; do
  batch=8; [[ "$mode" == unbatched ]] && batch=1
  log="$OUT/serve_$mode.log"
  # shellcheck disable=SC2086
  "$PY" -m pi05_ros.cli.serve --demo --device "$DEVICE" --precision "$PRECISION" --num-steps "$STEPS" \
    --max-batch "$batch" --batch-window-ms "$WINDOW_MS" --warm-up-views "$VIEWS" --port "$PORT" $SERVER_ARGS \
    > "$log" 2>&1 &
  server=$!
  # ready once it prints its health address (after loading, calibrating and warming every batch bucket; with
  # --ray, in every replica): one process and Ray Serve both print it last
  ready="health http://"
  for _ in $(seq 1 600); do
    grep -q "$ready" "$log" && break
    kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
  done
  grep -q "$ready" "$log" || { echo "pi05-serve did not start in 600 s" >&2; kill "$server"; exit 1; }
  echo "## $mode (--max-batch $batch $SERVER_ARGS), $DEVICE $PRECISION, $STEPS steps"
  # shellcheck disable=SC2086
  "$PY" tools/serve_load.py --url "ws://127.0.0.1:$PORT" --clients $CLIENTS --requests "$REQUESTS" \
    --num-steps "$STEPS" --views "$VIEWS" --json "$OUT/serve_$mode.json"
  kill -INT "$server"
  wait "$server" || true
done
