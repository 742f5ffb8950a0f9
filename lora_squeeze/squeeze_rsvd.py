"""Alg. 1 (randomized SVD) and the methods that form ΔW: ``rsvd``, ``rsvd_factored``, ``svd``.

The math and the public functions are in ``lora_squeeze.squeeze``. The helpers here are written
for one matrix and mapped over leading batch axes with ``jax.vmap`` (``map_batch``); every
product is float32 at HIGHEST precision, whatever the storage dtype. ``squeeze_qr_core`` reuses
``randomized_svd`` for its core="rsvd" option.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze.squeeze_base import F32, matmul


def map_batch(fn: Callable[..., Any], n_batch: int, keyed: bool) -> Callable[..., Any]:
  """vmaps ``fn(x, y, key)`` over ``n_batch`` leading axes of x, y (and key when ``keyed``)."""
  for _ in range(n_batch):
    fn = jax.vmap(fn, in_axes=(0, 0, 0 if keyed else None))
  return fn


def batch_keys(key: Any, batch_shape: tuple[int, ...]) -> Any:
  """One independent key per batch element: (*batch_shape,) key array (or the key itself)."""
  if not batch_shape:
    return key
  return jax.random.split(key, math.prod(batch_shape)).reshape(*batch_shape, *np.shape(key))


def pad_rank(a_t: jax.Array, s: jax.Array, b_t: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Zero-pads factors (m, k), (k,), (k, n) to rank ≥ k: extra directions with zero weight."""
  extra = rank - s.shape[0]
  if extra <= 0:
    return a_t, s, b_t
  return jnp.pad(a_t, ((0, 0), (0, extra))), jnp.pad(s, (0, extra)), jnp.pad(b_t, ((0, extra), (0, 0)))


def balanced(u: jax.Array, s: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a = U √S (m, k), b = √S Vᵀ (k, n): column norms of a equal row norms of b (Alg. 1, L17-19)."""
  root = jnp.sqrt(s)
  return u * root, root[:, None] * vt


def randomized_svd(
  apply: Callable[[jax.Array], jax.Array],
  apply_t: Callable[[jax.Array], jax.Array],
  n: int,
  rank: int,
  key: jax.Array,
  oversample: int,
  power_iters: int,
  dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Alg. 1 lines 1-16 on an operator W (m×n) given x ↦ W x and y ↦ Wᵀ y.

  Returns U_r (m, rank), S_r (rank,), V_rᵀ (rank, n). Needs rank ≤ min(m, n).
  """
  width = rank + oversample
  omega = jax.random.normal(key, (n, width), dtype)  # Ω: (n, r')
  y = apply(omega)  # Y = W Ω: (m, r')
  for _ in range(power_iters):  # a static hyper-parameter (k_q), unrolled once at trace time
    q, _ = jnp.linalg.qr(y)
    q_star, _ = jnp.linalg.qr(apply_t(q))  # Y* = Wᵀ Q
    y = apply(q_star)  # Y = W Q*
  q, _ = jnp.linalg.qr(y)
  d = apply_t(q).T  # D = Qᵀ W: (r', n)
  u_tilde, s, vt = jnp.linalg.svd(d, full_matrices=False)
  u = matmul(q, u_tilde)
  return u[:, :rank], s[:rank], vt[:rank]


def svd_exact_single(a, b, key, *, rank):
  """Full SVD of the formed ΔW = a @ b (m, n); all r_src singular values (zero-padded past min(m, n))."""
  del key
  r_src = a.shape[1]
  w = matmul(a.astype(F32), b.astype(F32))
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  k = min(rank, r_src, s.shape[0])  # rank(ΔW) ≤ r_src: further singular values are rounding noise
  a_t, b_t = balanced(u[:, :k], s[:k], vt[:k])
  a_t, _, b_t = pad_rank(a_t, s[:k], b_t, rank)
  s_all = jnp.pad(s[:r_src], (0, max(0, r_src - s.shape[0])))
  finite = {"a": jnp.all(jnp.isfinite(a)), "b": jnp.all(jnp.isfinite(b))}
  return a_t.astype(a.dtype), b_t.astype(b.dtype), s_all, finite


def rsvd_single(w, key, *, rank, oversample, power_iters):
  """Alg. 1 on a formed matrix w (m, n)."""
  w32 = w.astype(F32)
  m, n = w32.shape
  k = min(rank, m, n)
  u, s, vt = randomized_svd(
    lambda x: matmul(w32, x), lambda y: matmul(w32.T, y), n, k, key, oversample, power_iters, F32
  )
  a_t, b_t = balanced(u, s, vt)
  a_t, s, b_t = pad_rank(a_t, s, b_t, rank)
  return a_t.astype(w.dtype), b_t.astype(w.dtype), s, {"w": jnp.all(jnp.isfinite(w))}


def rsvd_factored_single(a, b, key, *, rank, oversample, power_iters):
  """Alg. 1 on the operator x ↦ a(b x): every product is with a or b, never with ΔW."""
  a32, b32 = a.astype(F32), b.astype(F32)
  (m, r_src), n = a32.shape, b32.shape[1]
  k = min(rank, r_src, m, n)
  u, s, vt = randomized_svd(
    lambda x: matmul(a32, matmul(b32, x)),
    lambda y: matmul(b32.T, matmul(a32.T, y)),
    n,
    k,
    key,
    oversample,
    power_iters,
    F32,
  )
  a_t, b_t = balanced(u, s, vt)
  a_t, s, b_t = pad_rank(a_t, s, b_t, rank)
  finite = {"a": jnp.all(jnp.isfinite(a)), "b": jnp.all(jnp.isfinite(b))}
  return a_t.astype(a.dtype), b_t.astype(b.dtype), s, finite


# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("rank",))
def svd_exact_jit(a, b, *, rank):
  return map_batch(functools.partial(svd_exact_single, rank=rank), a.ndim - 2, keyed=False)(a, b, None)


@functools.partial(jax.jit, static_argnames=("rank", "oversample", "power_iters"))
def rsvd_jit(w, key, *, rank, oversample, power_iters):
  fn = functools.partial(rsvd_single, rank=rank, oversample=oversample, power_iters=power_iters)
  fn2 = lambda x, _, k: fn(x, k)  # noqa: E731  (adapts to the (x, y, key) signature of map_batch)
  return map_batch(fn2, w.ndim - 2, keyed=True)(w, w, key)


@functools.partial(jax.jit, static_argnames=("rank", "oversample", "power_iters"))
def rsvd_factored_jit(a, b, key, *, rank, oversample, power_iters):
  fn = functools.partial(rsvd_factored_single, rank=rank, oversample=oversample, power_iters=power_iters)
  return map_batch(fn, a.ndim - 2, keyed=True)(a, b, key)


@jax.jit
def product_jit(a, b):
  return matmul(a.astype(F32), b.astype(F32))


@jax.jit
def finite_flags_jit(a, b):
  matrix_axes = (-2, -1)
  return {"a": jnp.all(jnp.isfinite(a), axis=matrix_axes), "b": jnp.all(jnp.isfinite(b), axis=matrix_axes)}
