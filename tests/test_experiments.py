"""Tests of the study drivers (experiments/): grid, resume, aggregation from files, tables, plots."""

import json
import pathlib
import re

import matplotlib.image as mpimg
import ml_collections
import numpy as np
import pytest

from experiments import grid, plots, presets, results, stats, tables
from experiments.cells import TRAIN_DIR, Cell, check_unique_names, claim_run_dir, run_dir
from lora_squeeze import protocols
from lora_squeeze.errors import UserInputError

_PLAN = protocols.direct(rank=2, steps=3, lr=0.01, warmup=1)


def _base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.optim = ml_collections.ConfigDict({"lr": 0.01, "warmup": 10})
  config.ranks = (1, 2)
  return config


def _write_results(train_dir: pathlib.Path, scores: dict[str, float], squeezes=(), nlls=None) -> None:
  """A finished run's results file in the trainer's format (lora_squeeze.train: results.json)."""
  train_dir.mkdir(parents=True, exist_ok=True)
  nlls = nlls or {}
  results = {
    "complete": True,
    "evals": {
      tag: {"tag": tag, "score": s, "metrics": {"accuracy": s, **({"option_nll": nlls[tag]} if tag in nlls else {})}}
      for tag, s in scores.items()
    },
    "squeezes": [{"r_src": a, "r_tgt": b, "method": m, "overall_retention": v} for a, b, m, v in squeezes],
  }
  (train_dir / "results.json").write_text(json.dumps(results))


# --- configs -------------------------------------------------------------------------------------


def test_apply_overrides_sets_nested_keys_on_a_copy():
  base = _base_config()
  config = presets.apply_overrides(base, {"optim.lr": 0.1, "seed": 43, "ranks": [4, 8]})
  assert (config.optim.lr, config.seed, config.ranks) == (0.1, 43, (4, 8))
  assert (base.optim.lr, base.seed, base.ranks) == (0.01, 0, (1, 2))


@pytest.mark.parametrize(
  "key, match",
  [
    ("optim.lrr", r"override \['optim.lrr'\]: Key \"lrr\" does not exist .* Did you mean \"lr\" instead of \"lrr\"\?$"),
    ("optimizer.lr", r"override \['optimizer.lr'\]: Key \"optimizer.lr\" cannot be set as \"optimizer\" was not found"),
    ("seed.x", r"Key \"seed.x\" cannot be updated as \"seed\" is not a ConfigDict"),
  ],
)
def test_apply_overrides_names_unknown_keys(key, match):
  base = _base_config()
  with pytest.raises(UserInputError, match=match):
    presets.apply_overrides(base, {key: 1.0})
  assert "lrr" not in base.optim and not base.is_locked  # nothing added, the caller's config untouched


def test_apply_overrides_may_change_a_type_and_keeps_the_lock_state():
  base = _base_config()
  base.optim.schedule = None
  config = presets.apply_overrides(base, {"optim.schedule": "cosine", "seed": 1})
  assert (config.optim.schedule, config.seed, config.is_locked) == ("cosine", 1, False)
  config.new_key = 1  # an unlocked config stays open, as before the override
  base.lock()
  assert presets.apply_overrides(base, {"seed": 2}).is_locked


def test_flatten_matches_the_nested_config():
  nested = ml_collections.ConfigDict({"a": 1, "b": {"c": (64,), "d": {"e": "x"}}, "empty": {}})
  assert presets.flatten(nested) == {"a": 1, "b.c": (64,), "b.d.e": "x"}
  assert presets.apply_overrides(nested, presets.flatten(nested)).to_dict() == nested.to_dict()


def test_load_config_file_passes_the_argument(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(
    "import ml_collections\ndef get_config(arg=None):\n  return ml_collections.ConfigDict({'arg': arg or 'none'})\n"
  )
  assert presets.load_config_file(f"{path}:reduced").arg == "reduced"
  assert presets.load_config_file(str(path)).arg == "none"
  with pytest.raises(ValueError, match="does not exist"):
    presets.load_config_file(str(tmp_path / "missing.py"))


# --- runner --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (62, "1m02s"), (3725, "1h02m05s"), (float("nan"), "?")])
def test_format_duration(seconds, text):
  assert grid.format_duration(seconds) == text


def test_duplicate_cell_names_are_refused():
  cell = Cell(plan=_PLAN, name="a", overrides={}, labels={}, evals={})
  with pytest.raises(ValueError, match="two cells share the folder name 'a'"):
    check_unique_names([cell, cell])


def test_claim_run_dir_refuses_a_folder_made_by_other_overrides(tmp_path):
  claim_run_dir(tmp_path, Cell(plan=_PLAN, name="x/y", overrides={"seed": 1}, labels={}, evals={}))
  claim_run_dir(tmp_path, Cell(plan=_PLAN, name="x/y", overrides={"seed": 1}, labels={"a": 1}, evals={}))
  with pytest.raises(ValueError, match=r"was made with overrides \{'seed': 1\}, not \{'seed': 2\}"):
    claim_run_dir(tmp_path, Cell(plan=_PLAN, name="x/y", overrides={"seed": 2}, labels={}, evals={}))


# --- aggregation ---------------------------------------------------------------------------------


def test_collect_rows_reads_finished_cells_and_lists_unfinished(tmp_path):
  done = Cell(
    plan=_PLAN,
    name="boolq/r4",
    overrides={},
    labels={"task": "boolq", "r_src": 4},
    evals={"r4": {"r_tgt": 4}, "r4_to_r2": {"r_tgt": 2}},
  )
  half = Cell(
    plan=_PLAN, name="boolq/r8", overrides={}, labels={"task": "boolq", "r_src": 8}, evals={"r8": {"r_tgt": 8}}
  )
  for cell in (done, half):
    claim_run_dir(tmp_path, cell)
  _write_results(
    run_dir(tmp_path, done) / TRAIN_DIR,
    {"r4": 0.7, "r4_to_r2": 0.685, "unlisted": 0.01},
    squeezes=[(4, 2, "qr_core", 0.9)],
  )
  rows, unfinished = results.collect_rows(tmp_path)
  assert unfinished == ["boolq/r8"]
  assert sorted((r["r_tgt"], r["score"], r["tag"]) for r in rows) == [(2, 68.5, "r4_to_r2"), (4, 70.0, "r4")]
  assert all(r["task"] == "boolq" and r["r_src"] == 4 and r["cell"] == "boolq/r4" for r in rows)
  squeezes, _ = results.collect_squeeze_rows(tmp_path)
  assert squeezes == [
    {"task": "boolq", "r_src": 4, "r_tgt": 2, "method": "qr_core", "retention": 0.9, "curve": None, "cell": "boolq/r4"}
  ]


def test_collect_rows_names_a_missing_evaluation(tmp_path):
  cell = Cell(plan=_PLAN, name="c", overrides={}, labels={}, evals={"r4": {}})
  claim_run_dir(tmp_path, cell)
  _write_results(run_dir(tmp_path, cell) / TRAIN_DIR, {"r8": 1.0})
  with pytest.raises(ValueError, match=r"finished without a score for 'r4'; it has \['r8'\]"):
    results.collect_rows(tmp_path)


def test_mean_score_and_select():
  rows = [
    {"task": "a", "rank": 1, "score": 1.0},
    {"task": "b", "rank": 1, "score": 3.0},
    {"task": "a", "rank": 2, "score": 5.0},
  ]
  assert results.mean_score(rows, key=lambda r: r["rank"]) == {1: 2.0, 2: 5.0}
  assert results.select(rows, task="a", rank=2) == [rows[2]]
  assert results.select(rows, missing=1) == []


def test_markdown_table_bolds_and_formats():
  text = tables.markdown_table(["task", "x", "y"], [["boolq", 1.234, float("nan")]], bold={(0, 1)})
  assert text.splitlines() == ["| task | x | y |", "|---|---|---|", "| boolq | **1.2** | – |"]


def test_write_csv_and_json_round_trip(tmp_path):
  rows = [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}]
  tables.write_csv(tmp_path / "r.csv", rows)
  assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b,c", "1,2.5,", "3,,x"]
  tables.write_json(tmp_path / "r.json", rows)
  assert json.loads((tmp_path / "r.json").read_text()) == rows
  assert not list(tmp_path.glob(".*tmp"))


