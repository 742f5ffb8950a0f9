"""Never destroy data: output paths are checked against the input; writing goes through
lora_squeeze.atomic (the project's one atomic-write helper), with AdapterError for bad paths."""

from __future__ import annotations

import os
import pathlib

from lora_squeeze import atomic as _atomic
from lora_squeeze.adapters.errors import AdapterError


def check_distinct(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Raises AdapterError when dst is src, lies inside src, or contains src (symlinks resolved)."""
  src_path = pathlib.Path(src).resolve()
  dst_path = pathlib.Path(dst).resolve()
  if src_path == dst_path:
    raise AdapterError(f"output {dst} is the input {src}; choose a new path (the source is never overwritten)")
  if src_path in dst_path.parents:
    raise AdapterError(f"output {dst} lies inside the input {src}; choose a path outside it")
  if dst_path in src_path.parents:
    raise AdapterError(f"input {src} lies inside the output {dst}; choose a path that does not contain it")


def check_writable(dst: str | os.PathLike, *, force: bool) -> pathlib.Path:
  """Checks, before any compute, that dst can be created: a proper name in an existing writable
  folder, and dst absent (unless force). See lora_squeeze.atomic.check_output."""
  return _atomic.check_output(dst, force=force, error=AdapterError)


def atomic_output(dst: str | os.PathLike, *, force: bool = False, mode_like: str | os.PathLike | None = None):
  """lora_squeeze.atomic.atomic_output (the project's one atomic-write helper) with AdapterError."""
  return _atomic.atomic_output(dst, force=force, mode_like=mode_like, error=AdapterError)
