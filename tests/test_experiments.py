"""Tests of the study drivers (experiments/): grid, resume, aggregation from files, tables, plots."""

import json
import pathlib

import matplotlib.image as mpimg
import ml_collections
import numpy as np
import pytest

from experiments import common
from lora_squeeze import protocols

_PLAN = protocols.direct(rank=2, steps=3, lr=0.01, warmup=1)


def _base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.optim = ml_collections.ConfigDict({"lr": 0.01, "warmup": 10})
  config.ranks = (1, 2)
  return config


def _write_results(train_dir: pathlib.Path, scores: dict[str, float], squeezes=()) -> None:
  """A finished run's results file in the trainer's format (lora_squeeze.train: results.json)."""
  train_dir.mkdir(parents=True, exist_ok=True)
  results = {"complete": True, "evals": {tag: {"tag": tag, "score": s, "metrics": {"accuracy": s}}
                                         for tag, s in scores.items()},
             "squeezes": [{"r_src": a, "r_tgt": b, "method": m, "overall_retention": v} for a, b, m, v in squeezes]}
  (train_dir / "results.json").write_text(json.dumps(results))


# --- configs -------------------------------------------------------------------------------------


def test_apply_overrides_sets_nested_keys_on_a_copy():
  base = _base_config()
  config = common.apply_overrides(base, {"optim.lr": 0.1, "seed": 43, "ranks": [4, 8]})
  assert (config.optim.lr, config.seed, config.ranks) == (0.1, 43, (4, 8))
  assert (base.optim.lr, base.seed, base.ranks) == (0.01, 0, (1, 2))


@pytest.mark.parametrize("key, match", [
    ("optim.lrr", r"no key 'optim.lrr'; optim has \['lr', 'warmup'\]"),
    ("optimizer.lr", r"no key 'optimizer' \(override 'optimizer.lr'\)"),
])
def test_apply_overrides_names_unknown_keys(key, match):
  with pytest.raises(ValueError, match=match):
    common.apply_overrides(_base_config(), {key: 1.0})


