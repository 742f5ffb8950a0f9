"""LR sweep per rank (paper App. A, Table 2) and "sweep only r_src, Post-Squeeze the rest" (Fig. 3).

    python -m experiments.lr_sweep --config=experiments/lr_sweep.py:reduced --workdir=studies/lr_sweep

Phase 1 trains direct LoRA for every task x rank x lr x seed and picks, per rank, the lr with the
highest score averaged over tasks and seeds (App. A). Phase 2 (when `source_rank` is set) trains
once at `source_rank` with its best lr and Post-Squeezes a copy to every lower rank: Fig. 3 compares
that with direct training at each lower rank at the same lr (what a sweep of r_src alone would
give) and at the rank's own best lr.

Writes into --workdir: rows.json/rows.csv (every score, read back from the run folders),
lr_sweep.csv (mean score per rank x lr and its standard error over seeds, App. B), lr_sweep.md
(best bold), lr_sweep.png, lr_table.json (the best lr per rank for the training config's model, in
the format of lora_squeeze/lr_table.json, which the training configs and the other studies'
`lr_table` read), per task and averaged, sweep_only_r<src>_<task>.png (Fig. 3), and
lr_sweep_comparisons.md/.csv/.png (each lr against its rank's best, Post-Squeeze against direct
training; paired bootstrap intervals over the evaluation items).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from experiments import driver, grid, plots, presets, results, stats, tables
from experiments.cells import Cell, Row
from lora_squeeze import protocols
from lora_squeeze.errors import UserInputError

PAPER_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PAPER_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Presets: "paper" (default), "reduced" (Gemma 3 270M + mmlu_field on CPU), "tiny" (tests)."""
  study = presets.study_config(arg)
  study.ranks = {"paper": PAPER_RANKS, "reduced": (1, 4, 16), "tiny": (1, 2)}[study.preset]
  # reduced: Adafactor without the parameter scale takes steps of ~lr per entry: a lower grid.
  study.lrs = {"paper": PAPER_LRS, "reduced": (3e-4, 1e-3, 3e-3), "tiny": (1e-2, 1e-1)}[study.preset]
  # Fig. 3: sweep only this rank and Post-Squeeze to the lower ones; 0 skips phase 2.
  study.source_rank = max(study.ranks)
  study.method = "qr_core"
  return study


def sweep_cells(study: ml_collections.ConfigDict) -> list[Cell]:
  """Phase 1: direct training at every task x rank x lr x seed."""
  cells = []
  for task in study.tasks:
    for rank in presets.check_ranks("ranks", study.ranks):
      for lr in study.lrs:
        for seed in study.seeds:
          plan = protocols.direct(rank=rank, steps=presets.steps_for(study, task), lr=lr, warmup=study.warmup)
          cells.append(
            Cell(
              name=f"{task}/sweep/r{rank}_lr{lr:g}_s{seed}",
              plan=plan,
              overrides=presets.run_overrides(task=task, seed=seed),
              labels={"study": "sweep", "task": task, "rank": rank, "lr": lr, "seed": seed},
              evals={tag: {} for tag in protocols.eval_tags(plan)},
              cost=presets.steps_for(study, task),
            )
          )
  return cells


def post_cells(study: ml_collections.ConfigDict, lr_src: float) -> list[Cell]:
  """Phase 2: train at source_rank with `lr_src`, Post-Squeeze to every lower swept rank."""
  r_src = study.source_rank
  targets = [r for r in presets.check_ranks("ranks", study.ranks) if r < r_src]
  if not targets:
    return []
  cells = []
  for task in study.tasks:
    for seed in study.seeds:
      plan = protocols.post_squeeze(
        r_src=r_src,
        steps=presets.steps_for(study, task),
        lr=lr_src,
        targets=targets,
        warmup=study.warmup,
        method=study.method,
      )
      cells.append(
        Cell(
          name=f"{task}/post/r{r_src}_lr{lr_src:g}_s{seed}",
          plan=plan,
          overrides=presets.run_overrides(task=task, seed=seed),
          labels={"study": "post", "task": task, "r_src": r_src, "lr": lr_src, "seed": seed},
          evals=dict(zip(protocols.eval_tags(plan), [{"rank": r} for r in (r_src, *targets)], strict=True)),
          cost=presets.steps_for(study, task),
        )
      )
  return cells


