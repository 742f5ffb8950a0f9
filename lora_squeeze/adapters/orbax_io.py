"""The project's own exported-adapter format: an Orbax checkpoint of the LoRA tree + JSON metadata.

    <path>/
      lora_squeeze_adapter.json   {"format": "lora-squeeze-adapter", "version": 1,
                                   "ranks": {"<module path>": r, ...}, "metadata": {...}}
      params/                     Orbax PyTree checkpoint of the LoRA tree (nested dicts of arrays)

A LoRA module is a dict with leaves `a: (*in, r)` and `b: (r, *out)` (gemma layout, ΔW = a @ b with
in/out axes flattened, no scale); its module path is the "/"-joined dict keys above it, e.g.
`layer_0/attn/q_einsum/_LoRAEinsum_0/lora`. `metadata` is the caller's JSON (model name, targets, ...).
The checkpoint restores with plain Orbax too; the squeeze reads it one module at a time (partial
restore), so memory stays at one module's factors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from lora_squeeze.adapters import atomic
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.factors_io import FactorPair, flat_factors, pair_factors
from lora_squeeze.adapters.modules import Factors, ModuleInfo, check_copied_finite
from lora_squeeze.orbax_paths import orbax_path

FORMAT = "lora-squeeze-adapter"
VERSION = 1
INDEX_FILE = "lora_squeeze_adapter.json"
PARAMS_DIR = "params"


def is_orbax_adapter(path: pathlib.Path) -> bool:
  return path.is_dir() and (path / INDEX_FILE).is_file()


def save_adapter(path: str | os.PathLike, lora_params: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
  """Saves a LoRA tree and JSON metadata as an adapter folder at `path` (which must not exist).

  `metadata["ranks"]` is always (re)computed from the tree. Atomic: the folder appears complete or
  not at all.

  Args:
    path: the adapter folder to create; its parent folder must exist.
    lora_params: nested dicts (string keys) whose LoRA modules hold `a: (*in, r)`, `b: (r, *out)`;
      other leaves are stored too.
    metadata: JSON-serialisable dict, e.g. {"model": "gemma3_270m", "targets": [...]}.
  """
  tree = _to_numpy_tree(lora_params, where=path)
  index = _index_json(tree, metadata, where=path)
  with atomic.atomic_output(path, force=False) as target:
    _write(target, tree, index)


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(lora_params as nested dicts of numpy arrays, metadata including "ranks") of an adapter folder."""
  adapter = open_orbax(path)
  flat = adapter.restore(list(adapter.shapes))
  return _unflatten(flat), adapter.metadata_with_ranks()


def _index_json(tree: Mapping[str, Any], metadata: Mapping[str, Any], *, where: Any) -> str:
  """The index file's text: format, version, rank per module (from the tree), caller's metadata."""
  flat = _flatten(tree)
  pairs = pair_factors({k: v.shape for k, v in flat.items()}, where=where)
  if not pairs:
    raise AdapterError(f"{where}: the LoRA tree has no LoRA modules (dicts with leaves 'a' (*in, r) and 'b' (r, *out))")
  user = {k: v for k, v in metadata.items() if k != "ranks"}
  index = {"format": FORMAT, "version": VERSION, "ranks": {n: p.info.r_src for n, p in pairs.items()}, "metadata": user}
  try:
    return json.dumps(index, indent=2, sort_keys=True) + "\n"
  except TypeError as e:
    raise AdapterError(f"{where}: adapter metadata must be JSON-serialisable: {e}") from e


def _local_checkpointer() -> ocp.Checkpointer:
  """A PyTree checkpointer that involves this process alone: an adapter is one host's file (in a
  multi-process run, process 0 writes it), so no barrier may wait for the other processes."""
  import jax

  local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=local), multiprocessing_options=local)


