"""LoRA modules inside gemma parameter pytrees, and squeezing all of them at once.

The gemma library (4.x) stores a LoRA module as the mapping ``.../<target>/_LoRAEinsum_<x>/lora``
= ``{'a': (*in_dims, r), 'b': (r, *out_dims)}``, e.g.

    layer_0/attn/q_einsum/_LoRAEinsum_0/lora          a (640, r)     b (r, 4, 256)
    layer_0/attn/attn_vec_einsum/_LoRAEinsum_0/lora   a (4, 256, r)  b (r, 640)
    layer_0/mlp/_LoRAEinsum_gating_einsum/lora        a (640, r)     b (r, 2, 2048)

and the update it adds is ΔW = reshape(a, (prod(in_dims), r)) @ reshape(b, (r, prod(out_dims))),
with no alpha or scale. ``squeeze_tree`` views every module as that matrix pair, stacks modules of
equal shape (the same target across layers) into one batch and restores the gemma shapes. With
qr_core the whole tree (every group, the reshapes and the stacking) is one compiled call: a call
per module or per group cost a fixed ~10 ms each, more than the arithmetic of a 4B adapter.
Everything stays on the devices of the inputs (sharded factors stay sharded, the Gram reductions
run where the shards are); only the (…, r_src) singular values and finiteness flags come back
to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import squeeze, squeeze_base, squeeze_qr_core
from lora_squeeze.lora_tree_types import EnergyRank, ModuleReport, RankRules, SqueezeReport

__all__ = ["EnergyRank", "ModuleReport", "RankRules", "SqueezeReport", "find_lora_modules", "squeeze_tree"]

_LORA_KEYS = frozenset({"a", "b"})


def find_lora_modules(tree: Any) -> dict[str, Mapping[str, Any]]:
  """All LoRA modules in a pytree of nested mappings: path ("a/b/.../lora") -> {'a': ..., 'b': ...}.

  A LoRA module is a mapping with exactly the keys 'a' and 'b'. Works on a tree of only LoRA
  modules or on a full parameter tree. Paths are returned in natural order (layer_2 < layer_10).
  """
  found: dict[str, Mapping[str, Any]] = {}

  def visit(node: Any, prefix: tuple[str, ...]) -> None:
    if not isinstance(node, Mapping):
      return
    if set(node.keys()) == _LORA_KEYS:
      found["/".join(prefix)] = node
      return
    for name, child in node.items():
      visit(child, (*prefix, str(name)))

  visit(tree, ())
  return {path: found[path] for path in sorted(found, key=_natural_key)}


def _natural_key(path: str) -> list[Any]:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Module:
  """A LoRA module viewed as matrices: a (*stack, d_in, r_src), b (*stack, r_src, d_out).

  raw_a, raw_b are the arrays in the gemma layout; ``a``/``b`` reshape them when asked (an eager
  dispatch each, so the single-call qr_core path reshapes inside its compiled function instead).
  """

  path: str
  raw_a: Any
  raw_b: Any
  stack: tuple[int, ...]
  in_dims: tuple[int, ...]
  out_dims: tuple[int, ...]

  @property
  def r_src(self) -> int:
    return int(np.shape(self.raw_a)[-1])

  @property
  def a(self) -> jax.Array:
    return jnp.reshape(self.raw_a, (*self.stack, math.prod(self.in_dims), self.r_src))

  @property
  def b(self) -> jax.Array:
    return jnp.reshape(self.raw_b, (*self.stack, self.r_src, math.prod(self.out_dims)))

  def signature(self) -> tuple[Any, ...]:
    """Matrix shapes and dtypes: modules with equal signatures can share one batched call."""
    m, n = math.prod(self.in_dims), math.prod(self.out_dims)
    return (
      (*self.stack, m, self.r_src),
      (*self.stack, self.r_src, n),
      str(jnp.dtype(self.raw_a.dtype)),
      str(jnp.dtype(self.raw_b.dtype)),
    )


def _as_matrices(path: str, module: Mapping[str, Any], stack_axes: int) -> _Module:
  a, b = module["a"], module["b"]
  if np.ndim(a) < stack_axes + 2 or np.ndim(b) < stack_axes + 2:
    raise ValueError(
      f"{path}: with stack_axes={stack_axes}, a must be (*stack, *in_dims, r) and b (*stack, r, *out_dims), "
      f"got shapes {np.shape(a)} and {np.shape(b)}"
    )
  if np.shape(a)[:stack_axes] != np.shape(b)[:stack_axes]:
    raise ValueError(f"{path}: stacked axes differ: a {np.shape(a)[:stack_axes]} vs b {np.shape(b)[:stack_axes]}")
  if np.shape(a)[-1] != np.shape(b)[stack_axes]:
    raise ValueError(
      f"{path}: inner ranks differ: a has r={np.shape(a)[-1]} (shape {np.shape(a)}) "
      f"but b has r={np.shape(b)[stack_axes]} (shape {np.shape(b)})"
    )
  stack = np.shape(a)[:stack_axes]
  in_dims, out_dims = tuple(np.shape(a)[stack_axes:-1]), tuple(np.shape(b)[stack_axes + 1 :])
  module = _Module(path=path, raw_a=a, raw_b=b, stack=tuple(stack), in_dims=in_dims, out_dims=out_dims)
  # Shapes and dtypes only: no array is touched (or moved) to validate.
  a_shape, b_shape, _, _ = module.signature()
  try:
    squeeze.validate_factors(jax.ShapeDtypeStruct(a_shape, _dtype(a)), jax.ShapeDtypeStruct(b_shape, _dtype(b)))
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from err
  return module


def _dtype(x: Any) -> Any:
  """x's dtype; ValueError (not a crash) for what jax cannot hold, e.g. strings."""
  dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  try:
    return jnp.dtype(dtype)
  except TypeError:
    return dtype


