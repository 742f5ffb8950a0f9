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
in float64 by default on CPU/GPU, which costs little since its float32 inputs are exact there)
and return factors in the input dtype and singular values in float32. Leading batch axes (e.g.
stacked layers) are mapped (``jax.vmap``, or ``lax.map`` for ``qr_core``'s per-matrix products).
A target rank above the source rank is allowed: the factors are zero-padded and ΔW is unchanged.

Where the code is: this module is the public API; ``squeeze_base`` holds the names, checks and
errors they share, ``squeeze_rsvd`` Alg. 1 and the methods that form ΔW, ``squeeze_qr_core``
Alg. 2. The names below that come from ``squeeze_base`` are re-exported here, so
``squeeze.METHODS``, ``squeeze.check_rank``, ``squeeze.NonFiniteError`` etc. stay where callers
find them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import validation
from lora_squeeze.squeeze_base import (
  CORES,
  FLOAT64_BACKENDS,
  METHODS,
  PRECISIONS,
  SUPPORTED_DTYPES,
  NonFiniteError,
  check_count,
  check_dtype,
  check_key,
  check_rank,
  raise_if_nonfinite,
  resolve_precision,
  run_single_threaded_lapack,
  validate_factors,
)
from lora_squeeze.squeeze_qr_core import qr_core_jit, singular_values_jit
from lora_squeeze.squeeze_rsvd import (
  batch_keys,
  finite_flags_jit,
  product_jit,
  rsvd_factored_jit,
  rsvd_jit,
  svd_exact_jit,
)

__all__ = [
  "CORES",
  "FLOAT64_BACKENDS",
  "METHODS",
  "PRECISIONS",
  "SUPPORTED_DTYPES",
  "NonFiniteError",
  "check_rank",
  "qr_core",
  "rank_for_energy",
  "resolve_precision",
  "rsvd",
  "rsvd_factored",
  "singular_values",
  "squeeze_factors",
  "svd_exact",
  "validate_factors",
  "variance_retention",
]


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
  oversample, power_iters = check_count(oversample, "oversample"), check_count(power_iters, "power_iters")
  check_dtype(w, "w")
  if np.ndim(w) < 2:
    raise ValueError(f"w must be a matrix (..., m, n), got shape {np.shape(w)}")
  check_key(key, "rsvd")
  with jax.enable_x64(True):
    keys = batch_keys(key, np.shape(w)[:-2])
    a_t, b_t, s, finite = rsvd_jit(w, keys, rank=rank, oversample=oversample, power_iters=power_iters)
  raise_if_nonfinite(finite)
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
  oversample, power_iters = check_count(oversample, "oversample"), check_count(power_iters, "power_iters")
  validate_factors(a, b)
  check_key(key, "rsvd_factored")
  with jax.enable_x64(True):
    keys = batch_keys(key, np.shape(a)[:-2])
    a_t, b_t, s, finite = rsvd_factored_jit(a, b, keys, rank=rank, oversample=oversample, power_iters=power_iters)
  raise_if_nonfinite(finite)
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
  oversample, power_iters = check_count(oversample, "oversample"), check_count(power_iters, "power_iters")
  validate_factors(a, b)
  if core == "rsvd":
    check_key(key, "qr_core(core='rsvd')")
  with jax.enable_x64(True):
    keys = batch_keys(key, np.shape(a)[:-2]) if core == "rsvd" else None
    a_t, b_t, s_all, finite = run_single_threaded_lapack(
      lambda: qr_core_jit(
        a, b, keys, rank=rank, core=core, oversample=oversample, power_iters=power_iters, precision=precision
      )
    )
  raise_if_nonfinite(finite)
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
    a_t, b_t, s_all, finite = svd_exact_jit(a, b, rank=rank)
  raise_if_nonfinite(finite)
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
    check_key(key, "rsvd")
    with jax.enable_x64(True):
      flags = finite_flags_jit(a, b)
    raise_if_nonfinite(flags)
    delta = product_jit(a, b)
    a_t, b_t, s = rsvd(delta, rank, key=key)
    return a_t.astype(a.dtype), b_t.astype(b.dtype), s
  raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def singular_values(a, b, *, precision="auto"):
  """All r_src singular values of ΔW = a @ b (..., r_src) in float32, descending, without forming ΔW.

  σ(ΔW) = σ(R_A R_Bᵀ) with R_Aᵀ R_A = aᵀa and R_Bᵀ R_B = b bᵀ (Gram matrices in float64, or
  float32 Householder QR with ``precision="float32"``; see ``qr_core``).
  """
  precision = resolve_precision(precision)
  validate_factors(a, b)
  with jax.enable_x64(True):
    s_all, finite = run_single_threaded_lapack(lambda: singular_values_jit(a, b, precision=precision))
  raise_if_nonfinite(finite)
  return s_all


def variance_retention(s, r_tgt):
  """Energy kept by the top r_tgt singular values (Eq. 10): Σ_{i≤r_tgt} s_i² / Σ_i s_i².

  Args:
    s: (..., r_src) singular values, descending. r_tgt: int ≥ 1 (≥ r_src gives 1).

  Returns:
    (...) float32 in [0, 1]; 1.0 where all s are zero (nothing to lose).
  """
  r_tgt = check_rank(r_tgt, name="r_tgt")
  energy = jnp.square(jnp.asarray(s, jnp.float32))
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
