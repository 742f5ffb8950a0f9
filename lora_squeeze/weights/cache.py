"""A verified on-disk cache of param trees: an Orbax checkpoint plus a manifest written last.

Layout of one entry `<root>/<name>/`:

    params/         Orbax (StandardCheckpointer) checkpoint of the nested param dict
    manifest.json   {"format": 1, "arrays": {"layer_0/attn/q_einsum/w": {"shape", "dtype", "sha256"}}}

The entry is assembled under a temporary name and renamed into place only after the manifest is
written, so a crash leaves no entry at all. On load, every array's shape, dtype and sha256 are
checked against the manifest: a partial, truncated or edited cache raises CacheError instead of
being used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_squeeze.orbax_paths import orbax_path

CACHE_ENV = "LORA_SQUEEZE_CACHE"
_FORMAT = 1


class CacheError(ValueError):
  """A cache entry is missing, partial or corrupt."""


def cache_root(cache_dir: os.PathLike | str | None = None) -> pathlib.Path:
  """`cache_dir`, else $LORA_SQUEEZE_CACHE, else ~/.cache/lora_squeeze (created)."""
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "lora_squeeze"
  root = pathlib.Path(cache_dir).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  return root


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to a temporary sibling, then renames it over `path`."""
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _flat(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(p.key for p in path)] = np.asarray(leaf)
  return out


def _digest(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def manifest_of(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Per-array shape, dtype and sha256 of a nested param dict."""
  arrays = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": _digest(v)} for k, v in _flat(tree).items()}
  return {"format": _FORMAT, "arrays": arrays}


def save_entry(entry: os.PathLike | str, tree: Mapping[str, Any]) -> pathlib.Path:
  """Stores `tree` as a verified entry at `entry` (replacing a previous entry there)."""
  entry = pathlib.Path(entry)
  tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  tree = jax.tree.map(np.asarray, tree)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(orbax_path(tmp / "params"), tree)
    ckpt.wait_until_finished()
  write_bytes_atomic(tmp / "manifest.json", json.dumps(manifest_of(tree)).encode())
  if entry.exists():
    stale = entry.with_name(f"{entry.name}.stale{os.getpid()}")
    os.replace(entry, stale)
    shutil.rmtree(stale)
  os.replace(tmp, entry)
  return entry


@contextlib.contextmanager
def _exclusive(entry: pathlib.Path):
  """An inter-process lock beside `entry` (parallel test workers build the cache once, not N times)."""
  with open(entry.with_name(entry.name + ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def load_entry(entry: os.PathLike | str) -> dict[str, Any]:
  """The nested numpy param dict stored at `entry`, verified against its manifest.

  Raises:
    CacheError: no manifest (partial entry), unreadable checkpoint, or any array whose
      name, shape, dtype or sha256 differs from the manifest.
  """
  entry = pathlib.Path(entry)
  manifest_path = entry / "manifest.json"
  if not manifest_path.is_file():
    raise CacheError(f"cache entry {str(entry)!r} is incomplete: no manifest.json")
  try:
    manifest = json.loads(manifest_path.read_text())
    expected = manifest["arrays"]
    if manifest.get("format") != _FORMAT:
      raise CacheError(f"cache entry {str(entry)!r} has format {manifest.get('format')}, expected {_FORMAT}")
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CacheError(f"cache entry {str(entry)!r} has an unreadable manifest: {e}") from e
  try:
    with ocp.StandardCheckpointer() as ckpt:
      tree = ckpt.restore(orbax_path(entry / "params"))
  except Exception as e:  # Orbax raises many types for a damaged checkpoint.
    raise CacheError(f"cache entry {str(entry)!r} has an unreadable checkpoint: {e}") from e
  tree = jax.tree.map(np.asarray, tree)
  got = _flat(tree)
  if set(got) != set(expected):
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    raise CacheError(
      f"cache entry {str(entry)!r} arrays differ from its manifest: missing {missing[:3]}, extra {extra[:3]}"
    )
  for name, want in expected.items():
    array = got[name]
    if list(array.shape) != want["shape"] or str(array.dtype) != want["dtype"]:
      raise CacheError(
        f"cache entry {str(entry)!r}: {name} is {array.dtype}{list(array.shape)},"
        f" manifest says {want['dtype']}{want['shape']}"
      )
    if _digest(array) != want["sha256"]:
      raise CacheError(f"cache entry {str(entry)!r}: {name} fails its sha256 check")
  return tree


def load_or_build(entry: os.PathLike | str, build: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
  """The verified tree at `entry`; if absent or failing verification, `build()` it and store it.

  A corrupt entry is never used: it is logged and replaced by a fresh build. Building holds an
  inter-process lock, and whoever waited on it first re-checks the entry another process may
  have just written.
  """
  entry = pathlib.Path(entry)
  entry.parent.mkdir(parents=True, exist_ok=True)
  if entry.exists():
    try:
      return load_entry(entry)
    except CacheError as e:
      logging.warning("cache entry failed verification: %s", e)
  with _exclusive(entry):
    if entry.exists():
      try:
        return load_entry(entry)
      except CacheError as e:
        logging.warning("rebuilding cache entry: %s", e)
    tree = jax.tree.map(np.asarray, build())
    save_entry(entry, tree)
    return tree
