"""Tests of lora_squeeze.lora_tree on gemma-layout LoRA trees built here (shapes as in gemma 4.x)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import lora_tree, squeeze
from lora_squeeze.errors import UserInputError

D, HEADS, HEAD_DIM, HIDDEN = 16, 2, 8, 32


def _module(rng, in_dims, out_dims, r, dtype=jnp.float32, stack=()):
  a = rng.standard_normal((*stack, *in_dims, r))
  b = rng.standard_normal((*stack, r, *out_dims)) / np.sqrt(np.prod(out_dims))
  return {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}


def _layer(rng, r, dtype=jnp.float32, stack=(), r_mlp=None):
  """One Gemma 3 block's LoRA modules in the gemma 4.x layout (tiny dimensions)."""
  r_mlp = r if r_mlp is None else r_mlp
  return {
    "attn": {
      "q_einsum": {"_LoRAEinsum_0": {"lora": _module(rng, (D,), (HEADS, HEAD_DIM), r, dtype, stack)}},
      "kv_einsum": {"_LoRAEinsum_0": {"lora": _module(rng, (D,), (2, 1, HEAD_DIM), r, dtype, stack)}},
      "attn_vec_einsum": {"_LoRAEinsum_0": {"lora": _module(rng, (HEADS, HEAD_DIM), (D,), r, dtype, stack)}},
    },
    "mlp": {
      "_LoRAEinsum_gating_einsum": {"lora": _module(rng, (D,), (2, HIDDEN), r_mlp, dtype, stack)},
      "_LoRAEinsum_linear": {"lora": _module(rng, (HIDDEN,), (D,), r_mlp, dtype, stack)},
    },
  }


def _tree(n_layers=3, r=8, dtype=jnp.float32, seed=0, r_mlp=None):
  rng = np.random.default_rng(seed)
  return {f"layer_{i}": _layer(rng, r, dtype, r_mlp=r_mlp) for i in range(n_layers)}


def _delta(module):
  a, b = np.asarray(module["a"], np.float64), np.asarray(module["b"], np.float64)
  r = a.shape[-1]
  return a.reshape(-1, r) @ b.reshape(r, -1)


def test_find_lora_modules_paths_in_natural_order():
  tree = _tree(n_layers=11)
  tree["embedder"] = {"input_embedding": jnp.ones((4, D))}
  paths = list(lora_tree.find_lora_modules(tree))
  assert len(paths) == 55
  assert paths[:5] == [
    "layer_0/attn/attn_vec_einsum/_LoRAEinsum_0/lora",
    "layer_0/attn/kv_einsum/_LoRAEinsum_0/lora",
    "layer_0/attn/q_einsum/_LoRAEinsum_0/lora",
    "layer_0/mlp/_LoRAEinsum_gating_einsum/lora",
    "layer_0/mlp/_LoRAEinsum_linear/lora",
  ]
  assert paths[-1] == "layer_10/mlp/_LoRAEinsum_linear/lora"
  assert paths.index("layer_2/attn/attn_vec_einsum/_LoRAEinsum_0/lora") < paths.index(
    "layer_10/attn/attn_vec_einsum/_LoRAEinsum_0/lora"
  )


@pytest.mark.parametrize("method", squeeze.METHODS)
def test_squeeze_tree_matches_per_module_squeeze(method):
  tree = _tree()
  tree["final_norm"] = {"scale": jnp.ones(D)}
  new, report = lora_tree.squeeze_tree(tree, 3, method=method, key=jax.random.key(0))
  assert new["final_norm"]["scale"] is tree["final_norm"]["scale"]
  old_modules, new_modules = lora_tree.find_lora_modules(tree), lora_tree.find_lora_modules(new)
  assert list(old_modules) == list(new_modules)
  for path, module in old_modules.items():
    squeezed = new_modules[path]
    assert squeezed["a"].shape == (*module["a"].shape[:-1], 3)
    assert squeezed["b"].shape == (3, *module["b"].shape[1:])
    s_ref = np.linalg.svd(_delta(module), compute_uv=False)
    error = np.linalg.norm(_delta(squeezed) - _delta(module))
    tol = 1e-3 if method.startswith("rsvd") else 1e-5  # flat random spectra: RSVD is approximate
    assert abs(error - np.sqrt(np.sum(s_ref[3:] ** 2))) <= tol * s_ref[0]
  for entry in report.modules:
    s_ref = np.linalg.svd(_delta(old_modules[entry.path]), compute_uv=False)[:8]
    np.testing.assert_allclose(entry.singular_values, s_ref, rtol=1e-4)
    assert (entry.r_src, entry.r_tgt) == (8, 3)
    assert entry.retention == pytest.approx(float(squeeze.variance_retention(s_ref, 3)), rel=1e-4)


