"""The run folder's one definition (lora_squeeze.train.run_dir): results.json written by the runner's
writer reads back through the reader experiments/ uses; metrics.jsonl truncates on resume."""

from __future__ import annotations

import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from experiments import grid, results  # noqa: E402
from lora_squeeze import checkpoint as ckpt_lib  # noqa: E402
from lora_squeeze import durations  # noqa: E402
from lora_squeeze.train import progress, run_dir  # noqa: E402


def test_names_are_the_workdir_guards():
  assert (
    run_dir.CHECKPOINTS_DIR,
    run_dir.ADAPTERS_DIR,
    run_dir.METRICS_FILE,
    run_dir.RESULTS_FILE,
  ) == ckpt_lib.RUN_ARTIFACTS
  assert run_dir.adapter_dir("w", "r4_to_r2") == pathlib.Path("w/adapters/r4_to_r2")


def test_results_round_trip_and_the_experiments_reader(tmp_path):
  assert run_dir.read_results(tmp_path) is None and results.read_run_results(tmp_path) is None
  squeeze = {
    "r_src": 4,
    "r_tgt": 2,
    "method": "qr_core",
    "overall_retention": 0.75,
    "retention_curve": [0.5, 0.75],
    "modules": [{"path": "a", "retention": 0.75}],
  }
  evals = {"r4_to_r2": {"score": 0.5, "metrics": {"accuracy": 0.5, "option_nll": 1.25}, "rank": 2}}
  run_dir.write_results(
    tmp_path, complete=False, run_id="abc", global_step=7, evals=evals, squeezes=[squeeze], config={"x": 1}
  )
  written = json.loads((tmp_path / "results.json").read_text())
  assert written == run_dir.read_results(tmp_path)
  assert written["squeezes"] == [{k: v for k, v in squeeze.items() if k != "modules"}]
  assert results.read_run_results(tmp_path) is None  # not complete yet
  run_dir.write_results(
    tmp_path, complete=True, run_id="abc", global_step=7, evals=evals, squeezes=[squeeze], config={"x": 1}
  )
  got = results.read_run_results(tmp_path)
  assert got.scores == {"r4_to_r2": 50.0} and got.nll == {"r4_to_r2": 1.25}
  assert got.squeezes == ({"r_src": 4, "r_tgt": 2, "method": "qr_core", "retention": 0.75, "curve": [0.5, 0.75]},)


def test_metrics_log_truncates_to_a_checkpoints_byte_size_or_step(tmp_path):
  log = run_dir.MetricsLog(run_dir.metrics_path(tmp_path))
  log.write({"step": 1, "loss": 2.0})
  size = log.size()
  log.write({"step": 2, "loss": 1.0})
  log.write({"step": 3, "loss": 0.5})
  log.truncate_after(1, size)
  assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1]
  log.write({"step": 2, "loss": 1.0})
  log.truncate_after(1)  # an older checkpoint without a byte size: by step
  assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1]
  silent = run_dir.MetricsLog(tmp_path / "other.jsonl", enabled=False)  # processes other than 0
  silent.write({"step": 1})
  assert not silent.path.exists() and silent.size() == 0


def test_one_duration_format_for_the_trainer_and_the_grid():
  assert grid.format_duration is progress.format_duration
  assert [progress.format_duration(s) for s in (0.4, 62, 3725, float("nan"))] == ["0s", "1m02s", "1h02m05s", "?"]
  assert progress.format_duration is durations.format_duration  # also the squeeze command's
  assert durations.eta(10.0, 2, 5) == 15.0 and durations.eta(10.0, 5, 5) == 0.0
  assert math.isnan(durations.eta(0.0, 0, 5))  # no rate before the first unit: printed as '?'
  line = progress.train_line(
    global_step=3,
    total_steps=10,
    stage_no=1,
    n_stages=2,
    rank=4,
    loss=0.5,
    grad_norm=0.25,
    lr=0.01,
    tokens_per_s=None,
    eta_seconds=125.0,
  )
  assert line == "step 3/10 stage 1/2 r=4 loss 0.5000 grad_norm 0.25 lr 0.01 tokens/s ? ETA 2m05s"
  assert progress.table_lines({"r4": {"rank": 4, "retention": None, "metrics": {"acc": 0.5}}}) == [
    "tag  rank  V_r  acc (higher is better)",
    "---  ----  ---  ----------------------",
    "r4   4     -    0.5000                ",
  ]
