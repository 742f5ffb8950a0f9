"""Tests of lora_squeeze.squeeze against numpy's float64 SVD and the identities of Alg. 1-2."""

import functools
import os
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import squeeze, squeeze_qr_core
from lora_squeeze.errors import UserInputError

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Every example compiles a new shape, so keep the example counts small.
settings = hypothesis.settings(max_examples=10, deadline=None, derandomize=True)


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _factors(seed, m, n, r, dtype=jnp.float32, decay=None):
  """Random a (m, r), b (r, n) in ``dtype``; optional geometric decay of a's column scales."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, r))
  b = rng.standard_normal((r, n)) / np.sqrt(n)
  if decay is not None:
    a = a * decay ** np.arange(r)
  return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _ill_conditioned(seed, m, r, cond):
  """A (m, r) float32 with singular values logspaced from 1 to 1/cond."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, r)))
  v, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return (u * np.logspace(0, -np.log10(cond), r)) @ v.T


def _reference(a, b):
  """Singular values of the stored a @ b in float64."""
  return np.linalg.svd(_f64(a) @ _f64(b), compute_uv=False)


def _optimal_error(s, rank):
  return float(np.sqrt(np.sum(np.square(s[rank:]))))


# Dimensions come from small sets so that examples share compiled shapes (each new one compiles).
shapes = st.tuples(
  st.sampled_from([1, 2, 7, 33]),  # m
  st.sampled_from([1, 5, 24, 40]),  # n
  st.sampled_from([1, 3, 8, 20]),  # r_src
  st.sampled_from([1, 2, 8, 25]),  # r_tgt
  st.sampled_from(DTYPES),
  st.integers(0, 2**16),  # seed
)


@settings
@hypothesis.given(shapes)
def test_qr_core_singular_values_match_numpy_svd(case):
  m, n, r_src, r_tgt, dtype, seed = case
  a, b = _factors(seed, m, n, r_src, dtype)
  _, _, s_all = squeeze.qr_core(a, b, r_tgt)
  s_ref = _reference(a, b)
  assert s_all.shape == (r_src,)
  assert s_all.dtype == jnp.float32
  k = min(m, n, r_src)
  np.testing.assert_allclose(np.asarray(s_all)[:k], s_ref[:k], rtol=0, atol=2e-5 * s_ref[0] + 1e-30)
  np.testing.assert_allclose(np.asarray(s_all)[k:], 0.0, atol=2e-5 * s_ref[0] + 1e-30)


@settings
@hypothesis.given(shapes)
def test_qr_core_reconstruction_is_eckart_young_optimal(case):
  m, n, r_src, r_tgt, dtype, seed = case
  a, b = _factors(seed, m, n, r_src, dtype)
  a_t, b_t, _ = squeeze.qr_core(a, b, r_tgt)
  s_ref = _reference(a, b)
  assert a_t.shape == (m, r_tgt) and b_t.shape == (r_tgt, n)
  # Storage rounding of the outputs (bf16: 2^-8) bounds how well a_t @ b_t can match.
  storage = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}[dtype]
  error = np.linalg.norm(_f64(a_t) @ _f64(b_t) - _f64(a) @ _f64(b))
  assert abs(error - _optimal_error(s_ref, r_tgt)) <= storage * s_ref[0] * np.sqrt(min(r_tgt, r_src))


@pytest.mark.parametrize("method", squeeze.METHODS)
@settings
@hypothesis.given(shapes)
def test_factors_are_balanced(method, case):
  m, n, r_src, r_tgt, _, seed = case
  a, b = _factors(seed, m, n, r_src)
  a_t, b_t, _ = squeeze.squeeze_factors(a, b, r_tgt, method=method, key=jax.random.key(seed))
  col_a = np.linalg.norm(_f64(a_t), axis=0)
  row_b = np.linalg.norm(_f64(b_t), axis=1)
  np.testing.assert_allclose(col_a, row_b, rtol=1e-4, atol=1e-6 * (col_a.max() + 1e-30))


