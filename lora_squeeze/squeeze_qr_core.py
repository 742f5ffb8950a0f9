"""Alg. 2 (``qr_core``): the SVD of ΔW = a @ b through its r_src×r_src core, batched.

The derivation and the accuracy choices are in ``lora_squeeze.squeeze``'s docstring; the public
function is ``squeeze.qr_core``. This module works on batch axes natively (batched products and
decompositions) in one of two arithmetics: "float64" (Gram matrices, Cholesky and the large
products in float64; CPU and GPU) or "float32" (Householder QR and HIGHEST-precision float32
products; no float64 anywhere, for TPU). ``lora_tree`` calls ``qr_core_batched`` inside its
one-call squeeze of a whole tree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_squeeze.squeeze_base import EPS32, EPS64, F32, F64, matmul
from lora_squeeze.squeeze_rsvd import map_batch, randomized_svd


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _gram(x: jax.Array, side: str) -> jax.Array:
  """(..., r, r) Gram matrix of a float64 factor: xᵀx for a (..., m, r) ("a"), x xᵀ for b (..., r, n) ("b")."""
  spec = "...mi,...mj->...ij" if side == "a" else "...in,...jn->...ij"
  return jnp.einsum(spec, x, x, precision=jax.lax.Precision.HIGHEST)


def _eigh_root(gram: jax.Array) -> jax.Array:
  """R = Λ^½ Vᵀ with RᵀR = G = V Λ Vᵀ; eigenvalues below G's float64 rounding level become zero."""
  w, v = jnp.linalg.eigh(gram)
  w = jnp.where(w > gram.shape[-1] * EPS64 * w[..., -1:], w, 0.0)
  return jnp.sqrt(w)[..., :, None] * _mT(v)


def _gram_root(gram: jax.Array) -> jax.Array:
  """R (..., r, r) with RᵀR = G for PSD Gram matrices G (float64).

  Cholesky (G = L Lᵀ, R = Lᵀ) when every G of the batch is positive definite in float64, which
  holds for cond(factor) up to ~6e7; otherwise (b = 0 right after init, r_src > m) the eigen-
  decomposition, which handles singular G. One branch for the whole batch: the fast path
  stays fast and the fallback stays exact.
  """
  chol = jnp.linalg.cholesky(gram)
  return jax.lax.cond(jnp.all(jnp.isfinite(chol)), lambda c, g: _mT(c), lambda c, g: _eigh_root(g), chol, gram)


def _pad_rank_batched(a_t, s, b_t, rank):
  """Zero-pads (..., m, k), (..., k), (..., k, n) to rank ≥ k."""
  extra = rank - s.shape[-1]
  if extra <= 0:
    return a_t, s, b_t
  nd = s.ndim - 1
  return (
    jnp.pad(a_t, ((0, 0),) * (nd + 1) + ((0, extra),)),
    jnp.pad(s, ((0, 0),) * nd + ((0, extra),)),
    jnp.pad(b_t, ((0, 0),) * nd + ((0, extra), (0, 0))),
  )


def _per_matrix(fn: Callable[..., Any], *xs: jax.Array) -> Any:
  """fn over the matrices of xs (*batch, p, q), one at a time (lax.map over the flattened batch axes).

  The float64 temporaries then exist for one matrix at a time: they stay in cache instead of being
  allocated for a whole stack of layers, which would cost more than the float64 arithmetic.
  """
  batch = xs[0].shape[:-2]
  flat = [x.reshape(-1, *x.shape[-2:]) for x in xs]
  out = jax.lax.map(lambda args: fn(*args), flat)
  return jax.tree.map(lambda y: y.reshape(*batch, *y.shape[1:]), out)


def _as_f64(x: jax.Array) -> jax.Array:
  return x.astype(F32).astype(F64)  # bf16/f16 -> f32 first: that is the precision they carry


def qr_root_f32(x: jax.Array, side: str) -> jax.Array:
  """R (..., r, r) float32 with RᵀR = xᵀx (a: (..., m, r)) or x xᵀ (b: (..., r, n)): Householder QR.

  Backward stable in float32 (R is the exact factor of x + δx with ‖δx‖ ~ ε₃₂‖x‖), so unlike a
  float32 Gram matrix it does not square the condition number. Zero rows pad R to r×r when the
  factor has fewer rows than r (r_src > m). R's diagonal is made non-negative
  (``positive_diagonal``), so R does not depend on the order of x's rows (``sharded_squeeze``'s
  TSQR of a factor split over devices gives the same R).
  """
  x = x.astype(F32)
  tall = x if side == "a" else _mT(x)  # (..., d, r)
  root = jnp.linalg.qr(tall, mode="r")  # (..., min(d, r), r)
  missing = tall.shape[-1] - root.shape[-2]
  if missing:
    root = jnp.pad(root, ((0, 0),) * (root.ndim - 2) + ((0, missing), (0, 0)))
  return positive_diagonal(root)


