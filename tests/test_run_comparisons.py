"""experiments.run_comparisons: every evaluation minus a baseline of the same run, and its figure."""

import numpy as np
import pytest

from experiments import run_comparisons
from lora_squeeze.errors import UserInputError


def evals():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 2, 200).astype(float)
  better = np.maximum(base, rng.integers(0, 2, 200))  # never worse, often better
  return {
    "direct_r1": {"per_item": {"accuracy": base.tolist()}},
    "r16_to_r1": {"per_item": {"accuracy": better.tolist()}},
    "r16": {"per_item": {"accuracy": base.tolist()}},
    "no_items": {"per_item": None},
  }


def test_comparisons_are_paired_differences_against_the_baseline(tmp_path):
  got = run_comparisons.comparisons(evals(), "direct_r1")
  assert set(got) == {"r16_to_r1", "r16"}
  e = evals()
  want = np.mean(np.subtract(e["r16_to_r1"]["per_item"]["accuracy"], e["direct_r1"]["per_item"]["accuracy"]))
  assert got["r16_to_r1"]["accuracy"].mean == pytest.approx(want) and got["r16_to_r1"]["accuracy"].excludes_zero
  same = got["r16"]["accuracy"]
  assert (same.mean, same.low, same.high, same.excludes_zero) == (0.0, 0.0, 0.0, False)
  path = tmp_path / "fig.png"
  run_comparisons.plot([("run", got)], "direct_r1", path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_baseline_without_per_item_scores_is_named():
  with pytest.raises(
    UserInputError,
    match=r"baseline 'direct_r4' has no per-item scores; tags with them: \['direct_r1', 'r16', 'r16_to_r1'\]$",
  ):
    run_comparisons.comparisons(evals(), "direct_r4")


def test_interval_plot_is_blue_only_where_the_interval_excludes_zero(tmp_path):
  import matplotlib.image as mpimg

  from experiments import plots

  got = run_comparisons.comparisons(evals(), "direct_r1")
  xlabel = {"accuracy": "accuracy"}
  plots.plot_intervals(
    [("same", {"accuracy": got["r16"]["accuracy"]})], path=tmp_path / "g.png", title="t", xlabel=xlabel
  )
  plots.plot_intervals([("better", got["r16_to_r1"])], path=tmp_path / "b.png", title="t", xlabel=xlabel)
  blue = lambda p: (lambda im: ((im[..., 2] - im[..., 0]) > 0.3).sum())(mpimg.imread(p)[..., :3])  # noqa: E731
  assert blue(tmp_path / "b.png") > 50 and blue(tmp_path / "g.png") == 0
  with pytest.raises(ValueError, match=r"no comparison has any of the metrics \['option_nll'\]"):
    plots.plot_intervals([("x", got["r16"])], path=tmp_path / "x.png", title="t", xlabel={"option_nll": "nll"})
