"""Post-Squeeze vs direct training over every source x target rank (paper Fig. 4 / 9, Table 6), and
memory-efficient (qr_core, Alg. 2) vs standard (rsvd on ΔW, Alg. 1) Post-Squeeze (Fig. 5).

    python -m experiments.heatmap --config=experiments/heatmap.py:reduced --workdir=studies/heatmap

One run per task x source rank x seed: train at r_src (its lr from the LR table), evaluate it, then
squeeze a copy to every target rank <= r_src with every method and evaluate each. The direct
baseline at rank r is the unsqueezed evaluation of the run with r_src = r, so the whole heatmap
costs one training run per source rank.

Writes into --workdir: rows.json/rows.csv (every score), heatmap.csv (per task, r_src, r_tgt and
method: Post-Squeeze, direct, gain; the same for option_nll), heatmap_<method>.md and
heatmap_<method>.png (Fig. 4: mean over tasks of Post-Squeeze minus direct, red = Post-Squeeze
better), heatmap_<method>_nll.md/.png (direct minus Post-Squeeze option NLL, red = Post-Squeeze
better; scored tasks), with two methods
heatmap_<method0>_vs_<method1>.png (Fig. 5), and heatmap_tasks.md (Table 6: per task, direct vs
Post-Squeeze for the `table_pairs`).
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Presets: "paper" (default), "reduced" (Gemma 3 270M + mmlu_field on CPU), "tiny" (tests)."""
  study = presets.study_config(arg)
  study.source_ranks = {"paper": (1, 2, 4, 8, 16, 32, 64, 128), "reduced": (1, 4, 16), "tiny": (1, 2, 4)}[study.preset]
  # Empty: the source ranks. A target above every source rank has no direct baseline.
  study.target_ranks = ()
  # The first method makes Fig. 4; two methods also make Fig. 5 (first minus second).
  study.methods = ("qr_core", "rsvd")
  # Table 6: per-task scores of these (r_src, r_tgt) pairs (first method); pairs not run are skipped.
  study.table_pairs = {"paper": ((16, 4), (128, 8)), "reduced": ((16, 4), (16, 1)), "tiny": ((2, 1),)}[study.preset]
  return study


def target_ranks(study: ml_collections.ConfigDict) -> tuple[int, ...]:
  return presets.check_ranks("target_ranks", study.target_ranks or study.source_ranks)


def cells(study: ml_collections.ConfigDict, lr_for_rank: Callable[[int], float]) -> list[Cell]:
  """One Post-Squeeze run per task x r_src x seed, squeezing to every target <= r_src per method."""
  if not study.methods or any(m not in protocols.SQUEEZE_METHODS for m in study.methods):
    raise UserInputError(f"methods must name one or more of {protocols.SQUEEZE_METHODS}, got {tuple(study.methods)}")
  out = []
  for task in study.tasks:
    steps = presets.steps_for(study, task)
    for r_src in presets.check_ranks("source_ranks", study.source_ranks):
      for seed in study.seeds:
        plan: list[protocols.PlanItem] = [
          protocols.Stage(rank=r_src, steps=steps, lr=lr_for_rank(r_src), warmup=study.warmup),
          protocols.Evaluate(tag=f"r{r_src}"),
        ]
        coords = [{"kind": "direct", "r_tgt": r_src}]  # per Evaluate of the plan, in its order
        for r_tgt in (t for t in target_ranks(study) if t <= r_src):
          for method in study.methods:
            squeeze = protocols.Squeeze(rank=r_tgt, method=method)
            plan.append(protocols.Branch(items=(squeeze, protocols.Evaluate(tag=f"r{r_src}_to_r{r_tgt}_{method}"))))
            coords.append({"kind": "post", "r_tgt": r_tgt, "method": method})
        plan = protocols.validate_plan(plan)
        # Rows are labelled by the plan's own tags (protocols.eval_tags), never by rebuilt strings.
        evals = dict(zip(protocols.eval_tags(plan), coords, strict=True))
        out.append(
          Cell(
            name=f"{task}/r{r_src}_s{seed}",
            plan=plan,
            overrides=presets.run_overrides(task=task, seed=seed),
            labels={"study": "heatmap", "task": task, "r_src": r_src, "lr": lr_for_rank(r_src), "seed": seed},
            evals=evals,
            cost=steps,
          )
        )
  return out


