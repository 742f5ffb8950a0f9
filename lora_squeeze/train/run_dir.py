"""The run folder: the one definition of the files a run writes and of how they are read back.

    <workdir>/run_config.json   the run's identity (config + plan), checkpoint.claim_workdir's guard
    <workdir>/checkpoints/      Orbax checkpoints (checkpoint.RunCheckpoints)
    <workdir>/adapters/<tag>/   one exported adapter per Evaluate (adapters.orbax_io)
    <workdir>/metrics.jsonl     one JSON record per line: train steps, squeezes, evaluations
    <workdir>/results.json      {"complete", "run_id", "global_step", "evals", "squeezes", "config"}

The runner writes through this module and experiments/ reads through it, so a changed name or
format changes both. The names themselves live in lora_squeeze.checkpoint (RUN_ARTIFACTS), a
lower layer whose workdir guard needs them too.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from lora_squeeze import atomic
from lora_squeeze import checkpoint as ckpt_lib

CHECKPOINTS_DIR, ADAPTERS_DIR, METRICS_FILE, RESULTS_FILE = ckpt_lib.RUN_ARTIFACTS
RUN_CONFIG_FILE = ckpt_lib.RUN_CONFIG_FILE


def checkpoints_dir(workdir: pathlib.Path | str) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINTS_DIR


def adapter_dir(workdir: pathlib.Path | str, tag: str) -> pathlib.Path:
  """Where the adapter of evaluation `tag` is exported."""
  return pathlib.Path(workdir) / ADAPTERS_DIR / tag


def metrics_path(workdir: pathlib.Path | str) -> pathlib.Path:
  return pathlib.Path(workdir) / METRICS_FILE


def results_path(workdir: pathlib.Path | str) -> pathlib.Path:
  return pathlib.Path(workdir) / RESULTS_FILE


def run_id(run_config: Mapping[str, Any]) -> str:
  """A short hash of the run's identity, stored in checkpoints, adapters and results.json."""
  return hashlib.sha256(json.dumps(run_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MetricsLog:
  """metrics.jsonl: one JSON record per line, appended and flushed as it happens."""

  def __init__(self, path: pathlib.Path, *, enabled: bool = True):
    self.path = path
    self.enabled = enabled  # False on processes other than 0: one writer per file

  def size(self) -> int:
    """Bytes written so far: stored in each checkpoint, so a resume drops exactly what followed it
    (0 on the processes that do not write the file)."""
    return self.path.stat().st_size if self.enabled and self.path.exists() else 0

  def truncate_after(self, global_step: int, size: int | None = None) -> None:
    """Drops the records written after a resumed checkpoint (they will be written again): those
    beyond its byte `size`, or (checkpoints older than that record) of steps beyond `global_step`."""
    if not self.enabled or not self.path.exists():
      return
    if size is not None:
      data = self.path.read_bytes()
      if len(data) > size:
        atomic.write_text(self.path, data[:size].decode())
      return
    kept = [
      line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= global_step
    ]
    atomic.write_text(self.path, "".join(line + "\n" for line in kept))

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True, default=float) + "\n")


def write_results(
  workdir: pathlib.Path | str,
  *,
  complete: bool,
  run_id: str,
  global_step: int,
  evals: Mapping[str, Any],
  squeezes: Sequence[Mapping[str, Any]],
  config: Mapping[str, Any],
) -> None:
  """results.json (atomically): the evaluation rows by tag and the squeeze reports without their
  per-module lists (those stay in metrics.jsonl)."""
  ckpt_lib.write_json_atomic(
    results_path(workdir),
    {
      "complete": complete,
      "run_id": run_id,
      "global_step": global_step,
      "evals": evals,
      "squeezes": [{k: v for k, v in s.items() if k != "modules"} for s in squeezes],
      "config": config,
    },
  )


def read_results(workdir: pathlib.Path | str) -> dict[str, Any] | None:
  """The run's results.json as written by write_results, or None while there is none."""
  path = results_path(workdir)
  if not path.exists():
    return None
  with open(path) as f:
    return json.load(f)
