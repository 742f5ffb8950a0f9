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

The trainer's closing table uses it (lora_squeeze.train); the study reports use it through
experiments/stats.py.
"""

from __future__ import annotations

import dataclasses
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
    raise UserInputError(
      f"{name}: expected per-item scores of shape (items,) or (seeds, items) with at least one "
      f"item, got shape {np.shape(values)}"
    )
  if not np.all(np.isfinite(array)):
    raise UserInputError(f"{name}: per-item scores must be finite (a failed run has none)")
  return array


def paired_bootstrap(
  treatment: Any, baseline: Any, *, n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0
) -> Comparison:
  """treatment - baseline over the same items: mean, percentile-bootstrap interval, per-seed means.

  Args:
    treatment, baseline: per-item scores, (n_items,) or (n_seeds, n_items), row s of both from
      seed s, column i from evaluation item i.
    n_boot: bootstrap replicates; confidence: interval level in (0, 1); seed: the resampling RNG's.
  """
  t, b = _as_matrix("treatment", treatment), _as_matrix("baseline", baseline)
  if t.shape != b.shape:
    raise UserInputError(
      f"treatment and baseline must be scored on the same seeds and items, got shapes {t.shape} and {b.shape}"
    )
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
  return Comparison(
    mean=float(per_item.mean()),
    low=float(low),
    high=float(high),
    per_seed=tuple(float(x) for x in d.mean(axis=1)),
    n_items=n,
    confidence=confidence,
    n_boot=n_boot,
  )


def format_comparison(c: Comparison, *, scale: float = 1.0, digits: int = 2) -> str:
  """e.g. "+2.38 [+0.48, +4.29] ++-" (mean, interval, sign per seed); bold when it excludes zero."""
  text = f"{c.mean * scale:+.{digits}f} [{c.low * scale:+.{digits}f}, {c.high * scale:+.{digits}f}] {c.signs}"
  return f"**{text}**" if c.excludes_zero else text
