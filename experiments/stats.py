"""Paired bootstrap confidence intervals for "protocol X minus direct training", over evaluation items.

Every run of a study is scored on the same evaluation items (the trainer records per-item scores:
results.json "per_item"), so two protocols are compared item by item. With S seeds of each, the
difference is d[s, i] = treatment[s, i] - baseline[s, i] and the reported effect is its mean over
seeds and items. The 95 % interval resamples items with replacement (the same items for every seed,
as the items are shared), B = 10,000 times, and takes the 2.5 / 97.5 percentiles of the resampled
means (percentile bootstrap, Efron & Tibshirani 1993, ch. 13). It measures how much the effect could
change with another draw of evaluation items of the same distribution; the spread across training
seeds is reported beside it as the sign of the effect in each seed. A difference is called a
difference only when its interval excludes zero.

    c = paired_bootstrap(treatment, baseline)       # (S, n) or (n,) arrays of per-item scores
    c.mean, c.low, c.high, c.per_seed, c.excludes_zero, format_comparison(c, scale=100)
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_squeeze.errors import UserInputError

N_BOOT = 10_000
CONFIDENCE = 0.95
# Resampled means are computed this many bootstrap replicates at a time (bounds the index array).
_CHUNK = 1_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class Comparison:
  """treatment minus baseline: mean over seeds and items, its paired-bootstrap interval, per seed.

  Attributes:
    mean: mean over seeds and items of treatment - baseline.
    low, high: the percentile bootstrap interval of `mean` at `confidence`.
    per_seed: the mean difference in each seed (same seed order as the inputs).
    n_items, confidence, n_boot: what the interval was computed from.
  """

  mean: float
  low: float
  high: float
  per_seed: tuple[float, ...]
  n_items: int
  confidence: float = CONFIDENCE
  n_boot: int = N_BOOT

  @property
  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0

  @property
  def signs(self) -> str:
    """One character per seed: + (treatment higher), - (lower), 0 (equal)."""
    return "".join("+" if d > 0 else "-" if d < 0 else "0" for d in self.per_seed)


def _as_matrix(name: str, values: Any) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim == 1:
    array = array[None, :]
  if array.ndim != 2 or array.shape[1] == 0 or array.shape[0] == 0:
    raise UserInputError(f"{name}: expected per-item scores of shape (items,) or (seeds, items) with at least one "
                         f"item, got shape {np.shape(values)}")
  if not np.all(np.isfinite(array)):
    raise UserInputError(f"{name}: per-item scores must be finite (a failed run has none)")
  return array


def paired_bootstrap(treatment: Any, baseline: Any, *, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                     seed: int = 0) -> Comparison:
  """treatment - baseline over the same items: mean, percentile-bootstrap interval, per-seed means.

  Args:
    treatment, baseline: per-item scores, (n_items,) or (n_seeds, n_items), row s of both from
      seed s, column i from evaluation item i.
    n_boot: bootstrap replicates; confidence: interval level in (0, 1); seed: the resampling RNG's.
  """
  t, b = _as_matrix("treatment", treatment), _as_matrix("baseline", baseline)
  if t.shape != b.shape:
    raise UserInputError(f"treatment and baseline must be scored on the same seeds and items, got shapes "
                         f"{t.shape} and {b.shape}")
  if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
    raise UserInputError(f"n_boot={n_boot!r}: expected an integer >= 1")
  if not 0 < confidence < 1:
    raise UserInputError(f"confidence={confidence!r}: expected a number in (0, 1)")
  d = t - b
  # The statistic (the mean over seeds and items) resampled with the same items for every seed is
  # the mean of the per-item seed averages over the resampled items.
  per_item = d.mean(axis=0)
  n = per_item.size
  rng = np.random.default_rng(seed)
  means = np.empty(n_boot)
  for start in range(0, n_boot, _CHUNK):
    stop = min(start + _CHUNK, n_boot)
    index = rng.integers(0, n, size=(stop - start, n))
    means[start:stop] = per_item[index].mean(axis=1)
  alpha = (1 - confidence) / 2
  low, high = np.quantile(means, [alpha, 1 - alpha])
  return Comparison(mean=float(per_item.mean()), low=float(low), high=float(high),
                    per_seed=tuple(float(x) for x in d.mean(axis=1)), n_items=n, confidence=confidence,
                    n_boot=n_boot)


def format_comparison(c: Comparison, *, scale: float = 1.0, digits: int = 2) -> str:
  """e.g. "+2.38 [+0.48, +4.29] ++-" (mean, interval, sign per seed); bold when it excludes zero."""
  text = f"{c.mean * scale:+.{digits}f} [{c.low * scale:+.{digits}f}, {c.high * scale:+.{digits}f}] {c.signs}"
  return f"**{text}**" if c.excludes_zero else text


# Metrics the comparison tables report: per-item key -> (column title, scale, digits, higher is better).
METRICS = {"accuracy": ("accuracy (points)", 100.0, 1, True), "option_nll": ("option NLL (nats)", 1.0, 4, False)}


def compare_groups(items: Mapping[Any, Mapping[int, Mapping[str, Sequence[float]]]],
                   pairs: Sequence[tuple[Any, Any]], *, metrics: Sequence[str] = tuple(METRICS)) -> list[dict[str, Any]]:
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
        record[metric] = paired_bootstrap([items[treatment][s][metric] for s in seeds],
                                          [items[baseline][s][metric] for s in seeds])
    out.append(record)
  return out


def comparison_table(records: Sequence[Mapping[str, Any]], *, label=str, metrics: Sequence[str] = tuple(METRICS)) -> str:
  """Markdown: comparison, seeds, then per metric "mean [95 % interval] signs" (bold = interval
  excludes zero) and the verdict (better / worse / no difference, for the treatment)."""
  from experiments import common  # pylint: disable=g-import-not-at-top

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
      title, scale, digits, higher_better = METRICS[metric]
      del title
      verdict = "no difference"
      if c.excludes_zero:
        verdict = "better" if (c.mean > 0) == higher_better else "worse"
      row += [format_comparison(c, scale=scale, digits=digits), verdict]
    body.append(row)
  return common.markdown_table(header, body)


def comparison_rows(records: Sequence[Mapping[str, Any]], *, label=str) -> list[dict[str, Any]]:
  """The records as flat CSV rows: comparison, seeds, and per metric mean/low/high/signs/excludes_zero."""
  rows = []
  for r in records:
    row = {"comparison": label(r), "seeds": " ".join(map(str, r["seeds"]))}
    for metric in METRICS:
      c = r.get(metric)
      if c is not None:
        row.update({f"{metric}_mean": c.mean, f"{metric}_low": c.low, f"{metric}_high": c.high,
                    f"{metric}_signs": c.signs, f"{metric}_excludes_zero": c.excludes_zero})
    rows.append(row)
  return rows


def group_items(rows: Sequence[Mapping[str, Any]], items: Mapping[tuple[str, str], Mapping[str, Sequence[float]]],
                key) -> dict[Any, dict[int, Mapping[str, Sequence[float]]]]:
  """{key(row): {seed: per-item scores}} for the rows whose (cell, tag) has per-item scores."""
  out: dict[Any, dict[int, Mapping[str, Sequence[float]]]] = {}
  for row in rows:
    found = items.get((row.get("cell"), row.get("tag")))
    if found:
      out.setdefault(key(row), {})[row["seed"]] = found
  return out


def write_comparisons(workdir, name: str, records: Sequence[Mapping[str, Any]], *, label=str, title: str = "") -> str:
  """<name>.md (comparison_table, under `title`) and <name>.csv (comparison_rows) in `workdir`;
  returns the Markdown."""
  from experiments import common  # pylint: disable=g-import-not-at-top

  note = (f"Mean over seeds and items, paired bootstrap {CONFIDENCE:.0%} interval over the evaluation items "
          f"({N_BOOT:,} resamples), then the sign per seed; bold = the interval excludes zero.\n\n")
  text = (f"{title}\n\n" if title else "") + note + comparison_table(records, label=label)
  common.atomic_write_text(pathlib.Path(workdir) / f"{name}.md", text)
  common.write_csv(pathlib.Path(workdir) / f"{name}.csv", comparison_rows(records, label=label))
  return text
