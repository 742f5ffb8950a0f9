"""What the jobs of a plan run share: its setup, where it stands, and its checkpoints.

RunSetup is everything a runner needs besides the plan; RunContext is what one run derives from
it (mesh, keys, sharded base, the metrics log, models by rank); Position is where the run stands
(the checkpoint's meta record); Checkpointer saves it and resumes from the newest good checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax

from lora_squeeze import checkpoint as ckpt_lib
from lora_squeeze import model as model_lib
from lora_squeeze import multihost
from lora_squeeze import optim
from lora_squeeze import protocols
from lora_squeeze import sharding as sharding_lib
from lora_squeeze.param_trees import Params
from lora_squeeze.train import run_dir
from lora_squeeze.train import step as step_lib

# (rank, lora_params) -> metrics of the adapter, e.g. {"accuracy": 0.71}; the first key is its score.
Evaluator = Callable[[int, Params], Mapping[str, float]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSetup:
  """Everything a plan runner needs besides the plan.

  Attributes:
    model_for_rank: rank -> LoRA-wrapped model (model.make_model(name, lora_rank=rank, ...)).
    base_params: the frozen base params (any float dtype; placed on the mesh by the runner).
    batches: random-access global batches, batches[i] for global step i (see batch_dataset).
    workdir: the run folder (train.run_dir: checkpoints/, adapters/, metrics.jsonl, results.json).
    key: the run's root PRNG key; split per LoRA init, per squeeze (by plan index) and per data.
    max_targets: static K of the loss gather (>= target tokens of any example); None = per batch
      the next power of two of its most target tokens per row (targets_bucket).
    evaluate: scores an adapter; None exports adapters without scores.
    run_config: JSON-able config of the run (the workdir guard compares it; stored everywhere).
    adapter_metadata: extra metadata for exported adapters (model name, targets, task ...).
    mesh: device mesh; None = all devices on the data axis.
    checkpoint_every: save every this many steps (and at each plan boundary).
    log_every: console line every this many steps (metrics.jsonl gets every step).
    max_to_keep: checkpoints kept.
    precompile: while a stage trains, compile the squeezes and the train step of the next stage
      in a background thread, hiding the recompilation of a rank change behind training. None =
      on for GPU/TPU, off on CPU (there the compiler competes with training for the same cores).
    printer: where progress lines go (process 0's lines only).
    min_shard_size: leaves with at least this many scalars are split over the fsdp axis
      (sharding.param_spec); LoRA factors and their optimizer state included.
    optimizer_state_at_squeeze: "reset" (a fresh optimizer state after each squeeze) or "project"
      (the state moved into the squeezed basis, lora_squeeze.opt_state_projection).
    initial_lora: the adapter the first stage starts from (any ranks; fitted to the stage's rank by
      adapters.import_peft.fit_initial_adapter); None = a fresh LoRA.
    optimizer: Adafactor's settings (the training config's `optim` keys).
  """

  model_for_rank: Callable[[int], Any]
  base_params: Params
  batches: Any
  workdir: pathlib.Path
  key: jax.Array
  max_targets: int | None = None
  evaluate: Evaluator | None = None
  run_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  adapter_metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  mesh: jax.sharding.Mesh | None = None
  checkpoint_every: int = 500
  log_every: int = 10
  max_to_keep: int = 2
  precompile: bool | None = None
  squeeze_precision: str = "auto"  # qr_core's arithmetic: squeeze.PRECISIONS
  printer: Callable[[str], None] = print
  min_shard_size: int = 1 << 16
  optimizer_state_at_squeeze: str = "reset"
  initial_lora: Params | None = None
  optimizer: optim.OptimizerOptions = optim.DEFAULT_OPTIONS


@dataclasses.dataclass(kw_only=True)
class Position:
  """Where a run stands; stored as the checkpoint's meta record."""

  item: int = 0  # index of the plan item to execute next (or the Stage being trained)
  stage_step: int = 0  # steps done in plan[item] when it is a Stage
  global_step: int = 0  # training steps done in total = index of the next batch
  rank: int = 0  # rank of the current adapter (0 before the first stage)
  data_start: int = 0  # global step of the last Restart: a Stage reads batches[global_step - data_start]
  retention: float | None = None  # V_r of the last squeeze applied to the trunk adapter
  evals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  squeezes: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class RunContext:
  """One run's plan and setup with what follows from them: mesh, keys, the sharded base, the
  metrics log, a model per rank."""

  def __init__(self, plan: protocols.Plan, setup: RunSetup):
    self.plan = protocols.validate_plan(plan)
    self.setup = setup
    self.workdir = pathlib.Path(setup.workdir)
    self.mesh = setup.mesh or sharding_lib.make_mesh()
    self.total_steps = protocols.plan_steps(self.plan)
    self.run_id = run_dir.run_id(setup.run_config)
    self.init_key, self.plan_key, _, _ = step_lib.run_keys(setup.key)
    self.writer = multihost.is_writer()
    self.base = sharding_lib.shard_params(setup.base_params, self.mesh, min_size=setup.min_shard_size)
    self.metrics = run_dir.MetricsLog(run_dir.metrics_path(self.workdir), enabled=self.writer)
    self._models: dict[int, Any] = {}

  def model(self, rank: int):
    if rank not in self._models:
      self._models[rank] = self.setup.model_for_rank(rank)
    return self._models[rank]

  def fresh_lora(self, rank: int) -> Params:
    lora = model_lib.init_lora_params(self.model(rank), self.setup.base_params, key=self.init_key)
    if self.setup.initial_lora is not None:
      from lora_squeeze.adapters import import_peft

      lora = import_peft.fit_initial_adapter(self.setup.initial_lora, jax.device_get(lora), where="initial_lora")
    return sharding_lib.shard_params(lora, self.mesh, min_size=self.setup.min_shard_size)

  def print(self, line: str) -> None:
    if self.writer:
      self.setup.printer(line)

  def carries_state(self, index: int) -> bool:
    """Whether an optimizer state is carried into plan[index] (optimizer_state_at_squeeze='project')."""
    from lora_squeeze import opt_state_projection

    mode = opt_state_projection.check_mode(self.setup.optimizer_state_at_squeeze)
    return mode == "project" and opt_state_projection.carried_at(self.plan, index)


