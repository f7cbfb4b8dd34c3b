#!/usr/bin/env bash
# Set up everything the test suite needs, then run it: lint, type check, tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k nakama`.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
bash scripts/install-js.sh
bash scripts/install-kafka.sh
bash scripts/install-k8s.sh

.venv/bin/ruff check router operator tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
