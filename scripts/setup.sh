#!/usr/bin/env bash
# Create .venv and install embray with what it needs to run and to be tested. Safe to rerun.
#
# The exact versions come from requirements.lock (made by scripts/lock.sh; CI passes with them), installed
# without resolving: with uv (from PyPI) where it can be had, else with pip. Where the lock cannot be installed
# (another Python or platform than the one it was made on), dependencies are resolved from pyproject.toml as
# before, with a warning. EMBRAY_NO_LOCK=1 resolves from pyproject.toml on purpose; EMBRAY_NO_UV=1 installs the
# lock with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=2.13.0
say() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch first, by name and with pip (it finds this machine's CPU wheel; asked for by a later
# package, or by uv, a multi-GB CUDA build would be downloaded instead).
"${pip[@]}" --no-deps "torch==$TORCH"

resolve() {
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "torch==$TORCH"
  "${pip[@]}" -e ".[test]"
}

from_lock() {
  if [ "${EMBRAY_NO_UV:-0}" != 1 ] && "${pip[@]}" uv 2>/dev/null && [ -x .venv/bin/uv ]; then
    say "installing requirements.lock with uv"
    .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -r requirements.lock &&
      .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .
  else
    say "uv not available; installing requirements.lock with pip"
    "${pip[@]}" --no-deps -r requirements.lock && "${pip[@]}" --no-deps -e .
  fi
}

if [ "${EMBRAY_NO_LOCK:-0}" = 1 ] || [ ! -f requirements.lock ]; then
  say "resolving dependencies from pyproject.toml (no lock used)"
  resolve
elif ! from_lock; then
  say "WARNING: requirements.lock does not install here ($("$PY" --version)); resolving from pyproject.toml"
  resolve
fi
# Every installed package's requirements met (catches a stale or hand-edited lock at once).
.venv/bin/python -m pip check >&2
echo "embray installed in $(pwd)/.venv" >&2
