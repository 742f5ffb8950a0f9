"""`lora-squeeze train`: run a protocol config into a run folder (resuming when it holds this run).

    lora-squeeze train --config=configs/default.py --workdir=runs/default
    lora-squeeze train --config=configs/post_squeeze.py:task=boolq,r_src=128 --config.steps=2000 \\
        --workdir=runs/boolq_post128

The config keys are documented in lora_squeeze/config_lib.py. A config file is any Python file
with a `get_config(arg)` that imports only lora_squeeze (configs/*.py are examples): it may live
anywhere. The run folder gets checkpoints/, adapters/<tag>/ (one exported adapter per evaluation),
metrics.jsonl and results.json.
Multi-process: every process runs this same command. The job starts (jax.distributed.initialize)
from --coordinator_address/--num_processes/--process_id, else JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, else JAX's detection (SLURM, Open MPI, TPU pods); see
docs/training.md. These are flags, not config keys: the config is the run's identity and is the
same on every process, while the process id is not.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Training config file, `path/to/file.py[:key=value,...]` (see lora_squeeze/config_lib.py).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (created; resumed when it holds this same run).")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Multi-process start: auto = when the flags below or the environment (JAX_*, SLURM, Open MPI, TPU pod) "
  "say so; on = always (JAX detects what is not given); off = never.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (default: JAX_COORDINATOR_ADDRESS, else detected)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes in the job (default: JAX_NUM_PROCESSES, else detected)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's id, 0..num_processes-1 (default: JAX_PROCESS_ID, else detected)."
)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
  "distributed_timeout", 300, "Seconds the processes may take to find each other before the job fails."
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint write at INFO; the trainer prints its own progress.
    logging.set_verbosity(logging.WARNING)
  from lora_squeeze import atomic
  from lora_squeeze import sharding
  from lora_squeeze.errors import UserInputError

  try:
    # Before any other JAX call: joins the processes of a multi-process job.
    sharding.maybe_initialize_distributed(
      enabled={"auto": None, "on": True, "off": False}[_DISTRIBUTED.value],
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      timeout_s=_DISTRIBUTED_TIMEOUT.value,
    )
  except UserInputError as e:
    sys.exit(f"lora-squeeze train: {e}")
  from lora_squeeze import train

  try:
    # Before any model or data is loaded: a file, or a folder that cannot be written, fails now.
    atomic.check_writable_folder(_WORKDIR.value, what="--workdir")
    train.run(_CONFIG.value, workdir=_WORKDIR.value)
  except (UserInputError, train.NonFiniteLossError) as e:  # only these: a bug keeps its traceback
    sys.exit(f"lora-squeeze train: error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for a config override of a key the config lacks
  (ml_collections raises a bare AttributeError from inside the parser for `--config.bogus=3`)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if spec is None:
      raise
    config = flags.FLAGS["config"].parser.parse(spec)
    for arg in argv[1:]:
      if not arg.startswith("--config."):
        continue
      key = arg[len("--config.") :].split("=", 1)[0]
      node, allowed = config, []
      for part in key.split("."):
        allowed = sorted(node.keys()) if hasattr(node, "keys") else []
        if part not in allowed:
          break
        node = node[part]
      else:
        continue
      where = f"allowed keys: {', '.join(allowed)}" if allowed else f"{key.rsplit('.', 1)[0]!r} is not a group of keys"
      sys.exit(f"lora-squeeze train: error: {arg}: the config has no key {key!r}; {where}")
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