class Checkpointer:
  """Saves the run's position with its adapter (and optimizer state) and resumes from the newest
  checkpoint that restores."""

  def __init__(self, ctx: RunContext):
    self.ctx = ctx
    self.checkpoints = ckpt_lib.RunCheckpoints(run_dir.checkpoints_dir(ctx.workdir), max_to_keep=ctx.setup.max_to_keep)

  @property
  def directory(self):
    return self.checkpoints.directory

  def latest(self):
    return self.checkpoints.latest()

  def save(self, pos: Position, lora: Params, opt_state) -> None:
    meta = {
      "position": dataclasses.asdict(pos),
      "run_id": self.ctx.run_id,
      "config": self.ctx.setup.run_config,
      "metrics_bytes": self.ctx.metrics.size(),
    }
    self.checkpoints.save(lora=lora, opt_state=opt_state, meta=meta)

  def close(self) -> None:
    self.checkpoints.close()

  def resume(self) -> tuple[Position, Params | None, Any]:
    # The newest checkpoint that restores; a damaged newer one (killed disk, truncated file) is
    # named and skipped rather than stopping the run.
    bad = []
    for number in self.checkpoints.numbers():
      try:
        meta, lora, opt_state = self.checkpoints.restore_verified(number, self._restore_targets)
      except ckpt_lib.CorruptCheckpointError as e:
        bad.append(str(e))
        self.ctx.print(f"warning: {e}; trying the previous checkpoint")
        continue
      pos = Position(**meta["position"])
      self.ctx.metrics.truncate_after(pos.global_step, meta.get("metrics_bytes"))
      self.ctx.print(
        f"resumed from checkpoint {number}: plan item {pos.item}/{len(self.ctx.plan)}, "
        f"global step {pos.global_step}, rank {pos.rank}"
      )
      return pos, lora, opt_state
    if bad:
      raise ckpt_lib.CorruptCheckpointError(
        f"no checkpoint in {self.checkpoints.directory} can be restored ({' | '.join(bad)}); move the folder "
        "away to start the run afresh"
      )
    return Position(), None, None

  def _restore_targets(self, meta: Mapping[str, Any]) -> tuple[Any, Any]:
    """Restore targets (shapes, dtypes, shardings) of a checkpoint: a fresh adapter and optimizer at
    its rank; both are LoRA-sized, so building them is cheap."""
    ctx = self.ctx
    if meta["run_id"] != ctx.run_id:
      raise ckpt_lib.WorkdirConflictError(f"checkpoints in {self.checkpoints.directory} belong to another run")
    pos = Position(**meta["position"])
    template = ctx.fresh_lora(pos.rank)
    abstract_opt = None
    item = ctx.plan[pos.item] if pos.item < len(ctx.plan) else None
    if (isinstance(item, protocols.Stage) and pos.stage_step > 0) or ctx.carries_state(pos.item):
      item = next(p for p in ctx.plan[pos.item :: -1] if isinstance(p, protocols.Stage))
      optimizer = optim.make_optimizer(item.lr, item.warmup, ctx.setup.optimizer)
      abstract_opt = ckpt_lib.abstract_like(
        step_lib.init_train_state(template, optimizer, ctx.mesh, min_shard_size=ctx.setup.min_shard_size).opt_state
      )
    return ckpt_lib.abstract_like(template), abstract_opt