def _group_by_shape(modules: list[_Module], ranks: dict[str, int]) -> list[list[_Module]]:
  """Modules that can share one batched call: equal matrix shapes, dtypes and target rank."""
  groups: dict[tuple[Any, ...], list[_Module]] = {}
  for module in modules:
    groups.setdefault((*module.signature(), ranks[module.path]), []).append(module)
  return list(groups.values())


def _stack(group: list[_Module], field: str) -> jax.Array:
  arrays = [getattr(module, field) for module in group]
  return arrays[0][None] if len(arrays) == 1 else jnp.stack(arrays)


def _call_group(fn, group: list[_Module], *args, **kwargs):
  """Runs a batched squeeze function on a stacked group; names the module when its input is bad."""
  try:
    return fn(_stack(group, "a"), _stack(group, "b"), *args, **kwargs)
  except squeeze.NonFiniteError as err:
    member, *layer = err.batch_index
    where = f" (stacked index {tuple(layer)})" if layer else ""
    raise ValueError(f"{group[member].path}: {err.operand} contains non-finite values (NaN or Inf){where}") from err


def _target_ranks(modules: list[_Module], rank: Any, precision: str = "auto") -> dict[str, int]:
  if isinstance(rank, RankRules):
    return {m.path: rank.rank_for(m.path) for m in modules}
  if isinstance(rank, EnergyRank):
    return _energy_ranks(modules, rank, precision)
  if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)):
    raise ValueError(f"rank must be a positive int, a RankRules or an EnergyRank, got {rank!r}")
  squeeze.check_rank(rank)
  return {m.path: int(rank) for m in modules}


def _energy_ranks(modules: list[_Module], target: EnergyRank, precision: str = "auto") -> dict[str, int]:
  """The homogeneous rank of an EnergyRank: max over modules (and stacked layers) of rank_for_energy."""
  needed = 1
  for group in _group_by_shape(modules, {m.path: 0 for m in modules}):
    spectra = np.asarray(_call_group(squeeze.singular_values, group, precision=precision))
    for s in spectra.reshape(-1, spectra.shape[-1]):
      needed = max(needed, squeeze.rank_for_energy(s, target.tau))
  if target.max_rank is not None:
    needed = min(needed, target.max_rank)
  return {m.path: needed for m in modules}