# --- plots ---------------------------------------------------------------------------------------


def _png(path: pathlib.Path) -> np.ndarray:
  assert path.stat().st_size > 1000
  return mpimg.imread(path)


def test_heatmap_is_red_for_gains_and_blue_for_losses(tmp_path):
  values = np.array([[2.0, np.nan], [-2.0, 0.0]])
  plots.plot_heatmap(
    values,
    row_labels=[4, 2],
    col_labels=[1, 2],
    path=tmp_path / "h.png",
    title="t",
    xlabel="r_tgt",
    ylabel="r_src",
    cbar_label="gain",
  )
  image = _png(tmp_path / "h.png")[..., :3]
  reddish = image[..., 0] - image[..., 2] > 0.25
  bluish = image[..., 2] - image[..., 0] > 0.25
  assert reddish.sum() > 500 and bluish.sum() > 500
  with pytest.raises(ValueError, match=r"values have shape \(2, 2\), labels need \(1, 2\)"):
    plots.plot_heatmap(
      values,
      row_labels=[4],
      col_labels=[1, 2],
      path=tmp_path / "bad.png",
      title="t",
      xlabel="x",
      ylabel="y",
      cbar_label="c",
    )


def test_lines_plot_is_written(tmp_path):
  plots.plot_lines(
    {"direct": ([1, 2, 4], [50.0, 60.0, 65.0]), "post": ([1, 2], [55.0, 61.0])},
    path=tmp_path / "l.png",
    title="t",
    xlabel="rank",
    ylabel="score",
  )
  assert _png(tmp_path / "l.png").std() > 0.01


def test_lines_plot_on_a_learning_rate_axis_labels_the_grid(tmp_path, monkeypatch):
  """A log10 axis (an lr sweep) gets its ticks at the grid's values, written plainly, and no labelled
  minor ticks in between (matplotlib's default crowded 3e-4..6e-4 into one unreadable run)."""
  saved, save = [], plots.save_figure
  monkeypatch.setattr(plots, "save_figure", lambda fig, path: (saved.append(fig), save(fig, path)))
  plots.plot_lines(
    {"r=1": ([3e-4, 1e-3, 3e-3], [2.44, 2.42, 2.43]), "r=16": ([3e-4, 1e-3], [2.41, 2.43])},
    path=tmp_path / "lr.png",
    title="t",
    xlabel="learning rate",
    ylabel="nll",
    x_scale="log10",
  )
  assert _png(tmp_path / "lr.png").std() > 0.01
  (ax,) = saved[0].axes
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0003", "0.001", "0.003"]
  assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))


# --- drivers on result files written here ---------------------------------------------------------
# These stand in for finished runs: the reports must come from the files alone.

from experiments import heatmap, lr_sweep, protocol_table, retention  # noqa: E402

_LR = protocols.lr_lookup({1: 0.1, 2: 0.03, 4: 0.01})


def _finish(workdir, cells, score, retention_of=lambda r_src, r_tgt: r_tgt / r_src, nll=None):
  """Writes a complete results file for every cell: score(labels, coords) per evaluation tag (and
  option_nll = nll(labels, coords) when given), and one squeeze record per Squeeze in the plan
  (from the rank the plan was at)."""
  for cell in cells:
    claim_run_dir(workdir, cell)
    scores = {tag: score(cell.labels, coords) / 100 for tag, coords in cell.evals.items()}
    nlls = {tag: nll(cell.labels, coords) for tag, coords in cell.evals.items()} if nll else None
    squeezes, rank = [], None
    for item in cell.plan:
      if isinstance(item, protocols.Stage):
        rank = item.rank
      for sub in item.items if isinstance(item, protocols.Branch) else (item,):
        if isinstance(sub, protocols.Squeeze):
          squeezes.append((rank, sub.rank, sub.method, retention_of(rank, sub.rank)))
          if not isinstance(item, protocols.Branch):
            rank = sub.rank
    _write_results(run_dir(workdir, cell) / TRAIN_DIR, scores, squeezes, nlls)


