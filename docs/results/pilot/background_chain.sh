#!/usr/bin/env bash
# Issue 16, the next step of the CPU study, resumable (every step skips what is done):
#   nohup bash docs/results/pilot/background_chain.sh > studies/chain.log 2>&1 &
# 1. the pilot again on the de-duplicated split into mmlu_field_v1 (3 seeds of direct r1 vs r16
#    without Adafactor's parameter scale, and r16 with it), 2. its report, 3. the CPU study
#    (scripts/cpu_study.sh: LR sweep on dev, then heatmap, protocol table and retention on test).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD
mkdir -p studies
nice -n 10 timeout 21600 .venv/bin/python -m experiments.pilot --workdir=docs/results/pilot/mmlu_field_v1 \
  --steps=30 --warmup=3 --batch=4 --max_len=64 --eval_examples=140 \
  --runs=F:1:0.001:0,F:16:0.001:0,F:1:0.001:1,F:16:0.001:1,F:1:0.001:2,F:16:0.001:2,T:16:0.01:0 \
  > studies/pilot_v1.log 2>&1
.venv/bin/python -m experiments.pilot --workdir=docs/results/pilot/mmlu_field_v1 --report > studies/pilot_v1_report.txt 2>&1
nice -n 10 bash scripts/cpu_study.sh studies/cpu
