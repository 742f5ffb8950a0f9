"""Study-level comparisons against direct training, with paired bootstrap intervals over items.

The statistics are lora_squeeze.bootstrap's (re-exported here): per comparison the mean difference
over seeds and items, its 95 % percentile-bootstrap interval over the evaluation items and the sign
per seed. The drivers (heatmap, protocol_table) group the per-item scores the trainer recorded
(results.json "per_item", read by experiments.results.collect_items) and write <name>.md / <name>.csv.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from lora_squeeze.bootstrap import (  # noqa: F401
  CONFIDENCE,
  LOWER_IS_BETTER,
  N_BOOT,
  Comparison,
  compare_items,
  format_comparison,
  paired_bootstrap,
)

# Metrics the comparison tables report: per-item key -> (column title, scale, digits); which way is
# better is bootstrap.LOWER_IS_BETTER's. token_nll is compared as a ratio of sums (summed NLL over
# target tokens; bootstrap.compare_items).
METRICS = {
  "accuracy": ("accuracy (points)", 100.0, 1),
  "option_nll": ("option NLL (nats)", 1.0, 4),
  "token_nll": ("NLL per target token (nats, lower is better)", 1.0, 4),
}


def compare_groups(
  items: Mapping[Any, Mapping[int, Mapping[str, Sequence[float]]]],
  pairs: Sequence[tuple[Any, Any]],
  *,
  metrics: Sequence[str] = tuple(METRICS),
) -> list[dict[str, Any]]:
  """One record per (treatment, baseline) pair of group keys: per metric the Comparison over the
  seeds both groups have (per-item scores `items[group][seed][metric]`). Pairs with no common seed,
  or a metric either side lacks, are left out."""
  out = []
  for treatment, baseline in pairs:
    if treatment not in items or baseline not in items:
      continue
    seeds = sorted(set(items[treatment]) & set(items[baseline]))
    if not seeds:
      continue
    record = {"treatment": treatment, "baseline": baseline, "seeds": seeds}
    for metric in metrics:
      if all(metric in items[g][s] for g in (treatment, baseline) for s in seeds):
        record[metric] = compare_items(
          metric, [items[treatment][s] for s in seeds], [items[baseline][s] for s in seeds]
        )
    out.append(record)
  return out


def comparison_table(records: Sequence[Mapping[str, Any]], *, label=str, metrics: Sequence[str] | None = None) -> str:
  """Markdown: comparison, seeds, then per metric "mean [95 % interval] signs" (bold = interval
  excludes zero) and the verdict (better / worse / no difference, for the treatment). `metrics`
  defaults to those of METRICS that any record has."""
  from experiments import tables

  if metrics is None:
    metrics = [m for m in METRICS if any(m in r for r in records)]

  header = ["comparison", "seeds"]
  for metric in metrics:
    header += [METRICS[metric][0], "verdict"]
  body = []
  for r in records:
    row = [label(r), ",".join(map(str, r["seeds"]))]
    for metric in metrics:
      c = r.get(metric)
      if c is None:
        row += ["–", "–"]
        continue
      title, scale, digits = METRICS[metric]
      higher_better = metric not in LOWER_IS_BETTER
      del title
      verdict = "no difference"
      if c.excludes_zero:
        verdict = "better" if (c.mean > 0) == higher_better else "worse"
      row += [format_comparison(c, scale=scale, digits=digits), verdict]
    body.append(row)
  return tables.markdown_table(header, body)


def comparison_rows(records: Sequence[Mapping[str, Any]], *, label=str) -> list[dict[str, Any]]:
  """The records as flat CSV rows: comparison, seeds, and per metric mean/low/high/signs/excludes_zero."""
  rows = []
  for r in records:
    row = {"comparison": label(r), "seeds": " ".join(map(str, r["seeds"]))}
    for metric in METRICS:
      c = r.get(metric)
      if c is not None:
        row.update(
          {
            f"{metric}_mean": c.mean,
            f"{metric}_low": c.low,
            f"{metric}_high": c.high,
            f"{metric}_signs": c.signs,
            f"{metric}_excludes_zero": c.excludes_zero,
          }
        )
    rows.append(row)
  return rows


def group_items(
  rows: Sequence[Mapping[str, Any]], items: Mapping[tuple[str, str], Mapping[str, Sequence[float]]], key
) -> dict[Any, dict[int, Mapping[str, Sequence[float]]]]:
  """{key(row): {seed: per-item scores}} for the rows whose (cell, tag) has per-item scores."""
  out: dict[Any, dict[int, Mapping[str, Sequence[float]]]] = {}
  for row in rows:
    found = items.get((row.get("cell"), row.get("tag")))
    if found:
      out.setdefault(key(row), {})[row["seed"]] = found
  return out


def write_comparisons(
  workdir,
  name: str,
  records: Sequence[Mapping[str, Any]],
  *,
  label=str,
  title: str = "",
  sections: Sequence[tuple[str, Sequence[Mapping[str, Any]]]] = (),
) -> str:
  """<name>.md (comparison_table, under `title`, then one more table per (title, records) of
  `sections`), <name>.csv (comparison_rows of all of them) and <name>.png (each comparison's mean
  and interval per metric, plots.plot_intervals) in `workdir`; returns the Markdown."""
  from experiments import plots, tables

  note = (
    f"Mean over seeds and items, paired bootstrap {CONFIDENCE:.0%} interval over the evaluation items "
    f"({N_BOOT:,} resamples), then the sign per seed; bold = the interval excludes zero.\n\n"
  )
  text = (f"{title}\n\n" if title else "") + note + comparison_table(records, label=label)
  for section_title, section in sections:
    text += f"\n{section_title}\n\n" + comparison_table(section, label=label)
  every = [*records, *(r for _, section in sections for r in section)]
  tables.atomic_write_text(pathlib.Path(workdir) / f"{name}.md", text)
  tables.write_csv(pathlib.Path(workdir) / f"{name}.csv", comparison_rows(every, label=label))
  if every:
    plots.plot_intervals(
      [(label(r), {m: r[m] for m in METRICS if m in r}) for r in every],
      path=pathlib.Path(workdir) / f"{name}.png",
      title=title or name,
      xlabel={m: f"{METRICS[m][0]}, 95 % interval (blue: excludes 0)" for m in METRICS},
      scale={m: METRICS[m][1] for m in METRICS},
    )
  return text
