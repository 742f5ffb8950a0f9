"""The trainer: a jitted LoRA step (step), the plan runner (runner, its jobs and context), the run
folder's files (run_dir), console progress (progress) and config -> run (setup).

`from lora_squeeze import train` gives the public names of all of them: train.run(config, ...),
train.execute_plan(plan, setup), train.RunSetup, train.TrainState, ...
"""

from lora_squeeze.train.context import Evaluator, Position, RunSetup
from lora_squeeze.train.run_dir import ADAPTERS_DIR, CHECKPOINTS_DIR, METRICS_FILE, RESULTS_FILE, RUN_CONFIG_FILE
from lora_squeeze.train.runner import execute_plan
from lora_squeeze.train.setup import make_evaluator, run, run_identity, run_plan, setup_from_config
from lora_squeeze.train.step import (
  NonFiniteLossError,
  TrainState,
  _train_step,  # noqa: F401  (tests read its compilation cache)
  batch_dataset,
  batch_tokens,
  check_batch,
  compile_step,
  data_seed,
  init_train_state,
  loss_fn,
  make_train_step,
  run_keys,
  target_nll,
  target_positions,
  targets_bucket,
)

__all__ = [
  "ADAPTERS_DIR",
  "CHECKPOINTS_DIR",
  "METRICS_FILE",
  "RESULTS_FILE",
  "RUN_CONFIG_FILE",
  "Evaluator",
  "NonFiniteLossError",
  "Position",
  "RunSetup",
  "TrainState",
  "batch_dataset",
  "batch_tokens",
  "check_batch",
  "compile_step",
  "data_seed",
  "execute_plan",
  "init_train_state",
  "loss_fn",
  "make_evaluator",
  "make_train_step",
  "run",
  "run_identity",
  "run_keys",
  "run_plan",
  "setup_from_config",
  "target_nll",
  "target_positions",
  "targets_bucket",
]
