#!/usr/bin/env bash
# The accelerator checks of issue 13, run from the repo root on the lent GPU machine (results in
# $OUT, at most 8 files come back). Stages, in the order given (default: train_270m precision):
#   train_270m, train_1b  benchmarks/gpu_train_bench.py for one model (125 s and 180 s on an H200
#                         before the compiled-ahead rank change was added; ~40 and ~60 s more now)
#   precision             benchmarks/squeeze_precision_bench.py, 2 seeds (35 s)
#   precision_no_tf32     the same, float32 storage, 1 seed, with TF32 off in cuBLAS and JAX's
#                         default matmul precision "highest" (the check the H200 run left open)
#   squeeze               benchmarks/squeeze_bench.py --quick (did not finish in 140 s on an H200)
#   locate                benchmarks/device/locate_float32_error.py, as is and with TF32 off: which
#                         float32 operation (QR, core product, SVD by algorithm) loses accuracy
#   loop                  benchmarks/train_bench.py --loop: per-step host sync against the runner's
#                         deferred metrics (tiny model; the gain issue 13 expects on accelerators)
# Every stage is bounded by `timeout`; one command may run at most 600 s there.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(train_270m precision)
for stage in "${stages[@]}"; do
  case $stage in train_270m|train_1b|precision|precision_no_tf32|squeeze|locate|loop) ;;
    *) echo "error: unknown stage '$stage' (allowed: train_270m train_1b precision precision_no_tf32 squeeze locate loop)" >&2; exit 2 ;;
  esac
done
log=$OUT/log.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD/benchmarks/device/tensorflow_stub:$PWD
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 --version
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda13-plugin|numpy|protobuf) '; } >$OUT/env.txt 2>&1
filter() { grep -vE 'oneDNN|^W0000|^I0000|^WARNING: All log' | tee -a "$log"; }
for stage in "${stages[@]}"; do
  s=$SECONDS
  case $stage in
    train_270m|train_1b)
      model=gemma3_${stage#train_}
      timeout -s ABRT 320 python3 -m benchmarks.gpu_train_bench --models="$model" --steps=10 \
        --out="$OUT/gpu_train_bench_${stage#train_}.json" 2>&1 | filter ;;
    precision)
      timeout -s ABRT 120 python3 -m benchmarks.squeeze_precision_bench --seeds 2 \
        --out "$OUT/squeeze_precision_bench_h200.json" 2>&1 | filter | tail -22 ;;
    precision_no_tf32)
      NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s ABRT 120 \
        python3 -m benchmarks.squeeze_precision_bench --seeds 1 --storage float32 \
        --out "$OUT/squeeze_precision_bench_h200_no_tf32.json" 2>&1 | filter | tail -12 ;;
    squeeze)
      timeout -s ABRT 280 python3 -m benchmarks.squeeze_bench --quick --reps 3 \
        --out "$OUT/squeeze_bench_quick_h200.json" 2>&1 | filter | grep -E 'Whole|qr_core|svd|speed' ;;
    locate)
      timeout -s ABRT 100 python3 -m benchmarks.device.locate_float32_error --out "$OUT/locate_float32_error.json" 2>&1 | filter
      NVIDIA_TF32_OVERRIDE=0 timeout -s ABRT 100 python3 -m benchmarks.device.locate_float32_error \
        --out "$OUT/locate_float32_error_no_tf32.json" 2>&1 | filter ;;
    loop)
      timeout -s ABRT 200 python3 -m benchmarks.train_bench --loop --loop-out "$OUT/train_loop_bench_h200.json" 2>&1 | filter ;;
  esac
  echo "stage $stage: rc=$? in $((SECONDS - s)) s" | tee -a "$log"
done
