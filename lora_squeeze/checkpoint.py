"""Run checkpoints (Orbax) and the one-run-per-workdir guard.

A checkpoint holds the LoRA params, the optimizer state (only mid-stage: every Stage starts a
fresh optimizer) and a JSON `meta` record: the position in the plan (item index, step within the
stage, global step = data position), the current rank, the evaluation results and squeeze
reports so far, and the run's config. Orbax's CheckpointManager writes each checkpoint to a
temporary folder and renames it when complete, so a crash never leaves a half-written "latest".

Checkpoints are numbered by a save counter, not by the training step: squeezes and evaluations
change the adapter without training, and each of those positions gets its own checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from lora_squeeze import validation
from lora_squeeze.errors import UserInputError
from lora_squeeze.orbax_paths import orbax_path

RUN_CONFIG_FILE = "run_config.json"
# What a run writes into its workdir; other files (e.g. an experiment's cell.json) may be there.
RUN_ARTIFACTS = ("checkpoints", "adapters", "metrics.jsonl", "results.json")


class WorkdirConflictError(UserInputError):
  """The workdir belongs to a different run."""


class CorruptCheckpointError(UserInputError):
  """A checkpoint whose files cannot be restored (truncated or damaged); the message names them."""


def _canonical(config: Mapping[str, Any]) -> str:
  return json.dumps(config, sort_keys=True, indent=2, default=str)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Dotted keys at which two JSON-like values differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new), key=str):
      out += _differences(old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}{key}.")
    return out
  return [] if old == new else [prefix.rstrip(".") or "<root>"]


def write_json_atomic(path: pathlib.Path | str, value: Any) -> None:
  """Writes JSON to `path` through a temporary file and a rename (never a half-written file)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
  os.replace(tmp, path)


def claim_workdir(workdir: pathlib.Path | str, config: Mapping[str, Any]) -> bool:
  """Makes `workdir` this run's folder; returns True when it already held this same run (resume).

  Raises:
      WorkdirConflictError: the folder holds a run with a different config (its adapters and
    checkpoints are never overwritten), or holds files but no run config.
  """
  workdir = pathlib.Path(workdir)
  config = json.loads(_canonical(config))
  marker = workdir / RUN_CONFIG_FILE
  if marker.exists():
    old = json.loads(marker.read_text())
    if old == config:
      return True
    diff = _differences(old, config)
    raise WorkdirConflictError(
      f"workdir {workdir} holds a different run (config differs at {', '.join(diff[:5])}"
      f"{' ...' if len(diff) > 5 else ''}); choose a new --workdir, or pass that run's exact "
      "config to resume it"
    )
  foreign = [name for name in RUN_ARTIFACTS if (workdir / name).exists()]
  if foreign:
    raise WorkdirConflictError(
      f"workdir {workdir} holds {', '.join(foreign)} but no {RUN_CONFIG_FILE}; refusing to write a run "
      "into it, choose a new --workdir"
    )
  workdir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(marker, config)
  return False


def abstract_like(tree: Any) -> Any:
  """jax.ShapeDtypeStruct (with sharding) of every array leaf: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
  """The checkpoints of one run under `directory` (keeps the newest `max_to_keep`)."""

  def __init__(self, directory: pathlib.Path | str, *, max_to_keep: int = 2):
    validation.positive_int("max_to_keep", max_to_keep)
    self.directory = orbax_path(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest(self) -> int | None:
    """Number of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, *, lora: Any, opt_state: Any | None, meta: Mapping[str, Any]) -> int:
    """Saves a new checkpoint (blocking until it is committed) and returns its number."""
    latest = self.latest()
    number = 0 if latest is None else latest + 1
    items = {"lora": ocp.args.StandardSave(lora), "meta": ocp.args.JsonSave(dict(meta))}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    self._manager.save(number, args=ocp.args.Composite(**items))
    self._manager.wait_until_finished()
    return number

  def restore_meta(self, number: int | None = None) -> dict[str, Any] | None:
    """The `meta` record of checkpoint `number` (default: newest), or None without checkpoints."""
    number = self.latest() if number is None else number
    if number is None:
      return None
    restored = self._manager.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, number: int, *, abstract_lora: Any, abstract_opt_state: Any | None) -> tuple[Any, Any]:
    """(lora, opt_state) of checkpoint `number`, restored into the given shapes and shardings.

    Args:
          number: a checkpoint number.
          abstract_lora / abstract_opt_state: targets from `abstract_like` (the trainer rebuilds
      them at the checkpoint's rank); None for opt_state restores none.
    """
    items = {"lora": ocp.args.StandardRestore(abstract_lora)}
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    restored = self._manager.restore(number, args=ocp.args.Composite(**items))
    return restored["lora"], restored.get("opt_state") if abstract_opt_state is not None else None

  def close(self) -> None:
    self._manager.close()

  def numbers(self) -> list[int]:
    """Numbers of the complete checkpoints, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def restore_verified(
    self, number: int, targets: Callable[[dict[str, Any]], tuple[Any, Any]]
  ) -> tuple[dict[str, Any], Any, Any]:
    """(meta, lora, opt_state) of checkpoint `number`; `targets(meta)` gives the abstract (lora,
    opt_state) to restore into (see `restore`).

    Raises:
      CorruptCheckpointError: a file of the checkpoint cannot be read (named in the message).
    """
    folder = self.directory / str(number)
    try:
      meta = self.restore_meta(number)
    except Exception as e:  # Orbax raises many types (JSON, tensorstore, OSError) for damaged files.
      raise CorruptCheckpointError(
        f"checkpoint {number}: {folder / 'meta' / 'metadata'} cannot be read: {_one_line(e)}"
      ) from e
    abstract_lora, abstract_opt = targets(meta)
    try:
      lora, opt_state = self.restore(number, abstract_lora=abstract_lora, abstract_opt_state=abstract_opt)
    except Exception as e:  # as above
      raise CorruptCheckpointError(
        f"checkpoint {number}: {folder} (lora{' / opt_state' if abstract_opt else ''}) "
        f"cannot be restored: {_one_line(e)}"
      ) from e
    return meta, lora, opt_state


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"
