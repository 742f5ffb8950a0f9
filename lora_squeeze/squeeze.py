"""The LoRA-Squeeze linear algebra (arXiv 2602.10993, Sec. 3.1 and App. D-F): matrices only.

A LoRA module is a pair of factors ``a: (m, r_src)`` and ``b: (r_src, n)`` whose product is the
update ``ΔW = a @ b`` (no alpha or scale: the gemma convention). Squeezing it to ``r_tgt`` means
finding the best rank-``r_tgt`` approximation of ``ΔW`` (Eckart-Young: the truncated SVD) and
writing it back as balanced factors

    a_t = U_r √S_r    (m, r_tgt)        b_t = √S_r V_rᵀ    (r_tgt, n)

so that the column norms of ``a_t`` equal the row norms of ``b_t`` (both are √s_i).

Four methods compute that truncation:

* ``svd``: form ΔW (m×n) and take its full SVD. The exact reference; O(mn·min(m, n)).
* ``rsvd``: Alg. 1 (randomized SVD, Halko et al.) on the formed ΔW. O(mn·(r_tgt + k_o)).
* ``rsvd_factored``: Alg. 1 on the operator x ↦ a(b x); never forms ΔW. O((m+n)·r_src·(r_tgt+k_o)).
* ``qr_core``: Alg. 2. With a = Q_A R_A and bᵀ = Q_B R_B, ΔW = Q_A (R_A R_Bᵀ) Q_Bᵀ, so the SVD of
  the r_src×r_src core M = R_A R_Bᵀ gives the SVD of ΔW exactly. O((m+n)·r_src²); never forms ΔW.

How ``qr_core`` is computed (the speed and accuracy choices):

* Only R_A and R_B enter M, and any R with RᵀR = aᵀa works (another choice rotates M's singular
  vectors and cancels below). So R is the Cholesky factor of the Gram matrix G_A = aᵀa: one
  matrix product instead of a Householder QR. A Gram matrix squares the condition number, so it is
  accumulated in float64 (float32 values and their products are exact in float64; only the sum
  rounds): factors with cond up to ~1e6 and beyond, common after training, keep float32 accuracy.
  Where G is singular in float64 (b = 0 right after init, r_src > m) R = Λ^½ Vᵀ from G = V Λ Vᵀ.
* Q_A and Q_B are never formed. With M = U S Vᵀ:
      a_t = Q_A U_r √S_r = ΔW Q_B V_r S_r^{-½} = a · (R_Bᵀ V_r S_r^{-½})
      b_t = √S_r V_rᵀ Q_Bᵀ = S_r^{-½} U_rᵀ Q_Aᵀ ΔW = (S_r^{-½} U_rᵀ R_A) · b
  using b Q_B = R_Bᵀ and Q_Aᵀ a = R_A. No triangular solve, no inverse of an ill-conditioned R:
  besides the Gram matrices the only large products are a @ (r_src, r_tgt) and (r_tgt, r_src) @ b,
  done in float64 because a column of a · (R_Bᵀ v_i) has norm s_i while its terms reach ‖a‖‖b‖.
* Singular values below M's float64 rounding level are zero: they get zero factors instead of
  rounding noise divided by √s_i.
* Cost: 2(m + n)·r_src² float64 flops for the Gram matrices, O(r_src³) for the core, and
  2(m + n)·r_src·r_tgt for the factors; extra memory O((m + n)·r_src) for one matrix at a time.

Without float64 (TPU), ``precision="float32"`` (chosen by ``precision="auto"`` there) computes R_A
and R_B by a float32 Householder QR of a and bᵀ instead, and every product in float32 at HIGHEST
precision: backward stable, so the spectrum stays within ~1e-6·σ₁ whatever the condition number
(a float32 Gram matrix would not: it squares it). docs/squeeze.md has the measured accuracy.

All functions take float32, bfloat16, float16 and float64 factors, compute in float32 (``qr_core``
in float64 by default on CPU/GPU, which costs little since its float32 inputs are exact there) and return factors in the
input dtype and singular values in float32. Leading batch axes (e.g. stacked layers) are mapped
(``jax.vmap``, or ``lax.map`` for ``qr_core``'s per-matrix products). A target rank above the
source rank is allowed: the factors are zero-padded and ΔW is unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from lora_squeeze import validation

METHODS = ("qr_core", "rsvd", "rsvd_factored", "svd")
CORES = ("svd", "rsvd")
# Arithmetic of qr_core: "float64" (Gram matrices and products in float64), "float32" (Householder
# QR in float32, for backends without float64: TPU), "auto" (float64 where the backend has it).
PRECISIONS = ("auto", "float64", "float32")
# Backends with native float64 arithmetic; on the others (TPU, ...) "auto" means "float32".
FLOAT64_BACKENDS = ("cpu", "gpu", "cuda", "rocm")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "float64")

_F32 = jnp.float32
_F64 = jnp.float64
_EPS64 = float(np.finfo(np.float64).eps)
_EPS32 = float(np.finfo(np.float32).eps)
# Full float32 products on every backend (TPU/GPU default to reduced-precision passes).
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class NonFiniteError(ValueError):
  """A factor holds NaN or Inf.

  Attributes:
    operand: which input ("a", "b" or "w").
    batch_index: index into the leading batch axes of the first offending matrix (() if none).
  """

  def __init__(self, operand: str, batch_index: tuple[int, ...]):
    where = f" at batch index {batch_index}" if batch_index else ""
    super().__init__(f"{operand} contains non-finite values (NaN or Inf){where}")
    self.operand = operand
    self.batch_index = batch_index


# --------------------------------------------------------------------------------------------
# Input checks (host side: shapes and dtypes are static, so they fail before any work starts).
# --------------------------------------------------------------------------------------------


def check_rank(rank: Any, *, name: str = "rank") -> int:
  """Returns ``rank`` as an int; UserInputError (a ValueError) unless it is an integer ≥ 1."""
  return int(validation.positive_int(name, rank))


def resolve_precision(precision: Any = "auto", *, backend: str | None = None) -> str:
  """ "float64" or "float32": the arithmetic qr_core uses for ``precision`` (one of PRECISIONS).

  "auto" is "float64" on backends with native float64 (FLOAT64_BACKENDS: CPU, GPU) and
  "float32" elsewhere (TPU). ``backend`` defaults to ``jax.default_backend()``.
  """
  validation.one_of("precision", precision, PRECISIONS)
  if precision != "auto":
    return precision
  backend = jax.default_backend() if backend is None else backend
  return "float64" if backend in FLOAT64_BACKENDS else "float32"


def _check_count(value: Any, name: str) -> int:
  return int(validation.integer(name, value, minimum=0))


def _check_dtype(x: Any, name: str) -> None:
  dtype = jnp.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  if dtype.name not in SUPPORTED_DTYPES:
    raise ValueError(f"{name} has unsupported dtype {dtype.name}; allowed: {', '.join(SUPPORTED_DTYPES)}")


def validate_factors(a: Any, b: Any) -> None:
  """Static checks of a LoRA pair ``a: (..., m, r)``, ``b: (..., r, n)``; ValueError naming the problem.

  Checks dtypes, ranks of the arrays (≥ 2), equal leading batch axes and equal inner rank r.
  Finiteness is checked by the squeeze functions themselves, inside their compiled computation.
  """
  _check_dtype(a, "a")
  _check_dtype(b, "b")
  if np.ndim(a) < 2 or np.ndim(b) < 2:
    raise ValueError(
      f"a and b must be matrices (..., m, r) and (..., r, n), got shapes {np.shape(a)} and {np.shape(b)}"
    )
  if np.shape(a)[-1] != np.shape(b)[-2]:
    raise ValueError(
      f"inner ranks differ: a has r={np.shape(a)[-1]} (shape {np.shape(a)}) "
      f"but b has r={np.shape(b)[-2]} (shape {np.shape(b)})"
    )
  if np.shape(a)[:-2] != np.shape(b)[:-2]:
    raise ValueError(
      f"batch axes differ: a {np.shape(a)[:-2]} vs b {np.shape(b)[:-2]} (shapes {np.shape(a)}, {np.shape(b)})"
    )


def _run_single_threaded_lapack(fn: Callable[[], Any]) -> Any:
  """Runs fn to completion with OpenBLAS (used by XLA's CPU LAPACK kernels) on one thread.

  The r×r decompositions are far too small to split; OpenBLAS's spinning worker threads made
  them ~5× slower on 2 shared cores (measured). The limit is scoped and restored, and the
  result is awaited inside it because XLA runs asynchronously. Under a caller's jit it only
  traces.
  """
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    out = fn()
    leaves = jax.tree.leaves(out)
    if not any(isinstance(x, jax.core.Tracer) for x in leaves):
      jax.block_until_ready(out)
  return out


def _check_key(key: Any, method: str) -> None:
  if key is None:
    raise ValueError(f"method {method!r} is randomized and needs a PRNG key, got key=None")


def _raise_if_nonfinite(flags: dict[str, jax.Array]) -> None:
  """flags: operand name -> bool array over the batch axes (True = finite)."""
  for operand, finite in flags.items():
    if isinstance(finite, jax.core.Tracer):
      continue  # inside a caller's jit: values are unknown until run time
    # An explicit fetch of the small flags (..batch) only: under jax.transfer_guard("disallow")
    # any implicit fetch, e.g. of a whole factor, would be an error (tests/test_lora_tree.py).
    finite = np.asarray(jax.device_get(finite))
    if not finite.all():
      bad = np.argwhere(~finite)[0] if finite.ndim else ()
      raise NonFiniteError(operand, tuple(int(i) for i in bad))


# --------------------------------------------------------------------------------------------
# Building blocks (single matrices; batching is added by _map_batch).
# --------------------------------------------------------------------------------------------


def _map_batch(fn: Callable[..., Any], n_batch: int, keyed: bool) -> Callable[..., Any]:
  """vmaps ``fn(x, y, key)`` over ``n_batch`` leading axes of x, y (and key when ``keyed``)."""
  for _ in range(n_batch):
    fn = jax.vmap(fn, in_axes=(0, 0, 0 if keyed else None))
  return fn


def _batch_keys(key: Any, batch_shape: tuple[int, ...]) -> Any:
  """One independent key per batch element: (*batch_shape,) key array (or the key itself)."""
  if not batch_shape:
    return key
  return jax.random.split(key, math.prod(batch_shape)).reshape(*batch_shape, *np.shape(key))


def _pad_rank(a_t: jax.Array, s: jax.Array, b_t: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Zero-pads factors (m, k), (k,), (k, n) to rank ≥ k: extra directions with zero weight."""
  extra = rank - s.shape[0]
  if extra <= 0:
    return a_t, s, b_t
  return jnp.pad(a_t, ((0, 0), (0, extra))), jnp.pad(s, (0, extra)), jnp.pad(b_t, ((0, extra), (0, 0)))


def _balanced(u: jax.Array, s: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a = U √S (m, k), b = √S Vᵀ (k, n): column norms of a equal row norms of b (Alg. 1, L17-19)."""
  root = jnp.sqrt(s)
  return u * root, root[:, None] * vt


def _randomized_svd(
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
  u = _matmul(q, u_tilde)
  return u[:, :rank], s[:rank], vt[:rank]


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _gram(x: jax.Array, side: str) -> jax.Array:
  """(..., r, r) Gram matrix of a float64 factor: xᵀx for a (..., m, r) ("a"), x xᵀ for b (..., r, n) ("b")."""
  spec = "...mi,...mj->...ij" if side == "a" else "...in,...jn->...ij"
  return jnp.einsum(spec, x, x, precision=jax.lax.Precision.HIGHEST)


def _eigh_root(gram: jax.Array) -> jax.Array:
  """R = Λ^½ Vᵀ with RᵀR = G = V Λ Vᵀ; eigenvalues below G's float64 rounding level become zero."""
  w, v = jnp.linalg.eigh(gram)
  w = jnp.where(w > gram.shape[-1] * _EPS64 * w[..., -1:], w, 0.0)
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


# --------------------------------------------------------------------------------------------
# Implementations. qr_core works on batch axes natively (batched products and decompositions);
# the others are written for one matrix and mapped over batch axes by _map_batch.
# --------------------------------------------------------------------------------------------


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
  return x.astype(_F32).astype(_F64)  # bf16/f16 -> f32 first: that is the precision they carry


def _qr_root_f32(x: jax.Array, side: str) -> jax.Array:
  """R (..., r, r) float32 with RᵀR = xᵀx (a: (..., m, r)) or x xᵀ (b: (..., r, n)): Householder QR.

  Backward stable in float32 (R is the exact factor of x + δx with ‖δx‖ ~ ε₃₂‖x‖), so unlike a
  float32 Gram matrix it does not square the condition number. Zero rows pad R to r×r when the
  factor has fewer rows than r (r_src > m).
  """
  x = x.astype(_F32)
  tall = x if side == "a" else _mT(x)  # (..., d, r)
  root = jnp.linalg.qr(tall, mode="r")  # (..., min(d, r), r)
  missing = tall.shape[-1] - root.shape[-2]
  if missing:
    root = jnp.pad(root, ((0, 0),) * (root.ndim - 2) + ((0, missing), (0, 0)))
  return root


def _finite_matrices(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def _qr_core_batched(a, b, key, *, rank, core, oversample, power_iters, precision="float64"):
  """Alg. 2 on a (..., m, r_src), b (..., r_src, n); see the module docstring for the derivation.

  precision "float64": Gram matrices, Cholesky and the large products in float64.
  precision "float32": R from a float32 Householder QR, every product in float32 with HIGHEST
  precision: no float64 anywhere (TPU).
  """
  r_src, a_dtype, b_dtype = a.shape[-1], a.dtype, b.dtype
  if precision == "float32":
    dtype, eps = _F32, _EPS32
    root_a, root_b = _qr_root_f32(a, "a"), _qr_root_f32(b, "b")
    # ‖a‖_F² = ‖R_A‖_F²: the scale of M's rounding errors.
    norm2_a = jnp.sum(jnp.square(root_a), axis=(-2, -1))
    norm2_b = jnp.sum(jnp.square(root_b), axis=(-2, -1))
    finite = {"a": _finite_matrices(a), "b": _finite_matrices(b)}
    cast = lambda x: x.astype(_F32)  # noqa: E731
    mm = _matmul
    # M's singular values carry absolute errors ~ε₃₂‖a‖‖b‖: below ε₃₂·‖a‖_F‖b‖_F a direction is
    # rounding noise. (A larger cut, like the float64 path's 16·r_src·ε, would drop real
    # directions of ill-conditioned pairs: measured 3e-5·σ₁ of extra error at cond 1e6.)
    threshold_scale = eps
  else:
    dtype, eps = _F64, _EPS64
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
    one = lambda m_, key_: _randomized_svd(  # noqa: E731
      lambda x: mm(m_, x), lambda y: mm(m_.T, y), r_src, k, key_, oversample, power_iters, dtype
    )
    u_k, s_k, vt_k = _map_batch(lambda m_, _, key_: one(m_, key_), core_m.ndim - 2, keyed=True)(core_m, None, key)
  # M's singular values are accurate to its rounding level; below it they are zero, and
  # dividing by their roots would turn rounding noise into large factors.
  frobenius = jnp.sqrt(norm2_a * norm2_b)
  keep = s_k > (threshold_scale * frobenius)[..., None]
  one, zero = jnp.ones((), s_k.dtype), jnp.zeros((), s_k.dtype)  # typed: no float64 constant on TPU
  inv_root = jnp.where(keep, one / jnp.sqrt(jnp.where(keep, s_k, one)), zero)
  left = mm(_mT(root_b), _mT(vt_k)) * inv_root[..., None, :]  # R_Bᵀ V_r S_r^{-½}: (..., r_src, k)
  right = inv_root[..., :, None] * mm(_mT(u_k), root_a)  # S_r^{-½} U_rᵀ R_A: (..., k, r_src)
  if precision == "float32":
    a_t, b_t = mm(cast(a), left).astype(a_dtype), mm(right, cast(b)).astype(b_dtype)
  else:
    a_t = _per_matrix(lambda x, y: (_as_f64(x) @ y).astype(a_dtype), a, left)
    b_t = _per_matrix(lambda x, y: (y @ _as_f64(x)).astype(b_dtype), b, right)
  a_t, _, b_t = _pad_rank_batched(a_t, s_k, b_t, rank)
  return a_t, b_t, s_all.astype(_F32), finite


def _singular_values_batched(a, b, precision="float64"):
  """All r_src singular values of a @ b (..., r_src) float32 and the finiteness flags."""
  if precision == "float32":
    core_m = _matmul(_qr_root_f32(a, "a"), _mT(_qr_root_f32(b, "b")))
    finite = {"a": _finite_matrices(a), "b": _finite_matrices(b)}
  else:
    gram_a = _per_matrix(lambda x: _gram(_as_f64(x), "a"), a)
    gram_b = _per_matrix(lambda x: _gram(_as_f64(x), "b"), b)
    core_m = _gram_root(gram_a) @ _mT(_gram_root(gram_b))
    finite = {
      "a": jnp.isfinite(jnp.trace(gram_a, axis1=-2, axis2=-1)),
      "b": jnp.isfinite(jnp.trace(gram_b, axis1=-2, axis2=-1)),
    }
  return jnp.linalg.svd(core_m, compute_uv=False).astype(_F32), finite


def _svd_exact_single(a, b, key, *, rank):
  """Full SVD of the formed ΔW = a @ b (m, n); all r_src singular values (zero-padded past min(m, n))."""
  del key
  r_src = a.shape[1]
  w = _matmul(a.astype(_F32), b.astype(_F32))
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  k = min(rank, r_src, s.shape[0])  # rank(ΔW) ≤ r_src: further singular values are rounding noise
  a_t, b_t = _balanced(u[:, :k], s[:k], vt[:k])
  a_t, _, b_t = _pad_rank(a_t, s[:k], b_t, rank)
  s_all = jnp.pad(s[:r_src], (0, max(0, r_src - s.shape[0])))
  finite = {"a": jnp.all(jnp.isfinite(a)), "b": jnp.all(jnp.isfinite(b))}
  return a_t.astype(a.dtype), b_t.astype(b.dtype), s_all, finite


def _rsvd_single(w, key, *, rank, oversample, power_iters):
  """Alg. 1 on a formed matrix w (m, n)."""
  w32 = w.astype(_F32)
  m, n = w32.shape
  k = min(rank, m, n)
  u, s, vt = _randomized_svd(
    lambda x: _matmul(w32, x), lambda y: _matmul(w32.T, y), n, k, key, oversample, power_iters, _F32
  )
  a_t, b_t = _balanced(u, s, vt)
  a_t, s, b_t = _pad_rank(a_t, s, b_t, rank)
  return a_t.astype(w.dtype), b_t.astype(w.dtype), s, {"w": jnp.all(jnp.isfinite(w))}


def _rsvd_factored_single(a, b, key, *, rank, oversample, power_iters):
  """Alg. 1 on the operator x ↦ a(b x): every product is with a or b, never with ΔW."""
  a32, b32 = a.astype(_F32), b.astype(_F32)
  (m, r_src), n = a32.shape, b32.shape[1]
  k = min(rank, r_src, m, n)
  u, s, vt = _randomized_svd(
    lambda x: _matmul(a32, _matmul(b32, x)),
    lambda y: _matmul(b32.T, _matmul(a32.T, y)),
    n,
    k,
    key,
    oversample,
    power_iters,
    _F32,
  )
  a_t, b_t = _balanced(u, s, vt)
  a_t, s, b_t = _pad_rank(a_t, s, b_t, rank)
  finite = {"a": jnp.all(jnp.isfinite(a)), "b": jnp.all(jnp.isfinite(b))}
  return a_t.astype(a.dtype), b_t.astype(b.dtype), s, finite


# --------------------------------------------------------------------------------------------
# Compiled, batched entry points. They run under a local float64 context (for the Gram matrices
# and to keep float64 inputs float64); every array they create has an explicit dtype.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("rank", "core", "oversample", "power_iters", "precision"))
def _qr_core_jit(a, b, key, *, rank, core, oversample, power_iters, precision):
  return _qr_core_batched(
    a, b, key, rank=rank, core=core, oversample=oversample, power_iters=power_iters, precision=precision
  )


@functools.partial(jax.jit, static_argnames=("rank",))
def _svd_exact_jit(a, b, *, rank):
  return _map_batch(functools.partial(_svd_exact_single, rank=rank), a.ndim - 2, keyed=False)(a, b, None)


@functools.partial(jax.jit, static_argnames=("rank", "oversample", "power_iters"))
def _rsvd_jit(w, key, *, rank, oversample, power_iters):
  fn = functools.partial(_rsvd_single, rank=rank, oversample=oversample, power_iters=power_iters)
  fn2 = lambda x, _, k: fn(x, k)  # noqa: E731  (adapts to the (x, y, key) signature of _map_batch)
  return _map_batch(fn2, w.ndim - 2, keyed=True)(w, w, key)


@functools.partial(jax.jit, static_argnames=("rank", "oversample", "power_iters"))
def _rsvd_factored_jit(a, b, key, *, rank, oversample, power_iters):
  fn = functools.partial(_rsvd_factored_single, rank=rank, oversample=oversample, power_iters=power_iters)
  return _map_batch(fn, a.ndim - 2, keyed=True)(a, b, key)


@functools.partial(jax.jit, static_argnames=("precision",))
def _singular_values_jit(a, b, *, precision):
  return _singular_values_batched(a, b, precision)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def rsvd(w, rank, *, key, oversample=10, power_iters=2):
  """Randomized SVD (Alg. 1) of a formed matrix, as balanced LoRA factors.

  r' = rank + oversample; Ω ~ N(0, 1)^{n×r'}; Y = W Ω; k_q times {Q = qr(Y); Q* = qr(Wᵀ Q);
  Y = W Q*}; Q = qr(Y); Ũ S Vᵀ = svd(Qᵀ W); U = Q Ũ; a = U_r √S_r, b = √S_r V_rᵀ.

  Args:
    w: (..., m, n) matrix, any supported float dtype; leading axes are batch axes.
    rank: target rank r (int ≥ 1); r > min(m, n) zero-pads the factors.
    key: PRNG key for Ω (split per batch element).
    oversample: k_o, extra sketch columns (paper: 10).
    power_iters: k_q, subspace iterations (paper: 2).

  Returns:
    a (..., m, r) and b (..., r, n) in w's dtype, s (..., r) float32 approximate top singular values.
  """
  rank = check_rank(rank)
  oversample, power_iters = _check_count(oversample, "oversample"), _check_count(power_iters, "power_iters")
  _check_dtype(w, "w")
  if np.ndim(w) < 2:
    raise ValueError(f"w must be a matrix (..., m, n), got shape {np.shape(w)}")
  _check_key(key, "rsvd")
  with jax.enable_x64(True):
    keys = _batch_keys(key, np.shape(w)[:-2])
    a_t, b_t, s, finite = _rsvd_jit(w, keys, rank=rank, oversample=oversample, power_iters=power_iters)
  _raise_if_nonfinite(finite)
  return a_t, b_t, s


def rsvd_factored(a, b, rank, *, key, oversample=10, power_iters=2):
  """Randomized SVD (Alg. 1) of ΔW = a @ b applied to the operator x ↦ a(b x); ΔW is never formed.

  Same steps as ``rsvd`` with W x = a(b x), Wᵀ y = bᵀ(aᵀ y) and Qᵀ W = (Qᵀ a) b. Extra memory is
  O((m + n)·(r + k_o)); time O((m + n)·r_src·(r + k_o)·(k_q + 1)).

  Args:
    a: (..., m, r_src), b: (..., r_src, n) LoRA factors; leading axes are batch axes.
    rank: target rank r_tgt (int ≥ 1); r_tgt > r_src zero-pads the factors.
    key, oversample, power_iters: as in ``rsvd``.

  Returns:
    a_t (..., m, r_tgt) in a's dtype, b_t (..., r_tgt, n) in b's dtype, s (..., r_tgt) float32.
  """
  rank = check_rank(rank)
  oversample, power_iters = _check_count(oversample, "oversample"), _check_count(power_iters, "power_iters")
  validate_factors(a, b)
  _check_key(key, "rsvd_factored")
  with jax.enable_x64(True):
    keys = _batch_keys(key, np.shape(a)[:-2])
    a_t, b_t, s, finite = _rsvd_factored_jit(a, b, keys, rank=rank, oversample=oversample, power_iters=power_iters)
  _raise_if_nonfinite(finite)
  return a_t, b_t, s


def qr_core(a, b, rank, *, core="svd", key=None, oversample=10, power_iters=2, precision="auto"):
  """Memory-efficient LoRA-Squeeze (Alg. 2): SVD of ΔW = a @ b through its r_src×r_src core.

  a = Q_A R_A, bᵀ = Q_B R_B, M = R_A R_Bᵀ = U S Vᵀ, then ΔW = (Q_A U) S (Q_B V)ᵀ exactly, and
  a_t = Q_A U_r √S_r, b_t = √S_r V_rᵀ Q_Bᵀ. Computed without Q_A, Q_B or ΔW: R_A is the
  Cholesky factor of aᵀa (float64 Gram; eigendecomposition where it is singular), likewise R_B of
  b bᵀ, and a_t = a (R_Bᵀ V_r S_r^{-½}), b_t = (S_r^{-½} U_rᵀ R_A) b. Extra memory
  O((m + n)·r_src) (one matrix at a time), time O((m + n)·r_src²). Exact: s_all equals the
  singular values of a @ b to float32 accuracy relative to the largest one, also for factors
  with cond ~1e6, and a_t @ b_t is the Eckart-Young optimal rank-r_tgt approximation.

  Args:
    a: (..., m, r_src), b: (..., r_src, n) LoRA factors; leading axes are batch axes.
    rank: target rank r_tgt (int ≥ 1). r_tgt ≥ r_src returns ΔW itself in balanced form, zero-padded.
    core: "svd" (exact SVD of M) or "rsvd" (Alg. 1 on M, with ``key``, ``oversample``, ``power_iters``).
    precision: one of PRECISIONS. "float64": float64 Gram matrices (exact to float32 accuracy
      at any condition number up to ~1e7). "float32": float32 Householder QR of a and bᵀ and
      float32 products (no float64: TPU); backward stable, so σ(a @ b) to ~1e-6·σ₁ at any
      condition number (docs/squeeze.md has the measured accuracy). "auto" (default): float64
      where the backend has it (CPU, GPU), float32 elsewhere (``resolve_precision``).

  Returns:
    a_t (..., m, r_tgt) in a's dtype, b_t (..., r_tgt, n) in b's dtype, and s_all (..., r_src)
    float32: all singular values of a @ b, descending (for variance retention).
  """
  rank = check_rank(rank)
  precision = resolve_precision(precision)
  if core not in CORES:
    raise ValueError(f"core must be one of {CORES}, got {core!r}")
  oversample, power_iters = _check_count(oversample, "oversample"), _check_count(power_iters, "power_iters")
  validate_factors(a, b)
  if core == "rsvd":
    _check_key(key, "qr_core(core='rsvd')")
  with jax.enable_x64(True):
    keys = _batch_keys(key, np.shape(a)[:-2]) if core == "rsvd" else None
    a_t, b_t, s_all, finite = _run_single_threaded_lapack(
      lambda: _qr_core_jit(
        a, b, keys, rank=rank, core=core, oversample=oversample, power_iters=power_iters, precision=precision
      )
    )
  _raise_if_nonfinite(finite)
  return a_t, b_t, s_all


def svd_exact(a, b, rank):
  """The reference: form ΔW = a @ b (m, n) in float32 and take its full SVD, ΔW = U S Vᵀ.

  a_t = U_r √S_r, b_t = √S_r V_rᵀ. O(mn·min(m, n)) time and O(mn) extra memory: for comparison
  and small matrices.

  Args:
    a: (..., m, r_src), b: (..., r_src, n); rank: r_tgt (int ≥ 1), zero-padded past min(m, n).

  Returns:
    a_t (..., m, r_tgt), b_t (..., r_tgt, n) in the input dtypes (zero-padded past
    min(r_src, m, n)), and s_all (..., r_src) float32: the top r_src singular values of ΔW
    (zero-padded when r_src > min(m, n)).
  """
  rank = check_rank(rank)
  validate_factors(a, b)
  with jax.enable_x64(True):
    a_t, b_t, s_all, finite = _svd_exact_jit(a, b, rank=rank)
  _raise_if_nonfinite(finite)
  return a_t, b_t, s_all


def squeeze_factors(a, b, rank, *, method="qr_core", key=None, precision="auto"):
  """Squeezes a LoRA pair a (..., m, r_src), b (..., r_src, n) to rank r_tgt with one of METHODS.

  "qr_core" (Alg. 2, exact, default), "rsvd" (Alg. 1 on the formed ΔW), "rsvd_factored" (Alg. 1 on
  x ↦ a(b x)), "svd" (full SVD of the formed ΔW). The randomized methods need ``key``.
  ``precision`` is qr_core's (the other methods compute in float32 anyway).

  Returns:
    a_t (..., m, r_tgt), b_t (..., r_tgt, n) in the input dtypes, and float32 singular values:
    all r_src of ΔW for "qr_core" and "svd", the r_tgt estimated ones for "rsvd"/"rsvd_factored".
  """
  if method == "qr_core":
    return qr_core(a, b, rank, precision=precision)
  resolve_precision(precision)  # a bad value is an error whatever the method
  if method == "svd":
    return svd_exact(a, b, rank)
  if method == "rsvd_factored":
    return rsvd_factored(a, b, rank, key=key)
  if method == "rsvd":
    validate_factors(a, b)
    _check_key(key, "rsvd")
    with jax.enable_x64(True):
      flags = _finite_flags_jit(a, b)
    _raise_if_nonfinite(flags)
    delta = _product_jit(a, b)
    a_t, b_t, s = rsvd(delta, rank, key=key)
    return a_t.astype(a.dtype), b_t.astype(b.dtype), s
  raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@jax.jit
def _product_jit(a, b):
  return _matmul(a.astype(_F32), b.astype(_F32))


@jax.jit
def _finite_flags_jit(a, b):
  matrix_axes = (-2, -1)
  return {"a": jnp.all(jnp.isfinite(a), axis=matrix_axes), "b": jnp.all(jnp.isfinite(b), axis=matrix_axes)}


def singular_values(a, b, *, precision="auto"):
  """All r_src singular values of ΔW = a @ b (..., r_src) in float32, descending, without forming ΔW.

  σ(ΔW) = σ(R_A R_Bᵀ) with R_Aᵀ R_A = aᵀa and R_Bᵀ R_B = b bᵀ (Gram matrices in float64, or
  float32 Householder QR with ``precision="float32"``; see ``qr_core``).
  """
  precision = resolve_precision(precision)
  validate_factors(a, b)
  with jax.enable_x64(True):
    s_all, finite = _run_single_threaded_lapack(lambda: _singular_values_jit(a, b, precision=precision))
  _raise_if_nonfinite(finite)
  return s_all


def variance_retention(s, r_tgt):
  """Energy kept by the top r_tgt singular values (Eq. 10): Σ_{i≤r_tgt} s_i² / Σ_i s_i².

  Args:
    s: (..., r_src) singular values, descending. r_tgt: int ≥ 1 (≥ r_src gives 1).

  Returns:
    (...) float32 in [0, 1]; 1.0 where all s are zero (nothing to lose).
  """
  r_tgt = check_rank(r_tgt, name="r_tgt")
  energy = jnp.square(jnp.asarray(s, _F32))
  total = jnp.sum(energy, axis=-1)
  kept = jnp.sum(energy[..., :r_tgt], axis=-1)
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)


def rank_for_energy(s, tau, *, max_rank=None):
  """Smallest r ≥ 1 with V_r ≥ tau (Eq. 10), capped at max_rank.

  Args:
    s: (r_src,) singular values, descending (host array). tau: energy target in (0, 1].
    max_rank: optional cap (int ≥ 1).

  Returns:
    int r in [1, min(r_src, max_rank)].
  """
  validation.fraction("tau", tau)
  if max_rank is not None:
    max_rank = check_rank(max_rank, name="max_rank")
  energy = np.square(np.asarray(s, np.float64))
  if energy.ndim != 1 or energy.size == 0:
    raise ValueError(f"s must be a non-empty vector of singular values, got shape {energy.shape}")
  cumulative = np.cumsum(energy)
  if cumulative[-1] <= 0:
    rank = 1
  else:
    # cumulative[-1] / cumulative[-1] is exactly 1, so tau = 1 is always reachable.
    rank = int(np.searchsorted(cumulative / cumulative[-1], tau, side="left")) + 1
  return min(rank, max_rank) if max_rank is not None else rank