def test_overall_retention_is_energy_weighted():
  _, report = lora_tree.squeeze_tree(_tree(), 2)
  kept = sum(np.sum(np.square(m.singular_values[:2].astype(np.float64))) for m in report.modules)
  total = sum(np.sum(np.square(m.singular_values.astype(np.float64))) for m in report.modules)
  assert report.overall_retention == pytest.approx(kept / total, rel=1e-9)
  rows = report.to_rows()
  assert rows[0]["path"] == report.modules[0].path and len(rows[0]["singular_values"]) == 8


def test_retention_curve_matches_overall_retention_at_every_rank():
  rng = np.random.default_rng(3)
  tree = {"layer_0": _layer(rng, 6, r_mlp=3), "layer_1": _layer(rng, 6)}
  curve = lora_tree.squeeze_tree(tree, 1)[1].retention_curve()
  assert curve.shape == (6,) and curve[-1] == pytest.approx(1.0)
  assert np.all(np.diff(curve) >= -1e-12)
  for r in range(1, 7):  # the r_mlp = 3 modules keep everything from r = 3 on
    assert curve[r - 1] == pytest.approx(lora_tree.squeeze_tree(tree, r)[1].overall_retention, rel=1e-6)
  stacked = {"layers": _layer(rng, 4, stack=(3,))}
  stacked_curve = lora_tree.squeeze_tree(stacked, 1, stack_axes=1)[1].retention_curve()
  assert stacked_curve[1] == pytest.approx(
    lora_tree.squeeze_tree(stacked, 2, stack_axes=1)[1].overall_retention, rel=1e-6
  )
  zeros = jax.tree.map(jnp.zeros_like, tree)
  np.testing.assert_array_equal(lora_tree.squeeze_tree(zeros, 2)[1].retention_curve(), np.ones(6))


def test_rank_rules_first_match_wins_and_default():
  rules = lora_tree.RankRules(rules=((r"/mlp/", 5), (r"q_einsum", 2)), default=4)
  new, report = lora_tree.squeeze_tree(_tree(), rules)
  ranks = {m.path: m.r_tgt for m in report.modules}
  assert ranks["layer_1/mlp/_LoRAEinsum_linear/lora"] == 5
  assert ranks["layer_1/attn/q_einsum/_LoRAEinsum_0/lora"] == 2
  assert ranks["layer_1/attn/kv_einsum/_LoRAEinsum_0/lora"] == 4
  assert new["layer_2"]["mlp"]["_LoRAEinsum_gating_einsum"]["lora"]["a"].shape == (D, 5)


def test_rank_rules_without_match_name_the_module():
  rules = lora_tree.RankRules(rules=((r"/mlp/", 5),))
  with pytest.raises(ValueError, match="layer_0/attn/attn_vec_einsum/_LoRAEinsum_0/lora: no rank rule matches"):
    lora_tree.squeeze_tree(_tree(), rules)


def test_energy_rank_gives_one_homogeneous_rank():
  tree = _tree(r=8, r_mlp=12)  # heterogeneous source ranks
  target = lora_tree.EnergyRank(tau=0.9)
  new, report = lora_tree.squeeze_tree(tree, target)
  ranks = {m.r_tgt for m in report.modules}
  assert len(ranks) == 1
  (r,) = ranks
  needed = [squeeze.rank_for_energy(m.singular_values, 0.9) for m in report.modules]
  assert r == max(needed)
  assert min(m.retention for m in report.modules) >= 0.9
  for module in lora_tree.find_lora_modules(new).values():
    assert module["a"].shape[-1] == r
  _, capped = lora_tree.squeeze_tree(tree, lora_tree.EnergyRank(tau=0.9, max_rank=2))
  assert {m.r_tgt for m in capped.modules} == {2}


def test_stacked_layers_equal_unstacked():
  rng = np.random.default_rng(3)
  stacked = _layer(rng, 6, stack=(4,))
  new_stacked, report = lora_tree.squeeze_tree(stacked, 2, stack_axes=1)
  for path, module in lora_tree.find_lora_modules(stacked).items():
    out = lora_tree.find_lora_modules(new_stacked)[path]
    for layer in range(4):
      single = {"x": {"a": module["a"][layer], "b": module["b"][layer]}}
      expected = lora_tree.squeeze_tree(single, 2)[0]["x"]
      np.testing.assert_allclose(np.asarray(out["a"][layer]), np.asarray(expected["a"]), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(out["b"][layer]), np.asarray(expected["b"]), rtol=1e-5, atol=1e-6)
  assert report.modules[0].singular_values.shape == (4, 6)


