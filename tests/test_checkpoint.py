"""Run checkpoints (Orbax) and the one-run-per-workdir guard."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import checkpoint as ckpt_lib
from lora_squeeze import optim


def lora_tree(rank, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "layer_0": {"q": {"lora": {"a": jax.random.normal(k1, (32, rank)), "b": jax.random.normal(k2, (rank, 4, 8))}}}
  }


def test_claim_workdir_new_same_and_different(tmp_path):
  config = {"model": "tiny", "steps": 10, "ranks": [8, 4]}
  assert ckpt_lib.claim_workdir(tmp_path / "run", config) is False
  assert json.loads((tmp_path / "run" / ckpt_lib.RUN_CONFIG_FILE).read_text()) == config
  assert ckpt_lib.claim_workdir(tmp_path / "run", dict(config)) is True
  with pytest.raises(
    ckpt_lib.WorkdirConflictError,
    match=r"holds a different run \(config differs at ranks, steps\); choose a new --workdir",
  ):
    ckpt_lib.claim_workdir(tmp_path / "run", {**config, "steps": 20, "ranks": [8, 2]})


def test_claim_workdir_refuses_foreign_run_files_but_not_other_files(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "cell.json").write_text("{}")  # e.g. an experiment driver's record
  assert ckpt_lib.claim_workdir(tmp_path / "a", {"x": 1}) is False
  (tmp_path / "b" / "adapters").mkdir(parents=True)
  with pytest.raises(ckpt_lib.WorkdirConflictError, match="holds adapters but no run_config.json"):
    ckpt_lib.claim_workdir(tmp_path / "b", {"x": 1})


def test_checkpoint_round_trip_with_optimizer_state(tmp_path):
  lora = lora_tree(4)
  optimizer = optim.make_optimizer(0.01, 10)
  opt_state = optimizer.init(lora)
  _, opt_state = optimizer.update(jax.tree.map(jnp.ones_like, lora), opt_state, lora)  # non-trivial state
  checkpoints = ckpt_lib.RunCheckpoints(tmp_path, max_to_keep=2)
  assert checkpoints.latest() is None and checkpoints.restore_meta() is None
  meta = {"position": {"item": 2, "stage_step": 3}, "note": "x"}
  assert checkpoints.save(lora=lora, opt_state=opt_state, meta=meta) == 0
  assert checkpoints.save(lora=lora_tree(2, 1), opt_state=None, meta={"position": {"item": 3}}) == 1
  assert checkpoints.restore_meta(0) == meta
  restored_lora, restored_opt = checkpoints.restore(
    0, abstract_lora=ckpt_lib.abstract_like(lora), abstract_opt_state=ckpt_lib.abstract_like(opt_state)
  )
  assert jax.tree.structure(restored_opt) == jax.tree.structure(opt_state)
  for got, want in zip(jax.tree.leaves((restored_lora, restored_opt)), jax.tree.leaves((lora, opt_state))):
    np.testing.assert_array_equal(got, want)
  lora1, none = checkpoints.restore(1, abstract_lora=ckpt_lib.abstract_like(lora_tree(2)), abstract_opt_state=None)
  assert none is None and lora1["layer_0"]["q"]["lora"]["a"].shape == (32, 2)
  checkpoints.save(lora=lora, opt_state=None, meta={})
  assert checkpoints.latest() == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # max_to_keep
  checkpoints.close()


def test_write_json_atomic_leaves_no_temporary(tmp_path):
  ckpt_lib.write_json_atomic(tmp_path / "results.json", {"a": [1, 2]})
  ckpt_lib.write_json_atomic(tmp_path / "results.json", {"a": [3]})
  assert json.loads((tmp_path / "results.json").read_text()) == {"a": [3]}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_bad_max_to_keep(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep must be a positive integer, got 0"):
    ckpt_lib.RunCheckpoints(tmp_path, max_to_keep=0)
