"""Paired bootstrap confidence intervals over evaluation items: "adapter X minus adapter Y" on the same items.

Two adapters scored on the same evaluation items are compared item by item. With S seeds of each,
the difference is d[s, i] = treatment[s, i] - baseline[s, i] and the reported effect is its mean over
seeds and items. The interval resamples items with replacement (the same items for every seed, as
the items are shared), B = 10,000 times, and takes the 2.5 / 97.5 percentiles of the resampled means
(percentile bootstrap, Efron & Tibshirani 1993, ch. 13). It measures how much the effect could change
with another draw of evaluation items of the same distribution; the spread across training seeds is
reported beside it as the sign of the effect in each seed. A difference is called a difference only
when its interval excludes zero.

    c = paired_bootstrap(treatment, baseline)       # (S, n) or (n,) arrays of per-item scores
    c.mean, c.low, c.high, c.per_seed, c.excludes_zero, format_comparison(c, scale=100)
    c = compare_items("token_nll", [per_item_t], [per_item_b])   # one per-item dict per seed

A ratio-of-sums metric (NLL per target token: the items' summed NLLs over their summed token
counts) is the weighted mean of the per-item ratios x_i = nll_i / n_i with weights w_i = n_i, so
`weights` makes the statistic sum_i w_i d_i / sum_i w_i, in the estimate and in every resample:
the interval is then exact for the ratio of sums, not for the mean of per-item ratios.

The trainer's closing table uses it (lora_squeeze.train); the study reports use it through
experiments/stats.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_squeeze.errors import UserInputError

N_BOOT = 10_000
CONFIDENCE = 0.95
# Resampled means are computed this many bootstrap replicates at a time (bounds the index array).
_CHUNK = 1_000
# Per-item score keys (results.json "per_item"): metrics where lower is better, and the ratio metrics:
# per_item[metric][i] is item i's numerator (its summed NLL) and per_item[RATIO_METRICS[metric]][i]
# its denominator (its target tokens); the metric is sum(numerators) / sum(denominators).
LOWER_IS_BETTER = frozenset({"option_nll", "token_nll"})
RATIO_METRICS = {"token_nll": "target_tokens"}


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
    raise UserInputError(
      f"{name}: expected per-item scores of shape (items,) or (seeds, items) with at least one "
      f"item, got shape {np.shape(values)}"
    )
  if not np.all(np.isfinite(array)):
    raise UserInputError(f"{name}: per-item scores must be finite (a failed run has none)")
  return array


def paired_bootstrap(
  treatment: Any,
  baseline: Any,
  *,
  weights: Any = None,
  n_boot: int = N_BOOT,
  confidence: float = CONFIDENCE,
  seed: int = 0,
) -> Comparison:
  """treatment - baseline over the same items: mean, percentile-bootstrap interval, per-seed means.

  Args:
    treatment, baseline: per-item scores, (n_items,) or (n_seeds, n_items), row s of both from
      seed s, column i from evaluation item i.
    weights: (n_items,) positive item weights (target tokens); None = equal. The statistic is the
      weighted mean over items, also within every resample (module docstring).
    n_boot: bootstrap replicates; confidence: interval level in (0, 1); seed: the resampling RNG's.
  """
  t, b = _as_matrix("treatment", treatment), _as_matrix("baseline", baseline)
  if t.shape != b.shape:
    raise UserInputError(
      f"treatment and baseline must be scored on the same seeds and items, got shapes {t.shape} and {b.shape}"
    )
  w = np.ones(t.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
  if w.shape != (t.shape[1],) or not np.all(np.isfinite(w)) or not np.all(w > 0):
    raise UserInputError(
      f"weights: expected {t.shape[1]} finite positive numbers (one per item), got shape {w.shape}"
      + (f", smallest {w.min()}" if w.size else "")
    )
  if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
    raise UserInputError(f"n_boot={n_boot!r}: expected an integer >= 1")
  if not 0 < confidence < 1:
    raise UserInputError(f"confidence={confidence!r}: expected a number in (0, 1)")
  d = t - b
  # The statistic (the weighted mean over seeds and items) resampled with the same items for every
  # seed is the weighted mean of the per-item seed averages over the resampled items.
  per_item = d.mean(axis=0)
  n = per_item.size
  rng = np.random.default_rng(seed)
  means = np.empty(n_boot)
  for start in range(0, n_boot, _CHUNK):
    stop = min(start + _CHUNK, n_boot)
    index = rng.integers(0, n, size=(stop - start, n))
    if weights is None:
      means[start:stop] = per_item[index].mean(axis=1)
    else:
      means[start:stop] = (w[index] * per_item[index]).sum(axis=1) / w[index].sum(axis=1)
  alpha = (1 - confidence) / 2
  low, high = np.quantile(means, [alpha, 1 - alpha])
  return Comparison(
    mean=float(np.average(per_item, weights=w)),
    low=float(low),
    high=float(high),
    per_seed=tuple(float(x) for x in np.average(d, axis=1, weights=w)),
    n_items=n,
    confidence=confidence,
    n_boot=n_boot,
  )


def compared_metrics(*per_items: Mapping[str, Sequence[float]]) -> list[str]:
  """The metrics every one of `per_items` (results.json "per_item" dicts) can be compared on, in the
  first one's order: its keys, less the denominators of ratio metrics (RATIO_METRICS)."""
  denominators = set(RATIO_METRICS.values())
  first, *rest = per_items
  return [m for m in first if m not in denominators and all(_has_metric(p, m) for p in per_items)]