def _finish_per_item(workdir, cells, items):
  """_finish with accuracy = mean of items(labels, coords) (0/1 per item), and those per-item
  scores written into each evaluation (what the paired bootstrap reads)."""
  _finish(workdir, cells, lambda labels, coords: 100 * items(labels, coords).mean())
  for cell in cells:
    path = run_dir(workdir, cell) / TRAIN_DIR / "results.json"
    written = json.loads(path.read_text())
    for tag, coords in cell.evals.items():
      written["evals"][tag]["per_item"] = {"accuracy": items(cell.labels, coords).tolist()}
    path.write_text(json.dumps(written))


def test_lr_sweep_grid_is_complete_and_unique():
  study = lr_sweep.get_config("tiny")
  study.tasks, study.seeds, study.ranks, study.lrs = ("a", "b"), (1, 2), (4, 1, 2), (0.1, 0.01)
  cells = lr_sweep.sweep_cells(study)
  coords = [(c.labels["task"], c.labels["rank"], c.labels["lr"], c.labels["seed"]) for c in cells]
  assert sorted(coords) == sorted((t, r, lr, s) for t in "ab" for r in (1, 2, 4) for lr in (0.1, 0.01) for s in (1, 2))
  assert len({c.name for c in cells}) == len(cells) == 24
  assert all(c.plan[0] == protocols.Stage(rank=c.labels["rank"], steps=2, lr=c.labels["lr"], warmup=1) for c in cells)
  with pytest.raises(ValueError, match=r"ranks must hold positive integers, got 0 in \(0, 1\)"):
    study.ranks = (0, 1)
    lr_sweep.sweep_cells(study)


def test_lr_sweep_seed_sem_and_a_diverged_run_never_wins():
  rows = [
    {"study": "sweep", "task": t, "rank": 1, "lr": 0.1, "seed": s, "score": v}
    for t, s, v in [("a", 1, 50.0), ("b", 1, 60.0), ("a", 2, 54.0), ("b", 2, 60.0)]
  ]
  assert lr_sweep.seed_sem(rows) == {(1, 0.1): pytest.approx(1.0)}  # seed means 55, 57: std sqrt(2), / sqrt(2)
  rows += [{"study": "sweep", "task": "a", "rank": 1, "lr": 0.01, "seed": 1, "score": float("nan")}]
  assert lr_sweep.best_lrs(rows) == {1: 0.1}


def test_lr_sweep_compares_post_squeeze_once_when_the_targets_best_lr_is_the_sources(tmp_path):
  """r1 and r2 both do best at lr 0.01: Post-Squeeze 2 -> 1 against direct r1 at 0.01 is one row
  (labelled as both), not the same comparison twice."""
  study = lr_sweep.get_config("tiny")
  study.tasks, study.seeds, study.ranks, study.lrs, study.source_rank = ("a",), (1,), (1, 2), (0.01, 0.1), 2
  base = np.tile([0.0, 1.0], 50)

  def items(labels, coords):
    out = base.copy()
    if labels["lr"] == 0.01:
      out[:10] = 1.0
    return out

  cells = [*lr_sweep.sweep_cells(study), *lr_sweep.post_cells(study, 0.01)]
  _finish_per_item(tmp_path, cells, items)
  assert lr_sweep.run_study(study, workdir=tmp_path, train=False, log=lambda line: None) == {1: 0.01, 2: 0.01}
  report = (tmp_path / "lr_sweep_comparisons.md").read_text()
  post = [line for line in report.splitlines() if line.startswith("| a: Post-Squeeze")]
  assert [line.split(" | ")[0] for line in post] == ["| a: Post-Squeeze 2→1 vs direct r1 at lr 0.01 (best, also r2's)"]


def test_lr_sweep_report_of_a_lower_is_better_metric(tmp_path):
  """token_nll: the lowest mean wins, the table keeps 4 decimals (a .1f table shows 2.4 everywhere)."""
  rows = [
    {"study": "sweep", "task": "x", "metric": "token_nll", "rank": r, "lr": lr, "seed": 1, "score": v}
    for r, lr, v in [(1, 0.001, 2.4157), (1, 0.003, 2.4263), (4, 0.001, 2.4120), (4, 0.003, 2.4667)]
  ]
  assert lr_sweep.write_sweep_report(rows, tmp_path, model="m") == {1: 0.001, 4: 0.001}
  table = (tmp_path / "lr_sweep.md").read_text().splitlines()
  assert table[2:] == ["| 1 | **2.4157** | 2.4263 | 0.001 |", "| 4 | **2.4120** | 2.4667 | 0.001 |"]
  assert "lowest mean score" in json.loads((tmp_path / "lr_table.json").read_text())["note"]


def _sweep_score(labels, coords):
  """Low ranks like a high lr, high ranks a low one (the paper's App. A trend); task b scores 10 more."""
  rank, lr = labels.get("rank"), labels["lr"]
  bonus = 10.0 if labels["task"] == "b" else 0.0
  if labels["study"] == "post":
    return 60.0 + coords["rank"] + bonus
  return 50.0 + bonus + (10.0 if (rank <= 2) == (lr == 0.1) else 0.0) + rank


def test_lr_sweep_report_is_built_from_the_files(tmp_path):
  study = lr_sweep.get_config("tiny")
  study.tasks, study.ranks, study.lrs, study.source_rank = ("a", "b"), (1, 2, 4), (0.01, 0.1), 4
  _finish(tmp_path, lr_sweep.sweep_cells(study), _sweep_score)
  best = lr_sweep.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  assert best == {1: 0.1, 2: 0.1, 4: 0.01}
  assert json.loads((tmp_path / "lr_table.json").read_text())["lr"] == {"tiny": {"1": 0.1, "2": 0.1, "4": 0.01}}
  table = (tmp_path / "lr_sweep.md").read_text().splitlines()
  assert table[2] == "| 1 | 56.0 | **66.0** | 0.1 |"  # mean of tasks a (51, 61) and b (61, 71)
  assert table[4] == "| 4 | **69.0** | 59.0 | 0.01 |"
  assert (tmp_path / "lr_sweep.csv").read_text().splitlines()[1] == "1,0.01,56.0,nan,False"  # one seed: no SEM
  # Phase 2 (the Post-Squeeze run at r=4 with lr 0.01) then Fig. 3 from its files.
  post = lr_sweep.post_cells(study, best[4])
  assert [c.labels["lr"] for c in post] == [0.01, 0.01] and post[0].evals == {
    "r4": {"rank": 4},
    "r4_to_r1": {"rank": 1},
    "r4_to_r2": {"rank": 2},
  }
  _finish(tmp_path, post, _sweep_score)
  lr_sweep.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  for name in ("a", "b", "average"):
    assert _png(tmp_path / f"sweep_only_r4_{name}.png").std() > 0.01
  rows = json.loads((tmp_path / "rows.json").read_text())
  assert len(rows) == 2 * 3 * 2 + 2 * 3


