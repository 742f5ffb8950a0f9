"""From a config (lora_squeeze/config_lib.py schema) to a run: the model, data and evaluator it
names become a RunSetup, its protocol's plan is built, and the runner executes it."""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_squeeze import config_lib
from lora_squeeze import model as model_lib
from lora_squeeze import multihost
from lora_squeeze import optim
from lora_squeeze import protocols
from lora_squeeze import sharding as sharding_lib
from lora_squeeze.train import step as step_lib
from lora_squeeze.train.context import Evaluator, RunSetup
from lora_squeeze.train.runner import execute_plan


def setup_from_config(
  config,
  *,
  workdir: str | pathlib.Path,
  plan: Sequence[protocols.PlanItem],
  evaluate: Evaluator | None = None,
  printer: Callable[[str], None] = print,
) -> RunSetup:
  """Loads the model, data and evaluator a config names (see lora_squeeze/config_lib.py for the keys).

  Args:
    config: a validated training config.
    workdir: the run folder.
    plan: the plan the run executes (stored with the config in the run's identity).
    evaluate: overrides the task's evaluator (None = make_evaluator: the task's eval split).
    printer: progress lines.
  """
  from lora_squeeze.data import batching, registry as tasks
  from lora_squeeze.weights import tokenizer as tokenizer_lib

  root = jax.random.key(config.seed)
  dtype = jnp.dtype(config.dtype)
  task = tasks.get_task(config.task)
  text_only = task.modality == "text"
  image_size = None if text_only else config.image_size
  if config.model in ("tiny", "tiny_vision"):
    base = model_lib.init_base_params(config.model, key=step_lib.run_keys(root)[3], dtype=dtype, text_only=text_only)
  else:
    base = model_lib.load_base_params(
      config.model, checkpoint=config.checkpoint or None, dtype=dtype, text_only=text_only
    )
  targets = tuple(config.lora_targets)
  model_for_rank = functools.partial(_lora_model, config.model, targets=targets, text_only=text_only)
  tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer or None)
  source, data_dir = config.data_source or None, config.data_dir or None
  train_split = task.load("train", source=source, data_dir=data_dir)
  n_train = config.train_examples or len(train_split)
  examples = [train_split[i] for i in range(min(n_train, len(train_split)))]
  batches = batching.train_batches(
    examples,
    tokenizer,
    batch_size=config.batch_size,
    max_len=config.max_len,
    seed=step_lib.data_seed(root),
    template=config.template,
    buckets=tuple(config.buckets),
    image_size=image_size,
  )
  if evaluate is None:
    evaluate = make_evaluator(config, base=base, model_for_rank=model_for_rank, tokenizer=tokenizer, printer=printer)
  mesh_config = config.get("mesh", None) or {}
  mesh = sharding_lib.make_mesh(data=mesh_config.get("data", -1), fsdp=mesh_config.get("fsdp", 1))
  return RunSetup(
    model_for_rank=model_for_rank,
    base_params=base,
    batches=batches,
    workdir=pathlib.Path(workdir),
    key=root,
    evaluate=evaluate,
    run_config=run_identity(config, plan),
    adapter_metadata={
      "model": config.model,
      "targets": list(targets),
      "task": config.task,
      "protocol": config.protocol,
    },
    mesh=mesh,
    initial_lora=_initial_lora(config.get("init_adapter", "")),
    checkpoint_every=config.checkpoint_every,
    log_every=config.log_every,
    printer=printer,
    optimizer_state_at_squeeze=config.get("optimizer_state_at_squeeze", "reset"),
    squeeze_precision=config.squeeze.get("precision", "auto"),
    optimizer=optim.OptimizerOptions(**config.get("optim", {})),
  )


def make_evaluator(
  config,
  *,
  base: Any,
  model_for_rank: Callable[[int], Any],
  tokenizer: Any,
  data_source: str | None = None,
  printer: Callable[[str], None] = print,
) -> Evaluator:
  """The evaluator of config's task on the eval split of `data_source` (None: config.data_source),
  over already loaded base weights and tokenizer.

  setup_from_config builds its run's evaluator with it; a caller that scores the same run on a
  second split (experiments/pilot.py --test_source) passes the setup's base and model_for_rank and
  another source instead of loading the model again.
  """
  from lora_squeeze import evaluate as evaluate_lib
  from lora_squeeze.data import registry as tasks

  task = tasks.get_task(config.task)
  text_only = task.modality == "text"
  source = (config.data_source if data_source is None else data_source) or None
  eval_split = task.load("eval", source=source, data_dir=config.data_dir or None)
  n_eval = min(config.eval.examples or len(eval_split), len(eval_split))
  # A float32 base takes the adapter folded in: one compiled forward pass for every rank a plan
  # evaluates (a bfloat16 base would lose most of a small ΔW's bits, so it keeps the LoRA model).
  plain_model = (
    model_lib.make_model(config.model, text_only=text_only) if jnp.dtype(config.dtype) == jnp.float32 else None
  )
  return evaluate_lib.make_evaluator(
    model_for_rank,
    base,
    tokenizer,
    task,
    [eval_split[i] for i in range(n_eval)],
    plain_model=plain_model,
    max_len=config.max_len,
    batch_size=config.eval.batch_size,
    template=config.template,
    buckets=tuple(config.buckets),
    image_size=None if text_only else config.image_size,
    progress=printer if multihost.is_writer() else None,  # progress lines: process 0's only
  )


def _initial_lora(path: str) -> Any:
  """The adapter of config.init_adapter (a lora-squeeze adapter folder), or None for ""."""
  if not path:
    return None
  from lora_squeeze.adapters import orbax_io

  return orbax_io.load_adapter(path)[0]


def _lora_model(name: str, rank: int, *, targets: tuple[str, ...], text_only: bool):
  return model_lib.make_model(name, lora_rank=rank, lora_targets=targets, text_only=text_only)


def run_identity(config, plan: Sequence[protocols.PlanItem]) -> dict[str, Any]:
  """What makes a run the same run: its config and its plan, as JSON data (of `optim`, only the
  keys the chosen optimizer reads: optim.identity_keys)."""
  record = config.to_dict()
  if isinstance(record.get("optim"), dict):
    record["optim"] = optim.identity_keys(record["optim"])
  return json.loads(json.dumps({"config": record, "plan": protocols.plan_record(plan)}, default=str))


def run_plan(
  plan: Sequence[protocols.PlanItem],
  *,
  config,
  workdir: str | pathlib.Path,
  evaluate: Evaluator | None = None,
  printer: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Executes `plan` with the model, data and evaluation of `config` into `workdir` (resuming
  when the workdir holds this same run). config_lib.validate(config) runs first."""
  config_lib.validate(config)
  setup = setup_from_config(config, workdir=workdir, plan=plan, evaluate=evaluate, printer=printer)
  return execute_plan(plan, setup)


def run(config, *, workdir: str | pathlib.Path, printer: Callable[[str], None] = print) -> dict[str, Any]:
  """The `lora-squeeze train` job: validate the config, build its protocol's plan, run it."""
  config_lib.validate(config)
  return run_plan(config_lib.make_plan(config), config=config, workdir=workdir, printer=printer)
