"""Parameter trees of a LoRA model: the one `Params` type, and the base and LoRA trees taken
apart, put together and folded.

A tree is the inner Flax dict (what `model.init(...)['params']` holds). A LoRA module lives at
`<layer>/<einsum>/_LoRAEinsum_<x>/lora` = {'a': (*in, r), 'b': (r, *out)}; ΔW = a @ b in the
layout of the weight it adapts, no alpha / rank scaling (gemma's convention, lora_squeeze.model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The one parameter-tree type of the package: a nested mapping of arrays.
Params = Mapping[str, Any]


def flatten(tree: Params) -> dict[tuple[str, ...], Any]:
  """{path tuple: leaf} (flax.traverse_util.flatten_dict), sorted by path."""
  # Sorted by path: the order jax flattens a dict tree in (lora_leaf_paths lists paths in it).
  return dict(sorted(traverse_util.flatten_dict(tree).items(), key=lambda item: item[0]))


def is_lora_path(path: Sequence[str]) -> bool:
  """Whether a flattened path is inside a LoRA module (gemma names each module's dict `lora`)."""
  return "lora" in path


def check_base_shapes(expected: Mapping[tuple[str, ...], Any] | Params, base_params: Params) -> None:
  """Raises ValueError naming the first missing, extra or mis-shaped base parameter."""
  if not isinstance(next(iter(expected), ()), tuple):
    expected = flatten(expected)
  got = flatten(base_params)
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  if missing:
    raise ValueError(f"base params lack {'/'.join(missing[0])} (and {len(missing) - 1} more)")
  if extra:
    raise ValueError(f"base params have unexpected {'/'.join(extra[0])} (and {len(extra) - 1} more)")
  for path, want in expected.items():
    if tuple(got[path].shape) != tuple(want.shape):
      raise ValueError(
        f"shape mismatch at {'/'.join(path)}: params have {tuple(got[path].shape)},"
        f" the model expects {tuple(want.shape)}"
      )


def merge_params(base_params: Params, lora_params: Params) -> Params:
  """One tree for `model.apply({'params': ...})`: the base with the LoRA modules added.

  Not gemma.peft.merge_params: that one keeps the base's leaf silently where both trees have
  one; here a LoRA param that is already in the base is an error.
  """
  flat = flatten(base_params)
  for path, leaf in flatten(lora_params).items():
    if path in flat:
      raise ValueError(f"LoRA param {'/'.join(path)} already exists in the base params")
    flat[path] = leaf
  return traverse_util.unflatten_dict(flat)


def split_params(params: Params) -> tuple[Params, Params]:
  """Inverse of merge_params: (base without LoRA, LoRA modules only).

  Not gemma.peft.split_params: that one leaves an empty module in the base for every LoRA
  wrapper (e.g. .../q_einsum/_LoRAEinsum_0 = {}), which is then no longer the plain base tree.
  """
  flat = flatten(params)
  base = {p: v for p, v in flat.items() if not is_lora_path(p)}
  lora = {p: v for p, v in flat.items() if is_lora_path(p)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(lora)


# Per LoRA wrapper: the base weight it adapts (relative to the wrapper's parent) and the einsum
# mapping a, b to that weight's layout. Gemma 3 layout (transpose_gating_einsum=True, GQA).
_DELTA_EINSUMS = {
  ("q_einsum", "_LoRAEinsum_0"): ("w", "Dr,rNH->NDH"),
  ("kv_einsum", "_LoRAEinsum_0"): ("w", "Dr,rCKH->CKDH"),
  ("attn_vec_einsum", "_LoRAEinsum_0"): ("w", "NHr,rD->NHD"),
  ("_LoRAEinsum_gating_einsum",): ("gating_einsum", "Fr,rNH->NHF"),
  ("_LoRAEinsum_linear",): ("linear", "Hr,rF->HF"),
}


def _delta_target(module_path: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
  """(base weight path, einsum) for a LoRA module path ending in .../lora."""
  parent = module_path[:-1]  # drop 'lora'
  for suffix, (weight, eqn) in _DELTA_EINSUMS.items():
    if parent[-len(suffix) :] == suffix:
      owner = parent[: -len(suffix)] + suffix[:-1] if len(suffix) == 2 else parent[:-1]
      return (*owner, weight), eqn
  raise ValueError(f"unrecognised LoRA module {'/'.join(module_path)}")


def fold_lora(base_params: Params, lora_params: Params) -> Params:
  """The base with every ΔW = a @ b added in (export / merged eval); dtype of the base kept.

  The sum is formed in float32 and cast back to each weight's dtype.
  """
  flat = flatten(base_params)
  modules: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in flatten(lora_params).items():
    modules.setdefault(path[:-1], {})[path[-1]] = leaf
  for module_path, ab in modules.items():
    weight_path, eqn = _delta_target(module_path)
    if weight_path not in flat:
      raise ValueError(f"LoRA module {'/'.join(module_path)} has no base weight {'/'.join(weight_path)}")
    w = flat[weight_path]
    delta = jnp.einsum(eqn, ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
    if delta.shape != w.shape:
      raise ValueError(f"ΔW of {'/'.join(module_path)} has shape {delta.shape}, base weight has {w.shape}")
    flat[weight_path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def lora_leaf_paths(params: Params) -> list[str]:
  """'/'-joined paths of every LoRA leaf in a tree (for inspection and tests)."""
  return ["/".join(p) for p in flatten(params) if is_lora_path(p)]


def count_params(params: Params) -> int:
  """Total number of scalars in a tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