def test_lr_sweep_comparisons_come_from_per_item_scores(tmp_path):
  """Of 200 items, r1 at lr 0.1 answers 20 more right than at lr 0.01 (both seeds); r2's best lr
  (0.01) wins by one item; Post-Squeeze 2 -> 1 answers what direct r1 at lr 0.01 does. Only the
  20-item gaps are called differences, and the report plots the metric, not a percentage."""
  study = lr_sweep.get_config("tiny")
  study.tasks, study.seeds, study.ranks, study.lrs, study.source_rank = ("a",), (1, 2), (1, 2), (0.01, 0.1), 2
  base = np.tile([0.0, 1.0], 100)

  def items(labels, coords):
    out = base.copy()
    rank = coords.get("rank", labels.get("rank"))
    if labels["study"] == "sweep" and (rank, labels["lr"]) == (1, 0.1):
      out[:40] = 1.0
    if labels["study"] == "sweep" and (rank, labels["lr"]) == (2, 0.01):
      out[0] = 1.0
    return out

  cells = [*lr_sweep.sweep_cells(study), *lr_sweep.post_cells(study, 0.01)]
  _finish_per_item(tmp_path, cells, items)
  assert lr_sweep.run_study(study, workdir=tmp_path, train=False, log=lambda line: None) == {1: 0.1, 2: 0.01}
  lines = {
    line.split(" | ")[0]: line
    for line in (tmp_path / "lr_sweep_comparisons.md").read_text().splitlines()
    if line.startswith("| a:")
  }
  assert re.fullmatch(
    r"\| a: r1 lr 0\.01 vs lr 0\.1 \(best\) \| 1,2 \| \*\*-10\.0 \[-1\d\.\d, -(5|6|7)\.\d\] --\*\* \| worse \|",
    lines["| a: r1 lr 0.01 vs lr 0.1 (best)"],
  )
  assert lines["| a: r2 lr 0.1 vs lr 0.01 (best)"].endswith("| no difference |")
  assert lines["| a: Post-Squeeze 2→1 vs direct r1 at lr 0.1 (best)"].endswith("| worse |")
  assert lines["| a: Post-Squeeze 2→1 vs direct r1 at lr 0.01 (r2's)"].endswith(
    "| +0.0 [+0.0, +0.0] 00 | no difference |"
  )
  assert len(lines) == 4
  assert (tmp_path / "lr_sweep_comparisons.csv").read_text().count("\n") == 1 + 4
  assert _png(tmp_path / "lr_sweep_comparisons.png").std() > 0.01
  assert lr_sweep._score_label(results.collect_rows(tmp_path)[0]) == "accuracy (points)"  # noqa: SLF001
  assert lr_sweep._score_label([{"metric": "token_nll"}, {}]) == "score"  # noqa: SLF001


def test_heatmap_gains_come_from_the_files(tmp_path):
  study = heatmap.get_config("tiny")
  study.tasks = ("a", "b")
  cells = heatmap.cells(study, _LR)
  assert len(cells) == 2 * 3
  assert cells[-1].evals["r4_to_r2_rsvd"] == {"kind": "post", "r_tgt": 2, "method": "rsvd"}
  study.methods = ("qr_core", "svdd")
  with pytest.raises(ValueError, match=r"methods must name one or more of .*got \('qr_core', 'svdd'\)"):
    heatmap.cells(study, _LR)
  study.methods = ("qr_core", "rsvd")

  def score(labels, coords):  # direct: 50 + r; post: 50 + r_tgt + r_src/2 (+1 for qr_core); task b + 4
    base = 50.0 + coords["r_tgt"] + (4.0 if labels["task"] == "b" else 0.0)
    if coords["kind"] == "direct":
      return base
    return base + labels["r_src"] / 2 + (1.0 if coords["method"] == "qr_core" else 0.0)

  _finish(tmp_path, cells, score, nll=lambda labels, coords: 2.0 - score(labels, coords) / 100)
  out = heatmap.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  # option NLL falls as the score rises: its direct-minus-Post-Squeeze gain is the score gain / 100.
  np.testing.assert_allclose(out["qr_core_nll"], out["qr_core"] / 100)
  assert "rsvd_nll" in out and _png(tmp_path / "heatmap_qr_core_nll.png").std() > 0.01
  assert (tmp_path / "heatmap_qr_core_nll.md").read_text().splitlines()[2] == "| 4 | +0.030 | +0.030 | +0.030 |"
  # rows: r_src 4, 2, 1 (top to bottom); columns: r_tgt 1, 2, 4; NaN above the diagonal.
  np.testing.assert_allclose(out["qr_core"], [[3, 3, 3], [2, 2, np.nan], [1.5, np.nan, np.nan]])
  np.testing.assert_allclose(out["rsvd"], [[2, 2, 2], [1, 1, np.nan], [0.5, np.nan, np.nan]])
  np.testing.assert_allclose(out["qr_core_vs_rsvd"], [[1, 1, 1], [1, 1, np.nan], [1, np.nan, np.nan]])
  assert (tmp_path / "heatmap_qr_core.md").read_text().splitlines()[2] == "| 4 | +3.00 | +3.00 | +3.00 |"
  for name in ("qr_core", "rsvd", "qr_core_vs_rsvd"):
    assert _png(tmp_path / f"heatmap_{name}.png").std() > 0.01
  # Table 6 for the pair 2 -> 1: direct r1 is 51 (a) / 55 (b), Post-Squeeze adds 1 + 1 (qr_core).
  assert (tmp_path / "heatmap_tasks.md").read_text().splitlines()[1:] == [
    "|---|---|---|---|",
    "| a | 51.0 | 53.0 | 2.0 |",
    "| b | 55.0 | 57.0 | 2.0 |",
    "| average | 53.0 | 55.0 | 2.0 |",
  ]
  assert len((tmp_path / "heatmap.csv").read_text().splitlines()) == 1 + 2 * 6 * 2


def test_protocol_table_marks_the_best_per_row(tmp_path):
  study = protocol_table.get_config("tiny")
  study.tasks, study.seeds, study.extra_steps = ("a", "b"), (1, 2), (2, 5)
  cells = protocol_table.cells(study, _LR)
  assert len(cells) == 2 * 2 * (2 * 2 + 2)
  columns = protocol_table.protocol_names(study)
  assert columns == [
    "zero_shot",
    "direct",
    "direct+2",
    "direct+5",
    "source",
    "post",
    "cont+2",
    "cont+5",
    "in_squeeze",
    "in_squeeze_min",
  ]
  # Only the first direct run scores the base model, before it trains.
  zero_shot = [c for c in cells if "zero_shot" in c.evals]
  assert [c.name for c in zero_shot] == [
    "a/direct_r1_plus2_s1",
    "a/direct_r1_plus2_s2",
    "b/direct_r1_plus2_s1",
    "b/direct_r1_plus2_s2",
  ]
  assert all(c.plan[0] == protocols.Evaluate(tag="zero_shot") for c in zero_shot)
  # The source (rank 4 after N steps) is scored once per seed, right after its stage, by the first M's cont run.
  sources = [c for c in cells if any(coords["protocol"] == "source" for coords in c.evals.values())]
  assert [c.name for c in sources] == [f"{t}/cont_r4_to_r1_plus2_s{s}" for t in "ab" for s in (1, 2)]
  assert all(
    c.plan[:2] == (protocols.Stage(rank=4, steps=2, lr=_LR(4), warmup=1), protocols.Evaluate(tag="direct_r4"))
    for c in sources
  )
  assert protocols.eval_tags(next(c for c in cells if c.name == "a/cont_r4_to_r1_plus5_s1").plan) == (
    "r4_to_r1",
    "r4_to_r1_plus5",
  )
  # In-Squeeze gets N + M = 2 + 2 steps over ranks 4 -> 2 -> 1, proportional to the rank (largest remainder).
  in_cell = next(c for c in cells if c.name == "a/in_squeeze_r4_to_r1_s1")
  assert [i.steps for i in in_cell.plan if isinstance(i, protocols.Stage)] == [2, 1, 1]
  values = {name: 40.0 + i for i, name in enumerate(columns[1:])}
  values["zero_shot"] = 99.0  # the highest, but a reference: never bold
  values["in_squeeze_min"] = 46.5  # below in_squeeze (47) for task a ...

  def score(labels, coords):  # ... but task b adds 2 to it (and seed 2 adds 1 to everything)
    bonus = 2.0 if labels["task"] == "b" and coords["protocol"] == "in_squeeze_min" else 0.0
    return values[coords["protocol"]] + bonus + (labels["seed"] - 1)

  _finish(tmp_path, cells, score, nll=lambda labels, coords: 1.0 - score(labels, coords) / 100)
  body = protocol_table.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  assert [row[0] for row in body] == ["a", "b", "average"]
  lines = (tmp_path / "protocol_table.md").read_text().splitlines()
  assert lines[2] == "| a | 99.5 | 40.5 | 41.5 | 42.5 | 43.5 | 44.5 | 45.5 | 46.5 | **47.5** | 47.0 |"
  assert lines[3] == "| b | 99.5 | 40.5 | 41.5 | 42.5 | 43.5 | 44.5 | 45.5 | 46.5 | 47.5 | **49.0** |"
  assert lines[4].endswith("| 47.5 | **48.0** |")
  csv_lines = (tmp_path / "protocol_table.csv").read_text().splitlines()
  assert csv_lines[0] == "task," + ",".join(columns) and csv_lines[3].startswith("average,99.5,40.5,")
  nll_lines = (tmp_path / "protocol_table_nll.md").read_text().splitlines()
  assert nll_lines[2] == (
    "| a | 0.0050 | 0.5950 | 0.5850 | 0.5750 | 0.5650 | 0.5550 | 0.5450 | 0.5350 | **0.5250** | 0.5300 |"
  )
  assert nll_lines[3].endswith("| 0.5250 | **0.5100** |")


def test_protocol_comparisons_come_from_per_item_scores(tmp_path):
  """cont+2 answers 20 more of 200 items right than direct in both seeds; everything else scores
  the same items: only cont+2 (vs direct and vs direct+2) is called a difference."""
  study = protocol_table.get_config("tiny")
  study.tasks, study.seeds, study.extra_steps = ("a",), (1, 2), (2,)
  cells = protocol_table.cells(study, _LR)
  _finish(tmp_path, cells, lambda labels, coords: 50.0)
  base = np.tile([0.0, 1.0], 100)
  for cell in cells:
    path = run_dir(tmp_path, cell) / TRAIN_DIR / "results.json"
    results = json.loads(path.read_text())
    for tag, coords in cell.evals.items():
      items = base.copy()
      if coords["protocol"] == "cont+2":
        items[:40] = 1.0
      results["evals"][tag]["per_item"] = {"accuracy": items.tolist(), "option_nll": (1.0 - items).tolist()}
    path.write_text(json.dumps(results))
  protocol_table.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  lines = {
    line.split(" | ")[0]: line
    for line in (tmp_path / "protocol_comparisons.md").read_text().splitlines()
    if line.startswith("| a:")
  }
  # 20 of 200 items differ: the interval is about 10 ± 1.96 * sqrt(0.1 * 0.9 / 200) points.
  assert re.fullmatch(
    r"\| a: cont\+2 vs direct \| 1,2 \| \*\*\+10\.0 \[\+(5|6|7)\.\d, \+1(3|4|5)\.\d\] \+\+\*\* \| better "
    r"\| \*\*-0\.1000 \[-0\.1\d+, -0\.0\d+\] --\*\* \| better \|",
    lines["| a: cont+2 vs direct"],
  )
  assert lines["| a: cont+2 vs direct+2"].endswith("| better |")
  assert lines["| a: post vs direct"].endswith(
    "| +0.0 [+0.0, +0.0] 00 | no difference | +0.0000 [+0.0000, +0.0000] 00 | no difference |"
  )
  assert set(lines) == {
    f"| a: {c}"
    for c in (
      "direct vs zero_shot",
      "direct+2 vs direct",
      "source vs direct",
      "post vs direct",
      "cont+2 vs direct",
      "cont+2 vs direct+2",
      "in_squeeze vs direct",
      "in_squeeze vs direct+2",
      "in_squeeze_min vs direct",
      "in_squeeze_min vs direct+2",
    )
  }
  csv_text = (tmp_path / "protocol_comparisons.csv").read_text()
  assert csv_text.startswith("comparison,seeds,accuracy_mean,accuracy_low,accuracy_high,accuracy_signs,")
  assert _png(tmp_path / "protocol_comparisons.png").std() > 0.01  # the same comparisons as a figure


def test_retention_rows_expand_a_recorded_curve():
  curve = [0.5, 0.7, 0.9, 1.0]
  squeezes = [
    {"task": "t", "r_src": 4, "r_tgt": t, "method": "qr_core", "retention": curve[t - 1], "curve": curve, "seed": 1}
    for t in (1, 2)
  ]
  squeezes.append({"task": "t", "r_src": 4, "r_tgt": 1, "method": "rsvd", "retention": 0.1, "curve": [0.1] * 4})
  rows = retention.retention_rows(squeezes, method="qr_core")
  assert [(r["r_tgt"], round(r["retention"], 9)) for r in rows] == [(1, 50.0), (2, 70.0), (3, 90.0), (4, 100.0)]


def test_retention_curves_from_the_squeeze_records(tmp_path):
  study = retention.get_config("tiny")
  cells = retention.cells(study, _LR)
  assert [[i.items[0].rank for i in c.plan[1:]] for c in cells] == [[1], [1, 2]]
  _finish(tmp_path, cells, score=None, retention_of=lambda r_src, r_tgt: (r_tgt / r_src) ** 0.5)
  rows = retention.run_study(study, workdir=tmp_path, train=False, log=lambda line: None)
  got = {(r["r_src"], r["r_tgt"]): round(r["retention"], 6) for r in rows}
  assert got == {
    (2, 1): round(100 * 0.5**0.5, 6),
    (2, 2): 100.0,
    (4, 1): 50.0,
    (4, 2): round(100 * 0.5**0.5, 6),
    (4, 4): 100.0,
  }
  assert _png(tmp_path / "retention_average.png").std() > 0.01
  assert _png(tmp_path / "retention_boolq.png").std() > 0.01
  # Another study's folder can stand in for training (e.g. a heatmap study that squeezed the same way).
  reuse = retention.get_config("tiny")
  reuse.reuse_workdirs = (str(tmp_path),)
  again = retention.run_study(reuse, workdir=tmp_path / "other", train=False, log=lambda line: None)
  assert again == rows
  reuse.source_ranks = (4,)  # only the study's own source ranks are plotted from a reused folder
  only_4 = retention.run_study(reuse, workdir=tmp_path / "other", train=False, log=lambda line: None)
  assert only_4 == [r for r in rows if r["r_src"] == 4]


# --- a driver end to end on the tiny model and the real trainer -----------------------------------

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lora_squeeze import model as model_lib  # noqa: E402
from lora_squeeze import train  # noqa: E402

_LENGTH, _HALF = 8, 3  # tokens [2, x1 x2 x3, 3, x1 x2 x3]: copy the three tokens after the separator 3