def _write(target: pathlib.Path, tree: Mapping[str, Any], index_json: str) -> None:
  target.mkdir()
  with _local_checkpointer() as checkpointer:
    checkpointer.save(orbax_path(target / PARAMS_DIR), dict(tree))
  (target / INDEX_FILE).write_text(index_json)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrbaxAdapter:
  """An opened adapter folder of our format (index and shapes only; no tensor data held)."""

  path: pathlib.Path
  index: Mapping[str, Any]
  shapes: Mapping[str, tuple[int, ...]]
  pairs: Mapping[str, FactorPair]
  format: str = "orbax"

  @property
  def modules(self) -> tuple[ModuleInfo, ...]:
    return tuple(p.info for p in self.pairs.values())

  def metadata_with_ranks(self) -> dict[str, Any]:
    return {**self.index.get("metadata", {}), "ranks": dict(self.index["ranks"])}

  def restore(self, keys: list[str]) -> dict[str, np.ndarray]:
    """Restores only the leaves named by flat keys ("<module path>/a", ...), as numpy arrays."""
    item = _unflatten({k: 0 for k in keys})
    restore_args = _unflatten({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in keys})
    try:
      with _local_checkpointer() as checkpointer:
        restored = checkpointer.restore(
          orbax_path(self.path / PARAMS_DIR),
          args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    except Exception as e:  # Orbax/tensorstore raise many types for a damaged checkpoint.
      raise AdapterError(f"{self.path / PARAMS_DIR}: cannot restore {keys[:2]}...: {e}") from e
    return _flatten(restored)

  def read(self, module: ModuleInfo) -> Factors:
    pair = self.pairs[module.name]
    flat = self.restore([pair.key_a, pair.key_b])
    return flat_factors(pair, flat[pair.key_a], flat[pair.key_b], where=self.path / PARAMS_DIR)

  def write(self, target: pathlib.Path, squeezed: Mapping[str, Factors], *, provenance: Mapping[str, Any]) -> None:
    stored_dtypes = self.restore_dtypes()
    flat_out: dict[str, np.ndarray] = {}
    for name, (a, b) in squeezed.items():
      pair = self.pairs[name]
      a_out, b_out = pair.unflatten(a, b)
      flat_out[pair.key_a] = a_out.astype(stored_dtypes[pair.key_a])
      flat_out[pair.key_b] = b_out.astype(stored_dtypes[pair.key_b])
    others = [k for k in self.shapes if k not in flat_out]
    if others:
      for key, value in self.restore(others).items():
        check_copied_finite(value, path=self.path / PARAMS_DIR, tensor=key)
        flat_out[key] = value
    metadata = {**self.index.get("metadata", {}), "lora_squeeze": dict(provenance)}
    tree = _unflatten(flat_out)
    _write(target, tree, _index_json(tree, metadata, where=self.path))

  def restore_dtypes(self) -> dict[str, np.dtype]:
    tree = _read_tree_metadata(self.path / PARAMS_DIR)
    return {k: np.dtype(v.dtype) for k, v in _flatten(tree).items()}


def open_orbax(path: str | os.PathLike) -> OrbaxAdapter:
  """Opens and checks an adapter folder of our format: index JSON, checkpoint tree, factor shapes."""
  path = pathlib.Path(path)
  index_path = path / INDEX_FILE
  try:
    index = json.loads(index_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise AdapterError(f"{index_path}: cannot read the adapter index: {e}") from e
  if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
    raise AdapterError(
      f"{index_path}: not a {FORMAT} version {VERSION} index "
      f"(format={index.get('format') if isinstance(index, dict) else None!r})"
    )
  tree = _read_tree_metadata(path / PARAMS_DIR)
  shapes = {k: tuple(v.shape) for k, v in _flatten(tree).items()}
  pairs = pair_factors(shapes, where=path / PARAMS_DIR)
  if not pairs:
    raise AdapterError(f"{path / PARAMS_DIR}: no LoRA modules (leaves '<path>/a' with a matching '<path>/b')")
  return OrbaxAdapter(path=path, index=index, shapes=shapes, pairs=pairs)


def _read_tree_metadata(params: pathlib.Path) -> Mapping[str, Any]:
  if not params.is_dir():
    raise AdapterError(f"{params}: the Orbax checkpoint folder is missing")
  try:
    with _local_checkpointer() as checkpointer:
      return checkpointer.metadata(orbax_path(params)).item_metadata.tree
  except Exception as e:  # Orbax raises many types for a damaged checkpoint.
    raise AdapterError(f"{params}: not a readable Orbax checkpoint: {e}") from e


def _to_numpy_tree(tree: Mapping[str, Any], *, where: Any) -> dict[str, Any]:
  if not isinstance(tree, Mapping):
    raise AdapterError(f"{where}: lora_params must be nested dicts with string keys, got {type(tree).__name__}")
  out = {}
  for key, value in tree.items():
    if not isinstance(key, str) or "/" in key:
      raise AdapterError(f"{where}: tree key {key!r} must be a string without '/'")
    out[key] = _to_numpy_tree(value, where=where) if isinstance(value, Mapping) else np.asarray(value)
  return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree
