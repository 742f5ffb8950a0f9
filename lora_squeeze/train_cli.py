"""`lora-squeeze train`: run a protocol config into a run folder (resuming when it holds this run).

    lora-squeeze train --config=configs/default.py --workdir=runs/default
    lora-squeeze train --config=configs/post_squeeze.py:task=boolq,r_src=128 --config.steps=2000 \\
        --workdir=runs/boolq_post128

The config keys are documented in configs/common.py. The run folder gets checkpoints/,
adapters/<tag>/ (one exported adapter per evaluation), metrics.jsonl and results.json.
Multi-host: every process runs this same command; jax.distributed.initialize is called when the
environment says the job has several processes (TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


def _config_package_roots(argv: list[str]) -> list[str]:
  """Folders to put on sys.path so that a config file inside a package (configs/post_squeeze.py)
  can import its siblings (`from configs import common`) wherever the command runs from."""
  roots = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    else:
      continue
    folder = pathlib.Path(spec.split(":", 1)[0]).resolve().parent
    if (folder / "__init__.py").exists():
      roots.append(str(folder.parent))
  return roots


# Config files are loaded while flags are parsed, before main runs.
sys.path[:0] = [root for root in _config_package_roots(sys.argv) if root not in sys.path]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, `path/to/file.py[:key=value,...]` (see configs/common.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (created; resumed when it holds this same run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint write at INFO; the trainer prints its own progress.
    logging.set_verbosity(logging.WARNING)
  from lora_squeeze import atomic  # pylint: disable=g-import-not-at-top
  from lora_squeeze import sharding  # pylint: disable=g-import-not-at-top
  from lora_squeeze.errors import UserInputError  # pylint: disable=g-import-not-at-top

  # Before any other JAX call: joins the processes of a multi-host job.
  sharding.maybe_initialize_distributed()
  from lora_squeeze import train  # pylint: disable=g-import-not-at-top

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
      key = arg[len("--config."):].split("=", 1)[0]
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
