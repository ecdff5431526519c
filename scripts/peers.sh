#!/usr/bin/env bash
# Builds the peer environments the tests compare the engine against (test/peers/): the real, unmodified
# LeRobot 0.6.1 (Python 3.12: its code uses PEP 695 syntax) and openpi-client 0.1.2 (Python 3.11), each in its
# own venv, installed from the package registry with the pinned lists in test/peers/requirements-*.txt
# (`--no-deps`: nothing outside a list comes in).
#
# The venvs live outside the clone, in $PI05_PEERS_DIR (default ~/.cache/pi05_ros/peers), one folder per list
# (named by a hash of the list and the Python version), so a fresh clone on the same machine reuses them; a venv
# whose stamp matches its list is not touched. Writes .peers.env (PI05_LEROBOT_PYTHON, PI05_OPENPI_CLIENT_PYTHON)
# for scripts/test.sh and test/peers/conftest.py.
set -eo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS_DIR="${PI05_PEERS_DIR:-$HOME/.cache/pi05_ros/peers}"
mkdir -p "$PEERS_DIR"

find_python() {  # find_python 3.12: a python of that minor version, or nothing
  local version="$1" candidate
  for candidate in "python$version" /root/.pyenv/versions/"$version".*/bin/python /usr/bin/python"$version"; do
    if command -v "$candidate" > /dev/null 2>&1 && "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$version'.split('.'))))" 2> /dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

# build_venv NAME PYTHON_VERSION REQUIREMENTS SMOKE_TEST -> prints the venv's python
build_venv() {
  local name="$1" version="$2" requirements="$3" smoke="$4" python
  python="$(find_python "$version")" || {
    echo "[peers] no Python $version found (python$version on PATH or /root/.pyenv/versions/$version.*): install it" \
         "to run the $name peer tests" >&2
    return 1
  }
  local wanted hash venv
  wanted="$("$python" --version 2>&1) $(cat "$requirements")"
  hash="$(printf '%s' "$wanted" | sha256sum | cut -c1-12)"
  venv="$PEERS_DIR/$name-$hash"
  exec 9> "$PEERS_DIR/.$name.lock"
  flock 9  # two checkouts building the same venv at once wait for each other
  if [[ -f "$venv/.pi05_requirements" && "$(cat "$venv/.pi05_requirements")" == "$wanted" && -x "$venv/bin/python" ]]; then
    echo "[peers] $name venv is up to date: $venv" >&2
  else
    echo "[peers] building the $name venv ($("$python" --version 2>&1), $(grep -cv '^#' "$requirements") pinned packages)" >&2
    local start=$SECONDS tmp="$venv.tmp.$$"
    rm -rf "$tmp"
    "$python" -m venv "$tmp"
    # The machine's pip config names local indexes that print a warning per package: keep them in a log.
    if ! "$tmp/bin/python" -m pip install --no-input --disable-pip-version-check --no-deps -r "$requirements" \
        > "$tmp/pip-install.log" 2>&1; then
      grep -v "is ignored: it is neither a file nor a directory" "$tmp/pip-install.log" | tail -30 >&2
      echo "[peers] pip install failed; full log: $tmp/pip-install.log" >&2
      return 1
    fi
    (cd /tmp && HF_HUB_OFFLINE=1 "$tmp/bin/python" -c "$smoke") >&2 || {
      echo "[peers] the $name venv does not import; left in $tmp" >&2
      return 1
    }
    echo "$wanted" > "$tmp/.pi05_requirements"
    rm -rf "$venv"
    mv "$tmp" "$venv"  # a venv finds its site-packages from pyvenv.cfg beside bin/: moving it is fine
    echo "[peers] $name venv built in $((SECONDS - start)) s: $venv" >&2
  fi
  flock -u 9
  echo "$venv/bin/python"
}

# Smoke tests: what the peer scripts import, offline.
LEROBOT_SMOKE="$(cat <<'PY'
import importlib.metadata as md
import torch
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.pi05 import PI05Config, PI05Policy
assert not torch.cuda.is_available()
print(f"[peers] lerobot {md.version('lerobot')}, torch {torch.__version__}, "
      f"transformers {md.version('transformers')}: imports OK")
PY
)"
OPENPI_CLIENT_SMOKE="$(cat <<'PY'
import importlib.metadata as md
from openpi_client import image_tools, websocket_client_policy
print(f"[peers] openpi-client {md.version('openpi-client')}, pillow {md.version('pillow')}: imports OK")
PY
)"

lerobot_python="$(build_venv lerobot 3.12 "$ROOT/test/peers/requirements-lerobot.txt" "$LEROBOT_SMOKE")"
openpi_client_python="$(build_venv openpi-client 3.11 "$ROOT/test/peers/requirements-openpi-client.txt" "$OPENPI_CLIENT_SMOKE")"
printf 'export PI05_LEROBOT_PYTHON=%q\nexport PI05_OPENPI_CLIENT_PYTHON=%q\n' "$lerobot_python" "$openpi_client_python" \
  > "$ROOT/.peers.env"
