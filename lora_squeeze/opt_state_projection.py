"""Carrying optax optimizer state across a squeeze: the state of the LoRA params before a rank
change, mapped into the new basis (config key ``optimizer_state_at_squeeze = 'project'``).

The change of basis
-------------------
A squeeze replaces a module's factors a (m, r_s), b (r_s, n) (matrix views of gemma's
(*in_dims, r) and (r, *out_dims) leaves; leading stacked-layer axes are batch axes) by

    a_t = a · P    (m, r_t)        b_t = Q · b    (r_t, n)

with P (r_s, r_t) and Q (r_t, r_s). qr_core computes them implicitly (P = R_Bᵀ V_r S_r^{-½},
Q = S_r^{-½} U_rᵀ R_A, see lora_squeeze.squeeze); here they are recovered from the factors before
and after, P = (aᵀa)⁺ aᵀ a_t and Q = b_t bᵀ (b bᵀ)⁺: two r×r Gram matrices in float64 (float32
values and products are exact there; only the sums round) and an eigendecomposition-based
pseudo-inverse. Where a has full column rank this P is the unique one with a P = a_t (so it is
qr_core's own, whatever method squeezed), and likewise Q; a rank-deficient a (b = 0 right after
init) gets the minimum-norm P. P Q is the identity for a squeeze to the same rank of full-rank
factors and the projector onto the kept singular directions (in the a/b coordinates) otherwise.

How each kind of state moves
----------------------------
With G = ∂L/∂ΔW the gradients are g_a = G bᵀ and g_b = aᵀ G, so in the new factors

    g_a_t = G b_tᵀ = g_a Qᵀ        g_b_t = a_tᵀ G = Pᵀ g_b          (covectors)

while a displacement of the params (an update) keeps its ΔW meaning when it moves like the params,
δa_t = δa P, δb_t = Q δb (vectors). Hence:

* First moments that average gradients (Adam's ``mu``, SGD's ``trace``, an ``ema`` before any
  preconditioner): covector rule. EXACT: an EMA is linear in the gradients, so the projected moment
  is the EMA of the past gradients mapped by the map that maps the current one.
* Momentum of preconditioned updates (Adafactor's ``momentum``: an ``ema`` after the scaling):
  vector rule, exact in the same sense (it is a sum of past displacements).
* Second moments (Adam's ``nu``, Adafactor's ``v``): EMA of g² elementwise. In the new basis the
  EMA of (g Qᵀ)²_ij = Σ_kl g_ik g_il Q_jk Q_jl needs the cross moments E[g_ik g_il], which no
  diagonal optimizer keeps. APPROXIMATION (chosen): drop them, ν_t = ν (Q∘Q)ᵀ and ν_t = (P∘P)ᵀ ν
  for b, i.e. assume the rank components of the gradient are uncorrelated. It is exact when P and
  Q are signed permutations (a squeeze of factors already in balanced SVD form, e.g. right after an
  earlier squeeze, up to sign and order), keeps ν non-negative and the total Σ ν Q² scale, and is
  what the one other implementation (a kohya sd-scripts fork) does. The alternative
  (√ν |Q|ᵀ)², the Cauchy-Schwarz bound for fully correlated components, overestimates ν and shrinks
  the first steps; not chosen because after an SVD rotation the components are close to
  uncorrelated by construction (the gradient's main directions are spread over all of them).
* Adafactor's factored second moment (leaves with two dims ≥ ``min_dim_size_to_factor``): v_row
  (the mean of v over the largest axis d0) and v_col (the mean over the second largest d1) are
  rebuilt into the dense estimate Adafactor itself uses, v̂ = v_row/mean_{d1}(v_row) ⊗ v_col,
  projected as above and refactored by the means of the new shape (factored or not: a 128 → 64
  squeeze of a (640, r) leaf switches to a dense v). The rebuild–refactor round trip is the
  identity (mean_{d0} v̂ = v_row, mean_{d1} v̂ = v_col), and a statistic whose averaging axis is not
  the rank axis (v_row of a: (m, r) keeps r) commutes with the projection: it is projected as
  exactly as the dense v would be. The other one (averaged over r) inherits the rank-1 error of v̂.
* Adafactor's parameter scale (``multiply_by_parameter_scale``: updates × RMS of the param
  block) and update clipping keep no state: they use the new factors' RMS from the first step.
  Balanced factors have a different RMS than trained ones (e.g. after a 64 → 8 squeeze the kept
  energy is split √s_i to each side), so the relative step size changes at a squeeze with
  ``project`` as it does with ``reset``.
* Step counts: the second-moment decay schedule (Adafactor's β2_t = 1 − (t+1)^−0.8) and Adam's
  bias correction keep their count, since the moments are continued; the learning-rate schedule's
  count (``ScaleByScheduleState``) restarts at 0, so the next stage's own warmup
  (``warmup_after_projection``) runs.
* Anything else (an optax state type not listed here, e.g. inject_hyperparams, or a state whose
  structure differs from the next stage's optimizer): a fresh ``optimizer.init`` state with a
  warning, today's ``reset``.

The projection never forms ΔW; its cost is two r×r Grams per module plus one (m or n)×r×r product
per state leaf. It runs in float32 (HIGHEST precision matmuls) with the bases solved in float64.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_squeeze import lora_tree
from lora_squeeze import protocols
from lora_squeeze import validation

MODES = ("reset", "project")
_EPS64 = float(np.finfo(np.float64).eps)
_matmul = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)  # noqa: E731


class UnknownOptimizerStateWarning(UserWarning):
  """The optimizer state holds a type this module cannot project; a fresh state is used."""


class _Unknown(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Basis:
  """The change of basis of one module: a_t = a · p, b_t = q · b.

  p: (*stack, r_src, r_tgt), q: (*stack, r_tgt, r_src), float32.
  """

  p: jax.Array
  q: jax.Array


# --------------------------------------------------------------------------------------------
# The change of basis.


def _matrix_a(a: jax.Array, stack_axes: int) -> jax.Array:
  """(*stack, *in_dims, r) -> (*stack, m, r)."""
  shape = np.shape(a)
  return jnp.reshape(a, (*shape[:stack_axes], -1, shape[-1]))


def _matrix_b(b: jax.Array, stack_axes: int) -> jax.Array:
  """(*stack, r, *out_dims) -> (*stack, r, n)."""
  shape = np.shape(b)
  return jnp.reshape(b, (*shape[: stack_axes + 1], -1))


def _pinv_psd(gram: jax.Array) -> jax.Array:
  """Pseudo-inverse of PSD Gram matrices (float64): eigenvalues below the rounding level are zero."""
  w, v = jnp.linalg.eigh(gram)
  keep = w > gram.shape[-1] * _EPS64 * jnp.maximum(w[..., -1:], 0.0) * 16
  inv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
  return _matmul(v * inv[..., None, :], jnp.swapaxes(v, -1, -2))


@jax.jit
def _basis_jit(a, b, a_t, b_t):
  f64 = lambda x: x.astype(jnp.float32).astype(jnp.float64)  # noqa: E731
  a, b, a_t, b_t = f64(a), f64(b), f64(a_t), f64(b_t)
  gram_a = jnp.einsum("...mi,...mj->...ij", a, a, precision=jax.lax.Precision.HIGHEST)
  gram_b = jnp.einsum("...in,...jn->...ij", b, b, precision=jax.lax.Precision.HIGHEST)
  cross_a = jnp.einsum("...mi,...mj->...ij", a, a_t, precision=jax.lax.Precision.HIGHEST)  # aᵀ a_t
  cross_b = jnp.einsum("...in,...jn->...ij", b_t, b, precision=jax.lax.Precision.HIGHEST)  # b_t bᵀ
  p = _matmul(_pinv_psd(gram_a), cross_a)
  q = _matmul(cross_b, _pinv_psd(gram_b))
  return p.astype(jnp.float32), q.astype(jnp.float32)


def change_of_basis(a, b, a_t, b_t) -> Basis:
  """P, Q with a_t = a P and b_t = Q b for matrix views a (..., m, r_s), b (..., r_s, n),
  a_t (..., m, r_t), b_t (..., r_t, n): P = (aᵀa)⁺ aᵀ a_t, Q = b_t bᵀ (b bᵀ)⁺ in float64."""
  with jax.enable_x64(True):
    p, q = _basis_jit(a, b, a_t, b_t)
  return Basis(p=p, q=q)


def bases_between(before: Any, after: Any, *, stack_axes: int = 0) -> dict[str, Basis]:
  """The change of basis of every LoRA module, from the params before and after a squeeze.

  Args:
    before, after: LoRA param trees ({'.../lora': {'a', 'b'}}) of equal structure; every module
      of ``after`` must span a subspace of ``before`` (true of any squeeze).
    stack_axes: leading stacked-layer axes of every leaf (as in lora_tree.squeeze_tree).

  Returns:
    module path -> Basis.
  """
  old, new = lora_tree.find_lora_modules(before), lora_tree.find_lora_modules(after)
  if set(old) != set(new):
    raise ValueError(f"the param trees hold different LoRA modules: {sorted(set(old) ^ set(new))}")
  return {
    path: change_of_basis(
      _matrix_a(old[path]["a"], stack_axes),
      _matrix_b(old[path]["b"], stack_axes),
      _matrix_a(new[path]["a"], stack_axes),
      _matrix_b(new[path]["b"], stack_axes),
    )
    for path in old
  }


def squeeze_with_basis(lora_params, rank, *, method="qr_core", key=None, stack_axes=0):
  """lora_tree.squeeze_tree plus each module's change of basis: (new_params, report, bases)."""
  new_params, report = lora_tree.squeeze_tree(lora_params, rank, method=method, key=key, stack_axes=stack_axes)
  return new_params, report, bases_between(lora_params, new_params, stack_axes=stack_axes)