def _copy_examples(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    x = rng.integers(4, 24, _HALF)
    mask = np.zeros(_LENGTH, bool)
    mask[_HALF + 2 :] = True
    out.append({"tokens": np.concatenate([[2], x, [3], x]).astype(np.int32), "target_mask": mask})
  return out


@pytest.fixture(scope="module")
def tiny_train_fn():
  """A train_fn that runs the real trainer on the tiny Gemma 3 and a synthetic copy task; its score
  is exp(-loss) on held-out rows (the mean target probability). Records each call's run folder."""
  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  model_for_rank = lambda rank: model_lib.make_model("tiny", lora_rank=rank)
  held_out = {k: jnp.asarray(np.stack([e[k] for e in _copy_examples(8, 1)])) for k in ("tokens", "target_mask")}

  def evaluate(rank, lora):
    loss, _ = train.loss_fn(lora, base, held_out, model=model_for_rank(rank), max_targets=_HALF)
    return {"target_prob": float(jnp.exp(-loss))}

  calls = []

  def train_fn(config, plan, run_dir):
    calls.append(run_dir)
    setup = train.RunSetup(
      model_for_rank=model_for_rank,
      base_params=base,
      workdir=run_dir,
      key=jax.random.key(config.seed),
      batches=train.batch_dataset(_copy_examples(16, 0), batch_size=4, seed=config.seed),
      max_targets=_HALF,
      evaluate=evaluate,
      run_config={"task": config.task, "seed": config.seed, "plan": protocols.plan_record(plan)},
      printer=lambda line: None,
    )
    train.execute_plan(plan, setup)

  train_fn.calls = calls
  return train_fn


@pytest.mark.slow  # ~30 s on 2 idle cores: two tiny training runs, squeezes, checkpoints
def test_heatmap_end_to_end_on_the_tiny_model_resumes_and_skips(tmp_path, tiny_train_fn):
  study = heatmap.get_config("tiny")
  (tmp_path / "lr.json").write_text(json.dumps({"lr": {"tiny": {"1": 0.1, "2": 0.1}}}))
  study.source_ranks, study.methods, study.lr_table = (1, 2), ("qr_core",), str(tmp_path / "lr.json")
  lines = []
  out = heatmap.run_study(study, workdir=tmp_path, train_fn=tiny_train_fn, log=lines.append)
  assert [p.parent.name for p in tiny_train_fn.calls] == ["r1_s42", "r2_s42"]
  assert lines[-1].startswith("[grid 2/2] boolq/r2_s42 done in ") and lines[-1].endswith("; 0 left, ETA 0s")
  rows = json.loads((tmp_path / "rows.json").read_text())
  assert sorted(r["tag"] for r in rows) == ["r1", "r1_to_r1_qr_core", "r2", "r2_to_r1_qr_core", "r2_to_r2_qr_core"]
  assert all(0 < r["score"] < 100 for r in rows)
  by_tag = {r["tag"]: r["score"] for r in rows}
  # The heatmap holds Post-Squeeze minus direct as read from the files.
  np.testing.assert_allclose(
    out["qr_core"],
    [
      [by_tag["r2_to_r1_qr_core"] - by_tag["r1"], by_tag["r2_to_r2_qr_core"] - by_tag["r2"]],
      [by_tag["r1_to_r1_qr_core"] - by_tag["r1"], np.nan],
    ],
    rtol=1e-6,
  )
  # Squeezing r -> r with the exact core keeps the adapter: the same score.
  assert by_tag["r2_to_r2_qr_core"] == pytest.approx(by_tag["r2"], rel=1e-4)

  # A second call trains nothing: every cell is finished.
  tiny_train_fn.calls.clear()
  lines.clear()
  heatmap.run_study(study, workdir=tmp_path, train_fn=tiny_train_fn, log=lines.append)
  assert tiny_train_fn.calls == [] and lines[0] == "[grid] 2/2 cells already finished, skipped"

  # A half-finished cell (results not complete) goes back to the trainer, which resumes from its last
  # checkpoint instead of training again.
  train_dir = tmp_path / "runs" / "boolq" / "r2_s42" / TRAIN_DIR
  results = json.loads((train_dir / "results.json").read_text())
  (train_dir / "results.json").write_text(json.dumps({**results, "complete": False}))
  trained_steps = (train_dir / train.METRICS_FILE).read_text().count('"event": "train"')
  heatmap.run_study(study, workdir=tmp_path, train_fn=tiny_train_fn, log=lines.append)
  assert tiny_train_fn.calls == [train_dir]
  assert (train_dir / train.METRICS_FILE).read_text().count('"event": "train"') == trained_steps == 2
  assert json.loads((train_dir / "results.json").read_text())["complete"]


@pytest.mark.slow  # ~25 s on 2 idle cores: a subprocess, the tokenizer, BoolQ rows, one tiny run
def test_retention_command_line_on_the_tiny_preset(tmp_path):
  """The whole path a user takes: absl flags, the study config file, the training config, the trainer."""
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.retention",
      "--config=experiments/retention.py:tiny",
      "--config.source_ranks=(2,)",
      f"--workdir={tmp_path}",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "[grid 1/1] boolq/r2_s42 done in " in done.stdout
  rows = (tmp_path / "retention.csv").read_text().splitlines()
  assert rows[0] == "task,r_src,r_tgt,retention" and rows[2] == "boolq,2,2,100.0"
  assert 0 < float(rows[1].split(",")[3]) < 100
  assert _png(tmp_path / "retention_boolq.png").std() > 0.01


@pytest.mark.parametrize(
  "driver, expected",
  [
    (lr_sweep, {"paper": 13 * 8 * 5, "reduced": 3 * 3}),
    (heatmap, {"paper": 13 * 8, "reduced": 3}),
    (protocol_table, {"paper": 13 * (2 * 2 + 2), "reduced": 2 + 2}),
    (retention, {"paper": 13 * 3, "reduced": 2}),
  ],
)
def test_presets_build_their_grids_and_valid_training_configs(driver, expected, tmp_path):
  from lora_squeeze import config_lib as configs_common

  for preset, n_cells in expected.items():
    study = driver.get_config(preset)
    base = presets.training_config(study)
    lr_for_rank = presets.lr_table(study, base)
    cells = lr_sweep.sweep_cells(study) if driver is lr_sweep else driver.cells(study, lr_for_rank)
    assert len(cells) == n_cells, preset
    if preset == "paper":  # validate checks that the checkpoint folder exists, not what it holds
      base = presets.apply_overrides(base, {"checkpoint": str(tmp_path)})
    for cell in cells[:: max(1, len(cells) // 20)]:
      configs_common.validate(presets.apply_overrides(base, cell.overrides))


def test_archive_keeps_what_a_report_and_a_resume_need(tmp_path):
  """The archive of a study holds each finished cell's cell.json and results (never a checkpoint or an
  unfinished cell), rebuilds the same report, and a workdir seeded with its runs/ trains only the rest."""
  from experiments import driver

  study = protocol_table.get_config("tiny")
  study.tasks, study.seeds, study.extra_steps = ("a",), (1,), (2,)
  cells = protocol_table.cells(study, _LR)
  workdir, dest = tmp_path / "study", tmp_path / "archive"
  _finish(workdir, cells[:-1], lambda labels, coords: 50.0 + len(coords["protocol"]))
  claim_run_dir(workdir, cells[-1])  # started, not finished
  for cell in cells:
    (run_dir(workdir, cell) / TRAIN_DIR / "checkpoints").mkdir(parents=True)
    (run_dir(workdir, cell) / TRAIN_DIR / "checkpoints" / "state").write_bytes(b"\0" * 64)
  protocol_table.run_study(study, workdir=workdir, train=False, log=lambda line: None)
  driver.archive(workdir, dest)
  copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
  assert [p for p in copied if p.startswith("runs/")] == sorted(
    f"runs/{c.name}/{f}" for c in cells[:-1] for f in ("cell.json", "train/results.json")
  )
  assert {"protocol_table.md", "rows.json", "rows.csv"} <= set(copied)
  report = (workdir / "protocol_table.md").read_text()
  (dest / "protocol_table.md").unlink()
  protocol_table.run_study(study, workdir=dest, train=False, log=lambda line: None)
  assert (dest / "protocol_table.md").read_text() == report

  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / "runs").symlink_to(dest / "runs", target_is_directory=True)
  trained, base = [], _base_config()
  base.task = "a"

  def train_fn(config, plan, train_dir):
    trained.append(plan)
    _write_results(train_dir, {tag: 0.5 for tag in protocols.eval_tags(plan)})

  grid.run_cells(cells, workdir=fresh, base_config=base, train_fn=train_fn, log=lambda line: None)
  assert trained == [cells[-1].plan]
  with pytest.raises(ValueError, match="is the workdir itself"):
    driver.archive(workdir, workdir)


def test_a_finished_cell_of_another_plan_is_refused_before_any_training(tmp_path):
  """Adding ranks to a sweep keeps the Post-Squeeze cell's name but squeezes to more targets: the
  finished folder of the old plan must not be skipped as done (the new targets would never run)."""
  study = lr_sweep.get_config("tiny")
  study.tasks, study.seeds, study.ranks, study.source_rank = ("a",), (1,), (1, 4), 4
  (old,) = lr_sweep.post_cells(study, 0.1)
  _finish(tmp_path, [old], lambda labels, coords: 50.0)
  study.ranks = (1, 2, 4)
  cells = [*lr_sweep.sweep_cells(study), *lr_sweep.post_cells(study, 0.1)]
  assert cells[-1].name == old.name and cells[-1].plan != old.plan
  trained, base = [], _base_config()
  base.task = "a"
  with pytest.raises(ValueError, match=r"run folder '.*/a/post/r4_lr0.1_s1' was made with plan .* move that folder"):
    grid.run_cells(cells, workdir=tmp_path, base_config=base, train_fn=lambda *a: trained.append(a), log=print)
  assert trained == []
  assert json.loads((run_dir(tmp_path, old) / "cell.json").read_text())["plan"] == old.record()["plan"]


def test_heatmap_gain_is_positive_where_post_squeeze_is_better_for_a_lower_is_better_score():
  # token_nll (lower is better): Post-Squeeze 2.0 against direct 2.5 is a gain of +0.5; accuracy
  # 60 against 55 a gain of +5. Means over the two seeds.
  def row(task, metric, kind, score, seed, r_src=4, method="qr_core"):
    return {
      "task": task,
      "metric": metric,
      "kind": kind,
      "r_src": r_src if kind == "post" else 1,
      "r_tgt": 1,
      "method": method if kind == "post" else None,
      "score": score,
      "seed": seed,
    }

  rows = [
    row("xsum", "token_nll", "direct", 2.4, 1),
    row("xsum", "token_nll", "direct", 2.6, 2),
    row("xsum", "token_nll", "post", 2.0, 1),
    row("xsum", "token_nll", "post", 2.0, 2),
    row("field", "accuracy", "direct", 55.0, 1),
    row("field", "accuracy", "post", 60.0, 1),
  ]
  gains = {g["task"]: g["gain"] for g in heatmap.gain_rows(rows)}
  assert gains == pytest.approx({"xsum": 0.5, "field": 5.0})
  # One task scored both ways has no direction for its gain: refused, naming the metrics.
  mixed = [*rows, row("xsum", "accuracy", "post", 60.0, 3)]
  with pytest.raises(
    UserInputError, match=r"mix lower-is-better and higher-is-better scores \(\['accuracy', 'token_nll'\]\)"
  ):
    heatmap.gain_rows(mixed)


@pytest.mark.parametrize("metric, sign", [("accuracy", 1.0), ("token_nll", -1.0)])
def test_heatmap_cells_carry_their_paired_interval(tmp_path, metric, sign):
  """With one task each Post-Squeeze cell is annotated with its bootstrap interval in the heatmap's
  direction (Post-Squeeze better = positive) and drawn bold when the interval excludes zero."""
  from lora_squeeze import bootstrap

  rng = np.random.default_rng(0)
  counts = rng.integers(5, 20, 60)

  def items(level):
    if metric == "accuracy":
      return {"accuracy": (rng.random(60) < level).astype(float).tolist()}
    return {"token_nll": ((level + rng.normal(0, 0.05, 60)) * counts).tolist(), "target_tokens": counts.tolist()}

  good, same = (0.9, 0.5) if metric == "accuracy" else (2.0, 2.5), (0.5, 0.5) if metric == "accuracy" else (2.5, 2.5)
  groups = {
    ("t", "direct", 1, 1, None): {1: items(good[1]), 2: items(good[1])},
    ("t", "post", 4, 1, "qr_core"): {1: items(good[0]), 2: items(good[0])},
    ("t", "direct", 4, 4, None): {1: items(same[1]), 2: items(same[1])},
    ("t", "post", 4, 4, "qr_core"): {1: items(same[0]), 2: items(same[0])},
  }
  pairs = [(("t", "post", 4, 1, "qr_core"), ("t", "direct", 1, 1, None))]
  pairs.append((("t", "post", 4, 4, "qr_core"), ("t", "direct", 4, 4, None)))
  records = stats.compare_groups(groups, pairs)
  out = heatmap._cell_intervals(records, metric, sign, "qr_core", [4, 1], [1, 4])  # noqa: SLF001
  c = bootstrap.compare_items(metric, list(groups[pairs[0][0]].values()), list(groups[pairs[0][1]].values()))
  scale, digits = stats.METRICS[metric][1], stats.METRICS[metric][2]
  low, high = sorted((sign * c.low * scale, sign * c.high * scale))
  assert low > 0 and out["notes"][0, 0] == f"[{low:+.{digits}f}, {high:+.{digits}f}]"
  assert out["bold"][0, 0] and out["notes"][0, 1] != "" and out["notes"][1, 0] == ""
  assert not out["bold"][1].any()
  assert heatmap._cell_intervals(records, None, sign, "qr_core", [4, 1], [1, 4]) == {}  # noqa: SLF001
  values = np.array([[1.0, 0.0], [np.nan, np.nan]])
  labels = {"row_labels": [4, 1], "col_labels": [1, 4], "title": "t", "xlabel": "x", "ylabel": "y", "cbar_label": "c"}
  plots.plot_heatmap(values, path=tmp_path / "h.png", **labels, **out)
  assert _png(tmp_path / "h.png").std() > 0.01
  with pytest.raises(ValueError, match=r"heatmap notes have shape \(1, 2\), the values \(2, 2\)"):
    plots.plot_heatmap(values, path=tmp_path / "b.png", **labels, notes=out["notes"][:1])
