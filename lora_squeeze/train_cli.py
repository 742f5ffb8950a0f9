"""`lora-squeeze train`: run a protocol config into a run folder (resuming when it holds this run).

    lora-squeeze train --config=configs/default.py --workdir=runs/default
    lora-squeeze train --config=configs/post_squeeze.py:task=boolq,r_src=128 --config.steps=2000 \\
        --workdir=runs/boolq_post128

The config keys are documented in lora_squeeze/config_lib.py. A config file is any Python file
with a `get_config(arg)` that imports only lora_squeeze (configs/*.py are examples): it may live
anywhere. The run folder gets checkpoints/, adapters/<tag>/ (one exported adapter per evaluation),
metrics.jsonl and results.json.
Multi-host: every process runs this same command; jax.distributed.initialize is called when the
environment says the job has several processes (TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, `path/to/file.py[:key=value,...]` (see lora_squeeze/config_lib.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (created; resumed when it holds this same run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint write at INFO; the trainer prints its own progress.
    logging.set_verbosity(logging.WARNING)
  from lora_squeeze import sharding  # pylint: disable=g-import-not-at-top

  # Before any other JAX call: joins the processes of a multi-host job.
  sharding.maybe_initialize_distributed()
  from lora_squeeze import train  # pylint: disable=g-import-not-at-top

  try:
    train.run(_CONFIG.value, workdir=_WORKDIR.value)
  except (ValueError, train.NonFiniteLossError) as e:
    sys.exit(f"lora-squeeze train: {e}")


if __name__ == "__main__":
  app.run(main)
