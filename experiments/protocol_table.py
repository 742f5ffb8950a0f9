"""Direct vs Post-, Cont- and In-Squeeze at an equal training budget (paper Table 1 / 7 / 8).

    python -m experiments.protocol_table --config=experiments/protocol_table.py:reduced --workdir=studies/protocols

Per task and seed, with N = steps and each M in extra_steps (paper: r_src = 128, r_tgt = 1,
M in {200, 700}):
  zero_shot    the base model (the first direct run scores its untrained adapter, ΔW = 0)
  direct       train at r_tgt for N steps                       } one run per M: N steps, then M more
  direct+M     ... then M more steps (fresh optimizer, 100-step warmup)   at r_tgt (lr of r_tgt)
  post         train at r_src for N steps, squeeze to r_tgt      } one run per M: the squeeze, then M
  cont+M       ... then M steps at r_tgt (lr of r_tgt, 100-step warmup)   more steps at r_tgt
  in_squeeze   anneal r_src -> r_src/2 -> ... -> r_tgt in N + in_squeeze_extra steps, stages
               proportional to their rank (the standard scheme)
  in_squeeze_min   the same with at least `min_steps` per stage (the minimum-steps scheme)
"direct" and "post" come from the first M's runs (the later ones repeat them exactly).

Writes into --workdir: rows.json/rows.csv, protocol_table.csv (task x protocol, mean over seeds;
an "average" row) and protocol_table.md (best trained protocol per row in bold; zero-shot is the
reference); for scored tasks also protocol_table_nll.csv/.md (option NLL in nats, lowest in bold).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence

import ml_collections
from absl import app

from experiments import common
from experiments import stats
from lora_squeeze import protocols


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Presets: "paper" (default), "reduced" (Gemma 3 270M + mmlu_field on CPU), "tiny" (tests)."""
  study = common.study_config(arg)
  study.r_src, study.r_tgt = {"paper": (128, 1), "reduced": (16, 1), "tiny": (4, 1)}[study.preset]
  study.extra_steps = {"paper": (200, 700), "reduced": (30,), "tiny": (2,)}[study.preset]
  study.extra_warmup = {"paper": 100, "reduced": 5, "tiny": 1}[study.preset]
  # In-Squeeze's budget is N + this many steps (equal to direct+M and cont+M for that M).
  study.in_squeeze_extra = study.extra_steps[0]
  study.min_steps = {"paper": 200, "reduced": 10, "tiny": 1}[study.preset]
  study.stage_warmup = study.extra_warmup
  study.method = "qr_core"
  return study


def protocol_names(study: ml_collections.ConfigDict) -> list[str]:
  """Table columns, in the paper's order."""
  extras = list(study.extra_steps)
  return [
    "zero_shot",
    "direct",
    *(f"direct+{m}" for m in extras),
    "post",
    *(f"cont+{m}" for m in extras),
    "in_squeeze",
    "in_squeeze_min",
  ]


def cells(study: ml_collections.ConfigDict, lr_for_rank: Callable[[int], float]) -> list[common.Cell]:
  """Per task x seed: a direct(+M) and a cont(+M) run per M, and the two In-Squeeze runs."""
  r_src, r_tgt = study.r_src, study.r_tgt
  if not (isinstance(r_src, int) and isinstance(r_tgt, int) and 0 < r_tgt < r_src):
    raise ValueError(f"need integer ranks 0 < r_tgt < r_src, got r_tgt={r_tgt!r}, r_src={r_src!r}")
  out = []
  for task in study.tasks:
    steps = common.steps_for(study, task)
    for seed in study.seeds:

      def cell(name, plan, evals, task=task, seed=seed):
        return common.Cell(
          name=f"{task}/{name}_s{seed}",
          plan=plan,
          overrides=common.run_overrides(task=task, seed=seed),
          labels={"study": "protocols", "task": task, "r_src": r_src, "r_tgt": r_tgt, "seed": seed},
          evals=evals,
          cost=protocols.plan_steps(plan),
        )

      for i, m in enumerate(study.extra_steps):
        plan = protocols.direct(
          rank=r_tgt,
          steps=steps,
          lr=lr_for_rank(r_tgt),
          warmup=study.warmup,
          extra_steps=m,
          extra_warmup=study.extra_warmup,
        )
        direct_tag, plus_tag = protocols.eval_tags(plan)
        evals = {plus_tag: {"protocol": f"direct+{m}"}}
        if i == 0:
          evals[direct_tag] = {"protocol": "direct"}
          plan = protocols.validate_plan((protocols.Evaluate(tag="zero_shot"), *plan))
          evals["zero_shot"] = {"protocol": "zero_shot"}
        out.append(cell(plus_tag, plan, evals))
        plan = protocols.cont_squeeze(
          r_src=r_src,
          r_tgt=r_tgt,
          steps=steps,
          extra_steps=m,
          lr_src=lr_for_rank(r_src),
          lr_tgt=lr_for_rank(r_tgt),
          warmup=study.warmup,
          extra_warmup=study.extra_warmup,
          method=study.method,
        )
        post_tag, plus_tag = protocols.eval_tags(plan)
        evals = {plus_tag: {"protocol": f"cont+{m}"}}
        if i == 0:
          evals[post_tag] = {"protocol": "post"}
        out.append(cell(f"cont_{plus_tag}", plan, evals))
      ranks = protocols.halving_ranks(r_src, r_tgt)
      for scheme, name in (("proportional", "in_squeeze"), ("min_steps", "in_squeeze_min")):
        plan = protocols.in_squeeze(
          ranks=ranks,
          total_steps=steps + study.in_squeeze_extra,
          lr_for_rank=lr_for_rank,
          scheme=scheme,
          min_steps=study.min_steps,
          warmup=study.warmup,
          stage_warmup=study.stage_warmup,
          method=study.method,
        )
        out.append(
          cell(f"{name}_r{r_src}_to_r{r_tgt}", plan, {tag: {"protocol": name} for tag in protocols.eval_tags(plan)})
        )
  return out


