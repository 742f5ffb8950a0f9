#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite, the slow tests with the real weights included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_squeeze.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