def test_bf16_tree_round_trip():
  new, _ = lora_tree.squeeze_tree(_tree(dtype=jnp.bfloat16), 4)
  for module in lora_tree.find_lora_modules(new).values():
    assert module["a"].dtype == jnp.bfloat16 and module["b"].dtype == jnp.bfloat16


def test_inner_rank_mismatch_names_the_module():
  tree = _tree()
  tree["layer_1"]["attn"]["q_einsum"]["_LoRAEinsum_0"]["lora"]["b"] = jnp.ones((5, HEADS, HEAD_DIM))
  with pytest.raises(ValueError, match=r"layer_1/attn/q_einsum/_LoRAEinsum_0/lora: inner ranks differ: a has r=8"):
    lora_tree.squeeze_tree(tree, 2)


def test_non_finite_names_the_module():
  tree = _tree()
  b = np.array(tree["layer_2"]["mlp"]["_LoRAEinsum_linear"]["lora"]["b"])
  b[0, 0] = np.inf
  tree["layer_2"]["mlp"]["_LoRAEinsum_linear"]["lora"]["b"] = b
  with pytest.raises(ValueError, match=r"layer_2/mlp/_LoRAEinsum_linear/lora: b contains non-finite values"):
    lora_tree.squeeze_tree(tree, 2)


def test_unsupported_dtype_names_the_module():
  tree = _tree()
  tree["layer_0"]["mlp"]["_LoRAEinsum_linear"]["lora"]["a"] = np.ones((HIDDEN, 8), np.int32)
  with pytest.raises(ValueError, match=r"layer_0/mlp/_LoRAEinsum_linear/lora: a has unsupported dtype int32"):
    lora_tree.squeeze_tree(tree, 2)


@pytest.mark.parametrize("rank", [0, 2.0, "8", True])
def test_bad_rank_is_named(rank):
  with pytest.raises(ValueError, match="rank must be a positive int"):
    lora_tree.squeeze_tree(_tree(), rank)


def test_bad_energy_target_and_rules():
  with pytest.raises(ValueError, match=r"tau must be a number in \(0, 1\], got 0"):
    lora_tree.EnergyRank(tau=0)
  with pytest.raises(ValueError, match=r"rank of rule 'mlp' must be a positive integer, got -1"):
    lora_tree.RankRules(rules=(("mlp", -1),))
  with pytest.raises(ValueError, match=r"method must be one of"):
    lora_tree.squeeze_tree(_tree(), 2, method="pca")


def test_float32_path_equals_float64_path_on_a_tree():
  tree = _tree(n_layers=3, r=8, dtype=jnp.float32, seed=5)
  out64, rep64 = lora_tree.squeeze_tree(tree, 3, precision="float64")
  out32, rep32 = lora_tree.squeeze_tree(tree, 3, precision="float32")
  for path, module in lora_tree.find_lora_modules(out32).items():
    ref = lora_tree.find_lora_modules(out64)[path]
    scale = np.linalg.norm(_delta(lora_tree.find_lora_modules(tree)[path]), 2)
    np.testing.assert_allclose(_delta(module), _delta(ref), atol=2e-6 * scale)
  for m32, m64 in zip(rep32.modules, rep64.modules):
    np.testing.assert_allclose(m32.singular_values, m64.singular_values, atol=2e-6 * m64.singular_values[0])
  with pytest.raises(UserInputError, match=r"precision must be one of .* got 'half'"):
    lora_tree.squeeze_tree(tree, 3, precision="half")


def test_qr_core_tree_is_one_compiled_call():
  # Every group of equal-shaped modules of the tree runs in one compiled call: a new tree layout
  # compiles once, and squeezing it again compiles nothing.
  tree = _tree(n_layers=4, r=8, seed=6)
  before = lora_tree._qr_core_all_jit._cache_size()
  first, _ = lora_tree.squeeze_tree(tree, 5)
  after_first = lora_tree._qr_core_all_jit._cache_size()
  again, _ = lora_tree.squeeze_tree(_tree(n_layers=4, r=8, seed=7), 5)
  assert after_first == before + 1
  assert lora_tree._qr_core_all_jit._cache_size() == after_first
  # ... and its result is the per-group batched squeeze (squeeze.qr_core on the stacked group).
  path = "layer_1/mlp/_LoRAEinsum_gating_einsum/lora"
  module = lora_tree.find_lora_modules(tree)[path]
  a_t, b_t, _ = squeeze.qr_core(module["a"], module["b"].reshape(8, -1), 5)
  np.testing.assert_allclose(
    np.asarray(first["layer_1"]["mlp"]["_LoRAEinsum_gating_einsum"]["lora"]["a"]), np.asarray(a_t), rtol=1e-5, atol=1e-6
  )