def _has_metric(per_item: Mapping[str, Sequence[float]], metric: str) -> bool:
  return metric in per_item and (metric not in RATIO_METRICS or RATIO_METRICS[metric] in per_item)


def metric_value(per_item: Mapping[str, Sequence[float]], metric: str) -> float:
  """The metric over the items: their mean, or for a ratio metric sum(numerators) / sum(denominators)."""
  if metric in RATIO_METRICS:
    return float(np.sum(per_item[metric]) / np.sum(per_item[RATIO_METRICS[metric]]))
  return float(np.mean(per_item[metric]))


def compare_items(
  metric: str,
  treatment: Sequence[Mapping[str, Sequence[float]]],
  baseline: Sequence[Mapping[str, Sequence[float]]],
  **options: Any,
) -> Comparison:
  """treatment minus baseline on `metric`, from one per-item dict per seed on each side (seed s of
  both in position s). A ratio metric is compared per item as numerator / denominator weighted by
  the denominator, which every dict must give the same (the same reference targets); `options` go
  to paired_bootstrap."""
  if metric not in RATIO_METRICS:
    return paired_bootstrap([p[metric] for p in treatment], [p[metric] for p in baseline], **options)
  key = RATIO_METRICS[metric]
  counts = np.asarray(baseline[0][key], dtype=np.float64)
  for p in (*treatment, *baseline):
    if np.shape(p[key]) != counts.shape or not np.array_equal(p[key], counts):
      raise UserInputError(f"{metric}: the compared evaluations count different {key} per item; score the same items")
  return paired_bootstrap(
    [np.asarray(p[metric], np.float64) / counts for p in treatment],
    [np.asarray(p[metric], np.float64) / counts for p in baseline],
    weights=counts,
    **options,
  )


def format_comparison(c: Comparison, *, scale: float = 1.0, digits: int = 2) -> str:
  """e.g. "+2.38 [+0.48, +4.29] ++-" (mean, interval, sign per seed); bold when it excludes zero."""
  text = f"{c.mean * scale:+.{digits}f} [{c.low * scale:+.{digits}f}, {c.high * scale:+.{digits}f}] {c.signs}"
  return f"**{text}**" if c.excludes_zero else text
