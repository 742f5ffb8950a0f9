"""Nothing lost, nothing half-written, no raw tracebacks (issue 14): real signals on real subprocesses
paused at a chosen point (LORA_SQUEEZE_PAUSE_AT, or a printer hook in the trainer), corrupt files,
immutable folders (`chattr +i`: the tests run as root, where mode bits do not stop a write)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_squeeze import atomic
from lora_squeeze import checkpoint as ckpt_lib
from lora_squeeze import model as model_lib
from lora_squeeze import train
from lora_squeeze.adapters import AdapterError, load_adapter, save_adapter, squeeze_adapter
from lora_squeeze.errors import UserInputError

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import test_train as tt  # noqa: E402  (the tiny copy task and its run setup)

ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}

# A writer through the one atomic-output helper: a folder output of two files.
WRITER = """
import sys
from lora_squeeze import atomic
with atomic.atomic_output(sys.argv[1], force=sys.argv[2] == "force") as target:
    target.mkdir()
    (target / "weights").write_text("new " * 1000)
    (target / "config").write_text("new")
print("done")
"""


def start_paused(command: list[str], point: str, *, cwd=None, pause_env: str = atomic.PAUSE_ENV) -> subprocess.Popen:
  """Starts `command` with the pause hook at `point` and returns once it is paused there."""
  # SIGINT back to its default in the child: a test run started in the background of a
  # non-interactive shell inherits SIGINT ignored, and Python installs no KeyboardInterrupt handler then.
  proc = subprocess.Popen(
    command,
    env={**ENV, pause_env: point},
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  lines = []
  deadline = time.time() + 600
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line and proc.poll() is not None:
      break
    lines.append(line)
    if f"paused at {point}" in line:
      return proc
  proc.kill()
  raise AssertionError(f"{command} did not pause at {point}: {''.join(lines)[-3000:]}")


def finish(proc: subprocess.Popen, sig: int) -> int:
  proc.send_signal(sig)
  proc.communicate(timeout=120)
  return proc.returncode


def tmp_folders(parent: pathlib.Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if atomic._TMP_INFIX in p.name)


def old_output(parent: pathlib.Path) -> pathlib.Path:
  out = parent / "out"
  out.mkdir()
  (out / "weights").write_text("old")
  return out


# ---------------------------------------------------------------- item 1: relative paths


def test_orbax_adapters_open_and_squeeze_by_a_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  rng = np.random.default_rng(0)
  tree = {
    "layer_0": {
      "lora": {"a": rng.normal(size=(6, 4)).astype(np.float32), "b": rng.normal(size=(4, 5)).astype(np.float32)}
    }
  }
  (tmp_path / "run" / "adapters").mkdir(parents=True)
  save_adapter("run/adapters/r4", tree, {"model": "tiny"})
  loaded, meta = load_adapter("run/adapters/r4")
  np.testing.assert_array_equal(loaded["layer_0"]["lora"]["a"], tree["layer_0"]["lora"]["a"])
  assert meta["ranks"] == {"layer_0/lora": 4}
  summary = squeeze_adapter("run/adapters/r4", "r2", rank=2)
  assert [r.r_tgt for r in summary.rows] == [2] and load_adapter("r2")[1]["ranks"] == {"layer_0/lora": 2}


class StopAt(list):
  """A printer that raises when a line starts with `prefix` (the crash point), else collects lines."""

  def __init__(self, prefix: str | None = None):
    super().__init__()
    self.prefix = prefix

  def append(self, line):
    super().append(line)
    if self.prefix is not None and line.startswith(self.prefix):
      raise tt.Crash(line)


def test_resume_with_a_relative_workdir_after_a_crash_between_export_and_checkpoint(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  plan = (tt.Stage(rank=4, steps=2, lr=tt.STAGE_LR, warmup=tt.STAGE_WARMUP), tt.Evaluate(tag="final"))
  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  # The printer line "evaluate ..." comes after the export and before the checkpoint that follows it.
  with pytest.raises(tt.Crash):
    train.execute_plan(plan, tt.make_setup("run", base, lines=StopAt("evaluate")))
  assert (tmp_path / "run" / "adapters" / "final" / "lora_squeeze_adapter.json").is_file()
  lines = StopAt()
  result = train.execute_plan(plan, tt.make_setup("run", base, lines=lines))
  assert result["global_step"] == 2 and any(line.startswith("resumed from checkpoint") for line in lines)


# ---------------------------------------------------------------- item 2: --force replacement


def test_force_replacement_killed_mid_swap_is_rolled_back_by_the_next_run(tmp_path):
  out = old_output(tmp_path)
  proc = start_paused([sys.executable, "-c", WRITER, str(out), "force"], "swap")
  assert finish(proc, signal.SIGKILL) == -signal.SIGKILL
  assert not out.exists()  # the instant between the two renames: the next run must restore it
  with pytest.raises(UserInputError, match="already exists; pass --force"):
    atomic.check_output(out, force=False)
  assert (out / "weights").read_text() == "old" and tmp_folders(tmp_path) == []


def test_sigterm_mid_swap_waits_for_the_swap_to_complete(tmp_path):
  out = old_output(tmp_path)
  proc = start_paused([sys.executable, "-c", WRITER, str(out), "force"], "swap")
  proc.send_signal(signal.SIGTERM)  # blocked during the swap; the pause ends only by SIGKILL or timeout
  time.sleep(1)
  assert proc.poll() is None
  proc.kill()
  proc.communicate(timeout=60)


def test_cli_force_replacement_killed_mid_swap_keeps_the_old_adapter(tmp_path):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  out = tmp_path / "out"
  squeeze_adapter(src, out, rank=3)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  command = [sys.executable, "-m", "lora_squeeze.cli", "squeeze", str(src), str(out), "--rank=2", "--force"]
  assert finish(start_paused(command, "swap"), signal.SIGKILL) == -signal.SIGKILL
  assert not out.exists()
  with pytest.raises(AdapterError, match="already exists"):  # the next run over out restores it first
    squeeze_adapter(src, out, rank=2)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---------------------------------------------------------------- item 3: temporary folders


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_mid_write_remove_the_temporary_folder(tmp_path, sig):
  out = old_output(tmp_path)
  proc = start_paused([sys.executable, "-c", WRITER, str(out), "force"], "written")
  assert tmp_folders(tmp_path)  # the complete new output waits in its temporary folder
  code = finish(proc, sig)
  assert code == -signal.SIGTERM if sig == signal.SIGTERM else code != 0
  assert tmp_folders(tmp_path) == [] and (out / "weights").read_text() == "old"


def test_temporaries_of_killed_runs_are_removed_by_the_next_run_but_not_those_of_live_runs(tmp_path):
  out = tmp_path / "out"
  killed = start_paused([sys.executable, "-c", WRITER, str(out), "no"], "written")
  assert finish(killed, signal.SIGKILL) == -signal.SIGKILL
  (dead,) = tmp_folders(tmp_path)
  live = start_paused([sys.executable, "-c", WRITER, str(out), "no"], "written")  # the next run over out
  try:
    (left,) = tmp_folders(tmp_path)
    assert left != dead
    atomic.check_output(out, force=False)  # one more run over out, while the live one is paused
    assert tmp_folders(tmp_path) == [left] and not out.exists()
    assert json.loads((tmp_path / left / atomic.OWNER_FILE).read_text())["pid"] == live.pid
  finally:
    finish(live, signal.SIGTERM)
  assert tmp_folders(tmp_path) == []


def test_long_output_names_get_a_short_temporary_name(tmp_path):
  out = tmp_path / ("x" * 250)
  with atomic.atomic_output(out) as target:
    target.write_text("ok")
  assert out.read_text() == "ok"
  with pytest.raises(UserInputError, match=r"is 256 bytes; the file system allows names of at most 255"):
    atomic.check_output(tmp_path / ("y" * 256), force=False)


# ---------------------------------------------------------------- item 4: corrupt checkpoints


def test_resume_falls_back_past_a_corrupt_checkpoint_and_names_it(tmp_path):
  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  plan = tt.anneal_plan()
  with pytest.raises(tt.Crash):
    train.execute_plan(
      plan,
      tt.make_setup(tmp_path, base, checkpoint_every=2, batches=tt.CrashAt(tt.make_setup(tmp_path, base).batches, 5)),
    )
  directory = tmp_path / train.CHECKPOINTS_DIR
  newest, previous = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)[:2]
  meta_file = directory / str(newest) / "meta" / "metadata"
  meta_file.write_bytes(meta_file.read_bytes()[:20])  # truncated JSON
  lines = StopAt()
  result = train.execute_plan(plan, tt.make_setup(tmp_path, base, checkpoint_every=2, lines=lines))
  warning = next(line for line in lines if line.startswith("warning:"))
  assert f"checkpoint {newest}: {meta_file} cannot be read" in warning and "\n" not in warning
  assert any(line.startswith(f"resumed from checkpoint {previous}:") for line in lines)
  assert result["global_step"] == 6
  # Every checkpoint damaged: one error naming each, no run from scratch over the old files.
  for folder in directory.iterdir():
    if folder.name.isdigit():
      for file in (folder / "lora").rglob("*"):
        if file.is_file():
          file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
      meta = folder / "meta" / "metadata"
      meta.write_bytes(meta.read_bytes()[:10])
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match=r"no checkpoint in .* can be restored \(checkpoint"):
    train.execute_plan(plan, tt.make_setup(tmp_path, base, checkpoint_every=2))


# ---------------------------------------------------------------- item 5: metrics.jsonl on resume

RUN_TINY = """
import dataclasses, os, sys, time
sys.path.insert(0, sys.argv[2])
import jax
import test_train as tt
from lora_squeeze import model as model_lib, train

