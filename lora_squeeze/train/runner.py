"""The plan runner: one loop for every protocol (lora_squeeze.protocols builds the plans; this
module only runs them). The loop hands each plan item to the job named for it (train.jobs), and
saves the run's position after every item (train.context.Checkpointer), so a run resumes
mid-stage and mid-anneal.

    execute_plan(plan, setup)      setup: train.context.RunSetup (train.setup builds it from a config)
      Runner.run: resume -> for each item: StageTrainer | SqueezeJob | EvaluateJob | Branch of those
                  | Restart (a fresh adapter and optimizer, the data from its first batch)
                  -> checkpoint -> results.json (train.run_dir) -> the final table (train.progress)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from lora_squeeze import checkpoint as ckpt_lib
from lora_squeeze import multihost
from lora_squeeze import protocols
from lora_squeeze.train import jobs
from lora_squeeze.train import progress
from lora_squeeze.train import run_dir
from lora_squeeze.train.context import Checkpointer, Position, RunContext, RunSetup


class Runner:
  """Executes one plan; see execute_plan."""

  def __init__(self, plan: protocols.Plan, setup: RunSetup):
    self.ctx = RunContext(plan, setup)
    self.checkpointer = Checkpointer(self.ctx)
    self.precompiler = jobs.Precompiler(self.ctx)
    self.train_stage = jobs.StageTrainer(self.ctx, self.checkpointer, self.precompiler)
    self.squeeze = jobs.SqueezeJob(self.ctx)
    self.evaluate = jobs.EvaluateJob(self.ctx)

  def run(self) -> dict[str, Any]:
    ctx, plan = self.ctx, self.ctx.plan
    pos, lora, opt_state = self.checkpointer.resume()
    for index in range(pos.item, len(plan)):
      item = plan[index]
      if not isinstance(item, protocols.Evaluate):
        self.precompiler.wait()
      if isinstance(item, protocols.Stage):
        if lora is None:
          lora, pos.rank = ctx.fresh_lora(item.rank), item.rank
        lora, last_opt_state = self.train_stage(item, index, lora, opt_state, pos)
        opt_state = last_opt_state if ctx.carries_state(index + 1) else None
        self.train_stage.log_adapter_size(item, lora, pos)
      elif isinstance(item, protocols.Squeeze):
        key = jax.random.fold_in(ctx.plan_key, index)
        before = lora
        lora, pos.retention = self.squeeze(item, lora, pos, r_src=pos.rank, key=key, index=index, branch=False)
        if opt_state is not None:
          opt_state = self.squeeze.project_opt_state(opt_state, before, lora, index)
        pos.rank = item.rank
      elif isinstance(item, protocols.Restart):
        lora, opt_state = ctx.fresh_lora(item.rank), None
        pos.rank, pos.retention, pos.data_start = item.rank, None, pos.global_step
      elif isinstance(item, protocols.Evaluate):
        if lora is None:  # before the first Stage: the fresh adapter (ΔW = 0) at that Stage's rank
          rank = next(p.rank for p in plan if isinstance(p, protocols.Stage))
          lora, pos.rank = ctx.fresh_lora(rank), rank
        self.evaluate(item, lora, pos, pos.rank, pos.retention)
      else:
        self.run_branch(item, index, lora, pos)
      pos.item, pos.stage_step = index + 1, 0
      self.checkpointer.save(pos, lora, opt_state)
      if isinstance(item, (protocols.Evaluate, protocols.Branch)):
        self.write_results(pos, complete=False)
    self.precompiler.wait()
    self.write_results(pos, complete=True)
    for line in progress.table_lines(pos.evals, baselines=protocols.baseline_tags(plan)):
      ctx.print(line)
    self.checkpointer.close()
    return {"evals": pos.evals, "global_step": pos.global_step, "lora": lora, "rank": pos.rank}

  def run_branch(self, item: protocols.Branch, index: int, lora, pos: Position) -> None:
    """A Branch's squeezes and evaluations on a copy of the trunk adapter (the trunk continues)."""
    branch_lora, rank, retention = lora, pos.rank, pos.retention
    for sub_index, sub in enumerate(item.items):
      if isinstance(sub, protocols.Squeeze):
        key = jax.random.fold_in(jax.random.fold_in(self.ctx.plan_key, index), sub_index)
        branch_lora, retention = self.squeeze(sub, branch_lora, pos, r_src=rank, key=key, index=index, branch=True)
        rank = sub.rank
      else:
        self.evaluate(sub, branch_lora, pos, rank, retention)

  def write_results(self, pos: Position, *, complete: bool) -> None:
    if not self.ctx.writer:
      return
    run_dir.write_results(
      self.ctx.workdir,
      complete=complete,
      run_id=self.ctx.run_id,
      global_step=pos.global_step,
      evals=pos.evals,
      squeezes=pos.squeezes,
      config=self.ctx.setup.run_config,
    )


def execute_plan(plan: Sequence[protocols.PlanItem], setup: RunSetup) -> dict[str, Any]:
  """Executes `plan` into `setup.workdir`, resuming from its newest checkpoint when there is one.

  Stage: fresh Adafactor (shapes are per rank), `steps` jitted steps, checkpoints every
  `checkpoint_every` steps. Squeeze: sharded_squeeze.squeeze_on_mesh (lora_tree.squeeze_tree
  on the factors where they lie on the mesh) with the key fold_in(plan_key, plan index); V_r
  (Eq. 10) overall and per module goes to metrics.jsonl.
  Evaluate: setup.evaluate(rank, lora), export through adapters.orbax_io.save_adapter to
  adapters/<tag>, a row in results.json. Branch: its items on a copy; the trunk continues.
  Restart: a fresh adapter at its rank (the same initialisation as the first), a fresh optimizer,
  and the next Stage reads the batches from the first one again.
  A checkpoint follows every plan item, so a run resumes mid-stage and mid-anneal.

  Returns:
    {"evals": tag -> row, "global_step", "lora": final trunk adapter, "rank"}.

  Raises:
    NonFiniteLossError: NaN/inf loss (the last good checkpoint stays).
  """
  multihost.on_writer(
    lambda: ckpt_lib.claim_workdir(setup.workdir, setup.run_config),
    error_types=(ckpt_lib.WorkdirConflictError, ValueError),
  )
  return Runner(tuple(plan), setup).run()
