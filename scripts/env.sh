#!/usr/bin/env bash
# Sourced by scripts/demo and scripts/test: makes .venv with the extras named in $1 (comma
# separated), reinstalling only when pyproject.toml or the extras change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="$1"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "need Python 3.10+ (apt-get install python3 python3-venv)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv || {
    echo "python venv failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
fi
stamp=".venv/.tandem-$(echo "$EXTRAS" | tr ',' '-')-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing tandem[$EXTRAS] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
