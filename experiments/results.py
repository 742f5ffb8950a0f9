"""Reading a study back from disk: the trainer's results per cell, and the rows the reports use.

    collect_rows / collect_squeeze_rows / collect_items   (only the files under <workdir>/runs)
        -> select / mean_score                            (the groupings the tables and plots use)
    archive_finished                                      (those files, and nothing else, copied)

The trainer's files are read in exactly one place, `read_run_results`, through
lora_squeeze.train.run_dir (the one definition of the run folder); nothing else here knows their
format. A report never depends on what is in memory, so `--report_only` rebuilds it from the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import cells as cells_lib
from experiments.cells import Row
from lora_squeeze import bootstrap
from lora_squeeze.train import run_dir as run_dir_lib
from lora_squeeze.errors import UserInputError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResults:
  """What a finished run left on disk, in the drivers' terms.

  Attributes:
    scores: evaluation tag -> task score (the first metric the evaluator returned): in percent, or
      for a lower-is-better metric (token_nll, nats per target token) its value unscaled.
    metrics: evaluation tag -> the name of that first metric ("accuracy", "token_nll", ...).
    nll: evaluation tag -> option_nll or token_nll (nats; see lora_squeeze.evaluate).
    squeezes: one record per squeeze the plan made: r_src, r_tgt, method, retention (Eq. 10 over
      all modules of the adapter) and curve (V_r of the squeezed adapter at every r = 1..r_src, or
      None in results written before the trainer recorded it).
    failure: the error of a run that diverged (then no scores), else None.
  """

  scores: Mapping[str, float]
  squeezes: tuple[Mapping[str, Any], ...]
  failure: str | None = None
  nll: Mapping[str, float] = dataclasses.field(default_factory=dict)
  metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # evaluation tag -> per-item scores {"accuracy": [0/1, ...], "option_nll": [...]} (experiments/stats.py)
  items: Mapping[str, Mapping[str, Sequence[float]]] = dataclasses.field(default_factory=dict)


def read_run_results(train_dir: pathlib.Path) -> RunResults | None:
  """The results of a finished run in `train_dir`, or None while it is missing or not finished.

  ADAPTER: the one function that reads the trainer's results, through lora_squeeze.train.run_dir
  (results.json = {"complete", "evals": {tag: {"score", "metrics", ...}}, "squeezes": [...]}).
  """
  results = run_dir_lib.read_results(train_dir)
  if results is None or not results.get("complete", False):
    return None
  evals = {tag: ev for tag, ev in results["evals"].items() if ev.get("score") is not None}
  metrics = {tag: next(iter(ev.get("metrics", {})), "") for tag, ev in evals.items()}
  scores = {
    tag: float(ev["score"]) * (1.0 if metrics[tag] in bootstrap.LOWER_IS_BETTER else 100.0) for tag, ev in evals.items()
  }
  nll = {
    tag: float(ev["metrics"][key])
    for tag, ev in results["evals"].items()
    for key in ("option_nll", "token_nll")
    if key in ev.get("metrics", {})
  }
  squeezes = tuple(
    {
      "r_src": s["r_src"],
      "r_tgt": s["r_tgt"],
      "method": s["method"],
      "retention": float(s["overall_retention"]),
      "curve": s.get("retention_curve"),
    }
    for s in results.get("squeezes", ())
  )
  items = {tag: ev["per_item"] for tag, ev in results["evals"].items() if ev.get("per_item")}
  return RunResults(scores=scores, squeezes=squeezes, nll=nll, items=items, metrics=metrics)


def cell_results(path: pathlib.Path) -> RunResults | None:
  """Results of the cell folder `path`: the run's, a failure record, or None while unfinished."""
  failed = pathlib.Path(path) / cells_lib.FAILED_FILE
  if failed.exists():
    with open(failed) as f:
      return RunResults(scores={}, squeezes=(), failure=json.load(f)["error"])
  return read_run_results(cells_lib.train_dir(path))


def _finished_cells(workdir: pathlib.Path) -> tuple[list[tuple[dict[str, Any], RunResults]], list[str]]:
  """(cell record, results) of every finished cell under `<workdir>/runs`, and the unfinished names."""
  finished, unfinished = [], []
  for cell_file in sorted((pathlib.Path(workdir) / cells_lib.RUNS_DIR).rglob(cells_lib.CELL_FILE)):
    with open(cell_file) as f:
      cell = json.load(f)
    results = cell_results(cell_file.parent)
    if results is None:
      unfinished.append(cell["name"])
    else:
      finished.append((cell, results))
  return finished, unfinished


