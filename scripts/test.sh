#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite, the slow tests with the real weights included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_squeeze.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Format and lint (settings in pyproject.toml) before the tests: either fails CI in seconds.
.venv/bin/python -m ruff format --check .
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
