"""Reading safetensors one tensor at a time, and writing them as a stream.

The `safetensors` library reads lazily (`safe_open`), but its writers take every tensor at once.
A squeezed adapter is small, yet tensors copied through unchanged (PEFT `modules_to_save`, e.g. a
whole embedding) need not be, so `write_safetensors` writes the header first and then each tensor in
turn, copying pass-through tensors byte for byte from the source in chunks. The layout is the
documented one: an 8-byte little-endian header length, a JSON header (padded with spaces to a
multiple of 8), then the tensors' bytes, contiguous and in header order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.modules import check_copied_finite

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces
_COPY_CHUNK_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
  """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

  path: pathlib.Path
  name: str
  dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetensorsHeader:
  """The parsed header: tensors in file order, and the free-form string metadata."""

  path: pathlib.Path
  tensors: Mapping[str, TensorEntry]
  metadata: Mapping[str, str]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
  """Parses and checks the header of a safetensors file without reading any tensor.

  Raises AdapterError naming the file (and tensor) for a file that is not safetensors, a header
  that is not JSON, or data shorter than the header promises (a truncated file).
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise AdapterError(f"{path} is not a safetensors file: only {size} bytes")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(_MAX_HEADER_BYTES, size - 8):
      raise AdapterError(
        f"{path} is not a valid safetensors file (truncated or corrupt): its header claims "
        f"{header_len} bytes but the file has {size}"
      )
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise AdapterError(f"{path} is not a valid safetensors file: its header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise AdapterError(f"{path} is not a valid safetensors file: its header is not a JSON object")
  data_start = 8 + header_len
  metadata = header.pop("__metadata__", None) or {}
  tensors = {}
  for name, info in header.items():
    try:
      begin, end = (int(x) for x in info["data_offsets"])
      entry = TensorEntry(
        path=path,
        name=name,
        dtype=str(info["dtype"]),
        shape=tuple(int(d) for d in info["shape"]),
        begin=data_start + begin,
        end=data_start + end,
      )
    except (KeyError, TypeError, ValueError) as e:
      raise AdapterError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from e
    if entry.end > size:
      raise AdapterError(f"{path} is truncated: tensor {name!r} needs bytes up to {entry.end} but the file has {size}")
    tensors[name] = entry
  ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].begin))
  return SafetensorsHeader(path=path, tensors=ordered, metadata=dict(metadata))


def read_tensors(path: str | os.PathLike, names: Sequence[str]) -> tuple[np.ndarray, ...]:
  """Reads only the named tensors (memory: those tensors), as numpy arrays in their stored dtype."""
  try:
    with safe_open(os.fspath(path), framework="numpy") as f:
      return tuple(_get(f, path, name) for name in names)
  except SafetensorError as e:
    raise AdapterError(f"{path} is not a valid safetensors file: {e}") from e


def _get(handle, path, name: str) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except (SafetensorError, TypeError, ValueError) as e:
    raise AdapterError(f"{path}: cannot read tensor {name!r}: {e}") from e


def numpy_dtype(name: str, *, where: str | os.PathLike, tensor: str) -> np.dtype:
  """The numpy dtype of a safetensors dtype name ('F32' -> float32, 'BF16' -> bfloat16, ...)."""
  try:
    return _DTYPES[name]
  except KeyError:
    raise AdapterError(f"{where}: tensor {tensor!r} has dtype {name!r}; allowed: {sorted(_DTYPES)}") from None


def dtype_name(dtype: np.dtype) -> str:
  """The safetensors name of a numpy dtype ('F32', 'BF16', ...)."""
  try:
    return _DTYPE_NAMES[np.dtype(dtype)]
  except KeyError:
    raise AdapterError(f"dtype {dtype} cannot be stored; allowed: {sorted(map(str, _DTYPE_NAMES))}") from None


def write_safetensors(
  path: str | os.PathLike,
  tensors: Sequence[tuple[str, np.ndarray | TensorEntry]],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes tensors in the given order: arrays from memory, TensorEntry copied from its file.

  Peak memory is one array of `tensors` plus a 16 MiB copy buffer, whatever the file size.
  """
  header: dict[str, object] = {}
  offset = 0
  for name, tensor in tensors:
    if isinstance(tensor, TensorEntry):
      dtype, shape, nbytes = tensor.dtype, tensor.shape, tensor.nbytes
    else:
      dtype, shape, nbytes = dtype_name(tensor.dtype), tensor.shape, tensor.nbytes
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as out:
    out.write(struct.pack("<Q", len(blob)))
    out.write(blob)
    for _, tensor in tensors:
      if isinstance(tensor, TensorEntry):
        _copy_bytes(tensor, out)
      else:
        out.write(np.ascontiguousarray(tensor, dtype=tensor.dtype.newbyteorder("<")).tobytes())


def _copy_bytes(entry: TensorEntry, out) -> None:
  # Chunks are multiples of 8 bytes, so each holds whole elements and is checked for NaN/inf as
  # it passes (one read of the source, memory one chunk).
  dtype = _DTYPES.get(entry.dtype)
  with open(entry.path, "rb") as src:
    src.seek(entry.begin)
    left = entry.nbytes
    while left:
      chunk = src.read(min(left, _COPY_CHUNK_BYTES))
      if not chunk:
        raise AdapterError(f"{entry.path} is truncated inside tensor {entry.name!r}")
      if dtype is not None and len(chunk) % dtype.itemsize == 0:
        check_copied_finite(np.frombuffer(chunk, dtype.newbyteorder("<")), path=entry.path, tensor=entry.name)
      out.write(chunk)
      left -= len(chunk)
