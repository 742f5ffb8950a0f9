"""What a run prints: durations (ETA), the periodic train line and the final table of evaluations.

Durations (the ETA) are formatted by lora_squeeze.durations, the one format of every progress line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lora_squeeze import bootstrap
from lora_squeeze.durations import format_duration


def train_line(
  *,
  global_step: int,
  total_steps: int,
  stage_no: int,
  n_stages: int,
  rank: int,
  loss: float,
  grad_norm: float,
  lr: float,
  tokens_per_s: float | None,
  eta_seconds: float,
) -> str:
  """The console line of a logging step."""
  return (
    f"step {global_step}/{total_steps} stage {stage_no}/{n_stages} r={rank} "
    f"loss {loss:.4f} grad_norm {grad_norm:.3g} lr {lr:.3g} "
    f"tokens/s {'?' if tokens_per_s is None else f'{tokens_per_s:.1f}'} ETA {format_duration(eta_seconds)}"
  )


def _interval(metric: str, items: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]]) -> str:
  c = bootstrap.compare_items(metric, [items], [reference])
  return f"{c.mean:+.4f} [{c.low:+.4f}, {c.high:+.4f}]{' *' if c.excludes_zero else ''}"


def _title(metric: str) -> str:
  """A metric's name and which way is better, for a column header."""
  return f"{metric} ({'lower' if metric in bootstrap.LOWER_IS_BETTER else 'higher'} is better)"


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
  """Header, a dashed rule and the rows, in columns as wide as their widest cell."""
  widths = [max(len(c) for c in col) for col in zip(header, *rows)]
  return ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, ["-" * w for w in widths], *rows]]


def table_lines(evals: Mapping[str, Mapping[str, Any]], baselines: Sequence[str] = ()) -> list[str]:
  """The final table: one row per evaluation tag (rank, V_r, then every metric any row has, each
  header saying which way is better), and, where the rows carry per-item scores, each later
  evaluation minus the first with its paired bootstrap 95 % interval over the items
  (lora_squeeze.bootstrap.compare_items: a ratio metric such as token_nll resampled as a ratio of
  sums; * = the interval excludes zero).

  Each tag in `baselines` (e.g. direct training after a Restart) then gets a second table: every
  other trained evaluation minus that baseline, with the same intervals."""
  metric_names = list(dict.fromkeys(k for row in evals.values() for k in row["metrics"]))
  header = ["tag", "rank", "V_r", *map(_title, metric_names)]
  rows = [
    [
      tag,
      str(row["rank"]),
      "-" if row["retention"] is None else f"{row['retention']:.4f}",
      *(f"{row['metrics'][m]:.4f}" if m in row["metrics"] else "-" for m in metric_names),
    ]
    for tag, row in evals.items()
  ]
  scored = [(tag, row["per_item"]) for tag, row in evals.items() if row.get("per_item")]
  if len(scored) > 1:
    first, first_items = scored[0]
    compared = bootstrap.compared_metrics(*(items for _, items in scored))
    header += [f"{_title(m)} minus {first} [95% CI]" for m in compared]
    for tag, row in zip(evals, rows):
      items = evals[tag].get("per_item")
      if tag == first or not items:
        row += ["-"] * len(compared)
        continue
      for m in compared:
        row.append(_interval(m, items, first_items))
  lines = _aligned(header, rows)
  if len(scored) > 1:
    for baseline in baselines:
      base_items = evals.get(baseline, {}).get("per_item")
      others = [(tag, items) for tag, items in scored if tag != baseline]
      if not base_items or not others:
        continue
      compared = bootstrap.compared_metrics(base_items, *(items for _, items in others))
      header = [f"minus {baseline}", *(f"{_title(m)} [95% CI]" for m in compared)]
      table = [[tag, *(_interval(m, items, base_items) for m in compared)] for tag, items in others]
      lines += ["", *_aligned(header, table)]
    lines.append("(* = the interval excludes zero: a difference beyond the sampling of evaluation items)")
  return lines
