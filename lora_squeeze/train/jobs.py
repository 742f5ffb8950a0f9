"""The jobs the plan runner hands its items to, one object per job (kauldron style).

StageTrainer trains a Stage (its step loop, metrics and checkpoints), Precompiler compiles what
follows a Stage while it trains, SqueezeJob squeezes an adapter (and moves the optimizer state
with it), EvaluateJob scores an adapter and exports it to adapters/<tag>.
"""

from __future__ import annotations

import math
import pathlib
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lora_squeeze import adapter_size as adapter_size_lib
from lora_squeeze import checkpoint as ckpt_lib
from lora_squeeze import multihost
from lora_squeeze import optim
from lora_squeeze import protocols
from lora_squeeze import sharding as sharding_lib
from lora_squeeze.train import progress
from lora_squeeze.train import run_dir
from lora_squeeze.train import step as step_lib
from lora_squeeze.train.context import Checkpointer, Params, Position, RunContext


def squeeze_on_mesh(ctx: RunContext, lora: Params, item: protocols.Squeeze, key: jax.Array):
  """The adapter squeezed where it lies on the mesh: one compiled call, factors kept sharded."""
  from lora_squeeze import sharded_squeeze

  return sharded_squeeze.squeeze_on_mesh(
    lora,
    item.rank,
    mesh=ctx.mesh,
    method=item.method,
    key=key,
    precision=ctx.setup.squeeze_precision,
    min_shard_size=ctx.setup.min_shard_size,
  )


class SqueezeJob:
  """A Squeeze item: the adapter projected to the lower rank, its V_r logged and kept."""

  def __init__(self, ctx: RunContext):
    self.ctx = ctx

  def __call__(
    self, item: protocols.Squeeze, lora: Params, pos: Position, *, r_src: int, key: jax.Array, index: int, branch: bool
  ):
    ctx = self.ctx
    start = time.perf_counter()
    new_lora, report = squeeze_on_mesh(ctx, lora, item, key)
    seconds = time.perf_counter() - start
    record = {
      "event": "squeeze",
      "step": pos.global_step,
      "plan_index": index,
      "r_src": r_src,
      "r_tgt": item.rank,
      "method": item.method,
      "branch": branch,
      "overall_retention": float(report.overall_retention),
      "seconds": seconds,
      "retention_curve": [float(v) for v in report.retention_curve()],
      "modules": [{"path": m.path, "retention": float(m.retention)} for m in report.modules],
    }
    ctx.metrics.write(record)
    pos.squeezes.append(record)
    ctx.print(
      f"squeeze r{r_src} -> r{item.rank} ({item.method}): V_r = {report.overall_retention:.4f} "
      f"over {len(report.modules)} modules, {seconds:.2f}s"
    )
    return new_lora, float(report.overall_retention)

  def project_opt_state(self, opt_state, before: Params, after: Params, index: int):
    """The optimizer state moved across the squeeze plan[index], for the next Stage's optimizer."""
    from lora_squeeze import opt_state_projection

    ctx = self.ctx
    stage = next(p for p in ctx.plan[index:] if isinstance(p, protocols.Stage))
    optimizer = optim.make_optimizer(stage.lr, stage.warmup, ctx.setup.optimizer)
    new_state = opt_state_projection.project_opt_state(opt_state, optimizer, before, after)
    ctx.print(f"optimizer state projected into the squeezed basis (next stage: warmup {stage.warmup})")
    return sharding_lib.shard_params(jax.block_until_ready(new_state), ctx.mesh, min_size=ctx.setup.min_shard_size)