def test_load_config_file_passes_the_argument(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text("import ml_collections\n"
                  "def get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict({'arg': arg or 'none'})\n")
  assert common.load_config_file(f"{path}:reduced").arg == "reduced"
  assert common.load_config_file(str(path)).arg == "none"
  with pytest.raises(ValueError, match="does not exist"):
    common.load_config_file(str(tmp_path / "missing.py"))


# --- runner --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (62, "1m02s"), (3725, "1h02m05s"), (float("nan"), "?")])
def test_format_duration(seconds, text):
  assert common.format_duration(seconds) == text


def test_duplicate_cell_names_are_refused():
  cell = common.Cell(plan=_PLAN, name="a", overrides={}, labels={}, evals={})
  with pytest.raises(ValueError, match="two cells share the folder name 'a'"):
    common.check_unique_names([cell, cell])


def test_claim_run_dir_refuses_a_folder_made_by_other_overrides(tmp_path):
  common.claim_run_dir(tmp_path, common.Cell(plan=_PLAN, name="x/y", overrides={"seed": 1}, labels={}, evals={}))
  common.claim_run_dir(tmp_path, common.Cell(plan=_PLAN, name="x/y", overrides={"seed": 1}, labels={"a": 1}, evals={}))
  with pytest.raises(ValueError, match=r"was made with overrides \{'seed': 1\}, not \{'seed': 2\}"):
    common.claim_run_dir(tmp_path, common.Cell(plan=_PLAN, name="x/y", overrides={"seed": 2}, labels={}, evals={}))


# --- aggregation ---------------------------------------------------------------------------------


def test_collect_rows_reads_finished_cells_and_lists_unfinished(tmp_path):
  done = common.Cell(plan=_PLAN, name="boolq/r4", overrides={}, labels={"task": "boolq", "r_src": 4},
                     evals={"r4": {"r_tgt": 4}, "r4_to_r2": {"r_tgt": 2}})
  half = common.Cell(plan=_PLAN, name="boolq/r8", overrides={}, labels={"task": "boolq", "r_src": 8}, evals={"r8": {"r_tgt": 8}})
  for cell in (done, half):
    common.claim_run_dir(tmp_path, cell)
  _write_results(common.run_dir(tmp_path, done) / common.TRAIN_DIR, {"r4": 0.7, "r4_to_r2": 0.685, "unlisted": 0.01},
                 squeezes=[(4, 2, "qr_core", 0.9)])
  rows, unfinished = common.collect_rows(tmp_path)
  assert unfinished == ["boolq/r8"]
  assert sorted((r["r_tgt"], r["score"], r["tag"]) for r in rows) == [(2, 68.5, "r4_to_r2"), (4, 70.0, "r4")]
  assert all(r["task"] == "boolq" and r["r_src"] == 4 and r["cell"] == "boolq/r4" for r in rows)
  squeezes, _ = common.collect_squeeze_rows(tmp_path)
  assert squeezes == [{"task": "boolq", "r_src": 4, "r_tgt": 2, "method": "qr_core", "retention": 0.9, "cell": "boolq/r4"}]


def test_collect_rows_names_a_missing_evaluation(tmp_path):
  cell = common.Cell(plan=_PLAN, name="c", overrides={}, labels={}, evals={"r4": {}})
  common.claim_run_dir(tmp_path, cell)
  _write_results(common.run_dir(tmp_path, cell) / common.TRAIN_DIR, {"r8": 1.0})
  with pytest.raises(ValueError, match=r"finished without a score for 'r4'; it has \['r8'\]"):
    common.collect_rows(tmp_path)


def test_mean_score_and_select():
  rows = [{"task": "a", "rank": 1, "score": 1.0}, {"task": "b", "rank": 1, "score": 3.0},
          {"task": "a", "rank": 2, "score": 5.0}]
  assert common.mean_score(rows, key=lambda r: r["rank"]) == {1: 2.0, 2: 5.0}
  assert common.select(rows, task="a", rank=2) == [rows[2]]
  assert common.select(rows, missing=1) == []


def test_markdown_table_bolds_and_formats():
  text = common.markdown_table(["task", "x", "y"], [["boolq", 1.234, float("nan")]], bold={(0, 1)})
  assert text.splitlines() == ["| task | x | y |", "|---|---|---|", "| boolq | **1.2** | – |"]


def test_write_csv_and_json_round_trip(tmp_path):
  rows = [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}]
  common.write_csv(tmp_path / "r.csv", rows)
  assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b,c", "1,2.5,", "3,,x"]
  common.write_json(tmp_path / "r.json", rows)
  assert json.loads((tmp_path / "r.json").read_text()) == rows
  assert not list(tmp_path.glob(".*tmp"))


# --- plots ---------------------------------------------------------------------------------------


def _png(path: pathlib.Path) -> np.ndarray:
  assert path.stat().st_size > 1000
  return mpimg.imread(path)


def test_heatmap_is_red_for_gains_and_blue_for_losses(tmp_path):
  values = np.array([[2.0, np.nan], [-2.0, 0.0]])
  common.plot_heatmap(values, row_labels=[4, 2], col_labels=[1, 2], path=tmp_path / "h.png", title="t",
                      xlabel="r_tgt", ylabel="r_src", cbar_label="gain")
  image = _png(tmp_path / "h.png")[..., :3]
  reddish = image[..., 0] - image[..., 2] > 0.25
  bluish = image[..., 2] - image[..., 0] > 0.25
  assert reddish.sum() > 500 and bluish.sum() > 500
  with pytest.raises(ValueError, match=r"values have shape \(2, 2\), labels need \(1, 2\)"):
    common.plot_heatmap(values, row_labels=[4], col_labels=[1, 2], path=tmp_path / "bad.png", title="t",
                        xlabel="x", ylabel="y", cbar_label="c")


def test_lines_plot_is_written(tmp_path):
  common.plot_lines({"direct": ([1, 2, 4], [50.0, 60.0, 65.0]), "post": ([1, 2], [55.0, 61.0])},
                    path=tmp_path / "l.png", title="t", xlabel="rank", ylabel="score")
  assert _png(tmp_path / "l.png").std() > 0.01
