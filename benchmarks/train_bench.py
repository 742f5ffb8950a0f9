"""Trainer throughput (steps/s, tokens/s) and the In-Squeeze overhead (squeeze + recompilation).

    python -m benchmarks.train_bench            # tiny model + Gemma 3 270M at batch 2 x 128
    python -m benchmarks.train_bench --big      # also one 270M configuration at batch 8 x 256

Every number is a wall-clock median over timed steps after one untimed (compiling) step, on
whatever JAX backend is present (CPU here). The In-Squeeze overhead of one rank change is

    squeeze_s (lora_tree.squeeze_tree on every module) + recompile_s (first step at the new rank
    minus a steady step) + optimizer re-init,

measured on the 270M; extrapolated to the paper's 128 -> 64 -> ... -> 1 anneal (7 rank changes)
over N + M = 10,200 steps with the squeeze times measured at each of those ranks on the 270M's
module shapes. Results: a table on stdout and benchmarks/results/train_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import lora_tree
from lora_squeeze import model as model_lib
from lora_squeeze import optim
from lora_squeeze import train

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "train_bench.json"
PAPER_RANKS = (128, 64, 32, 16, 8, 4, 2, 1)
PAPER_STEPS = 10_200  # N + M = 10,000 + 200
TARGETS_PER_ROW = 8  # a short answer, as in the scored tasks
LR, WARMUP = 0.01, 100


def synthetic_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens; the last TARGETS_PER_ROW tokens of each row are the targets."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 30_000, (batch, length)).astype(np.int32)
  mask = np.zeros((batch, length), bool)
  mask[:, -TARGETS_PER_ROW:] = True
  return {"tokens": tokens, "target_mask": mask}


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def bench_steps(name: str, base, *, rank: int, batch: int, length: int, steps: int, key) -> tuple[dict, train.TrainState]:
  """Compile (first step) and steady step times of the jitted train step at `rank`."""
  model = model_lib.make_model(name, lora_rank=rank)
  lora = model_lib.init_lora_params(model, base, key=key)
  data = {k: jnp.asarray(v) for k, v in synthetic_batch(batch, length).items()}
  step = train.make_train_step(model, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)
  state = train.init_train_state(lora, optim.make_optimizer(LR, WARMUP))
  (state, _), first_s = timed(lambda: step(state, base, data))
  times = []
  for _ in range(steps):
    (state, metrics), seconds = timed(lambda: step(state, base, data))
    times.append(seconds)
  step_s = statistics.median(times)
  row = {
      "model": name, "rank": rank, "batch": batch, "length": length, "dtype": str(jax.tree.leaves(base)[0].dtype),
      "timed_steps": steps, "first_step_s": first_s, "step_s": step_s, "steps_per_s": 1 / step_s,
      "tokens_per_s": batch * length / step_s, "loss": float(metrics["loss"]),
  }
  return row, state


def bench_rank_change(name: str, base, state: train.TrainState, *, r_tgt: int, batch: int, length: int,
                      steady_step_s: float, key) -> dict:
  """One In-Squeeze rank change: squeeze, fresh optimizer, first (compiling) step at r_tgt."""
  (lora, report), squeeze_s = timed(lambda: lora_tree.squeeze_tree(state.lora, r_tgt, method="qr_core", key=key))
  model = model_lib.make_model(name, lora_rank=r_tgt)
  new_state, reinit_s = timed(lambda: train.init_train_state(lora, optim.make_optimizer(LR, WARMUP)))
  data = {k: jnp.asarray(v) for k, v in synthetic_batch(batch, length, seed=1).items()}
  step = train.make_train_step(model, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)
  _, first_s = timed(lambda: step(new_state, base, data))
  recompile_s = max(first_s - steady_step_s, 0.0)
  return {
      "model": name, "r_src": report.modules[0].r_src, "r_tgt": r_tgt, "modules": len(report.modules),
      "squeeze_s": squeeze_s, "optimizer_reinit_s": reinit_s, "first_step_s": first_s, "recompile_s": recompile_s,
      "overhead_s": squeeze_s + reinit_s + recompile_s, "retention": float(report.overall_retention),
  }


def bench_paper_squeezes(name: str, base, *, key) -> list[dict]:
  """squeeze_tree times along the paper's anneal on the model's module shapes (random factors)."""
  rows = []
  model = model_lib.make_model(name, lora_rank=PAPER_RANKS[0])
  lora = model_lib.init_lora_params(model, base, key=key)
  # b = 0 at init; random b gives a full-rank ΔW, like a trained adapter.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
  lora = jax.tree_util.tree_unflatten(treedef, [
      jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if path[-1].key == "b" else x
      for i, (path, x) in enumerate(leaves)])
  for r_src, r_tgt in zip(PAPER_RANKS, PAPER_RANKS[1:]):
    (lora, _), seconds = timed(lambda: lora_tree.squeeze_tree(lora, r_tgt, method="qr_core", key=key))
    rows.append({"r_src": r_src, "r_tgt": r_tgt, "squeeze_s": seconds})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--big", action="store_true", help="also time the 270M at batch 8 x 256")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
  args = parser.parse_args()
  key = jax.random.key(0)
  load = os.getloadavg()
  rows, changes = [], []

  tiny = model_lib.init_base_params("tiny", key=key)
  row, _ = bench_steps("tiny", tiny, rank=16, batch=8, length=128, steps=10, key=key)
  rows.append(row)

  base = model_lib.load_base_params("gemma3_270m")
  row, state = bench_steps("gemma3_270m", base, rank=16, batch=2, length=128, steps=args.steps, key=key)
  rows.append(row)
  changes.append(bench_rank_change("gemma3_270m", base, state, r_tgt=8, batch=2, length=128,
                                   steady_step_s=row["step_s"], key=key))
  if args.big:
    row_big, _ = bench_steps("gemma3_270m", base, rank=16, batch=8, length=256, steps=max(1, args.steps - 1), key=key)
    rows.append(row_big)
  squeezes = bench_paper_squeezes("gemma3_270m", base, key=key)

  # Extrapolation to the paper's anneal (7 rank changes in 10,200 steps) at each measured step time.
  recompile_s = changes[0]["recompile_s"] + changes[0]["optimizer_reinit_s"]
  anneal_overhead_s = sum(s["squeeze_s"] for s in squeezes) + len(squeezes) * recompile_s
  extrapolated = []
  for r in rows[1:]:
    train_s = PAPER_STEPS * r["step_s"]
    extrapolated.append({"batch": r["batch"], "length": r["length"], "step_s": r["step_s"], "train_s": train_s,
                         "anneal_overhead_s": anneal_overhead_s,
                         "overhead_share": anneal_overhead_s / (train_s + anneal_overhead_s)})
  measured_share = changes[0]["overhead_s"] / (changes[0]["overhead_s"] + rows[1]["step_s"] * args.steps)

  result = {
      "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
               "devices": [str(d) for d in jax.devices()], "loadavg_start": load, "loadavg_end": os.getloadavg(),
               "jax": jax.__version__},
      "steps": rows, "rank_change": changes, "paper_anneal_squeezes": squeezes,
      "measured_overhead_share_of_this_short_run": measured_share,
      "extrapolated_paper_anneal": extrapolated,
  }
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  tmp = RESULTS.with_name(RESULTS.name + ".tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  os.replace(tmp, RESULTS)

  print(f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} cpus, {jax.default_backend()})")
  print(f"{'model':<12} {'rank':>4} {'batch':>5} {'len':>4} {'dtype':>8} {'compile+1 s':>11} {'step s':>8} "
        f"{'steps/s':>8} {'tokens/s':>9}")
  for r in rows:
    print(f"{r['model']:<12} {r['rank']:>4} {r['batch']:>5} {r['length']:>4} {r['dtype']:>8} {r['first_step_s']:>11.2f} "
          f"{r['step_s']:>8.3f} {r['steps_per_s']:>8.3f} {r['tokens_per_s']:>9.1f}")
  for c in changes:
    print(f"rank change r{c['r_src']}->r{c['r_tgt']} ({c['modules']} modules): squeeze {c['squeeze_s']:.3f} s, "
          f"optimizer re-init {c['optimizer_reinit_s']:.3f} s, recompile {c['recompile_s']:.2f} s "
          f"-> {100 * measured_share:.1f}% of this {args.steps}-step run")
  print("paper anneal squeezes (270M shapes): " + ", ".join(
      f"{s['r_src']}->{s['r_tgt']} {s['squeeze_s']:.3f}s" for s in squeezes))
  for e in extrapolated:
    print(f"extrapolated 128->...->1 over {PAPER_STEPS} steps at {e['batch']}x{e['length']} ({e['step_s']:.2f} s/step): "
          f"overhead {e['anneal_overhead_s']:.1f} s of {e['train_s'] / 3600:.1f} h = {100 * e['overhead_share']:.3f}%")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