# --------------------------------------------------------------------------------------------
# Moving params-shaped state leaves.


def _map_leaf(x: jax.Array, side: str, basis: Basis, kind: str, stack_axes: int, new_shape) -> jax.Array:
  """A params-shaped leaf of module side 'a' or 'b' in the new basis (see the module docstring).

  kind: "covector" (g_a Qᵀ, Pᵀ g_b), "squared" (ν_a (Q∘Q)ᵀ, (P∘P)ᵀ ν_b) or "vector" (δa P, Q δb).
  """
  p, q = basis.p, basis.q
  if kind == "squared":
    p, q = jnp.square(p), jnp.square(q)
  x32 = x.astype(jnp.float32)
  if side == "a":
    right = {"covector": jnp.swapaxes(q, -1, -2), "squared": jnp.swapaxes(q, -1, -2), "vector": p}[kind]
    out = _matmul(_matrix_a(x32, stack_axes), right)
  else:
    left = {"covector": jnp.swapaxes(p, -1, -2), "squared": jnp.swapaxes(p, -1, -2), "vector": q}[kind]
    out = _matmul(left, _matrix_b(x32, stack_axes))
  return jnp.reshape(out, new_shape).astype(x.dtype)


def _leaf_paths(tree: Any) -> dict[str, tuple[str, str]]:
  """Leaf key path string -> (module path, side) for every 'a'/'b' leaf of a params-shaped tree."""
  out = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(tree):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    out[jax.tree_util.keystr(path)] = ("/".join(names[:-1]), names[-1])
  return out