class EvaluateJob:
  """An Evaluate item: the adapter scored, exported to adapters/<tag>, a row in pos.evals."""

  def __init__(self, ctx: RunContext):
    self.ctx = ctx

  def __call__(self, item: protocols.Evaluate, lora: Params, pos: Position, rank: int, retention):
    from lora_squeeze import evaluate as evaluate_lib

    ctx = self.ctx
    metrics, per_item = {}, None
    if ctx.setup.evaluate is not None:
      raw = dict(ctx.setup.evaluate(rank, lora))
      per_item = raw.pop(
        evaluate_lib.PER_ITEM, None
      )  # per-example scores (results.json only: the bootstrap CIs need them)
      metrics = {k: float(v) for k, v in raw.items()}
    path = self.export(item.tag, lora, rank, pos)
    row = {
      "tag": item.tag,
      "rank": rank,
      "retention": retention,
      "step": pos.global_step,
      "metrics": metrics,
      "score": next(iter(metrics.values()), None),
      "adapter": str(path),
    }
    ctx.metrics.write({"event": "evaluate", **row})
    if per_item is not None:
      row["per_item"] = per_item
    pos.evals[item.tag] = row
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no evaluator"
    ctx.print(f"evaluate {item.tag} (rank {rank}): {shown}; adapter -> {path}")

  def export(self, tag: str, lora: Params, rank: int, pos: Position) -> pathlib.Path:
    path = run_dir.adapter_dir(self.ctx.workdir, tag)
    # The adapter is LoRA-sized: gathered whole (a collective, every process joins it), it is
    # written by process 0 as one portable folder, the same bytes a single-process run writes.
    host_lora = multihost.gather_to_host(lora)
    multihost.on_writer(
      lambda: self.write_adapter(path, host_lora, rank, pos), error_types=(ckpt_lib.WorkdirConflictError, ValueError)
    )
    return path

  def write_adapter(self, path: pathlib.Path, host_lora: Params, rank: int, pos: Position) -> None:
    from lora_squeeze.adapters import orbax_io

    if path.exists():
      # A crash between the export and the next checkpoint: the adapter is this run's own.
      _, meta = orbax_io.load_adapter(path)
      if meta.get("run_id") == self.ctx.run_id and meta.get("global_step") == pos.global_step:
        return
      raise ckpt_lib.WorkdirConflictError(f"adapter {path} exists and was not written by this run at this step")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
      **self.ctx.setup.adapter_metadata,
      "tag": path.name,
      "rank": rank,
      "run_id": self.ctx.run_id,
      "global_step": pos.global_step,
    }
    orbax_io.save_adapter(path, host_lora, metadata)