def _lower_is_better_tasks(rows: Sequence[Row]) -> set[str]:
  """The tasks whose score is lower-is-better (bootstrap.LOWER_IS_BETTER, e.g. token_nll);
  UserInputError (results.lower_is_better) for a task whose rows mix both kinds of score."""
  return {task for task in {r["task"] for r in rows} if results.lower_is_better(results.select(rows, task=task))}


def gain_rows(rows: Sequence[Row]) -> list[Row]:
  """Per task x r_src x r_tgt x method: mean Post-Squeeze score, mean direct score at r_tgt, gain;
  and the same for option_nll (nll_gain = direct minus Post-Squeeze: positive = Post-Squeeze better).

  gain is positive where Post-Squeeze is better: Post-Squeeze minus direct for a higher-is-better
  score (accuracy), direct minus Post-Squeeze for a task scored lower-is-better
  (bootstrap.LOWER_IS_BETTER, e.g. token_nll), so the heatmaps read the same way for both.
  Means are over seeds; direct is NaN where no run was trained at r_tgt, NLLs NaN without option_nll.
  """
  direct_key = lambda r: (r["task"], r["r_tgt"])  # noqa: E731
  post_key = lambda r: (r["task"], r["r_src"], r["r_tgt"], r["method"])  # noqa: E731
  direct = results.mean_score(results.select(rows, kind="direct"), key=direct_key)
  direct_nll = results.mean_score(results.select(rows, kind="direct"), key=direct_key, field="nll")
  post = results.mean_score(results.select(rows, kind="post"), key=post_key)
  post_nll = results.mean_score(results.select(rows, kind="post"), key=post_key, field="nll")
  lower = _lower_is_better_tasks(rows)
  out = []
  for (task, r_src, r_tgt, method), score in sorted(post.items()):
    base = direct.get((task, r_tgt), math.nan)
    base_nll = direct_nll.get((task, r_tgt), math.nan)
    nll = post_nll.get((task, r_src, r_tgt, method), math.nan)
    out.append(
      {
        "task": task,
        "r_src": r_src,
        "r_tgt": r_tgt,
        "method": method,
        "post_squeeze": score,
        "direct": base,
        "gain": base - score if task in lower else score - base,
        "post_squeeze_nll": nll,
        "direct_nll": base_nll,
        "nll_gain": base_nll - nll,
      }
    )
  return out


def _score_metric(rows: Sequence[Row]) -> str | None:
  """The metric the rows' `score` is (one for all rows), None if they mix several or name none."""
  names = {r.get("metric") for r in rows}
  return names.pop() if len(names) == 1 else None


def _cell_intervals(
  records: Sequence[dict],
  metric: str | None,
  sign: float,
  method: str,
  sources: Sequence[int],
  targets: Sequence[int],
) -> dict[str, np.ndarray]:
  """plot_heatmap's `notes` (the cell's 95 % interval, in the heatmap's direction: `sign` times
  Post-Squeeze minus direct, in stats.METRICS' unit) and `bold` (the interval excludes zero) for
  the Post-Squeeze cells of `method`; {} without a metric (the plot then shows the values only)."""
  if metric is None or metric not in stats.METRICS:
    return {}
  scale, digits = stats.METRICS[metric][1], stats.METRICS[metric][2]
  notes = np.full((len(sources), len(targets)), "", dtype=object)
  bold = np.zeros((len(sources), len(targets)), dtype=bool)
  for record in records:
    (_, kind, r_src, r_tgt, their_method), c = record["treatment"], record.get(metric)
    if kind != "post" or their_method != method or c is None or r_src not in sources or r_tgt not in targets:
      continue
    low, high = sorted((sign * c.low * scale, sign * c.high * scale))
    i, j = list(sources).index(r_src), list(targets).index(r_tgt)
    notes[i, j] = f"[{low:+.{digits}f}, {high:+.{digits}f}]"
    bold[i, j] = c.excludes_zero
  return {"notes": notes, "bold": bold}