def _map_params_tree(tree, template, bases, kind, stack_axes, before_shapes):
  """Maps every leaf of a params-shaped state tree; ``template`` gives the new shapes."""

  def one(path, x, t):
    module, side = _module_side(path)
    if module not in bases or side not in ("a", "b") or np.shape(x) != before_shapes[(module, side)]:
      raise _Unknown(f"leaf {jax.tree_util.keystr(path)} of shape {np.shape(x)} is not a LoRA factor's state")
    return _map_leaf(x, side, bases[module], kind, stack_axes, np.shape(t))

  return jax.tree_util.tree_map_with_path(one, tree, template)


def _module_side(path) -> tuple[str, str]:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return "/".join(names[:-1]), names[-1]


def _factored_axes(shape: tuple[int, ...]) -> tuple[int, int]:
  """(d1, d0): Adafactor's second largest and largest axes (optax's own tie-breaking: np.argsort)."""
  d1, d0 = np.argsort(shape)[-2:]
  return int(d1), int(d0)


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  return tuple(s for i, s in enumerate(shape) if i != axis)


def _dense_second_moment(v_row, v_col, v, shape) -> jax.Array:
  """The dense v̂ Adafactor divides by: v itself, or v_row/mean_{d1}(v_row) ⊗ v_col when factored."""
  if np.shape(v) == tuple(shape):
    return v.astype(jnp.float32)
  d1, d0 = _factored_axes(shape)
  if np.shape(v_row) != _without(shape, d0) or np.shape(v_col) != _without(shape, d1):
    raise _Unknown(f"factored second moment of shapes {np.shape(v_row)}, {np.shape(v_col)} for a param {shape}")
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  v_row, v_col = v_row.astype(jnp.float32), v_col.astype(jnp.float32)
  row_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
  # A state that saw no step yet is all zeros: its dense form is zero too (not 0/0).
  row = jnp.where(row_mean > 0, v_row / jnp.where(row_mean > 0, row_mean, 1.0), 0.0)
  return jnp.expand_dims(row, d0) * jnp.expand_dims(v_col, d1)


