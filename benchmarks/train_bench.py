"""Trainer throughput (steps/s, tokens/s) and the In-Squeeze overhead (squeeze + recompilation).

    python -m benchmarks.train_bench            # tiny model + Gemma 3 270M at batch 2 x 128
    python -m benchmarks.train_bench --big      # also one 270M configuration at batch 8 x 256

Every number is a wall-clock median over timed steps after one untimed (compiling) step, on
whatever JAX backend is present (CPU here). The In-Squeeze overhead of one rank change is

    squeeze_s (lora_tree.squeeze_tree on every module) + recompile_s (first step at the new rank
    minus a steady step) + optimizer re-init,

measured on the 270M, cold and compiled ahead (as RunSetup.precompile does); extrapolated to the
paper's 128 -> 64 -> ... -> 1 anneal (7 rank changes) over N + M = 10,200 steps with the squeeze
times (cold, and warm = compute only) measured at each of those ranks on the 270M's module shapes. Results: a table on stdout and benchmarks/results/train_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import threading
import time

import jax
import numpy as np

from lora_squeeze import checkpoint as ckpt_lib
from lora_squeeze import lora_tree
from lora_squeeze import model as model_lib
from lora_squeeze import optim
from lora_squeeze import sharding
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


def fresh_state(name: str, base, rank: int, mesh, key) -> train.TrainState:
  lora = model_lib.init_lora_params(model_lib.make_model(name, lora_rank=rank), base, key=key)
  return train.init_train_state(sharding.shard_params(lora, mesh), optim.make_optimizer(LR, WARMUP), mesh)


def run_steps(step, state, base, data, steps: int):
  times = []
  for _ in range(steps):
    (state, metrics), seconds = timed(lambda: step(state, base, data))
    times.append(seconds)
  return state, metrics, times


def bench_steps(name: str, base, mesh, *, rank: int, batch: int, length: int, steps: int,
                key) -> tuple[dict, train.TrainState]:
  """Compile (first step) and steady step times of the jitted train step at `rank` (the runner's
  placement: params and state on the mesh)."""
  model = model_lib.make_model(name, lora_rank=rank)
  data = sharding.shard_batch(synthetic_batch(batch, length), mesh)
  step = train.make_train_step(model, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)
  state = fresh_state(name, base, rank, mesh, key)
  (state, _), first_s = timed(lambda: step(state, base, data))
  state, metrics, times = run_steps(step, state, base, data, steps)
  step_s = statistics.median(times)
  row = {
      "model": name, "rank": rank, "batch": batch, "length": length, "dtype": str(jax.tree.leaves(base)[0].dtype),
      "timed_steps": steps, "first_step_s": first_s, "step_s": step_s, "steps_per_s": 1 / step_s,
      "tokens_per_s": batch * length / step_s, "loss": float(metrics["loss"]),
  }
  return row, state


def bench_rank_change(name: str, base, mesh, state: train.TrainState, *, r_tgt: int, batch: int, length: int,
                      steady_step_s: float, ahead: bool, steps_before: int, key) -> dict:
  """One In-Squeeze rank change r_src -> r_tgt: squeeze, fresh optimizer, first step at r_tgt.

  ahead=True does what the runner's `precompile` does: while `steps_before` more steps train at
  r_src, a thread compiles the squeeze and the r_tgt step; the overhead left is what is exposed.
  """
  model = model_lib.make_model(name, lora_rank=r_tgt)
  data = sharding.shard_batch(synthetic_batch(batch, length, seed=1), mesh)
  r_src = lora_tree.find_lora_modules(state.lora)["layer_0/attn/q_einsum/_LoRAEinsum_0/lora"]["a"].shape[-1]
  step_src = train.make_train_step(model_lib.make_model(name, lora_rank=r_src), lr=LR, warmup=WARMUP,
                                   max_targets=TARGETS_PER_ROW)
  thread = None
  if ahead:
    def compile_ahead():
      # Throw-away adapters of the right shapes: the training thread donates the real state.
      lora_tree.squeeze_tree(fresh_state(name, base, r_src, mesh, key).lora, r_tgt, method="qr_core", key=key)
      template = fresh_state(name, base, r_tgt, mesh, key)
      train.compile_step(model, ckpt_lib.abstract_like(template), base, data, lr=LR, warmup=WARMUP,
                         max_targets=TARGETS_PER_ROW)
    thread = threading.Thread(target=compile_ahead)
    thread.start()
  start = time.perf_counter()
  state, _, times = run_steps(step_src, state, base, data, steps_before)
  if thread is not None:
    thread.join()
  training_s = time.perf_counter() - start
  (lora, report), squeeze_s = timed(lambda: lora_tree.squeeze_tree(state.lora, r_tgt, method="qr_core", key=key))
  new_state, reinit_s = timed(lambda: train.init_train_state(sharding.shard_params(lora, mesh),
                                                             optim.make_optimizer(LR, WARMUP), mesh))
  step = train.make_train_step(model, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)
  _, first_s = timed(lambda: step(new_state, base, data))
  recompile_s = max(first_s - steady_step_s, 0.0)
  return {
      "model": name, "r_src": report.modules[0].r_src, "r_tgt": r_tgt, "modules": len(report.modules),
      "compiled_ahead": ahead, "steps_before": steps_before, "steps_before_s": training_s,
      "steps_before_slowdown": training_s / (steps_before * steady_step_s),
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
    _, cold_s = timed(lambda: lora_tree.squeeze_tree(lora, r_tgt, method="qr_core", key=key))
    (lora, _), warm_s = timed(lambda: lora_tree.squeeze_tree(lora, r_tgt, method="qr_core", key=key))
    rows.append({"r_src": r_src, "r_tgt": r_tgt, "squeeze_s": cold_s, "warm_squeeze_s": warm_s})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--big", action="store_true", help="also time the 270M at batch 8 x 256")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
  parser.add_argument("--ahead-steps", type=int, default=10,
                      help="steps trained while the next rank compiles in the background")
  args = parser.parse_args()
  key = jax.random.key(0)
  load = os.getloadavg()
  rows, changes = [], []

  mesh = sharding.make_mesh()
  tiny = sharding.shard_params(model_lib.init_base_params("tiny", key=key), mesh)
  row, _ = bench_steps("tiny", tiny, mesh, rank=16, batch=8, length=128, steps=10, key=key)
  rows.append(row)

  base = sharding.shard_params(model_lib.load_base_params("gemma3_270m"), mesh)
  row, state = bench_steps("gemma3_270m", base, mesh, rank=16, batch=2, length=128, steps=args.steps, key=key)
  rows.append(row)
  for r_tgt, ahead in ((8, False), (4, True)):
    state = fresh_state("gemma3_270m", base, 16, mesh, key)
    changes.append(bench_rank_change("gemma3_270m", base, mesh, state, r_tgt=r_tgt, batch=2, length=128,
                                     steady_step_s=row["step_s"], ahead=ahead, steps_before=args.ahead_steps,
                                     key=key))
  if args.big:
    row_big, _ = bench_steps("gemma3_270m", base, mesh, rank=16, batch=8, length=256, steps=max(1, args.steps - 1),
                             key=key)
    rows.append(row_big)
  squeezes = bench_paper_squeezes("gemma3_270m", base, key=key)

  # Extrapolation to the paper's anneal (7 rank changes in 10,200 steps) at each measured step time.
  # cold: every squeeze and step compiles when it is reached; ahead: compiled during the stage before.
  cold_s = sum(s["squeeze_s"] for s in squeezes) + len(squeezes) * (
      changes[0]["recompile_s"] + changes[0]["optimizer_reinit_s"])
  # Ahead of time only the compilation is hidden: the squeeze's own compute stays.
  ahead_s = sum(s["warm_squeeze_s"] for s in squeezes) + len(squeezes) * (
      changes[1]["recompile_s"] + changes[1]["optimizer_reinit_s"])
  extrapolated = []
  for r in rows[1:]:
    train_s = PAPER_STEPS * r["step_s"]
    for mode, overhead_s in (("cold", cold_s), ("ahead", ahead_s)):
      extrapolated.append({"mode": mode, "batch": r["batch"], "length": r["length"], "step_s": r["step_s"],
                           "train_s": train_s, "anneal_overhead_s": overhead_s,
                           "overhead_share": overhead_s / (train_s + overhead_s)})
  # This short run: the rank change's exposed overhead against the steps trained around it.
  measured_share = {f"r{c['r_src']}->r{c['r_tgt']}{' ahead' if c['compiled_ahead'] else ''}":
                    c["overhead_s"] / (c["overhead_s"] + c["steps_before_s"]) for c in changes}

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
  for c, share in zip(changes, measured_share.values()):
    print(f"rank change r{c['r_src']}->r{c['r_tgt']} ({c['modules']} modules, compiled ahead: {c['compiled_ahead']}): "
          f"squeeze {c['squeeze_s']:.3f} s, optimizer re-init {c['optimizer_reinit_s']:.3f} s, recompile "
          f"{c['recompile_s']:.2f} s; the {c['steps_before']} steps before took {c['steps_before_s']:.1f} s "
          f"({c['steps_before_slowdown']:.2f}x a steady step) -> exposed overhead {100 * share:.1f}% of them")
  print("paper anneal squeezes (270M shapes, cold/warm): " + ", ".join(
      f"{s['r_src']}->{s['r_tgt']} {s['squeeze_s']:.2f}/{s['warm_squeeze_s']:.2f}s" for s in squeezes))
  for e in extrapolated:
    print(f"extrapolated 128->...->1 ({e['mode']}) over {PAPER_STEPS} steps at {e['batch']}x{e['length']} "
          f"({e['step_s']:.2f} s/step): "
          f"overhead {e['anneal_overhead_s']:.1f} s of {e['train_s'] / 3600:.1f} h = {100 * e['overhead_share']:.3f}%")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