def gain_matrix(
  gains: Sequence[Row], *, value: Callable[[Row], float], sources: Sequence[int], targets: Sequence[int]
) -> np.ndarray:
  """(len(sources), len(targets)) mean over tasks of `value`; NaN where no task has a finite value."""
  matrix = np.full((len(sources), len(targets)), np.nan)
  for i, r_src in enumerate(sources):
    for j, r_tgt in enumerate(targets):
      values = [value(g) for g in gains if g["r_src"] == r_src and g["r_tgt"] == r_tgt]
      values = [v for v in values if math.isfinite(v)]
      if values:
        matrix[i, j] = float(np.mean(values))
  return matrix


def write_task_table(
  gains: Sequence[Row], path: pathlib.Path, *, method: str, pairs: Sequence[tuple[int, int]]
) -> list[list]:
  """Table 6: per task, direct at r_tgt, Post-Squeeze r_src -> r_tgt and the gain, for each pair;
  an "average" row over tasks. Pairs without results are left out."""
  by_key = {(g["task"], g["r_src"], g["r_tgt"]): g for g in gains if g["method"] == method}
  pairs = [(s, t) for s, t in pairs if any(k[1:] == (s, t) for k in by_key)]
  tasks = sorted({task for task, _, _ in by_key})
  header, body = ["task"], []
  for r_src, r_tgt in pairs:
    header += [f"direct r{r_tgt}", f"{r_src}→{r_tgt}", "Δ"]
  for task in tasks:
    row = [task]
    for r_src, r_tgt in pairs:
      g = by_key.get((task, r_src, r_tgt))
      row += [g["direct"], g["post_squeeze"], g["gain"]] if g else [math.nan] * 3
    body.append(row)
  if len(tasks) > 1:
    body.append(["average", *(float(np.mean([row[j] for row in body])) for j in range(1, len(header)))])
  tables.atomic_write_text(path, tables.markdown_table(header, body))
  return body


def write_comparisons(rows: Sequence[Row], workdir: pathlib.Path) -> list[dict]:
  """heatmap_comparisons.md/.csv/.png: every Post-Squeeze r_src -> r_tgt vs direct at r_tgt, and direct
  at every rank vs direct at the lowest, with paired bootstrap intervals over items and the sign
  per seed (experiments/stats.py); nothing without per-item scores."""
  rows = results.select(rows, study="heatmap")
  key = lambda r: (r["task"], r["kind"], r["r_src"], r["r_tgt"], r.get("method"))  # noqa: E731
  grouped = stats.group_items(rows, results.collect_items(workdir), key=key)
  direct = {(k[0], k[3]): k for k in grouped if k[1] == "direct"}  # (task, rank) -> key
  pairs = [(k, direct[(k[0], k[3])]) for k in sorted(grouped, key=str) if k[1] == "post" and (k[0], k[3]) in direct]
  for task in sorted({k[0] for k in direct}):
    ranks = sorted(r for t, r in direct if t == task)
    pairs += [(direct[(task, r)], direct[(task, ranks[0])]) for r in ranks[1:]]
  records = stats.compare_groups(grouped, pairs)

  def label(r):
    (task, kind, r_src, r_tgt, method), base = r["treatment"], r["baseline"]
    if kind == "post":
      return f"{task}: Post-Squeeze {r_src}→{r_tgt} ({method}) vs direct r{r_tgt}"
    return f"{task}: direct r{r_tgt} vs direct r{base[3]}"

  if records:
    stats.write_comparisons(
      workdir,
      "heatmap_comparisons",
      records,
      label=label,
      title="Post-Squeeze against direct training at the target rank; rank against the lowest rank",
    )
  return records