def _refactor(dense, t_row, t_col, t_v, shape):
  """(v_row, v_col, v) of the new shape laid out like the fresh template's leaves."""
  if np.shape(t_v) == tuple(shape):
    return t_row, t_col, dense.astype(t_v.dtype)
  d1, d0 = _factored_axes(shape)
  v_row, v_col = jnp.mean(dense, axis=d0), jnp.mean(dense, axis=d1)
  if np.shape(v_row) != np.shape(t_row) or np.shape(v_col) != np.shape(t_col):
    raise _Unknown(
      f"cannot lay out a factored second moment of a param {shape} like {np.shape(t_row)}, {np.shape(t_col)}"
    )
  return v_row.astype(t_row.dtype), v_col.astype(t_col.dtype), t_v


def _project_factored(old, tmpl, bases, stack_axes, before_shapes, after_shapes):
  rows, cols, vs = {}, {}, {}
  old_rows = jax.tree_util.tree_leaves_with_path(old.v_row)
  for (path, v_row), v_col, v, t_row, t_col, t_v in zip(
    old_rows,
    jax.tree.leaves(old.v_col),
    jax.tree.leaves(old.v),
    jax.tree.leaves(tmpl.v_row),
    jax.tree.leaves(tmpl.v_col),
    jax.tree.leaves(tmpl.v),
  ):
    module, side = _module_side(path)
    if module not in bases or (module, side) not in before_shapes:
      raise _Unknown(f"leaf {jax.tree_util.keystr(path)} is not a LoRA factor's state")
    dense = _dense_second_moment(v_row, v_col, v, before_shapes[(module, side)])
    shape = after_shapes[(module, side)]
    dense = _map_leaf(dense, side, bases[module], "squared", stack_axes, shape)
    key = jax.tree_util.keystr(path)
    rows[key], cols[key], vs[key] = _refactor(dense, t_row, t_col, t_v, shape)
  rebuild = lambda d, t: jax.tree_util.tree_map_with_path(lambda p, _: d[jax.tree_util.keystr(p)], t)  # noqa: E731
  return old._replace(v_row=rebuild(rows, tmpl.v_row), v_col=rebuild(cols, tmpl.v_col), v=rebuild(vs, tmpl.v))


def _same_structure(x, y) -> bool:
  return jax.tree.structure(x) == jax.tree.structure(y)


def _project_node(old, tmpl, ctx, preconditioned: bool):
  """One node of an optax state (chains are tuples of states); returns (new node, preconditioned)."""
  bases, stack_axes, before_shapes, after_shapes = ctx
  if type(old) is not type(tmpl):
    raise _Unknown(f"state type {type(old).__name__} differs from the new optimizer's {type(tmpl).__name__}")
  if isinstance(old, optax.EmptyState) or (isinstance(old, tuple) and not jax.tree.leaves(old)):
    return tmpl, preconditioned
  if type(old) is tuple or type(old) is list:  # a chain: its transformations in order
    out = []
    for o, t in zip(old, tmpl):
      node, preconditioned = _project_node(o, t, ctx, preconditioned)
      out.append(node)
    return type(old)(out), preconditioned
  if isinstance(old, optax.ScaleByScheduleState):
    return tmpl, preconditioned  # the learning-rate schedule restarts: the next stage's warmup
  mapped = lambda tree, t, kind: _map_params_tree(tree, t, bases, kind, stack_axes, before_shapes)  # noqa: E731
  if isinstance(old, optax.ScaleByAdamState):
    if not _same_structure(old.mu, tmpl.mu) or not _same_structure(old.nu, tmpl.nu):
      raise _Unknown("Adam moments do not mirror the params")
    return old._replace(mu=mapped(old.mu, tmpl.mu, "covector"), nu=mapped(old.nu, tmpl.nu, "squared")), True
  if type(old).__name__ == "FactoredState" and type(old).__module__.startswith("optax"):
    return _project_factored(old, tmpl, bases, stack_axes, before_shapes, after_shapes), True
  if isinstance(old, (optax.EmaState, optax.TraceState)):
    field = "ema" if isinstance(old, optax.EmaState) else "trace"
    kind = "vector" if preconditioned else "covector"
    return old._replace(**{field: mapped(getattr(old, field), getattr(tmpl, field), kind)}), preconditioned
  raise _Unknown(f"optax state {type(old).__module__}.{type(old).__name__}")


