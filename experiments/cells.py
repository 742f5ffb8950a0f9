"""A study's unit, the `Cell`, and the folder each cell runs in.

    <workdir>/runs/<cell.name>/cell.json     the cell that made the folder (Cell.record)
    <workdir>/runs/<cell.name>/train/        the trainer's run folder (lora_squeeze/train/run_dir.py)
    <workdir>/runs/<cell.name>/failed.json   instead of results, when the run diverged

A cell is one training run: a plan of the trainer (lora_squeeze.protocols), the training-config
overrides it runs under (task, seed, ...), the study coordinates it stands for (`labels`: task, rank,
lr, seed, ...) and, per evaluation tag of its plan, the coordinates that tag adds (`evals`: e.g. the
target rank and squeeze method of a Post-Squeeze).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.tables import write_json
from lora_squeeze import protocols
from lora_squeeze.errors import UserInputError

CELL_FILE = "cell.json"
# Written instead of results when the run diverged (NaN/inf loss): a finished cell without scores.
FAILED_FILE = "failed.json"
RUNS_DIR = "runs"
# The trainer refuses a non-empty workdir it did not make, so it gets a folder of its own.
TRAIN_DIR = "train"

# One result row of a study: a cell's labels, a tag's coordinates, its score (results.collect_rows).
Row = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
  """One training run of a study.

  Attributes:
    name: folder of the run relative to `<workdir>/runs`, e.g. "boolq/direct_r8_lr0.01_s42".
    plan: what the trainer runs (Stage/Squeeze/Evaluate/Branch items of lora_squeeze.protocols).
    overrides: dotted training-config keys -> values, applied on top of the study's base config.
    labels: the study coordinates of the run (task, rank, lr, seed, protocol, ...); copied into
      every result row of the cell.
    evals: evaluation tag written by the trainer -> extra coordinates of that tag's row (e.g.
      {"r_tgt": 4, "method": "qr_core"}); tags not listed here are ignored.
    cost: relative cost of the run (e.g. its total training steps); weights the ETA.
  """

  name: str
  plan: protocols.Plan
  overrides: Mapping[str, Any]
  labels: Mapping[str, Any]
  evals: Mapping[str, Mapping[str, Any]]
  cost: float = 1.0

  def record(self) -> dict[str, Any]:
    """The JSON-able form stored as `cell.json` in the run folder (lists for tuples)."""
    record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    record["plan"] = protocols.plan_record(self.plan)
    return json.loads(json.dumps(record))


def run_dir(workdir: pathlib.Path, cell: Cell) -> pathlib.Path:
  """The cell's folder: `cell.json` and the trainer's run folder `train/`."""
  return pathlib.Path(workdir) / RUNS_DIR / cell.name


def train_dir(cell_dir: pathlib.Path) -> pathlib.Path:
  """The trainer's run folder inside the cell folder `cell_dir`."""
  return pathlib.Path(cell_dir) / TRAIN_DIR


def check_unique_names(cells: Sequence[Cell]) -> None:
  seen = set()
  for cell in cells:
    if cell.name in seen:
      raise UserInputError(f"two cells share the folder name {cell.name!r}; every cell needs its own run folder")
    seen.add(cell.name)


def check_run_dir(workdir: pathlib.Path, cell: Cell) -> pathlib.Path:
  """The run folder of `cell`, after checking that an existing `cell.json` there was made by this cell.

  A folder made by another plan or other overrides (finished or not) would silently mix two studies'
  results, or stand in for a run that never happened (e.g. a Post-Squeeze cell of the same name
  that squeezed to fewer target ranks), so it is refused.
  """
  path = run_dir(workdir, cell)
  cell_file = path / CELL_FILE
  if cell_file.exists():
    with open(cell_file) as f:
      stored = json.load(f)
    for field in ("plan", "overrides"):
      if stored[field] != cell.record()[field]:
        raise UserInputError(
          f"run folder {str(path)!r} was made with {field} {stored[field]}, not {cell.record()[field]};"
          " use another --workdir or move that folder away"
        )
  return path


def claim_run_dir(workdir: pathlib.Path, cell: Cell) -> pathlib.Path:
  """Creates the run folder with its `cell.json`, or checks that an existing one was made by this
  cell (check_run_dir)."""
  path = check_run_dir(workdir, cell)
  write_json(path / CELL_FILE, cell.record())
  return path


def record_failure(cell_dir: pathlib.Path, error: BaseException) -> None:
  """failed.json: the run diverged; the cell counts as finished without scores (delete it to retry)."""
  write_json(pathlib.Path(cell_dir) / FAILED_FILE, {"error": f"{type(error).__name__}: {error}"})