@pytest.mark.parametrize("cond", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("both", [False, True])
def test_qr_core_exact_on_ill_conditioned_factors(cond, both):
  m, n, r = 300, 200, 32
  a = _ill_conditioned(0, m, r, cond)
  b = _ill_conditioned(1, n, r, cond).T if both else np.random.default_rng(2).standard_normal((r, n))
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  s_ref = _reference(a, b)
  for r_tgt in (1, 4, 16, 32):
    a_t, b_t, s_all = squeeze.qr_core(a, b, r_tgt)
    np.testing.assert_allclose(np.asarray(s_all), s_ref[:r], rtol=0, atol=1e-5 * s_ref[0])
    error = np.linalg.norm(_f64(a_t) @ _f64(b_t) - _f64(a) @ _f64(b))
    assert abs(error - _optimal_error(s_ref, r_tgt)) <= 1e-5 * s_ref[0]


@pytest.mark.parametrize("method", ["rsvd", "rsvd_factored"])
@pytest.mark.parametrize("r_tgt", [1, 8])
def test_rsvd_close_to_exact_on_decaying_spectrum(method, r_tgt):
  # Stated tolerance: with k_o = 10 and k_q = 2 on a spectrum decaying by 0.8 per index, the
  # randomized methods land within 1e-3·s_1 of the optimal error and of the top singular values.
  a, b = _factors(3, 400, 300, 64, decay=0.8)
  s_ref = _reference(a, b)
  a_t, b_t, s = squeeze.squeeze_factors(a, b, r_tgt, method=method, key=jax.random.key(0))
  error = np.linalg.norm(_f64(a_t) @ _f64(b_t) - _f64(a) @ _f64(b))
  assert abs(error - _optimal_error(s_ref, r_tgt)) <= 1e-3 * s_ref[0]
  np.testing.assert_allclose(np.asarray(s), s_ref[:r_tgt], rtol=0, atol=1e-3 * s_ref[0])


def test_rsvd_on_formed_matrix_matches_truncated_svd():
  a, b = _factors(4, 120, 90, 40, decay=0.7)
  w = _f64(a) @ _f64(b)
  a_t, b_t, s = squeeze.rsvd(jnp.asarray(w, jnp.float32), 6, key=jax.random.key(1))
  s_ref = np.linalg.svd(w, compute_uv=False)
  np.testing.assert_allclose(np.asarray(s), s_ref[:6], rtol=1e-4)
  assert abs(np.linalg.norm(_f64(a_t) @ _f64(b_t) - w) - _optimal_error(s_ref, 6)) <= 1e-4 * s_ref[0]


@pytest.mark.parametrize("method", ["rsvd", "rsvd_factored"])
def test_same_key_same_result_other_key_other_sketch(method):
  a, b = _factors(5, 64, 48, 16)
  first = squeeze.squeeze_factors(a, b, 4, method=method, key=jax.random.key(7))
  again = squeeze.squeeze_factors(a, b, 4, method=method, key=jax.random.key(7))
  for x, y in zip(first, again):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A flat spectrum makes the sketch matter, so a different key gives different factors.
  other = squeeze.squeeze_factors(a, b, 4, method=method, key=jax.random.key(8))
  assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_qr_core_rsvd_core_matches_svd_core():
  a, b = _factors(6, 80, 70, 24, decay=0.8)
  a_s, b_s, s_s = squeeze.qr_core(a, b, 5, core="svd")
  a_r, b_r, s_r = squeeze.qr_core(a, b, 5, core="rsvd", key=jax.random.key(0))
  np.testing.assert_allclose(np.asarray(s_r), np.asarray(s_s), rtol=1e-6)
  np.testing.assert_allclose(_f64(a_r) @ _f64(b_r), _f64(a_s) @ _f64(b_s), atol=1e-5 * float(s_s[0]))


@pytest.mark.parametrize("method", squeeze.METHODS)
def test_methods_agree_with_exact_svd(method):
  a, b = _factors(8, 60, 50, 12, decay=0.6)
  a_t, b_t, _ = squeeze.squeeze_factors(a, b, 3, method=method, key=jax.random.key(2))
  a_x, b_x, _ = squeeze.svd_exact(a, b, 3)
  scale = float(_reference(a, b)[0])
  np.testing.assert_allclose(_f64(a_t) @ _f64(b_t), _f64(a_x) @ _f64(b_x), atol=1e-4 * scale)


def test_jit_matches_eager():
  a, b = _factors(9, 40, 30, 10)
  eager = squeeze.qr_core(a, b, 3)
  jitted = jax.jit(lambda x, y: squeeze.qr_core(x, y, 3))(a, b)
  for x, y in zip(eager, jitted):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", squeeze.METHODS)
def test_stacked_layers_equal_per_layer_and_vmap(method):
  rng = np.random.default_rng(10)
  a = jnp.asarray(rng.standard_normal((3, 32, 12)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((3, 12, 24)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 3)
  fn = functools.partial(squeeze.squeeze_factors, method=method)
  mapped = jax.vmap(lambda x, y, k: fn(x, y, 4, key=k))(a, b, keys)
  for layer in range(3):
    single = fn(a[layer], b[layer], 4, key=keys[layer])
    for x, y in zip(mapped, single):
      np.testing.assert_allclose(np.asarray(x[layer]), np.asarray(y), rtol=1e-5, atol=1e-5)
  if method in ("qr_core", "svd"):  # deterministic: batch axes give the same result as the loop
    batched = fn(a, b, 4)
    for x, y in zip(batched, mapped):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", squeeze.METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_round_trip(method, dtype):
  a, b = _factors(11, 24, 20, 8, dtype)
  a_t, b_t, s = squeeze.squeeze_factors(a, b, 3, method=method, key=jax.random.key(0))
  assert a_t.dtype == dtype and b_t.dtype == dtype and s.dtype == jnp.float32


def test_float64_inputs_stay_float64():
  a, b = _factors(12, 24, 20, 8)
  a_t, b_t, s = squeeze.qr_core(np.asarray(a, np.float64), np.asarray(b, np.float64), 3)
  assert a_t.dtype == np.float64 and b_t.dtype == np.float64 and s.dtype == np.float32


@pytest.mark.parametrize("method", squeeze.METHODS)
def test_all_zero_adapter_gives_zero_factors(method):
  a, _ = _factors(13, 30, 20, 8)
  b = jnp.zeros((8, 20), jnp.float32)
  a_t, b_t, s = squeeze.squeeze_factors(a, b, 4, method=method, key=jax.random.key(0))
  for x in (a_t, b_t, s):
    assert np.all(np.asarray(x) == 0.0)


@pytest.mark.parametrize("method", ["qr_core", "svd", "rsvd_factored"])
def test_target_rank_above_source_keeps_delta_w(method):
  a, b = _factors(14, 40, 30, 6)
  a_t, b_t, _ = squeeze.squeeze_factors(a, b, 10, method=method, key=jax.random.key(0))
  assert a_t.shape == (40, 10) and b_t.shape == (10, 30)
  np.testing.assert_allclose(_f64(a_t) @ _f64(b_t), _f64(a) @ _f64(b), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a_t)[:, 6:], 0.0)
  np.testing.assert_array_equal(np.asarray(b_t)[6:], 0.0)


def test_variance_retention_matches_numpy():
  s = np.array([4.0, 2.0, 1.0, 0.5])
  for r in range(1, 6):
    expected = np.sum(s[:r] ** 2) / np.sum(s**2)
    assert float(squeeze.variance_retention(s, r)) == pytest.approx(expected, rel=1e-6)
  assert float(squeeze.variance_retention(np.zeros(4), 2)) == 1.0


@settings
@hypothesis.given(
  st.lists(st.floats(0.0, 10.0), min_size=1, max_size=20),
  st.floats(0.01, 1.0),
)
def test_rank_for_energy_is_smallest_rank_reaching_tau(values, tau):
  s = np.sort(np.asarray(values))[::-1]
  r = squeeze.rank_for_energy(s, tau)
  retention = np.cumsum(s**2) / max(np.sum(s**2), 1e-300)
  assert 1 <= r <= len(s)
  if np.sum(s**2) > 0:
    assert retention[r - 1] >= tau - 1e-12
    assert r == 1 or retention[r - 2] < tau
  assert squeeze.rank_for_energy(s, tau, max_rank=1) == 1


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "4", None])
def test_bad_rank_is_named(rank):
  a, b = _factors(15, 8, 8, 4)
  with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank!r}"):
    squeeze.qr_core(a, b, rank)


