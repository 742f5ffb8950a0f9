#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite, the slow tests with the real weights included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_squeeze.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# glibc serves XLA's large temporaries with fresh mmaps (hundreds of thousands of page faults per
# train step on CPU); transparent huge pages for them: 1.13x faster steps (benchmarks/malloc_bench.py).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
bash scripts/setup.sh
# Format and lint (settings in pyproject.toml) before the tests: either fails CI in seconds.
.venv/bin/python -m ruff format --check .
.venv/bin/python -m ruff check .
# One persistent compilation cache per run of the suite (unless the caller names one): both
# workers and every subprocess (the CLI runs, the 2-process jobs, the resumed runs) compile a
# program once instead of once per process. Removed at the end.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d -t lora_squeeze_jax_cache.XXXXXX)
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}
.venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
