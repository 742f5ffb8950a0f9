"""Bare factor files in the gemma layout: a `.safetensors` or `.npz` with, per LoRA module `<path>`,

    "<path>/a": (*in, r)     "<path>/b": (r, *out)      ΔW = reshape(a, (∏in, r)) @ reshape(b, (r, ∏out))

(no alpha/scale: the gemma convention). Keys that do not form such a pair are copied through.
`pair_factors` is shared with the Orbax adapter format, whose flattened tree uses the same keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_squeeze.adapters import safetensors_io
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.modules import Factors, ModuleInfo, as_float32, check_copied_finite

SUFFIXES = (".safetensors", ".npz")
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactorPair:
  """One module's keys and stored shapes in a flat "<path>/a", "<path>/b" mapping."""

  info: ModuleInfo
  key_a: str
  key_b: str
  shape_a: tuple[int, ...]
  shape_b: tuple[int, ...]

  def unflatten(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d_in, r), (r, d_out) -> the stored layout (*in, r), (r, *out)."""
    r = a.shape[1]
    return a.reshape(*self.shape_a[:-1], r), b.reshape(r, *self.shape_b[1:])


def pair_factors(shapes: Mapping[str, tuple[int, ...]], *, where: str | pathlib.Path) -> dict[str, FactorPair]:
  """Finds the "<path>/a" + "<path>/b" pairs among flat keys and checks their shapes."""
  pairs = {}
  for key, shape in shapes.items():
    if not key.endswith("/a"):
      continue
    name = key[:-2]
    key_b = name + "/b"
    if key_b not in shapes:
      raise AdapterError(f"{where}: tensor {key!r} has no matching {key_b!r}")
    shape_b = tuple(shapes[key_b])
    if len(shape) < 2 or len(shape_b) < 2 or shape[-1] != shape_b[0]:
      raise AdapterError(
        f"{where}: mismatched LoRA shapes: {key!r} is {tuple(shape)} (*in, r) but {key_b!r} is {shape_b} (r, *out)"
      )
    info = ModuleInfo(name=name, r_src=shape[-1], d_in=math.prod(shape[:-1]), d_out=math.prod(shape_b[1:]))
    pairs[name] = FactorPair(info=info, key_a=key, key_b=key_b, shape_a=tuple(shape), shape_b=shape_b)
  for key in shapes:
    if key.endswith("/b") and key[:-2] not in pairs:
      raise AdapterError(f"{where}: tensor {key!r} has no matching {key[:-2] + '/a'!r}")
  return pairs


def flat_factors(pair: FactorPair, a: np.ndarray, b: np.ndarray, *, where: str | pathlib.Path) -> Factors:
  """Stored (*in, r), (r, *out) -> float32 (d_in, r), (r, d_out), checked finite."""
  a = as_float32(a, path=where, tensor=pair.key_a)
  b = as_float32(b, path=where, tensor=pair.key_b)
  return a.reshape(pair.info.d_in, pair.info.r_src), b.reshape(pair.info.r_src, pair.info.d_out)


def provenance_metadata(provenance: Mapping[str, Any]) -> dict[str, str]:
  return {"lora_squeeze": json.dumps(dict(provenance), sort_keys=True)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetensorsFactors:
  """A bare .safetensors of gemma-layout factors (tensor index only; no data held)."""

  path: pathlib.Path
  header: safetensors_io.SafetensorsHeader
  pairs: Mapping[str, FactorPair]
  format: str = "safetensors"

  @property
  def modules(self) -> tuple[ModuleInfo, ...]:
    return tuple(p.info for p in self.pairs.values())

  def read(self, module: ModuleInfo) -> Factors:
    pair = self.pairs[module.name]
    a, b = safetensors_io.read_tensors(self.path, (pair.key_a, pair.key_b))
    return flat_factors(pair, a, b, where=self.path)

  def write(self, target: pathlib.Path, squeezed: Mapping[str, Factors], *, provenance: Mapping[str, Any]) -> None:
    replaced = {}
    for name, (a, b) in squeezed.items():
      pair = self.pairs[name]
      dtype = safetensors_io.numpy_dtype(self.header.tensors[pair.key_a].dtype, where=self.path, tensor=pair.key_a)
      a_out, b_out = pair.unflatten(a, b)
      replaced[pair.key_a], replaced[pair.key_b] = a_out.astype(dtype), b_out.astype(dtype)
    tensors = [(key, replaced.get(key, entry)) for key, entry in self.header.tensors.items()]
    metadata = {**self.header.metadata, **provenance_metadata(provenance)}
    safetensors_io.write_safetensors(target, tensors, metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NpzFactors:
  """A bare .npz of gemma-layout factors; members are read one at a time from the zip."""

  path: pathlib.Path
  members: Mapping[str, tuple[tuple[int, ...], np.dtype]]
  pairs: Mapping[str, FactorPair]
  format: str = "npz"

  @property
  def modules(self) -> tuple[ModuleInfo, ...]:
    return tuple(p.info for p in self.pairs.values())

  def read(self, module: ModuleInfo) -> Factors:
    pair = self.pairs[module.name]
    with zipfile.ZipFile(self.path) as zf:
      a, b = (_read_member(zf, self.path, key) for key in (pair.key_a, pair.key_b))
    return flat_factors(pair, a, b, where=self.path)

  def write(self, target: pathlib.Path, squeezed: Mapping[str, Factors], *, provenance: Mapping[str, Any]) -> None:
    replaced = {}
    for name, (a, b) in squeezed.items():
      pair = self.pairs[name]
      a_out, b_out = pair.unflatten(a, b)
      replaced[pair.key_a] = a_out.astype(self.members[pair.key_a][1])
      replaced[pair.key_b] = b_out.astype(self.members[pair.key_b][1])
    with zipfile.ZipFile(self.path) as src, zipfile.ZipFile(target, "w", allowZip64=True) as out:
      for key in self.members:
        with out.open(key + ".npy", "w", force_zip64=True) as dst:
          if key in replaced:
            np.lib.format.write_array(dst, replaced[key], allow_pickle=False)
          else:
            value = _read_member(src, self.path, key)
            check_copied_finite(value, path=self.path, tensor=key)
            np.lib.format.write_array(dst, value, allow_pickle=False)


def _read_member(zf: zipfile.ZipFile, path: pathlib.Path, key: str) -> np.ndarray:
  try:
    with zf.open(key + ".npy") as f:
      return np.lib.format.read_array(f, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise AdapterError(f"{path}: cannot read tensor {key!r}: {e}") from e


def _npz_index(path: pathlib.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """member key -> (shape, dtype), from each .npy header only."""
  index = {}
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        if not info.filename.endswith(".npy"):
          raise AdapterError(f"{path}: member {info.filename!r} is not a .npy array")
        key = info.filename[: -len(".npy")]
        with zf.open(info) as f:
          try:
            version = np.lib.format.read_magic(f)
            read_array_header = _NPY_HEADER_READERS[version]
            shape, _, dtype = read_array_header(f)
          except (KeyError, ValueError) as e:
            raise AdapterError(f"{path}: tensor {key!r} has a corrupt .npy header: {e}") from e
        index[key] = (tuple(shape), dtype)
  except (zipfile.BadZipFile, EOFError) as e:
    raise AdapterError(f"{path} is not a valid .npz file (truncated or corrupt): {e}") from e
  return index


def open_factors(path: str | pathlib.Path) -> SafetensorsFactors | NpzFactors:
  """Opens a bare factor file by its suffix (.safetensors or .npz) and pairs its factors."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    header = safetensors_io.read_header(path)
    pairs = pair_factors({k: e.shape for k, e in header.tensors.items()}, where=path)
    result = SafetensorsFactors(path=path, header=header, pairs=pairs)
  elif path.suffix == ".npz":
    members = _npz_index(path)
    pairs = pair_factors({k: shape for k, (shape, _) in members.items()}, where=path)
    result = NpzFactors(path=path, members=members, pairs=pairs)
  else:
    raise AdapterError(f"{path}: a bare factor file must end in one of {SUFFIXES}")
  if not pairs:
    raise AdapterError(f"{path}: no LoRA factors (keys '<path>/a' with a matching '<path>/b')")
  return result