def collect_rows(workdir: pathlib.Path) -> tuple[list[Row], list[str]]:
  """Score rows of every finished cell under `<workdir>/runs`, and the names of unfinished ones.

  One row per (cell, listed evaluation tag): the cell's labels, the tag's coordinates, `tag`, `cell`
  and `score` (NaN for a failed run, with its error in `failure`), `metric` (the score's metric:
  lower_is_better reads it), and `nll` where the evaluator gave option_nll or token_nll (NaN for a
  failed run). Built only from the files, so a report never depends on
  what is in memory.
  """
  rows = []
  finished, unfinished = _finished_cells(workdir)
  for cell, results in finished:
    if results.failure is not None:
      rows += [
        {
          **cell["labels"],
          **coords,
          "tag": tag,
          "cell": cell["name"],
          "score": math.nan,
          "nll": math.nan,
          "failure": results.failure,
        }
        for tag, coords in cell["evals"].items()
      ]
      continue
    for tag, coords in cell["evals"].items():
      if tag not in results.scores:
        raise UserInputError(
          f"cell {cell['name']!r} finished without a score for {tag!r}; it has {sorted(results.scores)}"
        )
      row = {**cell["labels"], **coords, "tag": tag, "cell": cell["name"], "score": results.scores[tag]}
      if results.metrics.get(tag):
        row["metric"] = results.metrics[tag]
      if tag in results.nll:
        row["nll"] = results.nll[tag]
      rows.append(row)
  return rows, unfinished


def collect_items(workdir: pathlib.Path) -> dict[tuple[str, str], Mapping[str, Sequence[float]]]:
  """Per-item scores of every finished cell: (cell name, evaluation tag) -> {metric: [per item]}."""
  finished, _ = _finished_cells(workdir)
  return {(cell["name"], tag): per_item for cell, results in finished for tag, per_item in results.items.items()}


def collect_squeeze_rows(workdir: pathlib.Path) -> tuple[list[Row], list[str]]:
  """One row per squeeze of every finished cell: the cell's labels, r_src, r_tgt, method, retention."""
  finished, unfinished = _finished_cells(workdir)
  rows = [
    {**cell["labels"], **squeeze, "cell": cell["name"]} for cell, results in finished for squeeze in results.squeezes
  ]
  return rows, unfinished


def archive_finished(workdir: pathlib.Path, dest: pathlib.Path) -> list[str]:
  """Copies what a report and a resume need of every finished cell, `runs/<cell>/cell.json` and its
  results file (or failed.json), from `workdir` to `dest`, and returns the cells' names.

  No checkpoint or adapter is copied, so `dest` is small enough to commit; it is itself a study
  folder (`--report_only --workdir=dest` rebuilds the report), and copying its runs/ into a fresh
  workdir makes the driver skip those cells. Unfinished cells are left out: their checkpoints stay
  behind, and a cell.json alone would only say that the run was started.
  """
  workdir, dest = pathlib.Path(workdir), pathlib.Path(dest)
  names = []
  for cell_file in sorted((workdir / cells_lib.RUNS_DIR).rglob(cells_lib.CELL_FILE)):
    source = cell_file.parent
    if cell_results(source) is None:
      continue
    results_file = run_dir_lib.results_path(cells_lib.train_dir(source))
    for path in (cell_file, source / cells_lib.FAILED_FILE, results_file):
      if path.exists():
        target = dest / path.relative_to(workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    names.append(str(source.relative_to(workdir / cells_lib.RUNS_DIR)))
  return names


def lower_is_better(rows: Iterable[Row]) -> bool:
  """Whether the rows' scores are better when lower (token_nll) rather than higher (accuracy, ...):
  UserInputError when rows of both kinds are mixed (their scores cannot be averaged or ranked)."""
  kinds = {r["metric"] in bootstrap.LOWER_IS_BETTER for r in rows if r.get("metric")}
  if len(kinds) > 1:
    metrics = sorted({r["metric"] for r in rows if r.get("metric")})
    raise UserInputError(f"rows mix lower-is-better and higher-is-better scores ({metrics}); report them apart")
  return kinds == {True}


def select(rows: Iterable[Row], **where: Any) -> list[Row]:
  """Rows whose fields equal every `where` value (a missing field never matches)."""
  missing = object()
  return [r for r in rows if all(r.get(k, missing) == v for k, v in where.items())]


def mean_score(rows: Iterable[Row], key: Callable[[Row], Any], *, field: str = "score") -> dict[Any, float]:
  """Mean `field` ("score", or "nll") per group: the average over tasks and seeds that the paper's
  figures report. Rows without the field are left out; a group with none is absent."""
  groups: dict[Any, list[float]] = {}
  for row in rows:
    if field in row:
      groups.setdefault(key(row), []).append(float(row[field]))
  return {k: float(np.mean(v)) for k, v in groups.items()}