def squeeze_tree(lora_params, rank, *, method="qr_core", key=None, stack_axes=0, precision="auto"):
  """Squeezes every LoRA module of a parameter pytree to a target rank.

  Each module a (*stack, *in_dims, r_src), b (*stack, r_src, *out_dims) becomes
  a_t (*stack, *in_dims, r_tgt), b_t (*stack, r_tgt, *out_dims) in the same dtypes, with
  a_t @ b_t the best rank-r_tgt approximation of ΔW = a @ b (see ``lora_squeeze.squeeze``).
  Non-LoRA leaves pass through unchanged; the input is never modified.

  Args:
    lora_params: nested mappings holding LoRA modules ({'a', 'b'} mappings), alone or inside
      a full parameter tree.
    rank: an int r_tgt for every module; a ``RankRules`` (per-module ranks by path regex); or an
      ``EnergyRank`` (one rank reaching an energy target in every module).
    method: one of ``squeeze.METHODS``; "rsvd" and "rsvd_factored" need ``key``.
    key: PRNG key for the randomized methods (split per batch of same-shaped modules).
    stack_axes: number of leading axes of a and b that stack layers (e.g. 1 for scanned layers);
      they are mapped over, never looped.
    precision: qr_core's arithmetic (``squeeze.PRECISIONS``): "auto" (float64 where the backend
      has it, float32 Householder QR on TPU), "float64" or "float32". Also used for the exact
      spectra of the randomized methods.

  Returns:
    (new_params, SqueezeReport). The report holds per module r_src, r_tgt, all singular values
    of ΔW (exact, from the Gram core even for the randomized methods) and V_r (Eq. 10).
  """
  if method not in squeeze.METHODS:
    raise ValueError(f"method must be one of {squeeze.METHODS}, got {method!r}")
  if isinstance(stack_axes, (bool, np.bool_)) or not isinstance(stack_axes, (int, np.integer)) or stack_axes < 0:
    raise ValueError(f"stack_axes must be a non-negative integer, got {stack_axes!r}")
  if method in ("rsvd", "rsvd_factored") and key is None:
    raise ValueError(f"method {method!r} is randomized and needs a PRNG key, got key=None")
  precision = squeeze.resolve_precision(precision)
  modules = [_as_matrices(path, module, stack_axes) for path, module in find_lora_modules(lora_params).items()]
  ranks = _target_ranks(modules, rank, precision)
  for path, r_tgt in ranks.items():
    squeeze.check_rank(r_tgt, name=f"{path}: target rank")
  groups = _group_by_shape(modules, ranks)
  keys = jax.random.split(key, len(groups)) if key is not None else [None] * len(groups)

  new_modules: dict[str, dict[str, jax.Array]] = {}
  reports: dict[str, ModuleReport] = {}
  kept_total, energy_total = 0.0, 0.0
  if method == "qr_core":
    squeezed, spectra = _qr_core_all(groups, ranks, precision)
  for g, (group, group_key) in enumerate(zip(groups, keys)):
    r_tgt = ranks[group[0].path]
    if method == "qr_core":
      s = spectra[g]
    else:
      a_t, b_t, s = _call_group(squeeze.squeeze_factors, group, r_tgt, method=method, key=group_key)
      if method in ("rsvd", "rsvd_factored"):
        s = _call_group(squeeze.singular_values, group, precision=precision)
      s = np.asarray(s)
    for i, module in enumerate(group):
      if method == "qr_core":
        new_modules[module.path] = squeezed[module.path]
      else:
        new_modules[module.path] = {
          "a": jnp.reshape(a_t[i], (*module.stack, *module.in_dims, r_tgt)),
          "b": jnp.reshape(b_t[i], (*module.stack, r_tgt, *module.out_dims)),
        }
      energy = np.square(s[i].astype(np.float64))
      kept, total = float(energy[..., :r_tgt].sum()), float(energy.sum())
      kept_total, energy_total = kept_total + kept, energy_total + total
      reports[module.path] = ModuleReport(
        path=module.path,
        r_src=module.r_src,
        r_tgt=r_tgt,
        singular_values=s[i],
        retention=kept / total if total > 0 else 1.0,
      )
  report = SqueezeReport(
    modules=tuple(reports[m.path] for m in modules),
    overall_retention=kept_total / energy_total if energy_total > 0 else 1.0,
    method=method,
  )
  return _replace_modules(lora_params, new_modules, ()), report


