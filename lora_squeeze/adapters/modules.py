"""What every adapter format presents to the squeeze: named LoRA modules, read one at a time.

A format reader gives, per module, the *effective* factors in the gemma layout,
    a: (d_in, r_src), b: (r_src, d_out), float32, with  ΔW = a @ b  the full update it applies
(any alpha/r scale of the format folded in, multi-axis einsum shapes flattened), and writes back
squeezed effective factors in its own layout, scale and dtype.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from lora_squeeze.adapters.errors import AdapterError

Factors = tuple[np.ndarray, np.ndarray]  # a: (d_in, r), b: (r, d_out), float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleInfo:
  """One LoRA module as found in the adapter's index (no tensor data read)."""

  name: str
  r_src: int
  d_in: int
  d_out: int


class AdapterSource(Protocol):
  """An opened adapter of one format (see the module docstring for the factor convention)."""

  format: str
  path: pathlib.Path
  modules: tuple[ModuleInfo, ...]

  def read(self, module: ModuleInfo) -> Factors:
    """The effective factors of one module, float32 (memory: that module only)."""

  def write(self, target: pathlib.Path, squeezed: Mapping[str, Factors], *, provenance: Mapping[str, Any]) -> None:
    """Writes the adapter with every module replaced by its squeezed effective factors."""


def check_finite(x: np.ndarray, *, path: str | os.PathLike, tensor: str) -> None:
  """Raises AdapterError naming the file and tensor when x holds NaN or inf."""
  if not np.isfinite(x).all():
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    raise AdapterError(f"{path}: tensor {tensor!r} holds {bad} NaN/inf values; refusing to squeeze it")


def as_float32(x: np.ndarray, *, path: str | os.PathLike, tensor: str) -> np.ndarray:
  """x as float32 after checking it is a finite floating-point array."""
  if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
    raise AdapterError(f"{path}: tensor {tensor!r} has dtype {x.dtype}; LoRA factors must be floating point")
  x = np.asarray(x, np.float32)
  check_finite(x, path=path, tensor=tensor)
  return x


def check_copied_finite(x: np.ndarray, *, path: str | os.PathLike, tensor: str) -> None:
  """Raises AdapterError naming the file and tensor when a tensor copied through unchanged (PEFT
  modules_to_save, other keys) is floating point and holds NaN or inf."""
  if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
    values = np.asarray(x, np.float32)
    if not np.isfinite(values).all():
      bad = int(values.size - np.count_nonzero(np.isfinite(values)))
      raise AdapterError(
        f"{path}: tensor {tensor!r} (copied through unchanged) holds {bad} NaN/inf values; refusing to "
        "write an adapter with it"
      )