def best_lrs(rows: Sequence[Row]) -> dict[int, float]:
  """rank -> the lr with the best mean score over tasks and seeds: the highest, or the lowest for a
  lower-is-better metric (token_nll; results.lower_is_better). Ties: the smaller lr.

  A mean with a NaN (a run that diverged) never wins.
  """
  sweep = results.select(rows, study="sweep")
  sign = -1.0 if results.lower_is_better(sweep) else 1.0
  means = results.mean_score(sweep, key=lambda r: (r["rank"], r["lr"]))
  best: dict[int, float] = {}
  for (rank, lr), score in sorted(means.items()):
    # A diverged run scores NaN: its lr is never the best (and a rank where all diverged has none).
    if math.isfinite(score) and (rank not in best or sign * score > sign * means[(rank, best[rank])]):
      best[rank] = lr
  return best


def seed_sem(sweep: Sequence[Row]) -> dict[tuple[int, float], float]:
  """(rank, lr) -> standard error of the mean over seeds of the task-averaged score (App. B, Table 3);
  NaN with a single seed."""
  per_seed = results.mean_score(sweep, key=lambda r: (r["rank"], r["lr"], r["seed"]))
  by_cell: dict[tuple[int, float], list[float]] = {}
  for (rank, lr, _), score in per_seed.items():
    by_cell.setdefault((rank, lr), []).append(score)
  return {k: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else math.nan for k, v in by_cell.items()}


def write_sweep_report(rows: Sequence[Row], workdir: pathlib.Path, *, model: str) -> dict[int, float]:
  """lr_sweep.csv/.md/.png and lr_table.json (for `model`) from the sweep rows; returns the best lr per rank."""
  sweep = results.select(rows, study="sweep")
  means = results.mean_score(sweep, key=lambda r: (r["rank"], r["lr"]))
  ranks = sorted({r for r, _ in means})
  lrs = sorted({lr for _, lr in means})
  best = best_lrs(rows)
  sem = seed_sem(sweep)
  lower = results.lower_is_better(sweep)
  tables.write_csv(
    workdir / "lr_sweep.csv",
    [
      {"rank": r, "lr": lr, "score": means[(r, lr)], "sem": sem[(r, lr)], "best": best.get(r) == lr}
      for r, lr in sorted(means)
    ],
  )
  body = [[r, *(means.get((r, lr), math.nan) for lr in lrs), f"{best[r]:g}" if r in best else "none"] for r in ranks]
  bold = {(i, 1 + lrs.index(best[r])) for i, r in enumerate(ranks) if r in best}
  tables.atomic_write_text(
    workdir / "lr_sweep.md",
    tables.markdown_table(
      ["rank", *(f"lr {lr:g}" for lr in lrs), "best lr"], body, bold=bold, float_format="{:.4f}" if lower else "{:.1f}"
    ),
  )
  tasks = sorted({r["task"] for r in sweep})
  seeds = sorted({r["seed"] for r in sweep})
  tables.write_json(
    workdir / "lr_table.json",
    {
      "note": (
        f"Best lr per rank by experiments.lr_sweep: {'lowest' if lower else 'highest'} mean score over tasks"
        f" {tasks} and seeds {seeds}."
      ),
      "grid": lrs,
      "lr": {model: {str(r): lr for r, lr in sorted(best.items())}},
    },
  )
  plots.plot_lines(
    {
      f"r={r}": ([lr for lr in lrs if (r, lr) in means], [means[(r, lr)] for lr in lrs if (r, lr) in means])
      for r in ranks
    },
    path=workdir / "lr_sweep.png",
    title="LR sweep: mean score over tasks and seeds",
    xlabel="learning rate",
    ylabel=_score_label(sweep),
    x_scale="log10",
  )
  return best


def write_comparisons(rows: Sequence[Row], workdir: pathlib.Path) -> list[dict]:
  """lr_sweep_comparisons.md/.csv/.png: per task and rank, every lr against the rank's best lr
  (best_lrs), and each Post-Squeeze r_src -> r_tgt (phase 2) against direct training at r_tgt at its
  best lr and at r_src's lr (Fig. 3), with paired bootstrap intervals over the evaluation items and
  the sign per seed (experiments/stats.py). Says whether the best lr is better than its neighbours
  or only the highest mean of one draw; nothing without per-item scores."""
  best = best_lrs(rows)
  post = [r for r in results.select(rows, study="post") if r["rank"] != r["r_src"]]  # r_src itself: a sweep run
  key = lambda r: (r["task"], r["study"], r["rank"], r["lr"])  # noqa: E731
  grouped = stats.group_items([*results.select(rows, study="sweep"), *post], results.collect_items(workdir), key=key)
  pairs = []
  for task, study, rank, lr in sorted(grouped, key=lambda k: (k[0], k[1] == "post", k[2], k[3])):  # sweep first
    best_key = (task, "sweep", rank, best.get(rank))
    if study == "sweep" and lr != best.get(rank):
      pairs.append(((task, study, rank, lr), best_key))
    elif study == "post":  # against the target's best lr and r_src's lr: one pair when they are the same
      pairs += [((task, study, rank, lr), b) for b in dict.fromkeys([best_key, (task, "sweep", rank, lr)])]
  records = [r for r in stats.compare_groups(grouped, pairs) if r["treatment"] != r["baseline"]]
  r_src = {r["lr"]: r["r_src"] for r in post}

  def label(record):
    (task, study, rank, lr), (_, _, _, base_lr) = record["treatment"], record["baseline"]
    if study == "sweep":
      return f"{task}: r{rank} lr {lr:g} vs lr {base_lr:g} (best)"
    if base_lr != best.get(rank):
      which = f"r{r_src[lr]}'s"
    else:
      which = f"best, also r{r_src[lr]}'s" if base_lr == lr else "best"
    return f"{task}: Post-Squeeze {r_src[lr]}→{rank} vs direct r{rank} at lr {base_lr:g} ({which})"

  if records:
    stats.write_comparisons(
      workdir,
      "lr_sweep_comparisons",
      records,
      label=label,
      title="Each learning rate against the rank's best; Post-Squeeze against direct training at the target rank",
    )
  return records


