#!/usr/bin/env bash
# The real openpi client (`openpi-client` from the package registry) in a venv of its own, for the serving tests:
# openpi-client 0.1.2 pins numpy < 2 while the project runs numpy 2, so the two cannot share .venv.
# Every package is pinned (the client's own dependencies too: it imports typing_extensions without declaring it),
# and a stamp makes a second run a no-op. Prints the venv's python on its last line.
set -eo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv-openpi-client"

# Versions seen resolving together on Python 3.11 / x86_64 (2026-12-01).
REQUIREMENTS=(
  openpi-client==0.1.2
  typing_extensions==4.16.0
  numpy==1.26.4
  msgpack==1.2.4
  websockets==17.4
  pillow==13.0.0
  dm-tree==0.1.10
  absl-py==2.5.1
  attrs==26.1.0
  wrapt==2.5.2
)
STAMP="$VENV/.pi05_requirements"
WANTED="$("$PYTHON" --version 2>&1) ${REQUIREMENTS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" && -x "$VENV/bin/python" ]]; then
  echo "[openpi-client] $VENV is up to date" >&2
else
  echo "[openpi-client] creating $VENV with the pinned openpi-client" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install --no-input "${REQUIREMENTS[@]}" > "$VENV/pip-install.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$VENV/pip-install.log" | tail -40 >&2
    echo "[openpi-client] pip install failed; full log: $VENV/pip-install.log" >&2
    exit 1
  fi
  "$VENV/bin/python" -c "import openpi_client.websocket_client_policy, numpy; assert numpy.__version__ < '2'"
  echo "$WANTED" > "$STAMP"
fi
echo "$VENV/bin/python"