_SHARDED_SCRIPT = r"""
import json
import jax
import numpy as np
from lora_squeeze import lora_tree, sharding

assert jax.device_count() == 8
rng = np.random.default_rng(0)
def module(in_dims, out_dims, r):
    return {"a": rng.standard_normal((*in_dims, r)).astype(np.float32),
            "b": (rng.standard_normal((r, *out_dims)) / 8).astype(np.float32)}
tree = {f"layer_{i}": {"attn": {"q_einsum": {"_LoRAEinsum_0": {"lora": module((64,), (4, 16), 16)}}},
                       "mlp": {"_LoRAEinsum_linear": {"lora": module((128,), (64,), 16)}}} for i in range(3)}
mesh = sharding.make_mesh(data=1, fsdp=8)
sharded = sharding.shard_params(jax.tree.map(jax.numpy.asarray, tree), mesh, min_size=0)
inputs_sharded = all(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
result = {"inputs_sharded": inputs_sharded, "max_diff": {}, "outputs_sharded": {}}
for precision in ("float64", "float32"):
    ref, ref_report = lora_tree.squeeze_tree(tree, 4, precision=precision)  # one device, unsharded
    # Any implicit device->host transfer (np.asarray of a factor) is an error in here; only the
    # explicit jax.device_get of the (..., r_src) spectra and finiteness flags is allowed.
    with jax.transfer_guard("disallow"):
        out, report = lora_tree.squeeze_tree(sharded, 4, precision=precision)
    result["max_diff"][precision] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                                        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    result["spectra_diff_" + precision] = max(float(np.max(np.abs(m.singular_values - n.singular_values)))
                                              for m, n in zip(report.modules, ref_report.modules))
    # A factor sharded along its rank axis (b (16, 4, 16): fsdp on the first of its largest dims)
    # cannot keep 8 shards at rank 4: the runner re-shards after the squeeze.
    on_rank = [tuple(x.sharding.spec)[-1 if name == "a" else 0:][:1] == ("fsdp",)
               for path, x in jax.tree_util.tree_leaves_with_path(sharded) for name in [path[-1].key]]
    result["outputs_sharded"][precision] = [
        (len(x.sharding.device_set), x.sharding.is_fully_replicated, rank_axis)
        for x, rank_axis in zip(jax.tree.leaves(out), on_rank)]
# The compiled tree squeeze reduces the Gram matrices across the shards on the devices.
modules = [lora_tree._as_matrices(p, m, 0) for p, m in lora_tree.find_lora_modules(sharded).items()]
ranks = {m.path: 4 for m in modules}
groups = lora_tree._group_by_shape(modules, ranks)
arrays = tuple(tuple((m.raw_a, m.raw_b) for m in g) for g in groups)
with jax.enable_x64(True):
    hlo = lora_tree._qr_core_all_jit.lower(arrays, layout=lora_tree._layout(groups, ranks),
                                            precision="float64").compile().as_text()
result["all_reduce"] = "all-reduce" in hlo
result["host_callback"] = "callback" in hlo
print(json.dumps(result))
"""


def test_squeeze_tree_on_a_sharded_tree_stays_on_the_devices():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["inputs_sharded"]
  # Sharded float32 sums run in another order than the single-device ones: float32 rounding.
  for precision, tolerance in (("float64", 1e-6), ("float32", 1e-4)):
    assert result["max_diff"][precision] <= tolerance, result
    assert result["spectra_diff_" + precision] <= tolerance, result
    assert all(devices == 8 for devices, _, _ in result["outputs_sharded"][precision]), result
  # float64: every squeezed factor stays sharded (but those sharded along the rank axis). float32:
  # XLA:CPU cannot partition the LAPACK QR call, so it all-gathers that factor on each device
  # (on the devices, not on the host).
  assert not any(replicated and not rank_axis for _, replicated, rank_axis in result["outputs_sharded"]["float64"]), (
    result
  )
  assert sum(not replicated for _, replicated, _ in result["outputs_sharded"]["float64"]) >= 9, result
  assert result["all_reduce"] and not result["host_callback"]