def write_fig3(rows: Sequence[Row], workdir: pathlib.Path, *, r_src: int) -> list[pathlib.Path]:
  """Fig. 3 per task and averaged: Post-Squeeze from r_src vs direct at r_src's lr and at the best lr."""
  best = best_lrs(rows)
  post = results.select(rows, study="post", r_src=r_src)
  if not post or r_src not in best:
    return []
  lr_src = best[r_src]
  tasks = sorted({r["task"] for r in post})
  written = []
  for task in [*tasks, None]:
    pick = (lambda rs: rs) if task is None else (lambda rs, t=task: results.select(rs, task=t))
    sweep = results.select(pick(rows), study="sweep")
    direct_src_lr = results.mean_score(results.select(sweep, lr=lr_src), key=lambda r: r["rank"])
    direct_best = results.mean_score([r for r in sweep if best.get(r["rank"]) == r["lr"]], key=lambda r: r["rank"])
    squeezed = results.mean_score(results.select(pick(post), lr=lr_src), key=lambda r: r["rank"])
    series = {
      f"direct, lr {lr_src:g} (best for r={r_src})": _xy(direct_src_lr),
      f"Post-Squeeze from r={r_src}": _xy(squeezed),
      "direct, best lr per rank": _xy(direct_best),
    }
    name = "average" if task is None else task
    path = workdir / f"sweep_only_r{r_src}_{name}.png"
    plots.plot_lines(
      series,
      path=path,
      title=f"{name}: sweep only r={r_src}, Post-Squeeze the rest",
      xlabel="LoRA rank",
      ylabel=_score_label(rows),
    )
    written.append(path)
  return written


def _score_label(rows: Sequence[Row]) -> str:
  """The y axis of the score plots: the metric's title when every row has the same one (stats.METRICS)."""
  metrics = {r.get("metric") for r in rows}
  (metric,) = metrics if len(metrics) == 1 else (None,)
  return stats.METRICS[metric][0] if metric in stats.METRICS else "score"


def _xy(by_rank: dict[int, float]) -> tuple[list[int], list[float]]:
  ranks = sorted(k for k, v in by_rank.items() if math.isfinite(v))
  return ranks, [by_rank[r] for r in ranks]


def run_study(
  study: ml_collections.ConfigDict,
  *,
  workdir: pathlib.Path,
  train: bool = True,
  train_fn: Callable = grid.train_run,
  log: Callable[[str], None] = grid.log_line,
) -> dict[int, float]:
  """Both phases (unless train=False: report only from the files) and every report; returns best lr per rank."""
  workdir = pathlib.Path(workdir)
  base = presets.training_config(study)
  if train:
    grid.run_cells(sweep_cells(study), workdir=workdir, base_config=base, train_fn=train_fn, log=log)
  rows, unfinished = results.collect_rows(workdir)
  if not results.select(rows, study="sweep"):
    raise UserInputError(f"no finished sweep runs under {workdir}; run without --report_only first")
  best = write_sweep_report(rows, workdir, model=base.model)
  if study.source_rank:
    if train:
      if study.source_rank not in best:
        raise UserInputError(
          f"source_rank={study.source_rank} has no finished sweep run with a finite score; "
          f"ranks with a best lr: {sorted(best)}"
        )
      grid.run_cells(
        post_cells(study, best[study.source_rank]), workdir=workdir, base_config=base, train_fn=train_fn, log=log
      )
      rows, unfinished = results.collect_rows(workdir)
    write_fig3(rows, workdir, r_src=study.source_rank)
  write_comparisons(rows, workdir)
  tables.write_rows(workdir, rows, unfinished, log=log)
  return best


if __name__ == "__main__":
  driver.run(run_study)
