"""The resumable grid runner: trains a study's cells, each in its own folder, then collects its rows.

    cells -> run_cells (skips finished cells, resumes half-finished ones, progress + ETA)
          -> results.collect_rows (reads only the files under <workdir>/runs)
          -> tables / plots (built from the rows, never recomputed)

The trainer is called in exactly one place, `train_run`; its files are read in exactly one place,
experiments/results.py.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from experiments import cells as cells_lib
from experiments import presets, results, tables
from experiments.cells import Cell, Row
from lora_squeeze import protocols
from lora_squeeze import durations
from lora_squeeze.errors import UserInputError

format_duration = durations.format_duration  # 62 -> '1m02s' (the trainer's ETA format)


def log_line(line: str) -> None:
  """A progress line, flushed at once: studies run for hours with stdout redirected to a file."""
  print(line, flush=True)


def train_run(config: ml_collections.ConfigDict, plan: protocols.Plan, run_dir: pathlib.Path) -> None:
  """Runs (or resumes from its last checkpoint) `plan` with the model, data and evaluation of
  `config` into `run_dir`.

  ADAPTER: the one function that calls the trainer.
  """
  from lora_squeeze import train

  train.run_plan(plan, config=config, workdir=run_dir, printer=log_line)


def run_cells(
  cells: Sequence[Cell],
  *,
  workdir: pathlib.Path,
  base_config: ml_collections.ConfigDict,
  train_fn: Callable[[ml_collections.ConfigDict, protocols.Plan, pathlib.Path], None] = train_run,
  log: Callable[[str], None] = log_line,
) -> None:
  """Trains every unfinished cell in order; finished ones (complete results file) are skipped. Every
  existing run folder is first checked to be this cell's (same plan and overrides, check_run_dir).

  A half-finished cell is handed to `train_fn` again with the same run folder, where the trainer
  resumes from its last checkpoint. A run that diverges (FloatingPointError, e.g. the trainer's
  NonFiniteLossError at a too-high lr) is recorded in `failed.json` and counts as finished with no
  scores, so a sweep goes on; delete that file to retry. One progress line per cell, with an ETA
  from the seconds per unit of `Cell.cost` measured so far in this session.
  """
  cells_lib.check_unique_names(cells)
  for cell in cells:  # before any training: a finished folder of another plan must not be skipped as done
    cells_lib.check_run_dir(workdir, cell)
  todo = [c for c in cells if results.cell_results(cells_lib.run_dir(workdir, c)) is None]
  if len(todo) < len(cells):
    log(f"[grid] {len(cells) - len(todo)}/{len(cells)} cells already finished, skipped")
  total_cost = sum(c.cost for c in todo)
  done_cost, spent = 0.0, 0.0
  for i, cell in enumerate(todo):
    path = cells_lib.claim_run_dir(workdir, cell)
    config = presets.apply_overrides(base_config, cell.overrides)
    log(f"[grid {i + 1}/{len(todo)}] {cell.name}: starting ({cell.cost:g} steps)")
    start = time.monotonic()
    outcome = "done"
    try:
      train_fn(config, cell.plan, cells_lib.train_dir(path))
    except FloatingPointError as e:
      cells_lib.record_failure(path, e)
      outcome = f"FAILED ({type(e).__name__}, recorded in {cells_lib.FAILED_FILE})"
    spent += time.monotonic() - start
    done_cost += cell.cost
    if results.cell_results(path) is None:
      raise RuntimeError(f"cell {cell.name!r} ran but left no complete results in {str(path)!r}")
    eta = durations.eta(spent, done_cost, total_cost)
    log(
      f"[grid {i + 1}/{len(todo)}] {cell.name} {outcome} in {format_duration(time.monotonic() - start)};"
      f" {len(todo) - i - 1} left, ETA {format_duration(eta)}"
    )


def run_grid(
  study: ml_collections.ConfigDict,
  make_cells: Callable[[ml_collections.ConfigDict, Any], Sequence[Cell]],
  *,
  workdir: pathlib.Path,
  train: bool,
  train_fn: Callable[[ml_collections.ConfigDict, protocols.Plan, pathlib.Path], None] = train_run,
  log: Callable[[str], None] = log_line,
) -> list[Row]:
  """Trains the missing cells of `make_cells(study, lr_table)` (unless train=False), then returns the
  rows of every finished run under `workdir`, also written there (UserInputError when there are none)."""
  workdir = pathlib.Path(workdir)
  if train:
    base = presets.training_config(study)
    run_cells(
      make_cells(study, presets.lr_table(study, base)), workdir=workdir, base_config=base, train_fn=train_fn, log=log
    )
  rows, unfinished = results.collect_rows(workdir)
  if not rows:
    raise UserInputError(f"no finished runs under {workdir}; run without --report_only first")
  tables.write_rows(workdir, rows, unfinished, log=log)
  return rows