def positive_diagonal(root: jax.Array) -> jax.Array:
  """R (..., r, r) with each row's sign flipped so that its diagonal is ≥ 0 (RᵀR is unchanged).

  A Householder R is unique up to these signs; with them fixed it is the Cholesky factor of RᵀR
  (where that is positive definite): the same for any order or blocking of the rows. Without
  them, M = R_A R_Bᵀ would change by diagonal ±1 factors and the SVD could flip the signs of
  a_t's columns and b_t's rows (the same ΔW, other factors).
  """
  negative = jnp.diagonal(root, axis1=-2, axis2=-1) < 0
  return jnp.where(negative[..., :, None], -root, root)  # no constant: no float64 under enable_x64


def canonical_signs(left: jax.Array, right: jax.Array) -> tuple[jax.Array, jax.Array]:
  """left (..., r_src, k) and right (..., k, r_src) with the sign of each pair (left[:, i],
  right[i]) chosen so that left[:, i]'s entry of largest magnitude is positive (sklearn's
  svd_flip, in the source basis). a_t b_t is unchanged.

  The SVD fixes a singular pair (u_i, v_i) only up to a common sign, and which one LAPACK returns
  can hinge on rounding-level values: for a core M that is nearly diagonal (an adapter that a
  squeeze has just balanced, squeezed again) it flipped between the sharded float32 path (TSQR)
  and the unsharded one. left maps a's columns to a_t's, and a is the caller's, so this sign is
  the same on every path that computes left to rounding, whatever basis R_A, R_B and U, V were in.
  """
  # No argmax: jnp.argmax is a cached jit whose index dtype follows enable_x64, which qr_core
  # toggles. Entries tied in magnitude add up (opposite signs: no flip), alike on every path.
  magnitude = jnp.abs(left)
  largest = magnitude == jnp.max(magnitude, axis=-2, keepdims=True)
  flip = jnp.sum(jnp.where(largest, left, jnp.zeros((), left.dtype)), axis=-2) < 0  # (..., k)
  return jnp.where(flip[..., None, :], -left, left), jnp.where(flip[..., :, None], -right, right)


