#!/usr/bin/env bash
# Prepares .gpu/ (in .gitignore) for a session on a lent GPU machine whose image has JAX with CUDA,
# flax, optax and orbax but not the rest of lora-squeeze's import chain (docs/training.md,
# "Throughput on an accelerator"): wheels of the missing and version-sensitive pure-Python
# packages at constraints.txt's pins, for CPython 3.12 on x86-64.
# Usage (here, in the repo root): bash benchmarks/device/prepare.sh
# Then on the device, with .gpu carried: bash benchmarks/device/run.sh [STAGE ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/whl
packages=(array_record clu dialog gemma grain immutabledict ipython traitlets kauldron lark mediapy ml_collections
  portpicker promise tensorflow-datasets tensorflow-metadata toml typeguard flax optax orbax-checkpoint chex etils
  jaxtyping treescope einops)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for p in "${packages[@]}"; do
  pin=$(grep -iE "^${p}==" constraints.txt | head -1)
  [ -n "$pin" ] || { echo "error: $p has no pin in constraints.txt" >&2; exit 1; }
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .gpu/whl "$pin" >/dev/null 2>&1; then
    # promise 2.3 has no wheel on PyPI: build one (pure Python).
    python3 -m pip wheel -q --no-deps -w .gpu/whl "$pin" 2> >(grep -v "^WARNING: Location" >&2)
  fi
done
du -sh .gpu/whl