def _layout(groups: list[list[_Module]], ranks: dict[str, int]) -> tuple[Any, ...]:
  """The static description of a tree squeeze: per group (r_tgt, per module (stack, in_dims, out_dims))."""
  return tuple((ranks[group[0].path], tuple((m.stack, m.in_dims, m.out_dims) for m in group)) for group in groups)


@functools.partial(jax.jit, static_argnames=("layout", "precision"))
def _qr_core_all_jit(arrays, *, layout, precision):
  """Alg. 2 on every group of a tree in one compiled call.

  arrays: per group, per module, (a, b) in the gemma layout. Returns per group the squeezed
  modules (gemma layout), s_all (len(group), *stack, r_src) and the finiteness flags.
  """
  out = []
  for group_arrays, (r_tgt, shapes) in zip(arrays, layout):
    stack, _, _ = shapes[0]
    r_src = group_arrays[0][0].shape[-1]
    a = jnp.stack([x.reshape(*stack, -1, r_src) for x, _ in group_arrays])
    b = jnp.stack([y.reshape(*stack, r_src, -1) for _, y in group_arrays])
    a_t, b_t, s_all, finite = squeeze_qr_core.qr_core_batched(
      a, b, None, rank=r_tgt, core="svd", oversample=0, power_iters=0, precision=precision
    )
    modules = tuple(
      (a_t[i].reshape(*stack, *in_dims, r_tgt), b_t[i].reshape(*stack, r_tgt, *out_dims))
      for i, (_, in_dims, out_dims) in enumerate(shapes)
    )
    out.append((modules, s_all, finite))
  return tuple(out)


def _qr_core_all(groups: list[list[_Module]], ranks: dict[str, int], precision: str):
  """Runs _qr_core_all_jit; returns ({path: {'a', 'b'}}, [s_all of each group as numpy])."""
  arrays = tuple(tuple((m.raw_a, m.raw_b) for m in group) for group in groups)
  with jax.enable_x64(True):
    results = squeeze_base.run_single_threaded_lapack(
      lambda: _qr_core_all_jit(arrays, layout=_layout(groups, ranks), precision=precision)
    )
  squeezed, spectra = {}, []
  for group, (modules, s_all, finite) in zip(groups, results):
    try:
      squeeze_base.raise_if_nonfinite(finite)
    except squeeze.NonFiniteError as err:
      member, *layer = err.batch_index
      where = f" (stacked index {tuple(layer)})" if layer else ""
      raise ValueError(f"{group[member].path}: {err.operand} contains non-finite values (NaN or Inf){where}") from err
    for module, (a_t, b_t) in zip(group, modules):
      squeezed[module.path] = {"a": a_t, "b": b_t}
    spectra.append(np.asarray(jax.device_get(s_all)))  # (len(group), *stack, r_src): small
  return squeezed, spectra


def _replace_modules(node: Any, new_modules: dict[str, dict[str, jax.Array]], prefix: tuple[str, ...]) -> Any:
  """A copy of ``node`` with the LoRA modules at the given paths replaced (same mapping types)."""
  if not isinstance(node, Mapping):
    return node
  path = "/".join(prefix)
  if path in new_modules and set(node.keys()) == _LORA_KEYS:
    return type(node)(new_modules[path])
  return type(node)({name: _replace_modules(child, new_modules, (*prefix, str(name))) for name, child in node.items()})
