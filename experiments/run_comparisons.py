"""One run's evaluations against a baseline of the same run, as a figure: every adapter minus the
baseline (e.g. the main job's `direct_r1`), per metric, with paired bootstrap 95 % intervals over
the evaluation items (the numbers the run's closing table prints).

    python -m experiments.run_comparisons --run=runs/default --baseline=direct_r1 --out=runs/default/vs_direct_r1.png
    python -m experiments.run_comparisons --run=A --run=B --label=all_targets --label=attn_out ...  # runs side by side
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app, flags

from experiments import plots
from lora_squeeze import bootstrap
from lora_squeeze.errors import UserInputError
from lora_squeeze.train import run_dir

_RUNS = flags.DEFINE_multi_string("run", [], "run folder(s) (results.json with per-item scores)")
_LABELS = flags.DEFINE_multi_string("label", [], "one label per --run (default: the folder names)")
_BASELINE = flags.DEFINE_string("baseline", "direct_r1", "the evaluation tag every other one is compared with")
_OUT = flags.DEFINE_string("out", None, "PNG path", required=True)


def comparisons(evals: dict, baseline: str) -> dict[str, dict[str, bootstrap.Comparison]]:
  """{tag: {metric: tag minus baseline}} for every evaluation with per-item scores but the baseline."""
  if baseline not in evals or not evals[baseline].get("per_item"):
    scored = sorted(tag for tag, row in evals.items() if row.get("per_item"))
    raise UserInputError(f"baseline {baseline!r} has no per-item scores; tags with them: {scored}")
  base = evals[baseline]["per_item"]
  out = {}
  for tag, row in evals.items():
    items = row.get("per_item")
    if tag == baseline or not items:
      continue
    out[tag] = {m: bootstrap.compare_items(m, [items], [base]) for m in bootstrap.compared_metrics(base, items)}
  return out


def plot(runs: Sequence[tuple[str, dict]], baseline: str, path: pathlib.Path) -> None:
  """One panel per metric: a row per (run, tag), its mean difference and 95 % interval."""
  metrics = sorted({m for _, comps in runs for c in comps.values() for m in c})
  plots.plot_intervals(
    [(f"{label}: {tag}", c) for label, comps in runs for tag, c in comps.items()],
    path=path,
    title=f"each adapter minus {baseline}, paired bootstrap over the evaluation items",
    xlabel={m: f"{m} minus {baseline} (95 % CI; blue = excludes 0)" for m in metrics},
  )


def main(argv: Sequence[str]) -> None:
  del argv
  if not _RUNS.value:
    raise app.UsageError("name at least one --run")
  labels = _LABELS.value or [pathlib.Path(r).name for r in _RUNS.value]
  if len(labels) != len(_RUNS.value):
    raise app.UsageError(f"{len(labels)} --label for {len(_RUNS.value)} --run")
  runs = []
  for label, folder in zip(labels, _RUNS.value):
    results = run_dir.read_results(pathlib.Path(folder))
    if results is None:
      raise UserInputError(f"--run={folder} holds no {run_dir.RESULTS_FILE}")
    runs.append((label, comparisons(results["evals"], _BASELINE.value)))
  plot(runs, _BASELINE.value, pathlib.Path(_OUT.value))
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
