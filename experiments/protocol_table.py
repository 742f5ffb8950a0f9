"""Direct vs Post-, Cont- and In-Squeeze at an equal training budget (paper Table 1 / 7 / 8).

    python -m experiments.protocol_table --config=experiments/protocol_table.py:reduced --workdir=studies/protocols

Per task and seed, with N = steps and each M in extra_steps (paper: r_src = 128, r_tgt = 1,
M in {200, 700}):
  zero_shot    the base model (the first direct run scores its untrained adapter, ΔW = 0)
  direct       train at r_tgt for N steps                       } one run per M: N steps, then M more
  direct+M     ... then M more steps (fresh optimizer, 100-step warmup)   at r_tgt (lr of r_tgt)
  source       train at r_src for N steps (scored in the first cont run, before its squeeze; "source
               vs direct" is the gap between the ranks that the squeeze starts from)
  post         train at r_src for N steps, squeeze to r_tgt      } one run per M: the squeeze, then M
  cont+M       ... then M steps at r_tgt (lr of r_tgt, 100-step warmup)   more steps at r_tgt
  in_squeeze   anneal r_src -> r_src/2 -> ... -> r_tgt in N + in_squeeze_extra steps, stages
               proportional to their rank (the standard scheme)
  in_squeeze_min   the same with at least `min_steps` per stage (the minimum-steps scheme)
"direct" and "post" come from the first M's runs (the later ones repeat them exactly).

The optimizer state at a squeeze (`optimizer_states`, lora_squeeze.opt_state_projection; default
("reset",), the paper's): with ("reset", "project") the protocols that train after a squeeze
(cont+M, in_squeeze, in_squeeze_min) run once per state, the "project" runs with
optimizer_state_at_squeeze = "project" and `warmup_after_projection` on every stage that starts
from a projected state; zero_shot, direct, direct+M and post do not depend on it and run once. Their
table columns are `cont+M`, `in_squeeze`, ... for reset and `cont+M/project`, ... for project.
Every row carries `optimizer_state` (a row without it, from before this axis, is "reset").

Writes into --workdir: rows.json/rows.csv, protocol_table.csv (task x protocol, mean over seeds;
an "average" row) and protocol_table.md (best trained protocol per row in bold; zero-shot is the
reference); for scored tasks also protocol_table_nll.csv/.md (option NLL in nats, lowest in bold);
with per-item scores protocol_comparisons.md/.csv/.png (paired bootstrap intervals: each protocol
against direct, and with both states each protocol's project minus its reset).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from experiments import cells as cells_lib
from experiments import driver
from experiments import grid
from experiments import presets
from experiments import results as results_lib
from experiments import tables
from experiments import stats
from lora_squeeze import opt_state_projection
from lora_squeeze import protocols

# The row label of the optimizer state a run carried across its squeezes, and its value in rows
# written before the label existed (every run then reset its optimizer).
OPTIMIZER_STATE = "optimizer_state"
DEFAULT_STATE = "reset"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Presets: "paper" (default), "reduced" (Gemma 3 270M + mmlu_field on CPU), "tiny" (tests)."""
  study = presets.study_config(arg)
  study.r_src, study.r_tgt = {"paper": (128, 1), "reduced": (16, 1), "tiny": (4, 1)}[study.preset]
  study.extra_steps = {"paper": (200, 700), "reduced": (30,), "tiny": (2,)}[study.preset]
  study.extra_warmup = {"paper": 100, "reduced": 5, "tiny": 1}[study.preset]
  # In-Squeeze's budget is N + this many steps (equal to direct+M and cont+M for that M).
  study.in_squeeze_extra = study.extra_steps[0]
  study.min_steps = {"paper": 200, "reduced": 10, "tiny": 1}[study.preset]
  study.stage_warmup = study.extra_warmup
  study.method = "qr_core"
  # The optimizer state at a squeeze ("reset" | "project"): the protocols that train after a squeeze
  # run once per state; project's stages after a squeeze warm up over warmup_after_projection steps
  # (0: the setting that helped most in docs/training.md's first measurement).
  study.optimizer_states = ("reset",)
  study.warmup_after_projection = 0
  return study


def depends_on_state(protocol: str) -> bool:
  """Whether a protocol trains after a squeeze, so that the optimizer state at the squeeze matters."""
  return protocol.startswith("cont+") or protocol in ("in_squeeze", "in_squeeze_min")