def test_inner_rank_mismatch_is_named():
  with pytest.raises(ValueError, match=r"inner ranks differ: a has r=4 \(shape \(8, 4\)\) but b has r=5"):
    squeeze.qr_core(jnp.ones((8, 4)), jnp.ones((5, 8)), 2)


@pytest.mark.parametrize("method", squeeze.METHODS)
@pytest.mark.parametrize("operand", ["a", "b"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_named(method, operand, bad):
  a, b = (np.array(x) for x in _factors(16, 8, 8, 4))
  (a if operand == "a" else b)[1, 2] = bad
  with pytest.raises(ValueError, match=f"{operand} contains non-finite values"):
    squeeze.squeeze_factors(a, b, 2, method=method, key=jax.random.key(0))


def test_non_finite_batch_index_is_reported():
  a = np.ones((3, 8, 4), np.float32)
  a[2, 0, 0] = np.nan
  with pytest.raises(
    squeeze.NonFiniteError, match=r"a contains non-finite values \(NaN or Inf\) at batch index \(2,\)"
  ):
    squeeze.qr_core(a, np.ones((3, 4, 8), np.float32), 2)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_unsupported_dtype_is_named(dtype):
  with pytest.raises(ValueError, match=f"a has unsupported dtype {np.dtype(dtype).name}"):
    squeeze.qr_core(np.ones((8, 4), dtype), np.ones((4, 8), np.float32), 2)


def test_bad_method_core_and_missing_key():
  a, b = _factors(17, 8, 8, 4)
  with pytest.raises(ValueError, match="method must be one of .* got 'lsvd'"):
    squeeze.squeeze_factors(a, b, 2, method="lsvd")
  with pytest.raises(ValueError, match="core must be one of .* got 'eig'"):
    squeeze.qr_core(a, b, 2, core="eig")
  with pytest.raises(ValueError, match="method 'rsvd_factored' is randomized and needs a PRNG key"):
    squeeze.squeeze_factors(a, b, 2, method="rsvd_factored")
  with pytest.raises(ValueError, match="tau must be a number in"):
    squeeze.rank_for_energy(np.ones(3), 1.5)


# --------------------------------------------------------------------------------------------
# The float32-only path (precision="float32": Householder QR, no float64; what TPUs run).
# --------------------------------------------------------------------------------------------


@settings
@hypothesis.given(shapes)
def test_qr_core_float32_path_matches_numpy_svd(case):
  m, n, r_src, r_tgt, dtype, seed = case
  a, b = _factors(seed, m, n, r_src, dtype)
  a_t, b_t, s_all = squeeze.qr_core(a, b, r_tgt, precision="float32")
  s_ref = _reference(a, b)
  assert s_all.shape == (r_src,) and a_t.shape == (m, r_tgt) and b_t.shape == (r_tgt, n)
  assert a_t.dtype == dtype and b_t.dtype == dtype
  k = min(m, n, r_src)
  np.testing.assert_allclose(np.asarray(s_all)[:k], s_ref[:k], rtol=0, atol=2e-5 * s_ref[0] + 1e-30)
  np.testing.assert_allclose(np.asarray(s_all)[k:], 0.0, atol=2e-5 * s_ref[0] + 1e-30)
  storage = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}[dtype]
  error = np.linalg.norm(_f64(a_t) @ _f64(b_t) - _f64(a) @ _f64(b))
  assert abs(error - _optimal_error(s_ref, r_tgt)) <= storage * s_ref[0] * np.sqrt(min(r_tgt, r_src))


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("storage", [jnp.float32, jnp.bfloat16])
def test_qr_core_float32_path_exact_on_ill_conditioned_factors(cond, storage):
  # A float32 Gram matrix (CholeskyQR) would square cond and lose every singular value below
  # ~3e-4·σ₁ at cond > 3e3; the Householder QR keeps them to float32 accuracy.
  m, n, r = 300, 200, 32
  a = jnp.asarray(_ill_conditioned(0, m, r, cond), storage)
  b = jnp.asarray(_ill_conditioned(1, n, r, cond).T, storage)
  s_ref = _reference(a, b)
  for r_tgt in (1, 4, 16, 32):
    a_t, b_t, s_all = squeeze.qr_core(a, b, r_tgt, precision="float32")
    a64, b64, s64 = squeeze.qr_core(a, b, r_tgt, precision="float64")
    np.testing.assert_allclose(np.asarray(s_all), s_ref[:r], rtol=0, atol=2e-6 * s_ref[0])
    np.testing.assert_allclose(np.asarray(s_all), np.asarray(s64), rtol=0, atol=2e-6 * s_ref[0])
    if storage == jnp.float32:  # bf16 outputs round the factors themselves to 2^-8
      error = np.linalg.norm(_f64(a_t) @ _f64(b_t) - _f64(a) @ _f64(b))
      assert abs(error - _optimal_error(s_ref, r_tgt)) <= 1e-5 * s_ref[0]
      np.testing.assert_allclose(_f64(a_t) @ _f64(b_t), _f64(a64) @ _f64(b64), atol=1e-5 * s_ref[0])


def test_float32_path_has_no_float64_anywhere():
  # What makes it run on a TPU: the compiled computation holds no f64 value at all, while the
  # float64 path's does (the check can fail).
  a, b = _factors(18, 40, 30, 8)
  hlo = {}
  for precision in ("float32", "float64"):
    with jax.enable_x64(True):
      lowered = squeeze_qr_core.qr_core_jit.lower(
        a, b, None, rank=3, core="svd", oversample=10, power_iters=2, precision=precision
      )
    hlo[precision] = lowered.as_text()
  assert "f64" not in hlo["float32"]
  assert "f64" in hlo["float64"]


def test_float32_path_singular_values_and_all_zero_adapter():
  a, b = _factors(19, 50, 40, 10, decay=0.5)
  np.testing.assert_allclose(
    np.asarray(squeeze.singular_values(a, b, precision="float32")),
    _reference(a, b)[:10],
    rtol=0,
    atol=1e-6 * _reference(a, b)[0],
  )
  a_t, b_t, s = squeeze.qr_core(a, jnp.zeros_like(b), 4, precision="float32")
  for x in (a_t, b_t, s):
    assert np.all(np.asarray(x) == 0.0)
  with pytest.raises(squeeze.NonFiniteError, match="b contains non-finite values"):
    squeeze.qr_core(a, b.at[0, 0].set(jnp.inf), 4, precision="float32")


def test_resolve_precision():
  assert squeeze.resolve_precision("auto", backend="cpu") == "float64"
  assert squeeze.resolve_precision("auto", backend="gpu") == "float64"
  assert squeeze.resolve_precision("auto", backend="tpu") == "float32"
  assert squeeze.resolve_precision("float32", backend="cpu") == "float32"
  assert squeeze.resolve_precision("auto") == ("float64" if jax.default_backend() != "tpu" else "float32")
  a, b = _factors(20, 8, 8, 4)
  for call in (
    lambda: squeeze.qr_core(a, b, 2, precision="bf16"),
    lambda: squeeze.squeeze_factors(a, b, 2, method="svd", precision="bf16"),
  ):
    with pytest.raises(UserInputError, match=r"precision must be one of \('auto', 'float64', 'float32'\), got 'bf16'"):
      call()


def test_cli_precision_flag_forces_the_float32_path(tmp_path):
  a, b = _factors(21, 48, 40, 12, decay=0.7)
  path = "layer_0/mlp/_LoRAEinsum_linear/lora"
  np.savez(tmp_path / "in.npz", **{f"{path}/a": np.asarray(a), f"{path}/b": np.asarray(b)})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def cli(*args):
    return subprocess.run(
      [sys.executable, "-m", "lora_squeeze.cli", "squeeze", *args],
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )

  done = cli(str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), "--rank=3", "--precision=float32", "--quiet")
  assert done.returncode == 0, done.stderr[-2000:]
  out = np.load(tmp_path / "out.npz")
  a_t, b_t, _ = squeeze.qr_core(a, b, 3, precision="float32")
  np.testing.assert_allclose(out[f"{path}/a"], np.asarray(a_t), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out[f"{path}/b"], np.asarray(b_t), rtol=1e-6, atol=1e-7)
  bad = cli(str(tmp_path / "in.npz"), str(tmp_path / "bad.npz"), "--rank=3", "--precision=half")
  assert bad.returncode != 0 and "--precision" in bad.stderr and "float32" in bad.stderr
  assert not (tmp_path / "bad.npz").exists()


@settings
@hypothesis.given(st.integers(1, 9), st.integers(1, 4), st.integers(0, 2**16))
def test_canonical_signs_make_each_pairs_largest_entry_positive_and_keep_the_product(r_src, k, seed):
  rng = np.random.default_rng(seed)
  left = rng.standard_normal((2, r_src, k)).astype(np.float32)
  right = rng.standard_normal((2, k, r_src)).astype(np.float32)
  got_left, got_right = map(np.asarray, squeeze_qr_core.canonical_signs(jnp.asarray(left), jnp.asarray(right)))
  np.testing.assert_allclose(got_left @ got_right, left @ right, rtol=1e-6, atol=1e-6)
  largest = np.take_along_axis(got_left, np.argmax(np.abs(left), axis=-2)[..., None, :], axis=-2)
  assert np.all(largest > 0)
  # Only signs change, and a column of left flips with the same row of right.
  flips = np.sign(got_left[..., :1, :] / left[..., :1, :])[..., 0, :]
  np.testing.assert_array_equal(got_right, flips[..., :, None] * right)