def table(rows: Sequence[common.Row], columns: Sequence[str], *, field: str = "score") -> tuple[list[str], list[list]]:
  """Task rows (mean of `field` over seeds) plus an "average" row over tasks with every column;
  NaN if missing."""
  means = common.mean_score(
    common.select(rows, study="protocols"), key=lambda r: (r["task"], r["protocol"]), field=field
  )
  tasks = sorted({task for task, _ in means})
  body = [[task, *(means.get((task, c), math.nan) for c in columns)] for task in tasks]
  if len(tasks) > 1:
    average = []
    for j in range(len(columns)):
      values = [row[1 + j] for row in body]
      average.append(math.nan if any(math.isnan(v) for v in values) else sum(values) / len(values))
    body.append(["average", *average])
  return tasks, body


def write_table(
  body: Sequence[list], workdir: pathlib.Path, name: str, *, columns: Sequence[str], best: Callable, float_format: str
) -> None:
  """<name>.csv and <name>.md; in each row the `best` (max or min) trained protocol is bold."""
  common.write_csv(workdir / f"{name}.csv", [dict(zip(["task", *columns], row)) for row in body], ["task", *columns])
  bold = set()
  for i, row in enumerate(body):
    trained = [(1 + j, v) for j, (c, v) in enumerate(zip(columns, row[1:])) if c != "zero_shot" and not math.isnan(v)]
    if trained:
      target = best(v for _, v in trained)
      bold |= {(i, j) for j, v in trained if v == target}
  common.atomic_write_text(
    workdir / f"{name}.md", common.markdown_table(["task", *columns], body, bold=bold, float_format=float_format)
  )


def write_report(rows: Sequence[common.Row], workdir: pathlib.Path, *, columns: Sequence[str]) -> list[list]:
  """protocol_table.csv/.md (score, best per row bold) and, when the rows have option NLLs,
  protocol_table_nll.csv/.md (lowest per row bold), from the rows."""
  _, body = table(rows, columns)
  write_table(body, workdir, "protocol_table", columns=columns, best=max, float_format="{:.1f}")
  if any("nll" in r for r in rows):
    _, nll_body = table(rows, columns, field="nll")
    write_table(nll_body, workdir, "protocol_table_nll", columns=columns, best=min, float_format="{:.4f}")
  write_comparisons(rows, workdir, columns=columns)
  return body


def comparison_pairs(tasks: Sequence[str], columns: Sequence[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
  """Per task: direct vs zero-shot, every other trained protocol vs direct (N steps) and the
  protocols with the budget N + M (cont+M, the In-Squeeze schemes) also vs direct+M (first M)."""
  extra = next((c for c in columns if c.startswith("direct+")), None)
  pairs = []
  for task in tasks:
    pairs.append(((task, "direct"), (task, "zero_shot")))
    for c in columns:
      if c in ("zero_shot", "direct"):
        continue
      pairs.append(((task, c), (task, "direct")))
      if extra and (c.startswith("cont+") or c.startswith("in_squeeze")):
        pairs.append(((task, c), (task, extra)))
  return pairs


def write_comparisons(rows: Sequence[common.Row], workdir: pathlib.Path, *, columns: Sequence[str]) -> list[dict]:
  """protocol_comparisons.md/.csv: each comparison of comparison_pairs with its paired bootstrap
  interval over items and sign per seed (experiments/stats.py); nothing without per-item scores."""
  rows = common.select(rows, study="protocols")
  grouped = stats.group_items(rows, common.collect_items(workdir), key=lambda r: (r["task"], r["protocol"]))
  records = stats.compare_groups(grouped, comparison_pairs(sorted({r["task"] for r in rows}), columns))
  if records:
    stats.write_comparisons(
      workdir,
      "protocol_comparisons",
      records,
      label=lambda r: f"{r['treatment'][0]}: {r['treatment'][1]} vs {r['baseline'][1]}",
      title="Protocols against direct training",
    )
  return records


def run_study(
  study: ml_collections.ConfigDict,
  *,
  workdir: pathlib.Path,
  train: bool = True,
  train_fn: Callable = common.train_run,
  log: Callable[[str], None] = common.log_line,
) -> list[list]:
  """Trains the missing cells (unless train=False), then writes the table from the run files."""
  rows = common.run_grid(study, cells, workdir=workdir, train=train, train_fn=train_fn, log=log)
  return write_report(rows, pathlib.Path(workdir), columns=protocol_names(study))


if __name__ == "__main__":
  common.define_driver_flags()
  app.run(common.driver_main(run_study))
