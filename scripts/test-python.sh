#!/usr/bin/env bash
# Builds the altgrad Python package (crates/altgrad-py + python/altgrad, by maturin through pip,
# reusing the workspace's target/ so only what changed is rebuilt), installs it into .venv
# (made by scripts/setup-venv.sh), and runs the Python tests. Fails on any failure.
#   scripts/setup-venv.sh && scripts/test-python.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "test-python: no $VENV; run scripts/setup-venv.sh first" >&2
  exit 2
fi
# maturin (the build backend) is run by name: put the venv's bin first.
export PATH="$PWD/$VENV/bin:$PATH"
"$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps --force-reinstall .
"$VENV/bin/python" -c "import altgrad; print('test-python: altgrad', altgrad.__version__, 'from', altgrad.__file__)"
exec "$VENV/bin/python" -m pytest -q tests/python "$@"
