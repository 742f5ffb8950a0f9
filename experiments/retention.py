"""Variance (energy) retention V_r(r_src -> r_tgt) of trained adapters (paper App. F, Fig. 6 / 7).

    python -m experiments.retention --config=experiments/retention.py:reduced --workdir=studies/retention

Per task x source rank x seed, one run trains at r_src and squeezes a copy to every lower target
rank without evaluating it; the trainer records, per squeeze, Eq. 10 over all LoRA modules of the
adapter: sum_{i<=r_tgt} s_i^2 / sum_i s_i^2 with the squared singular values of every module
summed (the energy of the whole task vector kept). Runs of other studies that squeeze the same
way can be read instead of training (`reuse_workdirs`, e.g. a heatmap study's folder).

Writes into --workdir: retention.csv (task, r_src, r_tgt, V_r in %, mean over seeds) and
retention_<task>.png per task plus retention_average.png (mean over tasks): one line per r_src.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import ml_collections

from experiments import driver, grid, plots, presets, results, tables
from experiments.cells import Cell, Row
from lora_squeeze import protocols
from lora_squeeze.errors import UserInputError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Presets: "paper" (default), "reduced" (Gemma 3 270M + mmlu_field on CPU), "tiny" (tests)."""
  study = presets.study_config(arg)
  study.source_ranks = {"paper": (32, 64, 128), "reduced": (4, 16), "tiny": (2, 4)}[study.preset]
  # The squeeze method of the runs (and of the reused runs' squeezes read): V_r itself is exact for
  # every method (lora_tree computes it from the exact r_src x r_src core).
  study.method = "qr_core"
  # Study folders whose finished runs' squeezes are read too (no training for what they hold).
  study.reuse_workdirs = ()
  return study


def cells(study: ml_collections.ConfigDict, lr_for_rank: Callable[[int], float]) -> list[Cell]:
  """Per task x r_src x seed: train at r_src, then squeeze copies to every power of two below it."""
  out = []
  for task in study.tasks:
    steps = presets.steps_for(study, task)
    for r_src in presets.check_ranks("source_ranks", study.source_ranks):
      targets = [2**i for i in range(r_src.bit_length()) if 2**i < r_src]
      for seed in study.seeds:
        plan = protocols.validate_plan(
          [
            protocols.Stage(rank=r_src, steps=steps, lr=lr_for_rank(r_src), warmup=study.warmup),
            *(protocols.Branch(items=(protocols.Squeeze(rank=t, method=study.method),)) for t in targets),
          ]
        )
        out.append(
          Cell(
            name=f"{task}/r{r_src}_s{seed}",
            plan=plan,
            overrides=presets.run_overrides(task=task, seed=seed),
            labels={"study": "retention", "task": task, "r_src": r_src, "seed": seed},
            evals={},
            cost=steps,
          )
        )
  return out


def retention_rows(squeezes: Sequence[Row], *, method: str) -> list[Row]:
  """Mean V_r (%) over seeds per task x r_src x r_tgt, with the V_r = 100 % point at r_tgt = r_src.

  A squeeze that recorded its curve (V_r at every r <= r_src) adds every rank of it, so one squeeze
  of a run draws the whole curve; the squeezes of one run agree on it (they share the source adapter).
  """
  picked = [dict(s, score=100.0 * s["retention"]) for s in squeezes if s["method"] == method]
  picked += [dict(s, r_tgt=s["r_src"], score=100.0) for s in picked]
  picked += [
    dict(s, r_tgt=r, score=100.0 * v)
    for s in picked
    if s["r_tgt"] != s["r_src"]
    for r, v in enumerate(s.get("curve") or (), start=1)
    if r < s["r_src"]
  ]
  means = results.mean_score(picked, key=lambda s: (s["task"], s["r_src"], s["r_tgt"]))
  return [{"task": t, "r_src": s, "r_tgt": r, "retention": v} for (t, s, r), v in sorted(means.items())]


def write_report(rows: Sequence[Row], workdir: pathlib.Path) -> list[pathlib.Path]:
  """retention.csv and the per-task and averaged plots."""
  tables.write_csv(workdir / "retention.csv", rows)
  written = []
  for task in [*sorted({r["task"] for r in rows}), None]:
    mine = rows if task is None else results.select(rows, task=task)
    means = results.mean_score([dict(r, score=r["retention"]) for r in mine], key=lambda r: (r["r_src"], r["r_tgt"]))
    series = {}
    for r_src in sorted({s for s, _ in means}):
      xs = sorted(t for s, t in means if s == r_src)
      series[f"r_src={r_src}"] = (xs, [means[(r_src, t)] for t in xs])
    name = "average" if task is None else task
    path = workdir / f"retention_{name}.png"
    plots.plot_lines(
      series, path=path, title=f"{name}: variance retention V_r (Eq. 10)", xlabel="target rank r_tgt", ylabel="V_r (%)"
    )
    written.append(path)
  return written


def run_study(
  study: ml_collections.ConfigDict,
  *,
  workdir: pathlib.Path,
  train: bool = True,
  train_fn: Callable = grid.train_run,
  log: Callable[[str], None] = grid.log_line,
) -> list[Row]:
  """Trains the missing cells (unless train=False or reused folders hold them), then reports."""
  workdir = pathlib.Path(workdir)
  reused = []
  for other in study.reuse_workdirs:
    reused += results.collect_squeeze_rows(pathlib.Path(other))[0]
  have = {(s["task"], s["r_src"], s["seed"]) for s in reused if s["method"] == study.method}
  if train:
    base = presets.training_config(study)
    todo = [
      c
      for c in cells(study, presets.lr_table(study, base))
      if (c.labels["task"], c.labels["r_src"], c.labels["seed"]) not in have
    ]
    grid.run_cells(todo, workdir=workdir, base_config=base, train_fn=train_fn, log=log)
  squeezes, unfinished = results.collect_squeeze_rows(workdir)
  # Runs that carried a projected optimizer state across a squeeze (a protocol study's
  # optimizer_state = "project" cells) trained differently after it: only reset's squeezes count.
  wanted = [
    s
    for s in [*squeezes, *reused]
    if s["task"] in study.tasks and s["r_src"] in study.source_ranks and s.get("optimizer_state", "reset") == "reset"
  ]
  rows = retention_rows(wanted, method=study.method)
  if not rows:
    raise UserInputError(f"no finished squeezes with method {study.method!r} under {workdir} or {study.reuse_workdirs}")
  tables.write_rows(workdir, [{k: v for k, v in s.items() if k != "curve"} for s in wanted], unfinished, log=log)
  write_report(rows, workdir)
  return rows


if __name__ == "__main__":
  driver.run(run_study)
