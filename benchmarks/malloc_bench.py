"""CPU training step time with glibc's default malloc against `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

    python -m benchmarks.malloc_bench                 # Gemma 3 270M, LoRA r 16 on attn_out, batch 8 x 128
    python -m benchmarks.malloc_bench --rounds 3 --rank 1

Why: XLA:CPU allocates its temporaries with malloc, and glibc serves every block above its mmap
threshold (at most 32 MB) with a fresh mmap that it unmaps on free. A training step of the 270M on
xsum_nll rows materialises ~216 target positions x 262,144 vocabulary logits (226 MB in float32)
forwards and backwards, so every step faults in hundreds of MB of new 4 KiB pages (~40,000 page
faults per second measured during the xsum_nll study). With `glibc.malloc.hugetlb=1` glibc asks for
transparent huge pages on that memory (madvise; THP mode "madvise" or "always"), 2 MiB per fault.

Each variant runs in its own subprocess (the tunable is read when the process starts), the variants
alternate for `--rounds` rounds, and each child reports the median of `--steps` timed steps after
one compiling step, with the minor page faults and system CPU seconds of those steps
(resource.getrusage). Same data and LoRA init in every child: the losses must agree bit for bit.
Prints a table and writes benchmarks/results/malloc_bench.json. Quote the ratio from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from benchmarks import record as record_lib

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "malloc_bench.json"
VARIANTS = {"default": None, "hugetlb": "glibc.malloc.hugetlb=1"}


def child(args) -> dict:
  import resource

  import jax
  import numpy as np

  from lora_squeeze import model as model_lib
  from lora_squeeze import optim, sharding, train

  targets = ("attn_out",)
  base = model_lib.load_base_params(args.model)
  mesh = sharding.make_mesh()
  model = model_lib.make_model(args.model, lora_rank=args.rank, lora_targets=targets)
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(0))
  options = optim.OptimizerOptions(multiply_by_parameter_scale=False)
  state = train.init_train_state(
    sharding.shard_params(lora, mesh), optim.make_optimizer(1e-3, 5, options=options), mesh
  )
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 30_000, (args.batch, args.length)).astype(np.int32)
  mask = np.zeros((args.batch, args.length), bool)
  mask[:, -args.targets :] = True  # the summary at the end of the row, as in xsum_nll
  data = sharding.shard_batch({"tokens": tokens, "target_mask": mask}, mesh)
  step = train.make_train_step(model, lr=1e-3, warmup=5, max_targets=args.targets, optimizer_options=options)
  state, metrics = jax.block_until_ready(step(state, base, data))  # compiles
  times, losses = [], []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, base, data))
    times.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {
    "step_s": statistics.median(times),
    "times": times,
    "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
    "system_s_per_step": (after.ru_stime - before.ru_stime) / args.steps,
    "user_s_per_step": (after.ru_utime - before.ru_utime) / args.steps,
    "losses": losses,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gemma3_270m")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--targets", type=int, default=27, help="target tokens per row (xsum_nll: 27.1 on average)")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args)), flush=True)
    return
  passed = [f"--{k}={getattr(args, k)}" for k in ("model", "rank", "batch", "length", "targets", "steps")]
  rows = []
  for round_ in range(args.rounds):
    for name, tunable in VARIANTS.items():
      env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
      if tunable:
        env["GLIBC_TUNABLES"] = tunable
      out = subprocess.run(
        [sys.executable, "-m", "benchmarks.malloc_bench", "--child", *passed],
        env=env,
        capture_output=True,
        text=True,
        check=True,
      )
      result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
      rows.append({"variant": name, "GLIBC_TUNABLES": tunable, "round": round_, **result})
      print(f"round {round_} {name}: {result['step_s']:.2f} s/step", flush=True)
  if len({tuple(r["losses"]) for r in rows}) != 1:
    raise SystemExit(f"the variants' losses differ: {[r['losses'] for r in rows]}")
  summary = {}
  for name in VARIANTS:
    mine = [r for r in rows if r["variant"] == name]
    summary[name] = {
      "step_s": statistics.median(r["step_s"] for r in mine),
      "minor_faults_per_step": statistics.median(r["minor_faults_per_step"] for r in mine),
      "system_s_per_step": statistics.median(r["system_s_per_step"] for r in mine),
      "user_s_per_step": statistics.median(r["user_s_per_step"] for r in mine),
    }
  ratio = summary["default"]["step_s"] / summary["hugetlb"]["step_s"]
  print(
    f"\n{args.model}, LoRA r {args.rank} on attn_out, batch {args.batch} x {args.length}, {args.targets} targets/row"
  )
  print("| malloc | s/step | minor faults/step | system s/step | user s/step |")
  print("|---|---|---|---|---|")
  for name, s in summary.items():
    print(
      f"| {name} | {s['step_s']:.2f} | {s['minor_faults_per_step']:.0f} | {s['system_s_per_step']:.2f} | "
      f"{s['user_s_per_step']:.2f} |"
    )
  print(f"speed-up of hugetlb over the default: {ratio:.2f}x (median step time; same losses in every child)")
  thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
  record = {
    "args": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
    "machine": record_lib.machine(thp=thp.read_text().strip() if thp.exists() else None),
    "rows": rows,
    "summary": summary,
    "speedup": ratio,
  }
  record_lib.write(args.out, record)


if __name__ == "__main__":
  main()