def project_opt_state(
  opt_state,
  optimizer: optax.GradientTransformation,
  before: Any,
  after: Any,
  *,
  stack_axes: int = 0,
  bases: Mapping[str, Basis] | None = None,
):
  """The optimizer state of ``before`` (LoRA params) moved to ``after`` = the squeezed params.

  Args:
    opt_state: ``optimizer``'s state for ``before`` (any chain of the optax states the module
      docstring lists: Adafactor with or without momentum, Adam, AdamW, SGD with momentum).
    optimizer: the optimizer of the next stage; its fresh ``init(after)`` gives the new shapes and
      the fallback for a state it cannot project.
    before, after: the LoRA params before and after the squeeze (same modules, ranks may differ).
    stack_axes: leading stacked-layer axes of every LoRA leaf.
    bases: precomputed change of basis (``bases_between(before, after)``); computed when None.

  Returns:
    The state for ``after`` (same structure as ``optimizer.init(after)``). An unknown state type
    gives ``optimizer.init(after)`` and an UnknownOptimizerStateWarning naming it.
  """
  template = optimizer.init(after)
  if bases is None:
    bases = bases_between(before, after, stack_axes=stack_axes)
  before_shapes = {
    (m, s): np.shape(x) for m, mod in lora_tree.find_lora_modules(before).items() for s, x in mod.items()
  }
  after_shapes = {(m, s): np.shape(x) for m, mod in lora_tree.find_lora_modules(after).items() for s, x in mod.items()}
  try:
    if not _same_structure(opt_state, template):
      raise _Unknown("its tree structure differs from the next optimizer's fresh state")
    new_state, _ = _project_node(opt_state, template, (bases, stack_axes, before_shapes, after_shapes), False)
  except _Unknown as err:
    warnings.warn(
      f"optimizer_state_at_squeeze='project' cannot project this optimizer state ({err}); "
      "the next stage starts a fresh optimizer state as with 'reset'",
      UnknownOptimizerStateWarning,
      stacklevel=2,
    )
    return template
  return new_state


# --------------------------------------------------------------------------------------------
# Plans: where a projected state is carried, and the warmup after a projected squeeze.


def check_mode(mode: Any) -> str:
  """``mode`` if it is one of MODES; UserInputError naming it otherwise."""
  return validation.one_of("optimizer_state_at_squeeze", mode, MODES)


def carried_at(plan: Sequence[protocols.PlanItem], index: int) -> bool:
  """With 'project', whether a carried optimizer state exists just before plan[index] runs.

  The state of a Stage is carried when a (trunk) Squeeze follows it and another Stage follows
  that, from the end of the first Stage up to and including the start of the next one. Elsewhere
  (Direct's +M stage, Post-Squeeze's branches, a squeeze with no training after it) nothing is
  carried: 'project' changes only what happens to the optimizer across a squeeze.
  """
  last = next((i for i in range(min(index, len(plan)) - 1, -1, -1) if isinstance(plan[i], protocols.Stage)), None)
  if last is None:
    return False
  following = plan[last + 1 :]
  stop = next((i for i, p in enumerate(following) if isinstance(p, protocols.Stage)), None)
  if stop is None or index > last + 1 + stop:
    return False
  between = following[:stop]
  return any(isinstance(p, protocols.Squeeze) for p in between) and not any(
    isinstance(p, protocols.Restart) for p in between
  )


def with_projected_warmup(plan: Sequence[protocols.PlanItem], warmup: int) -> protocols.Plan:
  """The plan with every Stage that starts from a projected state warming up over ``warmup`` steps."""
  validation.integer("warmup_after_projection", warmup, minimum=0)
  return protocols.validate_plan(
    [
      dataclasses.replace(p, warmup=warmup) if isinstance(p, protocols.Stage) and carried_at(plan, i) else p
      for i, p in enumerate(plan)
    ]
  )
