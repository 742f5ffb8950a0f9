"""Training throughput on an accelerator: Gemma 3 270M and 1B architectures (random weights), LoRA
r = 16 on every target, batch 8 x 1024, bfloat16 base; steps/s, tokens/s, MFU and the cost of one
rank change (squeeze 16 -> 8 + optimizer re-init + recompilation of the step), cold; then the next
one (8 -> 4) as the runner makes it with RunSetup.precompile (the squeeze and the rank-4 step
compiled by a thread while rank 8 trains on): what is still exposed.

    python -m benchmarks.gpu_train_bench                  # both models, ~5 min on one H200
    python -m benchmarks.gpu_train_bench --models=gemma3_270m --steps=20

The loop is the runner's: the state is donated, metrics are pulled to the host every 10th step
only, and the timer stops after the last step's metrics are on the host. Results: a table on stdout
and benchmarks/results/gpu_train_bench.json (with the device name).

MFU = model FLOPs per step / (step time x the device's peak dense bf16 FLOP/s), where the model
FLOPs of one step over T = batch x length tokens (sequence length S, n_layers L) are

    4 * P_base * T        frozen base matmuls: forward 2 P T, backward 2 P T for the activation
                          gradients only (no weight gradients for frozen weights)
  + 6 * P_lora * T        LoRA factors: forward, activation and weight gradients
  + 3 * 4 * B * S^2 * L * n_heads * head_dim
                          attention scores and weighted values, forward plus a 2x backward
                          (counted for the full S x S square, as is usual; local layers and the
                          causal mask do less)
  + 4 * B * K * V * d     the output embedding at the K = 8 target positions per row (forward and
                          activation gradient; the loss never forms the other logits)

with P_base the base parameters without the embedding table (it is a gather on the input side).
Peak FLOP/s per device kind are in PEAK_BF16 (dense, no sparsity); MFU is null for other devices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import checkpoint
from lora_squeeze import lora_tree
from lora_squeeze import model as model_lib
from lora_squeeze import optim
from lora_squeeze import sharding
from lora_squeeze import train

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "gpu_train_bench.json"
LR, WARMUP, RANK, R_TGT, R_AHEAD, TARGETS_PER_ROW = 1e-3, 100, 16, 8, 4, 8
# Peak dense bfloat16 FLOP/s by a substring of jax.Device.device_kind (vendor data sheets).
PEAK_BF16 = {
  "H200": 989e12,
  "H100": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "TPU v5 lite": 197e12,
  "TPU v5p": 459e12,
  "TPU v4": 275e12,
  "TPU v6": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_BF16.items() if k.lower() in device_kind.lower()), None)


def synthetic_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 30_000, (batch, length)).astype(np.int32)
  mask = np.zeros((batch, length), bool)
  mask[:, -TARGETS_PER_ROW:] = True
  return {"tokens": tokens, "target_mask": mask}


def count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def step_flops(model_name: str, base, lora, *, batch: int, length: int) -> dict:
  config = model_lib.base_model(model_lib.make_model(model_name)).config
  embedding = count(base["embedder"])
  p_base, p_lora = count(base) - embedding, count(lora)
  d, vocab = config.embed_dim, config.num_embed
  tokens = batch * length
  attention = 3 * 4 * batch * length**2 * config.num_layers * config.num_heads * config.head_dim
  total = 4 * p_base * tokens + 6 * p_lora * tokens + attention + 4 * batch * TARGETS_PER_ROW * vocab * d
  return {"p_base_without_embedding": p_base, "p_embedding": embedding, "p_lora": p_lora, "flops_per_step": total}


def run_loop(step, state, base, data, steps: int):
  """Runs `steps` steps as the runner does (metrics to the host every 10th); returns (state, s)."""
  start, pending = time.perf_counter(), []
  for i in range(steps):
    state, metrics = step(state, base, data)
    pending.append(metrics)
    if (i + 1) % 10 == 0 or i + 1 == steps:
      losses = [float(m["loss"]) for m in jax.device_get(pending)]
      if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss {losses}")
      pending = []
  return state, time.perf_counter() - start


def bench_model(name: str, mesh, *, batch: int, length: int, steps: int, key, ahead_steps: int | None = None) -> dict:
  base = sharding.shard_params(model_lib.init_base_params(name, key=key, dtype=jnp.bfloat16), mesh)
  model = model_lib.make_model(name, lora_rank=RANK)
  lora = sharding.shard_params(model_lib.init_lora_params(model, base, key=key), mesh)
  # b = 0 at init; random b gives the squeeze a full-rank ΔW, like a trained adapter.
  lora = jax.tree_util.tree_map_with_path(
    lambda p, x: jax.random.normal(key, x.shape, x.dtype) * 0.01 if p[-1].key == "b" else x, lora
  )
  data = sharding.shard_batch(synthetic_batch(batch, length), mesh)
  state = train.init_train_state(lora, optim.make_optimizer(LR, WARMUP), mesh)
  step = train.make_train_step(model, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)
  state, first_s = run_loop(step, state, base, data, 1)
  print(f"{name}: first step (compilation) {first_s:.1f} s", flush=True)
  state, _ = run_loop(step, state, base, data, 3)  # warm
  state, seconds = run_loop(step, state, base, data, steps)
  step_s = seconds / steps
  print(f"{name}: {step_s * 1e3:.1f} ms per step over {steps} steps", flush=True)

  # One rank change: squeeze (cold: compiles), fresh optimizer, first step at the new rank.
  new_step, new_state, report, squeeze_s, reinit_s, first_new_s = change_rank(name, mesh, state, base, data, R_TGT, key)
  print(f"{name}: squeeze {RANK} -> {R_TGT} {squeeze_s:.2f} s", flush=True)
  new_state, _ = run_loop(new_step, new_state, base, data, 3)
  new_state, seconds_new = run_loop(new_step, new_state, base, data, steps)
  recompile_s = max(first_new_s - seconds_new / steps, 0.0)

  print(f"{name}: recompilation at rank {R_TGT} {recompile_s:.1f} s", flush=True)
  steady_after = seconds_new / steps
  ahead = rank_change_ahead(
    name,
    mesh,
    new_state,
    base,
    data,
    steady_step_s=steady_after,
    cold_recompile_s=recompile_s,
    key=key,
    steps_during=ahead_steps,
  )
  print(f"{name}: rank change {R_TGT} -> {R_AHEAD} compiled ahead: {ahead['exposed_s']:.2f} s exposed", flush=True)

  flops = step_flops(name, base, lora, batch=batch, length=length)
  peak = peak_flops(jax.devices()[0].device_kind)
  achieved = flops["flops_per_step"] / step_s
  return {
    "model": name,
    "rank": RANK,
    "batch": batch,
    "length": length,
    "base_dtype": "bfloat16",
    "first_step_s": first_s,
    "step_s": step_s,
    "steps_per_s": 1 / step_s,
    "tokens_per_s": batch * length / step_s,
    **flops,
    "achieved_flops_per_s": achieved,
    "peak_flops_per_s_per_device": peak,
    "mfu": achieved / (peak * len(jax.devices())) if peak else None,
    "rank_change": {
      "r_src": RANK,
      "r_tgt": R_TGT,
      "modules": len(report.modules),
      "squeeze_s": squeeze_s,
      "optimizer_reinit_s": reinit_s,
      "first_step_s": first_new_s,
      "recompile_s": recompile_s,
      "total_s": squeeze_s + reinit_s + recompile_s,
      "steady_step_s_after": steady_after,
    },
    "rank_change_ahead": ahead,
  }


def change_rank(name, mesh, state, base, data, rank, key):
  """A rank change as the runner makes it: squeeze every module to `rank`, a fresh optimizer, the
  first step at the new rank (compiling it unless compiled ahead). Returns (step, state after that
  step, squeeze report, squeeze_s, optimizer re-init s, first step s)."""
  start = time.perf_counter()
  new_lora, report = lora_tree.squeeze_tree(state.lora, rank, method="qr_core", key=key)
  new_lora = jax.block_until_ready(sharding.shard_params(new_lora, mesh))
  squeeze_s = time.perf_counter() - start
  start = time.perf_counter()
  new_state = jax.block_until_ready(train.init_train_state(new_lora, optim.make_optimizer(LR, WARMUP), mesh))
  reinit_s = time.perf_counter() - start
  step = train.make_train_step(
    model_lib.make_model(name, lora_rank=rank), lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW
  )
  new_state, first_s = run_loop(step, new_state, base, data, 1)
  return step, new_state, report, squeeze_s, reinit_s, first_s


def rank_change_ahead(
  name, mesh, state, base, data, *, steady_step_s, cold_recompile_s, key, steps_during=None
) -> dict:
  """The next rank change (R_TGT -> R_AHEAD) as the runner makes it with RunSetup.precompile: a
  thread compiles the squeeze and the new rank's step while training goes on at the current rank
  (steps_during steps; default: for 1.5x the cold recompilation time); then change_rank. exposed_s
  is what the run still waits for; training_slowdown how much the compiling thread slowed the steps."""
  step = train.make_train_step(
    model_lib.make_model(name, lora_rank=R_TGT), lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW
  )
  if steps_during is None:
    steps_during = min(max(10, math.ceil(1.5 * cold_recompile_s / steady_step_s)), 5000)

  def fresh(rank):
    lora = model_lib.init_lora_params(model_lib.make_model(name, lora_rank=rank), base, key=key)
    return train.init_train_state(sharding.shard_params(lora, mesh), optim.make_optimizer(LR, WARMUP), mesh)

  def compile_ahead():
    # Throw-away adapters of the right shapes and shardings: the training thread donates the real state.
    lora_tree.squeeze_tree(fresh(R_TGT).lora, R_AHEAD, method="qr_core", key=key)
    template = checkpoint.abstract_like(fresh(R_AHEAD))
    model = model_lib.make_model(name, lora_rank=R_AHEAD)
    train.compile_step(model, template, base, data, lr=LR, warmup=WARMUP, max_targets=TARGETS_PER_ROW)

  thread = threading.Thread(target=compile_ahead, name="precompile")
  thread.start()
  state, training_s = run_loop(step, state, base, data, steps_during)
  start = time.perf_counter()
  thread.join()
  waited_s = time.perf_counter() - start
  *_, squeeze_s, reinit_s, first_s = change_rank(name, mesh, state, base, data, R_AHEAD, key)
  recompile_s = max(first_s - steady_step_s, 0.0)
  return {
    "r_src": R_TGT,
    "r_tgt": R_AHEAD,
    "steps_during_compile": steps_during,
    "training_slowdown": training_s / (steps_during * steady_step_s),
    "waited_for_compile_s": waited_s,
    "squeeze_s": squeeze_s,
    "optimizer_reinit_s": reinit_s,
    "first_step_s": first_s,
    "recompile_s": recompile_s,
    "exposed_s": waited_s + squeeze_s + reinit_s + recompile_s,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="gemma3_270m,gemma3_1b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
  parser.add_argument(
    "--ahead-steps",
    type=int,
    default=None,
    help="steps trained while the next rank compiles (default: 1.5x its cold time)",
  )
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  key = jax.random.key(0)
  mesh = sharding.make_mesh()
  rows = [
    bench_model(
      name, mesh, batch=args.batch, length=args.length, steps=args.steps, key=key, ahead_steps=args.ahead_steps
    )
    for name in args.models.split(",")
  ]
  result = {
    "host": {
      "platform": platform.platform(),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "device_kind": jax.devices()[0].device_kind,
      "devices": [str(d) for d in jax.devices()],
    },
    "command": "python -m benchmarks.gpu_train_bench "
    + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "out" and v is not None),
    "rows": rows,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  os.replace(tmp, out)
  print(f"{jax.devices()[0].device_kind} x {len(jax.devices())} ({jax.default_backend()})")
  print(
    f"{'model':<12} {'steps/s':>8} {'tokens/s':>10} {'TFLOP/step':>10} {'MFU':>6} {'compile s':>9} "
    f"{'squeeze s':>9} {'recompile s':>11} {'ahead: exposed s':>16}"
  )
  for r in rows:
    rc = r["rank_change"]
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(
      f"{r['model']:<12} {r['steps_per_s']:>8.2f} {r['tokens_per_s']:>10.0f} {r['flops_per_step'] / 1e12:>10.2f} "
      f"{mfu:>6} {r['first_step_s']:>9.1f} {rc['squeeze_s']:>9.2f} {rc['recompile_s']:>11.1f} "
      f"{r['rank_change_ahead']['exposed_s']:>16.2f}"
    )
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
