"""The trainer on the tiny Gemma 3 and a synthetic copy task: loss, plans, resume, bad input."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import adapter_size
from lora_squeeze import checkpoint as ckpt_lib
from lora_squeeze import model as model_lib
from lora_squeeze import optim
from lora_squeeze import protocols
from lora_squeeze import train
from lora_squeeze.protocols import Evaluate, Squeeze, Stage

LENGTH = 12
HALF = 5  # tokens: [2, x1..x5, 3, x1..x5]: copy the five tokens after the separator 3.
MAX_TARGETS = HALF
STAGE_LR, STAGE_WARMUP = 0.5, 2  # one (lr, warmup) everywhere: the tests reuse the compiled steps


def copy_examples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    x = rng.integers(4, 24, HALF)
    tokens = np.concatenate([[2], x, [3], x]).astype(np.int32)
    mask = np.zeros(LENGTH, bool)
    mask[HALF + 2 :] = True
    out.append({"tokens": tokens, "target_mask": mask})
  return out


@pytest.fixture(scope="module")
def base():
  return model_lib.init_base_params("tiny", key=jax.random.key(0))


def make_setup(workdir, base, *, batches=None, evaluate=None, checkpoint_every=100, lines=None):
  return train.RunSetup(
    model_for_rank=lambda r: model_lib.make_model("tiny", lora_rank=r),
    base_params=base,
    batches=batches if batches is not None else train.batch_dataset(copy_examples(32, 0), batch_size=4, seed=1),
    workdir=pathlib.Path(workdir),
    key=jax.random.key(7),
    max_targets=MAX_TARGETS,
    evaluate=evaluate,
    run_config={"test": "tiny-copy", "workdir": str(workdir)},
    adapter_metadata={"model": "tiny"},
    checkpoint_every=checkpoint_every,
    log_every=2,
    printer=(lines.append if lines is not None else lambda line: None),
  )


def read_metrics(workdir, event="train"):
  path = pathlib.Path(workdir) / train.METRICS_FILE
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def test_target_positions_gathers_first_k_targets():
  mask = jnp.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 1]], bool)
  positions, weights = train.target_positions(mask, 2)
  np.testing.assert_array_equal(positions, [[1, 3], [4, 0]])
  np.testing.assert_array_equal(weights, [[1, 1], [1, 0]])
  # One group: both rows flattened (row 1 starts at 5), the first 4 targets in row-major order.
  positions, weights = train.target_positions(mask, 4, groups=1)
  np.testing.assert_array_equal(positions, [[1, 3, 4, 9]])
  np.testing.assert_array_equal(weights, [[1, 1, 1, 1]])
  positions, weights = train.target_positions(mask, 6, groups=1)
  np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 0, 0]])
  with pytest.raises(ValueError, match="groups=3 must divide the batch size 2"):
    train.target_positions(mask, 2, groups=3)


@pytest.mark.parametrize("groups", [None, 1, 3])
def test_loss_matches_full_logits_reference(base, groups):
  """The gathered-rows loss equals cross-entropy on the full (B, T, V) logits of model.apply, with
  one gather per row (None), per block of rows (3 rows in 3 groups) or over the whole batch (1):
  a block's flattened positions never predict a token from the previous row's last state."""
  model = model_lib.make_model("tiny", lora_rank=2)
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(3))
  lora = jax.tree.map(lambda x: x + 0.05, lora)  # b != 0, so LoRA takes part
  batch = {k: jnp.asarray(np.stack([e[k] for e in copy_examples(3, 5)])) for k in ("tokens", "target_mask")}
  max_targets = train.targets_bucket(np.asarray(batch["target_mask"]), groups=groups)
  assert max_targets == {None: 8, 1: 16, 3: 8}[groups]  # HALF = 5 targets per row
  loss, n = train.loss_fn(lora, base, batch, model=model, max_targets=max_targets, groups=groups)
  logits = model.apply({"params": model_lib.merge_params(base, lora)}, batch["tokens"]).logits
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
  mask = batch["target_mask"][:, 1:]
  np.testing.assert_allclose(loss, jnp.sum(nll * mask) / jnp.sum(mask), rtol=1e-5)
  assert n == 3 * HALF


def test_direct_plan_loss_decreases_and_writes_run_files(base, tmp_path):
  lines = []
  plan = protocols.direct(rank=4, steps=16, lr=STAGE_LR, warmup=STAGE_WARMUP)
  evaluate = lambda rank, lora: {"neg_loss": -1.0}
  out = train.execute_plan(plan, make_setup(tmp_path, base, evaluate=evaluate, lines=lines))
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == list(range(1, 17))
  first, last = np.mean([r["loss"] for r in records[:3]]), np.mean([r["loss"] for r in records[-3:]])
  assert last < first - 0.05, (first, last)
  assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)
  assert records[0]["lr"] == pytest.approx(0.25) and records[-1]["lr"] == pytest.approx(0.5)
  assert any(
    line.startswith("step 16/16 stage 1/1 r=4 loss") and "tokens/s" in line and "ETA" in line for line in lines
  )
  results = json.loads((tmp_path / train.RESULTS_FILE).read_text())
  assert results["complete"] and results["evals"]["direct_r4"]["score"] == -1.0
  [size] = read_metrics(tmp_path, event="stage_end")
  assert size["step"] == 16 and size["rank"] == 4
  assert size["delta_w_fro"] == pytest.approx(adapter_size.adapter_size(jax.device_get(out["lora"]))["delta_w_fro"])
  assert size["delta_w_fro"] > 0 and any(line.startswith("stage end (rank 4, step 16): ||ΔW||_F") for line in lines)
  lora, meta = __import__("lora_squeeze.adapters.orbax_io", fromlist=["x"]).load_adapter(
    tmp_path / "adapters" / "direct_r4"
  )
  assert meta["rank"] == 4 and meta["model"] == "tiny"
  for got, want in zip(jax.tree.leaves(lora), jax.tree.leaves(out["lora"])):
    np.testing.assert_array_equal(got, want)


def test_only_lora_params_change(base):
  model = model_lib.make_model("tiny", lora_rank=2)
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(3))
  batch = {k: jnp.asarray(np.stack([e[k] for e in copy_examples(4, 5)])) for k in ("tokens", "target_mask")}
  base_before = jax.tree.map(np.asarray, base)
  state = train.init_train_state(lora, optim.make_optimizer(STAGE_LR, STAGE_WARMUP))
  step = train.make_train_step(model, lr=STAGE_LR, warmup=STAGE_WARMUP, max_targets=8)
  state, _ = step(state, base, batch)
  b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(state.lora) if p[-1].key == "b"]
  assert all(np.abs(np.asarray(b)).max() > 0 for b in b_leaves)  # b started at 0
  for got, want in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
    np.testing.assert_array_equal(got, want)


class Crash(Exception):
  pass


class CrashAt:
  """A batch source that fails when asked for batch `step` (a simulated crash mid-run)."""

  def __init__(self, inner, step):
    self.inner, self.step = inner, step

  def __getitem__(self, i):
    if i == self.step:
      raise Crash(f"simulated crash at batch {i}")
    return self.inner[i]


def anneal_plan():
  return protocols.validate_plan(
    (
      Stage(rank=4, steps=3, lr=STAGE_LR, warmup=STAGE_WARMUP),
      Squeeze(rank=2, method="qr_core"),
      Stage(rank=2, steps=3, lr=STAGE_LR, warmup=STAGE_WARMUP),
      Evaluate(tag="final"),
    )
  )


def test_resume_mid_stage_and_mid_anneal_is_bit_identical(base, tmp_path):
  plan = anneal_plan()
  # The uninterrupted run also compiles each next stage in the background: same numbers.
  straight_lines = []
  setup = dataclasses.replace(
    make_setup(tmp_path / "a", base, checkpoint_every=2, lines=straight_lines), precompile=True
  )
  straight = train.execute_plan(plan, setup)
  assert not [line for line in straight_lines if "ahead-of-time compilation" in line]  # it compiled, not failed
  lines = []
  # Checkpoints every 2 steps: the crash at batch 2 resumes mid first stage (step 2), the one at
  # batch 5 mid second stage, after the squeeze (step 4).
  for crash_step in (2, 5):
    with pytest.raises(Crash):
      train.execute_plan(
        plan,
        make_setup(
          tmp_path / "b", base, checkpoint_every=2, batches=CrashAt(make_setup(tmp_path, base).batches, crash_step)
        ),
      )
  resumed = train.execute_plan(plan, make_setup(tmp_path / "b", base, checkpoint_every=2, lines=lines))
  assert any(line.startswith("resumed from checkpoint") and "global step 4, rank 2" in line for line in lines)
  for got, want in zip(jax.tree.leaves(resumed["lora"]), jax.tree.leaves(straight["lora"])):
    np.testing.assert_array_equal(got, want)
  # The metrics log holds each step once, with the same losses as the uninterrupted run.
  losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d)]  # noqa: E731
  assert losses(tmp_path / "b") == losses(tmp_path / "a")
  squeezes = read_metrics(tmp_path / "b", "squeeze")
  assert [(s["r_src"], s["r_tgt"]) for s in squeezes] == [(4, 2)]
  assert 0 < squeezes[0]["overall_retention"] <= 1 and len(squeezes[0]["modules"]) == 10  # 5 targets x 2 layers


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path):
  plan = protocols.validate_plan((Stage(rank=4, steps=6, lr=STAGE_LR, warmup=STAGE_WARMUP), Evaluate(tag="final")))
  with pytest.raises(Crash):
    train.execute_plan(
      plan, make_setup(tmp_path, base, checkpoint_every=2, batches=CrashAt(make_setup(tmp_path, base).batches, 4))
    )
  poisoned = jax.tree.map(lambda x: x, base)
  poisoned["final_norm"]["scale"] = poisoned["final_norm"]["scale"].at[0].set(jnp.nan)
  with pytest.raises(
    train.NonFiniteLossError,
    match=r"loss is nan at global step 4 \(stage 1/1, rank 4, lr 0.5\).*"
    r"last good checkpoint .* is kept",
  ):
    train.execute_plan(plan, make_setup(tmp_path, poisoned, checkpoint_every=2))
  checkpoints = ckpt_lib.RunCheckpoints(tmp_path / train.CHECKPOINTS_DIR)
  meta = checkpoints.restore_meta()
  assert meta["position"]["global_step"] == 4
  # The clean base resumes from that checkpoint and finishes.
  out = train.execute_plan(plan, make_setup(tmp_path, base, checkpoint_every=2))
  assert out["global_step"] == 6


def test_post_squeeze_to_the_same_rank_keeps_the_logits(base, tmp_path):
  from lora_squeeze.adapters import orbax_io

  plan = protocols.post_squeeze(r_src=4, steps=4, lr=STAGE_LR, warmup=STAGE_WARMUP, targets=(4, 2))
  out = train.execute_plan(plan, make_setup(tmp_path, base))
  assert set(out["evals"]) == {"r4", "r4_to_r4", "r4_to_r2"}
  assert out["rank"] == 4  # the trunk is untouched by the branches
  model = model_lib.make_model("tiny", lora_rank=4)
  batch = {k: jnp.asarray(np.stack([e[k] for e in copy_examples(4, 9)])) for k in ("tokens", "target_mask")}

  def logits(tag):
    lora, _ = orbax_io.load_adapter(tmp_path / "adapters" / tag)
    params = model_lib.merge_params(base, lora)
    hidden = model_lib.hidden_states(model, params, batch["tokens"])
    return model_lib.logits_at(params, hidden, jnp.broadcast_to(jnp.arange(LENGTH), (4, LENGTH)))

  before, after = logits("r4"), logits("r4_to_r4")
  np.testing.assert_allclose(after, before, atol=1e-4 * float(jnp.max(jnp.abs(before))))
  results = json.loads((tmp_path / train.RESULTS_FILE).read_text())
  assert results["evals"]["r4_to_r4"]["retention"] == pytest.approx(1.0, abs=1e-5)
  assert results["evals"]["r4_to_r2"]["retention"] < 1.0 and results["evals"]["r4"]["retention"] is None


def test_per_item_scores_are_stored_and_compared_with_intervals(base, tmp_path):
  """The evaluator's per-item scores land in results.json; the closing table prints each later
  evaluation minus the first with a paired bootstrap interval, starred when it excludes zero."""
  from lora_squeeze import evaluate as evaluate_lib

  def evaluate(rank, lora):
    items = [1.0] * 100 if rank == 4 else [1.0, 0.0] * 50  # rank 2 loses half the items
    return {"acc": float(np.mean(items)), evaluate_lib.PER_ITEM: {"acc": items}}

  lines = []
  plan = protocols.post_squeeze(r_src=4, steps=2, lr=STAGE_LR, warmup=STAGE_WARMUP, targets=(4, 2))
  train.execute_plan(plan, make_setup(tmp_path, base, evaluate=evaluate, lines=lines))
  results = json.loads((tmp_path / train.RESULTS_FILE).read_text())
  assert results["evals"]["r4_to_r2"]["per_item"] == {"acc": [1.0, 0.0] * 50}
  assert results["evals"]["r4_to_r2"]["metrics"] == {"acc": 0.5}
  header = next(line for line in lines if line.startswith("tag "))
  assert "acc (higher is better) minus r4 [95% CI]" in header
  row = next(line for line in lines if line.startswith("r4_to_r2 "))
  assert "-0.5000 [-0.6" in row and row.rstrip().endswith("*")
  same = next(line for line in lines if line.startswith("r4_to_r4 "))
  assert "+0.0000 [+0.0000, +0.0000]" in same and not same.rstrip().endswith("*")


def test_optimizer_options_reach_the_train_step(base, tmp_path):
  """Without Adafactor's parameter scale the zero-initialised b moves ~lr per step instead of
  ≤ lr·1e-3: the adapter grows far more in the same steps."""
  sizes = {}
  for scale in (True, False):
    setup = dataclasses.replace(
      make_setup(tmp_path / str(scale), base), optimizer=optim.OptimizerOptions(multiply_by_parameter_scale=scale)
    )
    train.execute_plan(protocols.direct(rank=2, steps=2, lr=0.01, warmup=0), setup)
    sizes[scale] = read_metrics(tmp_path / str(scale), event="stage_end")[0]["b_rms"]
  assert sizes[True] <= 2 * 0.01 * 1e-3 * (1 + 1e-5) and sizes[False] > 10 * sizes[True]


def test_zero_shot_evaluation_scores_the_base_model_and_changes_no_training(base, tmp_path):
  batch = {k: jnp.asarray(np.stack([e[k] for e in copy_examples(4, 9)])) for k in ("tokens", "target_mask")}
  plain = model_lib.make_model("tiny")
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (4, LENGTH))
  base_logits = model_lib.logits_at(base, model_lib.hidden_states(plain, base, batch["tokens"]), positions)

  def logits_of(rank, lora):
    params = model_lib.merge_params(base, lora)
    model = model_lib.make_model("tiny", lora_rank=rank)
    return {
      "logit_sum": float(
        jnp.sum(model_lib.logits_at(params, model_lib.hidden_states(model, params, batch["tokens"]), positions))
      )
    }

  direct = protocols.direct(rank=4, steps=3, lr=STAGE_LR, warmup=STAGE_WARMUP)
  with_zero_shot = protocols.validate_plan((Evaluate(tag="zero_shot"), *direct))
  out = train.execute_plan(with_zero_shot, make_setup(tmp_path / "a", base, evaluate=logits_of))
  ref = train.execute_plan(direct, make_setup(tmp_path / "b", base))
  zero_shot = out["evals"]["zero_shot"]
  assert zero_shot["rank"] == 4 and zero_shot["step"] == 0
  assert zero_shot["score"] == pytest.approx(float(jnp.sum(base_logits)), rel=1e-5)
  for got, want in zip(jax.tree.leaves(out["lora"]), jax.tree.leaves(ref["lora"])):
    np.testing.assert_array_equal(got, want)


def test_workdir_of_another_run_is_refused(base, tmp_path):
  ckpt_lib.claim_workdir(tmp_path, {"test": "some other run"})
  plan = protocols.direct(rank=4, steps=1, lr=STAGE_LR, warmup=STAGE_WARMUP)
  with pytest.raises(ckpt_lib.WorkdirConflictError, match=r"holds a different run \(config differs at test, workdir\)"):
    train.execute_plan(plan, make_setup(tmp_path, base))


def test_bad_batches_are_refused():
  good = {"tokens": np.ones((2, 4), np.int32), "target_mask": np.array([[0, 0, 1, 1], [0, 1, 1, 1]], bool)}
  train.check_batch(good, max_targets=3, step=0)
  with pytest.raises(ValueError, match="batch 5: a row has 3 target tokens > max_targets=2"):
    train.check_batch(good, max_targets=2, step=5)
  train.check_batch(good, max_targets=5, step=0, groups=1)
  with pytest.raises(ValueError, match="batch 7: a group of rows has 5 target tokens > max_targets=4"):
    train.check_batch(good, max_targets=4, step=7, groups=1)
  with pytest.raises(ValueError, match="batch 2: 2 rows cannot be split into groups=3 equal blocks"):
    train.check_batch(good, max_targets=None, step=2, groups=3)
  with pytest.raises(ValueError, match=r"batch 0: target_mask\[:, 0\] is True"):
    train.check_batch({**good, "target_mask": np.ones((2, 4), bool)}, max_targets=None, step=0)
  assert train.targets_bucket(good["target_mask"]) == 8
  assert train.targets_bucket(np.ones((1, 20), bool), minimum=8) == 24
  assert train.targets_bucket(np.ones((1, 25), bool), minimum=8) == 32
  assert train.targets_bucket(np.ones((4, 20), bool), groups=1) == 96  # 80 targets in one group
  assert train.targets_bucket(np.ones((4, 20), bool), groups=2) == 48
  assert [train.targets_bucket(np.ones((1, n), bool), minimum=1) for n in (1, 2, 3, 5, 7, 13)] == [1, 2, 3, 6, 8, 16]


def test_bf16_base_keeps_float32_lora_and_optimizer_state(base):
  model = model_lib.make_model("tiny", lora_rank=2)
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(3))
  batch = {k: jnp.asarray(np.stack([e[k] for e in copy_examples(4, 5)])) for k in ("tokens", "target_mask")}
  step = train.make_train_step(model, lr=STAGE_LR, warmup=STAGE_WARMUP, max_targets=8)
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    state = train.init_train_state(jax.tree.map(jnp.copy, lora), optim.make_optimizer(STAGE_LR, STAGE_WARMUP))
    state, metrics = step(state, jax.tree.map(lambda x: x.astype(dtype), base), batch)
    losses[dtype] = float(metrics["loss"])
    assert {x.dtype for x in jax.tree.leaves(state.lora)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)} == {
      jnp.dtype(jnp.float32)
    }
  assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-2)
