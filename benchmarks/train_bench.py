"""Trainer throughput (steps/s, tokens/s) and the In-Squeeze overhead (squeeze + recompilation).

    python -m benchmarks.train_bench            # tiny model + Gemma 3 270M at batch 2 x 128
    python -m benchmarks.train_bench --big      # also one 270M configuration at batch 8 x 256
    python -m benchmarks.train_bench --loop     # only: the step loop, per-step host sync vs the runner's

The --loop comparison runs the same jitted step, interleaved in paired rounds in one process: "sync"
pulls the loss to the host after every step (the old loop: the host waits for each step before it
dispatches the next), "deferred" pulls the metrics of all steps at every 10th step (the runner's
loop since issue 13). Reported: steps/s of each and the ratio deferred/sync (median over rounds,
95% bootstrap interval over the paired rounds); results in benchmarks/results/train_loop_bench.json.

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
LOOP_RESULTS = RESULTS.with_name("train_loop_bench.json")
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


def bench_steps(
  name: str, base, mesh, *, rank: int, batch: int, length: int, steps: int, key
) -> tuple[dict, train.TrainState]:
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
    "model": name,
    "rank": rank,
    "batch": batch,
    "length": length,
    "dtype": str(jax.tree.leaves(base)[0].dtype),
    "timed_steps": steps,
    "first_step_s": first_s,
    "step_s": step_s,
    "steps_per_s": 1 / step_s,
    "tokens_per_s": batch * length / step_s,
    "loss": float(metrics["loss"]),
  }
  return row, state


def bench_rank_change(
  name: str,
  base,
  mesh,
  state: train.TrainState,
  *,
  r_tgt: int,
  batch: int,
  length: int,
  steady_step_s: float,
  ahead: bool,
  steps_before: int,
  key,
) -> dict:
  """One In-Squeeze rank change r_src -> r_tgt: squeeze, fresh optimizer, first step at r_tgt.

  ahead=True does what the runner's `precompile` does: while `steps_before` more steps train at
  r_src, a thread compiles the squeeze and the r_tgt step; the overhead left is what is exposed.
  """
  model = model_lib.make_model(name, lora_rank=r_tgt)
  data = sharding.shard_batch(synthetic_batch(batch, length, seed=1), mesh)
  r_src = lora_tree.find_lora_modules(state.lora)["layer_0/attn/q_einsum/_LoRAEinsum_0/lora"]["a"].shape[-1]
  step_src = train.make_train_step(
    model_lib.make_model(name, lora_rank=r_src), lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW
  )
  thread = None
  if ahead:

    def compile_ahead():
      # Throw-away adapters of the right shapes: the training thread donates the real state.
      lora_tree.squeeze_tree(fresh_state(name, base, r_src, mesh, key).lora, r_tgt, method="qr_core", key=key)
      template = fresh_state(name, base, r_tgt, mesh, key)
      train.compile_step(
        model, ckpt_lib.abstract_like(template), base, data, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW
      )

    thread = threading.Thread(target=compile_ahead)
    thread.start()
  start = time.perf_counter()
  state, _, times = run_steps(step_src, state, base, data, steps_before)
  if thread is not None:
    thread.join()
  training_s = time.perf_counter() - start
  (lora, report), squeeze_s = timed(lambda: lora_tree.squeeze_tree(state.lora, r_tgt, method="qr_core", key=key))
  new_state, reinit_s = timed(
    lambda: train.init_train_state(sharding.shard_params(lora, mesh), optim.make_optimizer(LR, WARMUP), mesh)
  )
  step = train.make_train_step(model, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)
  _, first_s = timed(lambda: step(new_state, base, data))
  recompile_s = max(first_s - steady_step_s, 0.0)
  return {
    "model": name,
    "r_src": report.modules[0].r_src,
    "r_tgt": r_tgt,
    "modules": len(report.modules),
    "compiled_ahead": ahead,
    "steps_before": steps_before,
    "steps_before_s": training_s,
    "steps_before_slowdown": training_s / (steps_before * steady_step_s),
    "squeeze_s": squeeze_s,
    "optimizer_reinit_s": reinit_s,
    "first_step_s": first_s,
    "recompile_s": recompile_s,
    "overhead_s": squeeze_s + reinit_s + recompile_s,
    "retention": float(report.overall_retention),
  }


def bench_paper_squeezes(name: str, base, *, key) -> list[dict]:
  """squeeze_tree times along the paper's anneal on the model's module shapes (random factors)."""
  rows = []
  model = model_lib.make_model(name, lora_rank=PAPER_RANKS[0])
  lora = model_lib.init_lora_params(model, base, key=key)
  # b = 0 at init; random b gives a full-rank ΔW, like a trained adapter.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
  lora = jax.tree_util.tree_unflatten(
    treedef,
    [
      jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if path[-1].key == "b" else x
      for i, (path, x) in enumerate(leaves)
    ],
  )
  for r_src, r_tgt in zip(PAPER_RANKS, PAPER_RANKS[1:]):
    _, cold_s = timed(lambda: lora_tree.squeeze_tree(lora, r_tgt, method="qr_core", key=key))
    (lora, _), warm_s = timed(lambda: lora_tree.squeeze_tree(lora, r_tgt, method="qr_core", key=key))
    rows.append({"r_src": r_src, "r_tgt": r_tgt, "squeeze_s": cold_s, "warm_squeeze_s": warm_s})
  return rows


def loop_steps_per_s(step, state, base, data, *, steps: int, sync_every: int):
  """steps/s of `steps` train steps when the metrics go to the host every `sync_every` steps."""
  start, pending = time.perf_counter(), []
  for i in range(steps):
    state, metrics = step(state, base, data)
    pending.append(metrics)
    if (i + 1) % sync_every == 0 or i + 1 == steps:
      losses = [float(m["loss"]) for m in jax.device_get(pending)]
      assert all(np.isfinite(losses)), losses
      pending = []
  return state, steps / (time.perf_counter() - start)


def bench_loop(
  *, model_name: str, base, mesh, rank: int, batch: int, length: int, steps: int, rounds: int, key
) -> dict:
  """Paired rounds of the per-step-sync loop and the deferred loop on the same state and batch."""
  model = model_lib.make_model(model_name, lora_rank=rank)
  data = sharding.shard_batch(synthetic_batch(batch, length), mesh)
  step = train.make_train_step(model, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)
  state = fresh_state(model_name, base, rank, mesh, key)
  state, _ = loop_steps_per_s(step, state, base, data, steps=3, sync_every=1)  # compile
  sync, deferred = [], []
  for i in range(rounds):
    for name in ("sync", "deferred") if i % 2 == 0 else ("deferred", "sync"):  # alternate the order
      state, rate = loop_steps_per_s(step, state, base, data, steps=steps, sync_every=1 if name == "sync" else 10)
      (sync if name == "sync" else deferred).append(rate)
  ratios = np.asarray(deferred) / np.asarray(sync)
  rng = np.random.default_rng(0)
  boot = np.median(rng.choice(ratios, (10_000, len(ratios))), axis=1)
  return {
    "model": model_name,
    "rank": rank,
    "batch": batch,
    "length": length,
    "steps_per_round": steps,
    "rounds": rounds,
    "sync_steps_per_s": sync,
    "deferred_steps_per_s": deferred,
    "sync_median": float(np.median(sync)),
    "deferred_median": float(np.median(deferred)),
    "ratio_median": float(np.median(ratios)),
    "ratio_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
  }


def main_loop(args) -> None:
  key = jax.random.key(0)
  load = os.getloadavg()
  mesh = sharding.make_mesh()
  tiny = sharding.shard_params(model_lib.init_base_params("tiny", key=key), mesh)
  rows = [
    bench_loop(
      model_name="tiny",
      base=tiny,
      mesh=mesh,
      rank=16,
      batch=b,
      length=length_,
      steps=args.loop_steps,
      rounds=args.rounds,
      key=key,
    )
    for b, length_ in [(8, int(x)) for x in args.loop_lengths.split(",")]
  ]
  result = {
    "host": {
      "platform": platform.platform(),
      "cpus": os.cpu_count(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "loadavg_start": load,
      "loadavg_end": os.getloadavg(),
      "jax": jax.__version__,
    },
    "command": (
      f"python -m benchmarks.train_bench --loop --rounds={args.rounds} --loop-steps={args.loop_steps} "
      f"--loop-lengths={args.loop_lengths}"
    ),
    "loop": rows,
  }
  out = pathlib.Path(args.loop_out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  os.replace(tmp, out)
  print(
    f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} cpus, {jax.default_backend()})"
  )
  print(
    f"{'model':<6} {'batch':>5} {'len':>4} {'sync steps/s':>12} {'deferred steps/s':>16} {'ratio':>6} {'95% CI':>14}"
  )
  for r in rows:
    print(
      f"{r['model']:<6} {r['batch']:>5} {r['length']:>4} {r['sync_median']:>12.1f} {r['deferred_median']:>16.1f} "
      f"{r['ratio_median']:>6.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]"
    )
  print(f"wrote {out}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--big", action="store_true", help="also time the 270M at batch 8 x 256")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
  parser.add_argument(
    "--ahead-steps", type=int, default=10, help="steps trained while the next rank compiles in the background"
  )
  parser.add_argument("--loop", action="store_true", help="only compare the step loops (tiny model)")
  parser.add_argument("--loop-steps", type=int, default=50, help="steps per round of --loop")
  parser.add_argument("--rounds", type=int, default=10, help="paired rounds of --loop")
  parser.add_argument("--loop-lengths", default="32,128", help="sequence lengths of --loop (batch 8)")
  parser.add_argument("--loop-out", default=str(LOOP_RESULTS), help="JSON path of --loop's results")
  args = parser.parse_args()
  if args.loop:
    main_loop(args)
    return
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
    changes.append(
      bench_rank_change(
        "gemma3_270m",
        base,
        mesh,
        state,
        r_tgt=r_tgt,
        batch=2,
        length=128,
        steady_step_s=row["step_s"],
        ahead=ahead,
        steps_before=args.ahead_steps,
        key=key,
      )
    )
  if args.big:
    row_big, _ = bench_steps(
      "gemma3_270m", base, mesh, rank=16, batch=8, length=256, steps=max(1, args.steps - 1), key=key
    )
    rows.append(row_big)
  squeezes = bench_paper_squeezes("gemma3_270m", base, key=key)

  # Extrapolation to the paper's anneal (7 rank changes in 10,200 steps) at each measured step time.
  # cold: every squeeze and step compiles when it is reached; ahead: compiled during the stage before.
  cold_s = sum(s["squeeze_s"] for s in squeezes) + len(squeezes) * (
    changes[0]["recompile_s"] + changes[0]["optimizer_reinit_s"]
  )
  # Ahead of time only the compilation is hidden: the squeeze's own compute stays.
  ahead_s = sum(s["warm_squeeze_s"] for s in squeezes) + len(squeezes) * (
    changes[1]["recompile_s"] + changes[1]["optimizer_reinit_s"]
  )
  extrapolated = []
  for r in rows[1:]:
    train_s = PAPER_STEPS * r["step_s"]
    for mode, overhead_s in (("cold", cold_s), ("ahead", ahead_s)):
      extrapolated.append(
        {
          "mode": mode,
          "batch": r["batch"],
          "length": r["length"],
          "step_s": r["step_s"],
          "train_s": train_s,
          "anneal_overhead_s": overhead_s,
          "overhead_share": overhead_s / (train_s + overhead_s),
        }
      )
  # This short run: the rank change's exposed overhead against the steps trained around it.
  measured_share = {
    f"r{c['r_src']}->r{c['r_tgt']}{' ahead' if c['compiled_ahead'] else ''}": c["overhead_s"]
    / (c["overhead_s"] + c["steps_before_s"])
    for c in changes
  }

  result = {
    "host": {
      "platform": platform.platform(),
      "cpus": os.cpu_count(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "loadavg_start": load,
      "loadavg_end": os.getloadavg(),
      "jax": jax.__version__,
    },
    "steps": rows,
    "rank_change": changes,
    "paper_anneal_squeezes": squeezes,
    "measured_overhead_share_of_this_short_run": measured_share,
    "extrapolated_paper_anneal": extrapolated,
  }
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  tmp = RESULTS.with_name(RESULTS.name + ".tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  os.replace(tmp, RESULTS)

  print(
    f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} cpus, {jax.default_backend()})"
  )
  print(
    f"{'model':<12} {'rank':>4} {'batch':>5} {'len':>4} {'dtype':>8} {'compile+1 s':>11} {'step s':>8} "
    f"{'steps/s':>8} {'tokens/s':>9}"
  )
  for r in rows:
    print(
      f"{r['model']:<12} {r['rank']:>4} {r['batch']:>5} {r['length']:>4} {r['dtype']:>8} {r['first_step_s']:>11.2f} "
      f"{r['step_s']:>8.3f} {r['steps_per_s']:>8.3f} {r['tokens_per_s']:>9.1f}"
    )
  for c, share in zip(changes, measured_share.values()):
    print(
      f"rank change r{c['r_src']}->r{c['r_tgt']} ({c['modules']} modules, compiled ahead: {c['compiled_ahead']}): "
      f"squeeze {c['squeeze_s']:.3f} s, optimizer re-init {c['optimizer_reinit_s']:.3f} s, recompile "
      f"{c['recompile_s']:.2f} s; the {c['steps_before']} steps before took {c['steps_before_s']:.1f} s "
      f"({c['steps_before_slowdown']:.2f}x a steady step) -> exposed overhead {100 * share:.1f}% of them"
    )
  print(
    "paper anneal squeezes (270M shapes, cold/warm): "
    + ", ".join(f"{s['r_src']}->{s['r_tgt']} {s['squeeze_s']:.2f}/{s['warm_squeeze_s']:.2f}s" for s in squeezes)
  )
  for e in extrapolated:
    print(
      f"extrapolated 128->...->1 ({e['mode']}) over {PAPER_STEPS} steps at {e['batch']}x{e['length']} "
      f"({e['step_s']:.2f} s/step): "
      f"overhead {e['anneal_overhead_s']:.1f} s of {e['train_s'] / 3600:.1f} h = {100 * e['overhead_share']:.3f}%"
    )
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