def _finite_matrices(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def qr_core_batched(a, b, key, *, rank, core, oversample, power_iters, precision="float64", root_f32=qr_root_f32):
  """Alg. 2 on a (..., m, r_src), b (..., r_src, n); see the module docstring for the derivation.

  precision "float64": Gram matrices, Cholesky and the large products in float64.
  precision "float32": R from a float32 Householder QR, every product in float32 with HIGHEST
  precision: no float64 anywhere (TPU). `root_f32(x, side)` computes its R factors (qr_root_f32's
  contract; ``sharded_squeeze`` passes a TSQR over the devices that hold x's row blocks).
  """
  r_src, a_dtype, b_dtype = a.shape[-1], a.dtype, b.dtype
  if precision == "float32":
    dtype, eps = F32, EPS32
    root_a, root_b = root_f32(a, "a"), root_f32(b, "b")
    # ‖a‖_F² = ‖R_A‖_F²: the scale of M's rounding errors.
    norm2_a = jnp.sum(jnp.square(root_a), axis=(-2, -1))
    norm2_b = jnp.sum(jnp.square(root_b), axis=(-2, -1))
    finite = {"a": _finite_matrices(a), "b": _finite_matrices(b)}
    cast = lambda x: x.astype(F32)  # noqa: E731
    mm = matmul
    # M's singular values carry absolute errors ~ε₃₂‖a‖‖b‖: below ε₃₂·‖a‖_F‖b‖_F a direction is
    # rounding noise. (A larger cut, like the float64 path's 16·r_src·ε, would drop real
    # directions of ill-conditioned pairs: measured 3e-5·σ₁ of extra error at cond 1e6.)
    threshold_scale = eps
  else:
    dtype, eps = F64, EPS64
    # Float32 values and their products are exact in float64: only the Gram summation rounds.
    gram_a = _per_matrix(lambda x: _gram(_as_f64(x), "a"), a)  # aᵀa: (..., r_src, r_src)
    gram_b = _per_matrix(lambda x: _gram(_as_f64(x), "b"), b)  # b bᵀ
    root_a, root_b = _gram_root(gram_a), _gram_root(gram_b)
    norm2_a = jnp.trace(gram_a, axis1=-2, axis2=-1)
    norm2_b = jnp.trace(gram_b, axis1=-2, axis2=-1)
    finite = {"a": jnp.isfinite(norm2_a), "b": jnp.isfinite(norm2_b)}
    cast = _as_f64
    mm = jnp.matmul
    threshold_scale = 16 * r_src * eps
  core_m = mm(root_a, _mT(root_b))  # M = R_A R_Bᵀ
  k = min(rank, r_src)
  if core == "svd":
    u, s_all, vt = jnp.linalg.svd(core_m)
    u_k, s_k, vt_k = u[..., :k], s_all[..., :k], vt[..., :k, :]
  else:
    s_all = jnp.linalg.svd(core_m, compute_uv=False)
    one = lambda m_, key_: randomized_svd(  # noqa: E731
      lambda x: mm(m_, x), lambda y: mm(m_.T, y), r_src, k, key_, oversample, power_iters, dtype
    )
    u_k, s_k, vt_k = map_batch(lambda m_, _, key_: one(m_, key_), core_m.ndim - 2, keyed=True)(core_m, None, key)
  # M's singular values are accurate to its rounding level; below it they are zero, and
  # dividing by their roots would turn rounding noise into large factors.
  frobenius = jnp.sqrt(norm2_a * norm2_b)
  keep = s_k > (threshold_scale * frobenius)[..., None]
  one, zero = jnp.ones((), s_k.dtype), jnp.zeros((), s_k.dtype)  # typed: no float64 constant on TPU
  inv_root = jnp.where(keep, one / jnp.sqrt(jnp.where(keep, s_k, one)), zero)
  left = mm(_mT(root_b), _mT(vt_k)) * inv_root[..., None, :]  # R_Bᵀ V_r S_r^{-½}: (..., r_src, k)
  right = inv_root[..., :, None] * mm(_mT(u_k), root_a)  # S_r^{-½} U_rᵀ R_A: (..., k, r_src)
  left, right = canonical_signs(left, right)
  if precision == "float32":
    a_t, b_t = mm(cast(a), left).astype(a_dtype), mm(right, cast(b)).astype(b_dtype)
  else:
    a_t = _per_matrix(lambda x, y: (_as_f64(x) @ y).astype(a_dtype), a, left)
    b_t = _per_matrix(lambda x, y: (y @ _as_f64(x)).astype(b_dtype), b, right)
  a_t, _, b_t = _pad_rank_batched(a_t, s_k, b_t, rank)
  return a_t, b_t, s_all.astype(F32), finite


def singular_values_batched(a, b, precision="float64"):
  """All r_src singular values of a @ b (..., r_src) float32 and the finiteness flags."""
  if precision == "float32":
    core_m = matmul(qr_root_f32(a, "a"), _mT(qr_root_f32(b, "b")))
    finite = {"a": _finite_matrices(a), "b": _finite_matrices(b)}
  else:
    gram_a = _per_matrix(lambda x: _gram(_as_f64(x), "a"), a)
    gram_b = _per_matrix(lambda x: _gram(_as_f64(x), "b"), b)
    core_m = _gram_root(gram_a) @ _mT(_gram_root(gram_b))
    finite = {
      "a": jnp.isfinite(jnp.trace(gram_a, axis1=-2, axis2=-1)),
      "b": jnp.isfinite(jnp.trace(gram_b, axis1=-2, axis2=-1)),
    }
  return jnp.linalg.svd(core_m, compute_uv=False).astype(F32), finite


@functools.partial(jax.jit, static_argnames=("rank", "core", "oversample", "power_iters", "precision"))
def qr_core_jit(a, b, key, *, rank, core, oversample, power_iters, precision):
  return qr_core_batched(
    a, b, key, rank=rank, core=core, oversample=oversample, power_iters=power_iters, precision=precision
  )


@functools.partial(jax.jit, static_argnames=("precision",))
def singular_values_jit(a, b, *, precision):
  return singular_values_batched(a, b, precision)
