"""experiments/stats.py: the paired bootstrap against closed forms, a plain-loop reference and coverage."""

import numpy as np
import pytest

from experiments import stats
from lora_squeeze.errors import UserInputError


def test_constant_shift_gives_a_point_interval():
  rng = np.random.default_rng(0)
  base = rng.random((3, 50))
  c = stats.paired_bootstrap(base + 0.25, base, n_boot=500)
  assert c.mean == pytest.approx(0.25)
  assert c.low == pytest.approx(0.25) and c.high == pytest.approx(0.25)
  assert c.per_seed == pytest.approx((0.25, 0.25, 0.25)) and c.signs == "+++" and c.excludes_zero


def test_swapping_sides_mirrors_the_interval():
  rng = np.random.default_rng(1)
  a, b = rng.random((2, 80)), rng.random((2, 80))
  ab, ba = stats.paired_bootstrap(a, b, seed=3), stats.paired_bootstrap(b, a, seed=3)
  assert ab.mean == pytest.approx(-ba.mean)
  assert ab.low == pytest.approx(-ba.high) and ab.high == pytest.approx(-ba.low)


def test_matches_a_plain_loop_reference():
  """Chunked, vectorised resampling equals resampling one replicate at a time with the same draws."""
  rng = np.random.default_rng(2)
  t, b = rng.normal(size=(2, 37)), rng.normal(size=(2, 37))
  c = stats.paired_bootstrap(t, b, n_boot=2500, seed=7)
  draws = np.random.default_rng(7)
  d = t - b
  means = []
  for _ in range(2500):
    index = draws.integers(0, 37, size=(1, 37))[0]
    means.append(np.mean(d[:, index]))  # mean over seeds and the resampled items
  assert c.low == pytest.approx(np.quantile(means, 0.025))
  assert c.high == pytest.approx(np.quantile(means, 0.975))


def test_interval_width_matches_the_normal_approximation():
  """For a mean of n i.i.d. differences the interval is about ±1.96 σ/√n."""
  rng = np.random.default_rng(4)
  d = rng.normal(0.0, 1.0, size=2000)
  c = stats.paired_bootstrap(d, np.zeros_like(d), n_boot=20_000)
  half = 1.96 * d.std() / np.sqrt(d.size)
  assert (c.high - c.low) / 2 == pytest.approx(half, rel=0.05)
  assert c.low < d.mean() < c.high


def test_pairing_narrows_the_interval_of_correlated_scores():
  rng = np.random.default_rng(5)
  shared = rng.normal(size=400)
  t, b = shared + 0.1 + 0.1 * rng.normal(size=400), shared + 0.1 * rng.normal(size=400)
  paired = stats.paired_bootstrap(t, b)
  unpaired_half = 1.96 * np.sqrt(t.var() / 400 + b.var() / 400)
  assert paired.excludes_zero and (paired.high - paired.low) / 2 < unpaired_half / 3


def test_coverage_near_nominal():
  """Under a true difference of zero, about 95 % of intervals contain zero."""
  rng = np.random.default_rng(6)
  hits = sum(
    not stats.paired_bootstrap(rng.normal(size=60), np.zeros(60), n_boot=1000, seed=s).excludes_zero for s in range(200)
  )
  assert 0.89 <= hits / 200 <= 0.99


@pytest.mark.parametrize(
  "t, b, match",
  [
    (np.zeros(5), np.zeros(6), "same seeds and items"),
    (np.zeros((0,)), np.zeros((0,)), "at least one item"),
    (np.array([0.0, np.nan]), np.zeros(2), "finite"),
  ],
)
def test_bad_input_raises_one_line(t, b, match):
  with pytest.raises(UserInputError, match=match):
    stats.paired_bootstrap(t, b)


def test_compare_groups_pairs_by_common_seeds_and_formats():
  items = {
    "x": {1: {"accuracy": [1, 1, 1, 0]}, 2: {"accuracy": [1, 1, 0, 0]}},
    "y": {1: {"accuracy": [0, 0, 0, 0]}, 3: {"accuracy": [1, 1, 1, 1]}},
  }
  [record] = stats.compare_groups(items, [("x", "y"), ("x", "missing")], metrics=("accuracy",))
  assert record["seeds"] == [1] and record["accuracy"].mean == pytest.approx(0.75)
  table = stats.comparison_table([record], metrics=("accuracy",))
  assert "+75.0" in table and "better" in table