def column(protocol: str, state: str = DEFAULT_STATE) -> str:
  """The table column of a protocol run with an optimizer state: `cont+30`, `cont+30/project`."""
  return protocol if state == DEFAULT_STATE or not depends_on_state(protocol) else f"{protocol}/{state}"


def row_column(row: cells_lib.Row) -> str:
  """The table column of a result row (rows without the optimizer_state label are reset's)."""
  return column(row["protocol"], row.get(OPTIMIZER_STATE, DEFAULT_STATE))


def optimizer_states(study: ml_collections.ConfigDict) -> tuple[str, ...]:
  """study.optimizer_states, checked: distinct values of opt_state_projection.MODES, at least one."""
  states = tuple(study.get("optimizer_states", (DEFAULT_STATE,)))
  if not states or len(set(states)) != len(states):
    raise ValueError(f"optimizer_states must name distinct states of {opt_state_projection.MODES}, got {states}")
  for state in states:
    opt_state_projection.check_mode(state)
  return states


def protocol_names(study: ml_collections.ConfigDict) -> list[str]:
  """Table columns, in the paper's order; a protocol that depends on the optimizer state has one
  column per state of study.optimizer_states, side by side."""
  extras = list(study.extra_steps)
  states = optimizer_states(study)
  per_state = lambda protocol: [column(protocol, state) for state in states]  # noqa: E731
  return [
    "zero_shot",
    "direct",
    *(f"direct+{m}" for m in extras),
    "source",
    "post",
    *(c for m in extras for c in per_state(f"cont+{m}")),
    *per_state("in_squeeze"),
    *per_state("in_squeeze_min"),
  ]


def _with_state(plan: protocols.Plan, state: str, warmup: int, evals: Mapping[str, Any]) -> protocols.Plan:
  """The plan of a run with optimizer state `state` (not reset): project's stages after a squeeze
  warm up over `warmup` steps, and only the Evaluate items of `evals` run (an evaluation before the
  squeeze, e.g. post, is the same for every state and scored by one run)."""
  if state == "project":
    plan = opt_state_projection.with_projected_warmup(plan, warmup)
  return protocols.validate_plan(p for p in plan if not (isinstance(p, protocols.Evaluate) and p.tag not in evals))