class PauseAt(list):
  def append(self, line):
    if line.startswith(os.environ["PAUSE_ON_LINE"]):
      print("paused at line", file=sys.stderr, flush=True)
      time.sleep(600)

base = model_lib.init_base_params("tiny", key=jax.random.key(0))
train.execute_plan(tt.anneal_plan(), tt.make_setup(sys.argv[1], base, checkpoint_every=2, lines=PauseAt()))
"""


def test_a_kill_after_a_squeeze_record_and_before_its_checkpoint_does_not_duplicate_it(tmp_path):
  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  straight = tmp_path / "straight"
  train.execute_plan(tt.anneal_plan(), tt.make_setup(straight, base, checkpoint_every=2))
  run = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, "-c", RUN_TINY, str(run), str(TESTS)],
    env={**ENV, "PAUSE_ON_LINE": "squeeze"},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_line(proc, "paused at line")
  assert finish(proc, signal.SIGKILL) == -signal.SIGKILL
  assert len(tt.read_metrics(run, "squeeze")) == 1  # written before the kill, after the last checkpoint
  train.execute_plan(tt.anneal_plan(), tt.make_setup(run, base, checkpoint_every=2))
  records = lambda d: [
    (r["event"], r.get("step")) for r in map(json.loads, (d / train.METRICS_FILE).read_text().splitlines())
  ]  # noqa: E731
  assert records(run) == records(straight)
  assert [r["event"] for r in map(json.loads, (run / train.METRICS_FILE).read_text().splitlines())].count(
    "squeeze"
  ) == 1


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
  lines = []
  while True:
    line = proc.stderr.readline()
    if not line and proc.poll() is not None:
      raise AssertionError(f"exited before {text!r}: {''.join(lines)[-3000:]}")
    lines.append(line)
    if text in line:
      return


# ---------------------------------------------------------------- item 6: one-line errors


def write_peft(folder: pathlib.Path, tensors: dict, **config) -> pathlib.Path:
  folder.mkdir()
  (folder / "adapter_config.json").write_text(
    json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], **config})
  )
  save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
  return folder


def peft_tensors(rng, modules=("layers.0.q", "layers.1.q"), r=4, d_in=6, d_out=5):
  tensors = {}
  for m in modules:
    tensors[f"base_model.model.{m}.lora_A.weight"] = rng.normal(size=(r, d_in)).astype(np.float32)
    tensors[f"base_model.model.{m}.lora_B.weight"] = rng.normal(size=(d_out, r)).astype(np.float32)
  return tensors


@pytest.mark.parametrize(
  "config, message",
  [
    ('{"lora_alpha": NaN}', r"adapter_config.json: lora_alpha must be a finite positive number, got nan"),
    ('{"lora_alpha": Infinity}', r"adapter_config.json: lora_alpha must be a finite positive number, got inf"),
    ('{"alpha_pattern": {"layers.0.q": "16"}}', r"alpha_pattern\['layers.0.q'\] = '16'; its values must be finite"),
    ('{"rank_pattern": {"layers.(0.q": 4}}', r"rank_pattern key 'layers.\(0.q' is not a valid regular expression"),
  ],
)
def test_bad_peft_config_values_are_named_before_any_compute(tmp_path, config, message):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  cfg = json.loads((src / "adapter_config.json").read_text())
  (src / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ", " + config[1:])
  with pytest.raises(AdapterError, match=message):
    squeeze_adapter(src, tmp_path / "out", rank=2)
  assert tmp_folders(tmp_path) == [] and not (tmp_path / "out").exists()


@contextlib.contextmanager
def immutable(folder: pathlib.Path):
  subprocess.run(["chattr", "+i", str(folder)], check=True)
  try:
    yield
  finally:
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_bad_output_paths_are_refused_before_any_compute(tmp_path, monkeypatch):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "x").mkdir()
  for dst in (".", "x/.."):
    with pytest.raises(AdapterError, match=rf"output '{re.escape(dst)}' does not name a file or folder of its own"):
      squeeze_adapter(src, dst, rank=2, force=True)
  with pytest.raises(AdapterError, match="is 300 bytes; the file system allows names of at most 255"):
    squeeze_adapter(src, "o" * 300, rank=2)
  locked = tmp_path / "locked"
  locked.mkdir()
  calls = []
  with immutable(locked):
    with pytest.raises(AdapterError, match=rf"cannot write in {locked} .*Operation not permitted"):
      squeeze_adapter(src, locked / "out", rank=2, on_module=lambda *a: calls.append(a))
  assert calls == []  # refused before the first module was squeezed
  assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "src", "x"]


def run_train_cli(*args: str, cwd) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "lora_squeeze.cli", "train", *args],
    capture_output=True,
    text=True,
    timeout=600,
    env=ENV,
    cwd=cwd,
  )


def test_train_cli_gives_one_line_errors_for_bad_keys_and_workdirs(tmp_path):
  config = f"--config={REPO / 'configs' / 'direct.py'}"
  bogus = run_train_cli(config, "--config.bogus=3", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
  assert bogus.returncode == 1 and "Traceback" not in bogus.stderr
  assert (
    bogus.stderr.strip()
    .splitlines()[-1]
    .startswith("lora-squeeze train: error: --config.bogus=3: the config has no key 'bogus'; allowed keys: batch_size,")
  )
  (tmp_path / "file").write_text("")
  as_file = run_train_cli(config, "--workdir=file", cwd=tmp_path)
  assert as_file.returncode == 1 and "Traceback" not in as_file.stderr
  assert as_file.stderr.strip().splitlines()[-1] == (
    "lora-squeeze train: error: --workdir file is a file, not a folder; give a folder path"
  )


def test_workdir_in_an_immutable_folder_is_refused(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  with immutable(locked):
    with pytest.raises(UserInputError, match=rf"cannot write in {locked} \(--workdir {locked}/run\): Operation not"):
      atomic.check_writable_folder(locked / "run", what="--workdir")


def test_config_errors_are_user_input_errors():
  from configs import direct

  with pytest.raises(UserInputError, match=r"config has no key 'bogus'; allowed keys: "):
    direct.get_config("bogus=3")


# ---------------------------------------------------------------- item 7: modes, NaN, zero B


def test_output_modes_are_no_wider_than_the_source(tmp_path):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  for file in src.iterdir():
    file.chmod(0o600)
  src.chmod(0o700)
  squeeze_adapter(src, tmp_path / "out", rank=2)
  assert stat.S_IMODE((tmp_path / "out").stat().st_mode) & 0o077 == 0
  for file in (tmp_path / "out").iterdir():
    assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_nan_in_modules_to_save_is_refused_with_the_tensor_named(tmp_path):
  tensors = peft_tensors(np.random.default_rng(0))
  embed = np.ones((7, 3), np.float32)
  embed[4, 1] = np.nan
  tensors["base_model.model.embed_tokens.modules_to_save.default.weight"] = embed
  src = write_peft(tmp_path / "src", tensors)
  with pytest.raises(
    AdapterError,
    match=r"tensor 'base_model.model.embed_tokens.modules_to_save.default.weight' "
    r"\(copied through unchanged\) holds 1 NaN/inf values",
  ):
    squeeze_adapter(src, tmp_path / "out", rank=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_all_zero_b_keeps_b_zero_and_an_orthonormal_a_of_the_source_scale(tmp_path, caplog):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(9, 4)).astype(np.float32)
  np.savez(tmp_path / "in.npz", **{"m/a": a, "m/b": np.zeros((4, 7), np.float32)})
  with caplog.at_level("WARNING"):
    squeeze_adapter(tmp_path / "in.npz", tmp_path / "out.npz", rank=2)
  assert "module m: B is all zero" in caplog.text
  out = np.load(tmp_path / "out.npz")
  np.testing.assert_array_equal(out["m/b"], 0)
  a_t = out["m/a"].astype(np.float64)
  scale = np.linalg.norm(a.astype(np.float64)) / math.sqrt(4)
  np.testing.assert_allclose(a_t.T @ a_t, scale**2 * np.eye(2), rtol=1e-5, atol=1e-5)
  # Its columns lie in the source A's column space.
  q, _ = np.linalg.qr(a.astype(np.float64))
  np.testing.assert_allclose(q @ (q.T @ a_t), a_t, atol=1e-4)