class Precompiler:
  """Compiles what follows a Stage in a background thread while it trains: its squeezes (run once
  on a throw-away adapter of the right shapes) and the next Stage's train step for the current
  batch shape. The compilations land in JAX's caches; a failure only costs the time saved."""

  def __init__(self, ctx: RunContext):
    self.ctx = ctx
    self._thread: threading.Thread | None = None

  def upcoming(self, index: int) -> tuple[list[tuple[int, protocols.Squeeze]], protocols.Stage | None]:
    """The squeezes (with their source rank) before the next Stage after plan[index], and that Stage."""
    plan = self.ctx.plan
    rank, squeezes = plan[index].rank, []
    for item in plan[index + 1 :]:
      if isinstance(item, protocols.Stage):
        return squeezes, item
      if isinstance(item, protocols.Restart):
        rank = item.rank
      elif isinstance(item, protocols.Squeeze):
        squeezes.append((rank, item))
        rank = item.rank
      elif isinstance(item, protocols.Branch):
        branch_rank = rank
        for sub in item.items:
          if isinstance(sub, protocols.Squeeze):
            squeezes.append((branch_rank, sub))
            branch_rank = sub.rank
    return squeezes, None

  def start(self, index: int, batch: Mapping[str, np.ndarray], max_targets: int, groups: int) -> None:
    ctx = self.ctx
    squeezes, stage = self.upcoming(index)
    precompile = ctx.setup.precompile
    if precompile is None:
      precompile = jax.default_backend() != "cpu"
    if not precompile or (not squeezes and stage is None):
      return
    batch_sharding = sharding_lib.batch_sharding(ctx.mesh)
    abstract_batch = {
      k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sharding) for k, v in batch.items()
    }

    def compile_ahead():
      from lora_squeeze import sharded_squeeze

      try:
        for r_src, squeeze in squeezes:
          sharded_squeeze.compile_on_mesh(  # compiled, not run: no collective from this thread
            ctx.fresh_lora(r_src),
            squeeze.rank,
            mesh=ctx.mesh,
            method=squeeze.method,
            key=ctx.plan_key,
            precision=ctx.setup.squeeze_precision,
            min_shard_size=ctx.setup.min_shard_size,
          )
        if stage is not None:
          optimizer = optim.make_optimizer(stage.lr, stage.warmup, ctx.setup.optimizer)
          state = step_lib.init_train_state(
            ctx.fresh_lora(stage.rank), optimizer, ctx.mesh, min_shard_size=ctx.setup.min_shard_size
          )
          step_lib.compile_step(
            ctx.model(stage.rank),
            ckpt_lib.abstract_like(state),
            ctx.base,
            abstract_batch,
            lr=stage.lr,
            warmup=stage.warmup,
            max_targets=max_targets,
            optimizer_options=ctx.setup.optimizer,
            groups=groups,
          )
      except Exception as e:
        ctx.print(f"ahead-of-time compilation of the next stage failed ({e!r}); it compiles when it starts")

    self._thread = threading.Thread(target=compile_ahead, name="precompile", daemon=True)
    self._thread.start()

  def wait(self) -> None:
    """Joins the background compilation (so nothing compiles twice)."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None


class StageTrainer:
  """A Stage item: `steps` jitted steps from the current adapter, metrics to metrics.jsonl and the
  console, checkpoints every `checkpoint_every` steps."""

  def __init__(self, ctx: RunContext, checkpointer: Checkpointer, precompiler: Precompiler):
    self.ctx = ctx
    self.checkpointer = checkpointer
    self.precompiler = precompiler

  def __call__(self, item: protocols.Stage, index: int, lora: Params, opt_state, pos: Position):
    """Trains plan[index] = item from pos.stage_step on; returns the adapter and optimizer state."""
    ctx, setup = self.ctx, self.ctx.setup
    optimizer = optim.make_optimizer(item.lr, item.warmup, setup.optimizer)
    model = ctx.model(item.rank)
    if opt_state is None:
      state = step_lib.init_train_state(lora, optimizer, ctx.mesh, min_shard_size=setup.min_shard_size)
    else:
      step = sharding_lib.place(
        np.int32(pos.stage_step), jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
      )
      state = step_lib.TrainState(lora=lora, opt_state=opt_state, step=step)
    schedule = optim.warmup_constant(item.lr, item.warmup)
    n_stages = sum(isinstance(p, protocols.Stage) for p in ctx.plan)
    stage_no = sum(isinstance(p, protocols.Stage) for p in ctx.plan[: index + 1])
    window_start, window_tokens, window_steps = None, 0, 0
    # Metrics stay on the device until a logging or checkpoint step (or the stage's first and last
    # step) pulls them all at once: between those, the host dispatches steps without waiting.
    pending: list[dict[str, Any]] = []
    while pos.stage_step < item.steps:
      batch = setup.batches[pos.global_step - pos.data_start]
      step_lib.check_batch(batch, max_targets=setup.max_targets, step=pos.global_step)
      tokens = step_lib.batch_tokens(batch)
      # The loss gathers each device's rows together (step.target_nll): one block per device, K
      # the bucket of the block with the most targets, or setup.max_targets per row of the block.
      groups = ctx.mesh.devices.size
      if setup.max_targets:
        max_targets = setup.max_targets * (len(batch["target_mask"]) // groups)
      else:
        max_targets = step_lib.targets_bucket(batch["target_mask"], groups=groups)
      train_step = step_lib.make_train_step(
        model,
        lr=item.lr,
        warmup=item.warmup,
        max_targets=max_targets,
        optimizer_options=setup.optimizer,
        groups=groups,
      )
      state, metrics = train_step(state, ctx.base, sharding_lib.shard_batch(batch, ctx.mesh))
      lr = float(schedule(pos.stage_step))
      pos.stage_step += 1
      pos.global_step += 1
      pending.append({"step": pos.global_step, "tokens": tokens, "lr": lr, "device": metrics})
      first = window_start is None
      save_now = pos.stage_step < item.steps and pos.global_step % setup.checkpoint_every == 0
      log_now = pos.stage_step % setup.log_every == 0 or pos.stage_step == item.steps
      if not (first or save_now or log_now):
        window_tokens += tokens
        window_steps += 1
        continue
      # Host sync: the NaN check runs on every pulled step before a checkpoint can store it.
      fetched = self.fetch_metrics(pending, stage_no=stage_no, n_stages=n_stages, item=item)
      pending = []
      now = time.perf_counter()
      if first:  # the first step of a stage includes compilation; not timed
        window_start = now
        self.precompiler.start(index, batch, max_targets, groups)
      else:
        window_tokens += tokens
        window_steps += 1
      elapsed = now - window_start
      tokens_per_s = window_tokens / elapsed if window_steps else None
      steps_per_s = window_steps / elapsed if window_steps else float("nan")
      for record in fetched:
        ctx.metrics.write(
          {
            "event": "train",
            "step": record["step"],
            "stage": stage_no,
            "rank": item.rank,
            "loss": record["loss"],
            "grad_norm": record["grad_norm"],
            "lr": record["lr"],
            "target_tokens": record["target_tokens"],
            "tokens": record["tokens"],
            "tokens_per_s": tokens_per_s,
          }
        )
      if log_now:
        last = fetched[-1]
        eta = (ctx.total_steps - pos.global_step) / steps_per_s if window_steps else float("nan")
        ctx.print(
          progress.train_line(
            global_step=pos.global_step,
            total_steps=ctx.total_steps,
            stage_no=stage_no,
            n_stages=n_stages,
            rank=item.rank,
            loss=last["loss"],
            grad_norm=last["grad_norm"],
            lr=lr,
            tokens_per_s=tokens_per_s,
            eta_seconds=eta,
          )
        )
      if save_now:
        self.checkpointer.save(pos, state.lora, state.opt_state)
    return state.lora, state.opt_state

  def log_adapter_size(self, item: protocols.Stage, lora: Params, pos: Position) -> None:
    """A "stage_end" record with the adapter's ‖ΔW‖_F and factor RMS: shows that (and how far) it moved."""
    # A collective (every process calls it): the factors may span the devices of several processes.
    size = adapter_size_lib.adapter_size(multihost.gather_to_host(lora))
    self.ctx.metrics.write({"event": "stage_end", "step": pos.global_step, "rank": item.rank, "lr": item.lr, **size})
    self.ctx.print(
      f"stage end (rank {item.rank}, step {pos.global_step}): ||ΔW||_F {size['delta_w_fro']:.4g}, "
      f"RMS a {size['a_rms']:.3g}, RMS b {size['b_rms']:.3g}"
    )

  def fetch_metrics(
    self, pending: list[dict[str, Any]], *, stage_no: int, n_stages: int, item: protocols.Stage
  ) -> list[dict[str, Any]]:
    """Pulls the metrics of the `pending` steps to the host (one transfer) as records of floats.

    Raises:
      NonFiniteLossError: at the first step with a NaN/inf loss; the records before it are written.
    """
    values = jax.device_get([p["device"] for p in pending])
    records = []
    for p, metrics in zip(pending, values):
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        for record in records:
          self.ctx.metrics.write({"event": "train", "stage": stage_no, "rank": item.rank, **record})
        raise step_lib.NonFiniteLossError(
          f"loss is {loss} at global step {p['step'] - 1} (stage {stage_no}/{n_stages}, rank {item.rank}, "
          f"lr {item.lr}); stopped. The last good checkpoint in {self.checkpointer.directory} is kept "
          f"(number {self.checkpointer.latest()}); lower the learning rate or check the data"
        )
      records.append(
        {
          "step": p["step"],
          "loss": loss,
          "grad_norm": float(metrics["grad_norm"]),
          "lr": p["lr"],
          "target_tokens": float(metrics["target_tokens"]),
          "tokens": p["tokens"],
        }
      )
    return records
