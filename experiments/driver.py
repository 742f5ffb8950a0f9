"""The command line every study driver shares: `--config=<driver>.py:<preset> --workdir=... [--report_only]`.

python -m experiments.heatmap --config=experiments/heatmap.py:reduced --workdir=/tmp/heatmap
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any


def define_driver_flags() -> None:
  """--config (a study config file[:preset]), --workdir and --report_only, defined when a driver runs.

  Defined on demand rather than at import, so that tests can import every driver in one process.
  """
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", None, "study config: file.py[:preset], e.g. experiments/heatmap.py:reduced", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "study folder: runs/, rows, tables and plots")
  flags.DEFINE_bool("report_only", False, "rebuild tables and plots from the finished runs, train nothing")
  flags.DEFINE_string(
    "archive",
    None,
    "after the report, copy it and each finished cell's cell.json + results (no checkpoints) to this"
    " folder: small enough to commit, a study folder of its own, and a resume point (copy its runs/ back)",
  )
  flags.mark_flags_as_required(["config", "workdir"])


def archive(workdir: pathlib.Path, dest: pathlib.Path) -> None:
  """--archive: the report files at the top of `workdir` (tables, CSV, PNG, rows) and the finished
  cells' files (experiments.results.archive_finished) copied to `dest`."""
  import shutil

  from experiments import results

  if dest.resolve() == workdir.resolve():
    raise ValueError(f"--archive={str(dest)!r} is the workdir itself; name another folder")
  dest.mkdir(parents=True, exist_ok=True)
  for path in sorted(workdir.glob("*")):
    if path.is_file() and path.suffix in (".md", ".csv", ".png", ".json"):
      shutil.copyfile(path, dest / path.name)
  names = results.archive_finished(workdir, dest)
  print(f"archived the report and {len(names)} finished cells to {dest}", flush=True)


def driver_main(run_study: Callable[..., Any]) -> Callable[[Sequence[str]], None]:
  """The absl main of a driver: run_study(config, workdir=..., train=not --report_only)."""

  def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    from absl import logging

    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint write at INFO
    if not flags.FLAGS.report_only:
      from lora_squeeze import sharding

      sharding.maybe_initialize_distributed()  # a multi-host job: before any other JAX call
    workdir = pathlib.Path(flags.FLAGS.workdir)
    try:
      run_study(flags.FLAGS.config, workdir=workdir, train=not flags.FLAGS.report_only)
      if flags.FLAGS.archive:
        archive(workdir, pathlib.Path(flags.FLAGS.archive))
    except ValueError as e:
      # Bad config or folder: the message says what to change. ValueError, not only UserInputError,
      # while protocol_table.py still raises ValueError for its ranks.
      raise SystemExit(f"{pathlib.Path(argv[0]).name}: {e}") from None

  return main


def run(run_study: Callable[..., Any]) -> None:
  """A driver's `__main__`: restart with huge pages for XLA's host buffers (lora_squeeze.allocator,
  before anything trains), define the shared flags, run driver_main(run_study) under absl."""
  from absl import app

  from lora_squeeze import allocator

  allocator.restart_with_huge_pages()
  define_driver_flags()
  app.run(driver_main(run_study))