def cells(study: ml_collections.ConfigDict, lr_for_rank: Callable[[int], float]) -> list[cells_lib.Cell]:
  """Per task x seed: a direct(+M) run per M, and per optimizer state a cont(+M) run per M and the
  two In-Squeeze runs (reset's cells keep their names; project's get a `_project` suffix)."""
  r_src, r_tgt = study.r_src, study.r_tgt
  if not (isinstance(r_src, int) and isinstance(r_tgt, int) and 0 < r_tgt < r_src):
    raise ValueError(f"need integer ranks 0 < r_tgt < r_src, got r_tgt={r_tgt!r}, r_src={r_src!r}")
  states = optimizer_states(study)
  warmup_after_projection = study.get("warmup_after_projection", 0)
  # post (scored right after the squeeze, before any training) is the same for every state: one
  # run scores it, reset's when there is one.
  post_state = DEFAULT_STATE if DEFAULT_STATE in states else states[0]
  out = []
  for task in study.tasks:
    steps = presets.steps_for(study, task)
    for seed in study.seeds:

      def cell(name, plan, evals, state=DEFAULT_STATE, task=task, seed=seed):
        overrides = presets.run_overrides(task=task, seed=seed)
        if state != DEFAULT_STATE:  # the training config's keys (lora_squeeze/config_lib.py)
          overrides.update(optimizer_state_at_squeeze=state, warmup_after_projection=warmup_after_projection)
        return cells_lib.Cell(
          name=f"{task}/{name}{'' if state == DEFAULT_STATE else '_' + state}_s{seed}",
          plan=plan if state == DEFAULT_STATE else _with_state(plan, state, warmup_after_projection, evals),
          overrides=overrides,
          labels={
            "study": "protocols",
            "task": task,
            "r_src": r_src,
            "r_tgt": r_tgt,
            "seed": seed,
            OPTIMIZER_STATE: state,
          },
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
        if i == 0:  # the source adapter itself, scored once per seed before its squeeze
          source_tag = f"direct_r{r_src}"
          plan = protocols.validate_plan((plan[0], protocols.Evaluate(tag=source_tag), *plan[1:]))
        for state in states:
          evals = {plus_tag: {"protocol": f"cont+{m}"}}
          if i == 0 and state == post_state:
            evals[source_tag] = {"protocol": "source"}
            evals[post_tag] = {"protocol": "post"}
          out.append(cell(f"cont_{plus_tag}", plan, evals, state))
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
        for state in states:
          evals = {tag: {"protocol": name} for tag in protocols.eval_tags(plan)}
          out.append(cell(f"{name}_r{r_src}_to_r{r_tgt}", plan, evals, state))
  return out


def table(
  rows: Sequence[cells_lib.Row], columns: Sequence[str], *, field: str = "score"
) -> tuple[list[str], list[list]]:
  """Task rows (mean of `field` over seeds) plus an "average" row over tasks with every column;
  NaN if missing."""
  means = results_lib.mean_score(
    results_lib.select(rows, study="protocols"), key=lambda r: (r["task"], row_column(r)), field=field
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
  tables.write_csv(workdir / f"{name}.csv", [dict(zip(["task", *columns], row)) for row in body], ["task", *columns])
  bold = set()
  for i, row in enumerate(body):
    trained = [(1 + j, v) for j, (c, v) in enumerate(zip(columns, row[1:])) if c != "zero_shot" and not math.isnan(v)]
    if trained:
      target = best(v for _, v in trained)
      bold |= {(i, j) for j, v in trained if v == target}
  tables.atomic_write_text(
    workdir / f"{name}.md", tables.markdown_table(["task", *columns], body, bold=bold, float_format=float_format)
  )


def write_report(rows: Sequence[cells_lib.Row], workdir: pathlib.Path, *, columns: Sequence[str]) -> list[list]:
  """protocol_table.csv/.md (score, best per row bold: the highest, or the lowest for token_nll) and,
  when the rows have NLLs, protocol_table_nll.csv/.md (lowest per row bold), from the rows."""
  _, body = table(rows, columns)
  if results_lib.lower_is_better(rows):
    write_table(body, workdir, "protocol_table", columns=columns, best=min, float_format="{:.4f}")
  else:
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


def state_pairs(tasks: Sequence[str], columns: Sequence[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
  """Per task: every protocol run with another optimizer state (`cont+M/project`) vs the same
  protocol with reset (`cont+M`), where both are columns."""
  return [
    ((task, c), (task, c.partition("/")[0]))
    for task in tasks
    for c in columns
    if "/" in c and c.partition("/")[0] in columns
  ]


def write_comparisons(rows: Sequence[cells_lib.Row], workdir: pathlib.Path, *, columns: Sequence[str]) -> list[dict]:
  """protocol_comparisons.md/.csv/.png: each comparison of comparison_pairs, then (with two optimizer
  states) each of state_pairs in a section of its own, with its paired bootstrap interval over
  items and sign per seed (experiments/stats.py); nothing without per-item scores."""
  rows = results_lib.select(rows, study="protocols")
  grouped = stats.group_items(rows, results_lib.collect_items(workdir), key=lambda r: (r["task"], row_column(r)))
  tasks = sorted({r["task"] for r in rows})
  records = stats.compare_groups(grouped, comparison_pairs(tasks, columns))
  state_records = stats.compare_groups(grouped, state_pairs(tasks, columns))
  if records or state_records:
    stats.write_comparisons(
      workdir,
      "protocol_comparisons",
      records,
      label=_comparison_label,
      title="Protocols against direct training",
      sections=[
        (
          "Optimizer state at the squeeze: project against reset (same seeds, data and budget; "
          "the differences are project − reset)",
          state_records,
        )
      ]
      if state_records
      else (),
    )
  return [*records, *state_records]


def _comparison_label(record: dict) -> str:
  return f"{record['treatment'][0]}: {record['treatment'][1]} vs {record['baseline'][1]}"


def run_study(
  study: ml_collections.ConfigDict,
  *,
  workdir: pathlib.Path,
  train: bool = True,
  train_fn: Callable = grid.train_run,
  log: Callable[[str], None] = grid.log_line,
) -> list[list]:
  """Trains the missing cells (unless train=False), then writes the table from the run files."""
  rows = grid.run_grid(study, cells, workdir=workdir, train=train, train_fn=train_fn, log=log)
  return write_report(rows, pathlib.Path(workdir), columns=protocol_names(study))


if __name__ == "__main__":
  driver.run(run_study)
