#!/usr/bin/env bash
# Issue 16: after the session's pilot process (pid in $1) ends (its own `timeout 4800` stops it at
# ~14:14 UTC), run the pilot again on the de-duplicated split into mmlu_field_v1 (3 seeds of direct
# r1 vs r16 without the parameter scale, and r16 with it), write its report, then run the CPU study.
# Started by the i16-science session; see docs/reproducing.md. Every step resumes.
cd /work/wt-i16-science
export PYTHONPATH=/work/wt-i16-science
while kill -0 "$1" 2>/dev/null; do sleep 60; done
nice -n 10 timeout 21600 .venv/bin/python -m experiments.pilot --workdir=docs/results/pilot/mmlu_field_v1 \
  --steps=30 --warmup=3 --batch=4 --max_len=64 --eval_examples=140 \
  --runs=F:1:0.001:0,F:16:0.001:0,F:1:0.001:1,F:16:0.001:1,F:1:0.001:2,F:16:0.001:2,T:16:0.01:0 \
  > studies/pilot_v1.log 2>&1
.venv/bin/python -m experiments.pilot --workdir=docs/results/pilot/mmlu_field_v1 --report > studies/pilot_v1_report.txt 2>&1
nice -n 10 bash scripts/cpu_study.sh /work/wt-i16-science/studies/cpu