def write_report(
  rows: Sequence[Row],
  workdir: pathlib.Path,
  *,
  methods: Sequence[str],
  table_pairs: Sequence[tuple[int, int]] = (),
) -> dict[str, np.ndarray]:
  """heatmap.csv, per method the gain heatmap (.md/.png), with two methods also Fig. 5, and the
  per-task table of `table_pairs` (heatmap_tasks.md)."""
  gains = gain_rows(rows)
  tables.write_csv(workdir / "heatmap.csv", gains)
  records = write_comparisons(rows, workdir)
  write_task_table(gains, workdir / "heatmap_tasks.md", method=methods[0], pairs=table_pairs)
  sources = sorted({g["r_src"] for g in gains}, reverse=True)  # largest source on top, as in the paper
  targets = sorted({g["r_tgt"] for g in gains})
  n_tasks = len({g["task"] for g in gains})
  # With one task, each cell also shows its paired bootstrap interval (bold: it excludes zero); a
  # mean over several tasks has none (the per-task intervals are in heatmap_comparisons.md).
  score_metric = _score_metric(rows) if n_tasks == 1 else None
  lower = _lower_is_better_tasks(rows)  # score differences negated there: positive = better
  score_sign = -1.0 if lower else 1.0
  over = f"{gains[0]['task']}, 95 % intervals" if n_tasks == 1 else f"mean over {n_tasks} tasks"
  matrices = {}
  for method in methods:
    mine = [g for g in gains if g["method"] == method]
    matrix = gain_matrix(mine, value=lambda g: g["gain"], sources=sources, targets=targets)
    matrices[method] = matrix
    plots.plot_heatmap(
      matrix,
      row_labels=sources,
      col_labels=targets,
      path=workdir / f"heatmap_{method}.png",
      title=f"Post-Squeeze ({method}) against direct, {over}",
      xlabel="target rank r_tgt",
      ylabel="source rank r_src",
      cbar_label="score gain (red = Post-Squeeze better)",
      **_cell_intervals(records, score_metric, score_sign, method, sources, targets),
    )
    body = [[r_src, *matrix[i]] for i, r_src in enumerate(sources)]
    tables.atomic_write_text(
      workdir / f"heatmap_{method}.md",
      tables.markdown_table(["r_src \\ r_tgt", *map(str, targets)], body, float_format="{:+.2f}"),
    )
    nll_matrix = gain_matrix(mine, value=lambda g: g["nll_gain"], sources=sources, targets=targets)
    if np.isfinite(nll_matrix).any():
      matrices[f"{method}_nll"] = nll_matrix
      plots.plot_heatmap(
        nll_matrix,
        row_labels=sources,
        col_labels=targets,
        path=workdir / f"heatmap_{method}_nll.png",
        title=f"option NLL: direct minus Post-Squeeze ({method}), {over}",
        xlabel="target rank r_tgt",
        ylabel="source rank r_src",
        cbar_label="NLL difference (nats; red = Post-Squeeze lower)",
        fmt="{:+.3f}",
        **_cell_intervals(records, "option_nll" if n_tasks == 1 else None, -1.0, method, sources, targets),
      )
      body = [[r_src, *nll_matrix[i]] for i, r_src in enumerate(sources)]
      tables.atomic_write_text(
        workdir / f"heatmap_{method}_nll.md",
        tables.markdown_table(["r_src \\ r_tgt", *map(str, targets)], body, float_format="{:+.3f}"),
      )
  if len(methods) >= 2:
    first, second = methods[:2]
    by_key = {(g["task"], g["r_src"], g["r_tgt"], g["method"]): g["post_squeeze"] for g in gains}
    diffs = [
      {
        "r_src": g["r_src"],
        "r_tgt": g["r_tgt"],
        "diff": (-1.0 if g["task"] in lower else 1.0)
        * (g["post_squeeze"] - by_key.get((g["task"], g["r_src"], g["r_tgt"], second), math.nan)),
      }
      for g in gains
      if g["method"] == first
    ]
    matrix = gain_matrix(diffs, value=lambda d: d["diff"], sources=sources, targets=targets)
    matrices[f"{first}_vs_{second}"] = matrix
    plots.plot_heatmap(
      matrix,
      row_labels=sources,
      col_labels=targets,
      path=workdir / f"heatmap_{first}_vs_{second}.png",
      title=f"Post-Squeeze {first} against {second}, {over}",
      xlabel="target rank r_tgt",
      ylabel="source rank r_src",
      cbar_label=f"score difference (red = {first} better)",
      fmt="{:+.2f}",
    )
  return matrices


def run_study(
  study: ml_collections.ConfigDict,
  *,
  workdir: pathlib.Path,
  train: bool = True,
  train_fn: Callable = grid.train_run,
  log: Callable[[str], None] = grid.log_line,
) -> dict[str, np.ndarray]:
  """Trains the missing cells (unless train=False), then writes every report from the run files."""
  rows = grid.run_grid(study, cells, workdir=workdir, train=train, train_fn=train_fn, log=log)
  return write_report(
    rows, pathlib.Path(workdir), methods=tuple(study.methods), table_pairs=tuple(map(tuple, study.table_pairs))
  )


if __name__ == "__main__":
  driver.run(run_study)
