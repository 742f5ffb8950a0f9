"""The accelerator benchmark stays runnable where none is lent: benchmarks/gpu_train_bench.py has
never met a GPU in this project, so the session that gets one minutes of device time must not
spend them on a crash. Run here on CPU with the tiny model, in a real subprocess."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import gpu_train_bench
from lora_squeeze import model as model_lib


def test_gpu_train_bench_runs_end_to_end_on_cpu(tmp_path):
  out = tmp_path / "bench.json"
  batch, length, steps = 2, 64, 2
  command = [sys.executable, "-m", "benchmarks.gpu_train_bench", "--models=tiny", f"--batch={batch}"]
  command += [f"--length={length}", f"--steps={steps}", "--ahead-steps=10", f"--out={out}"]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["host"]["backend"] == "cpu" and result["command"].endswith(f"--steps={steps} --ahead-steps=10")
  (row,) = result["rows"]
  # LoRA r = 16 on every target of every layer: (in + out) * r per module, from the model's own config.
  config = model_lib.base_model(model_lib.make_model("tiny")).config
  d, q, kv, hidden = (
    config.embed_dim,
    config.num_heads * config.head_dim,
    config.num_kv_heads * config.head_dim,
    config.hidden_dim,
  )
  per_layer = (d + q) + (d + 2 * kv) + (q + d) + (d + 2 * hidden) + (hidden + d)
  assert row["p_lora"] == 16 * per_layer * config.num_layers
  assert row["p_embedding"] == config.num_embed * d
  tokens = batch * length
  assert row["tokens_per_s"] == pytest.approx(tokens / row["step_s"])
  assert row["achieved_flops_per_s"] == pytest.approx(row["flops_per_step"] / row["step_s"])
  assert row["flops_per_step"] > 6 * row["p_lora"] * tokens + 4 * row["p_base_without_embedding"] * tokens
  assert row["mfu"] is None  # no peak FLOP/s for a CPU
  change = row["rank_change"]
  assert (change["r_src"], change["r_tgt"], change["modules"]) == (16, 8, 5 * config.num_layers)
  assert change["total_s"] == pytest.approx(change["squeeze_s"] + change["optimizer_reinit_s"] + change["recompile_s"])
  ahead = row["rank_change_ahead"]
  assert (ahead["r_src"], ahead["r_tgt"], ahead["steps_during_compile"]) == (8, 4, 10)
  parts = ahead["waited_for_compile_s"] + ahead["squeeze_s"] + ahead["optimizer_reinit_s"] + ahead["recompile_s"]
  assert ahead["exposed_s"] == pytest.approx(parts)


@pytest.mark.parametrize(
  "kind, peak",
  [("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5 lite", 197e12), ("cpu", None)],
)
def test_gpu_train_bench_peak_flops_by_device_kind(kind, peak):
  assert gpu_train_bench.peak_flops(kind) == peak


def test_device_tensorflow_stand_in_carries_the_benchmarks_import_chain():
  """The GPU image has no TensorFlow; benchmarks/device/run.sh puts a stand-in first on the path.
  gemma/kauldron/clu must still import through it (an upgrade that needs more of TF fails here)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  stub = root / "benchmarks" / "device" / "tensorflow_stub"
  code = (
    "import tensorflow, benchmarks.gpu_train_bench, benchmarks.squeeze_bench, benchmarks.squeeze_precision_bench\n"
    "import benchmarks.train_bench, benchmarks.device.locate_float32_error\n"
    "print(tensorflow.__file__)"
  )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub), str(root)]))
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert pathlib.Path(done.stdout.split()[-1]) == stub / "tensorflow" / "__init__.py"


def test_device_run_script_refuses_an_unknown_stage_before_doing_anything(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, OUT=str(tmp_path))
  done = subprocess.run(
    ["bash", str(root / "benchmarks" / "device" / "run.sh"), "precision", "bogus"],
    capture_output=True,
    text=True,
    env=env,
    cwd=root,
    timeout=60,
  )
  assert done.returncode == 2
  assert done.stderr.strip() == (
    "error: unknown stage 'bogus' (allowed: train_270m train_1b precision precision_no_tf32 squeeze locate loop)"
  )
  assert list(tmp_path.iterdir()) == []  # nothing installed, nothing written
