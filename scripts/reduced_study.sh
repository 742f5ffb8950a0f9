#!/usr/bin/env bash
# The reduced CPU study committed under docs/results/ (issue #7): the Post-Squeeze heatmap, the
# protocol table and the variance-retention curves on the embedded Gemma 3 270M + BoolQ, one after
# the other, then their reports (tables, CSV, PNG; no checkpoints or adapters) copied to
# docs/results/. Every driver resumes: run it again after an interruption.
#
#     bash scripts/reduced_study.sh [STUDY_DIR]      # default studies/reduced
#     SEEDS='(42,)' bash scripts/reduced_study.sh    # one seed (half the time)
#
# Needs `bash scripts/setup.sh` first. About 62 minutes per seed on 2 idle CPU cores (docs/reproducing.md).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-studies/reduced}
SEEDS=${SEEDS:-(42,43)}
PY=.venv/bin/python
RESULTS=docs/results

"$PY" -m experiments.heatmap --config=experiments/heatmap.py:reduced --workdir="$OUT/heatmap" --config.seeds="$SEEDS"
"$PY" -m experiments.protocol_table --config=experiments/protocol_table.py:reduced --workdir="$OUT/protocols" --config.seeds="$SEEDS"
"$PY" -m experiments.retention --config=experiments/retention.py:reduced --workdir="$OUT/retention" --config.seeds="$SEEDS" \
  --config.reuse_workdirs="(\"$OUT/heatmap\",)"

for study in heatmap protocols retention; do
  mkdir -p "$RESULTS/$study"
  for file in "$OUT/$study"/*.png "$OUT/$study"/*.md "$OUT/$study"/*.csv "$OUT/$study"/rows.json; do
    [ -e "$file" ] && cp "$file" "$RESULTS/$study/"
  done
done
echo "reports copied to $RESULTS/{heatmap,protocols,retention}"
