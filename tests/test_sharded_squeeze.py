"""sharded_squeeze.squeeze_on_mesh: the squeeze inside a run, on factors split over the mesh.

It must equal the unsharded lora_tree.squeeze_tree (every method and precision), place every
factor as sharding.param_shardings says, and keep qr_core's factors split: in float64 the
compiled program's only collectives are all-reduces of r_src × r_src Gram matrices, in float32
(the TPU path, a TSQR) all-gathers of the per-device r_src × r_src R blocks. The 2-device cases
run in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=2); the 2-process case is
in tests/test_multiprocess.py.
"""

import json
import logging
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from lora_squeeze import lora_tree, sharding, sharded_squeeze

ROOT = pathlib.Path(__file__).resolve().parent.parent
R_SRC, R_TGT = 8, 3
# in_dims, out_dims of the gemma modules, with split dimensions that are not the first one
# (o: a (heads, head_dim, r); q: b (r, heads, head_dim)).
SHAPES = {"q": ((64,), (2, 96)), "o": ((2, 96), (64,)), "gating": ((64,), (2, 128)), "linear": ((128,), (64,))}
CONDITIONS = (1e2, 1e3, 1e4, 1e5, 1e6)


def gemma_like_adapter(seed: int, *, layers: int = 2, dtype=np.float32) -> dict:
  """Random factors in the gemma LoRA layout (SHAPES) with a decaying spectrum."""
  rng = np.random.default_rng(seed)
  scale = 0.7 ** np.arange(R_SRC)
  adapter = {}
  for layer in range(layers):
    for name, (in_dims, out_dims) in SHAPES.items():
      a = rng.standard_normal((*in_dims, R_SRC)) * scale
      b = rng.standard_normal((R_SRC, *out_dims))
      adapter.setdefault(f"layer_{layer}", {})[name] = {"lora": {"a": a.astype(dtype), "b": b.astype(dtype)}}
  return adapter


def conditioned_adapter(seed: int, cond: float, *, dtype=np.float32) -> dict:
  """Like gemma_like_adapter (2 layers), but a and b each have singular values logspaced over
  [1/cond, 1] in random directions, so a @ b has a condition number up to cond²."""
  rng = np.random.default_rng(seed)
  scale = np.logspace(0, -np.log10(cond), R_SRC)

  def factor(rows: int) -> np.ndarray:  # (rows, R_SRC) with singular values `scale`
    left = np.linalg.qr(rng.standard_normal((rows, R_SRC)))[0]
    right = np.linalg.qr(rng.standard_normal((R_SRC, R_SRC)))[0]
    return (left * scale) @ right.T

  adapter = {}
  for layer in range(2):
    for name, (in_dims, out_dims) in SHAPES.items():
      a = factor(math.prod(in_dims)).reshape(*in_dims, R_SRC)
      b = factor(math.prod(out_dims)).T.reshape(R_SRC, *out_dims)
      adapter.setdefault(f"layer_{layer}", {})[name] = {"lora": {"a": a.astype(dtype), "b": b.astype(dtype)}}
  return adapter


def balanced_adapter(seed: int) -> dict:
  """gemma_like_adapter(seed) squeezed to R_TGT (float32 path), as numpy: aᵀa = b bᵀ = diag(σ), so a
  second squeeze sees a core M that is diagonal up to rounding (where the SVD's signs hinged on
  rounding-level values before squeeze_qr_core.canonical_signs)."""
  squeezed, _ = lora_tree.squeeze_tree(gemma_like_adapter(seed), R_TGT, precision="float32")
  return jax.tree.map(np.asarray, squeezed)


def max_rel_diff(got, want) -> float:
  """The largest |got − want| over the leaves, relative to each leaf's largest |want| (float64)."""
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want))
  )


_SCRIPT = r"""
import glob, json, re, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_sharded_squeeze import CONDITIONS, R_TGT, balanced_adapter, conditioned_adapter, gemma_like_adapter, max_rel_diff
from lora_squeeze import lora_tree, sharding, sharded_squeeze

COLLECTIVE = re.compile(r"= (\([^)]*\)|\S+) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)\(")
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}
mesh = sharding.make_mesh(data=1, fsdp=2)
result = {"cases": [], "conditioned": []}
cases = [("qr_core", "float64", "float32"), ("qr_core", "float32", "float32"), ("qr_core", "float64", "bfloat16"),
         ("qr_core", "float32", "bfloat16"), ("rsvd_factored", "float64", "float32")]
for method, precision, dtype in cases:
  host = gemma_like_adapter(0, dtype=DTYPES[dtype])
  placed = sharding.shard_params(host, mesh, min_size=1)
  key = jax.random.key(5)
  if precision == "float32":  # compiled first: squeeze_on_mesh then runs this very program
    text = sharded_squeeze.compile_on_mesh(
      placed, R_TGT, mesh=mesh, method=method, precision=precision, min_shard_size=1).as_text()
    result.setdefault("float32_f64_values", {})[dtype] = text.count("f64[")
    result.setdefault("float32_collectives", {})[dtype] = [
      [re.sub(r"\{[^}]*\}|/\*[^*]*\*/| ", "", shape), op] for shape, op in COLLECTIVE.findall(text)]
  want, want_report = lora_tree.squeeze_tree(host, R_TGT, method=method, key=key, precision=precision)
  got, got_report = sharded_squeeze.squeeze_on_mesh(
    placed, R_TGT, mesh=mesh, method=method, key=key, precision=precision, min_shard_size=1)
  expected = jax.tree.leaves(sharding.param_shardings(got, mesh, min_size=1))
  leaves = jax.tree.leaves(got)
  result["cases"].append({
    "method": method, "precision": precision, "dtype": dtype,
    "inputs_split": sum(len(x.sharding.device_set) == 2 and not x.sharding.is_fully_replicated
                        for x in jax.tree.leaves(placed)),
    "outputs_split": sum(not x.sharding.is_fully_replicated for x in leaves),
    "shardings_as_declared": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, expected)),
    "dtypes": sorted({str(x.dtype) for x in leaves}),
    "structure_equal": jax.tree.structure(got) == jax.tree.structure(want),
    "shapes_equal": [x.shape for x in leaves] == [y.shape for y in jax.tree.leaves(want)],
    "max_rel_diff": max_rel_diff(leaves, want),
    "retention": [got_report.overall_retention, want_report.overall_retention],
    "paths_equal": [m.path for m in got_report.modules] == [m.path for m in want_report.modules],
    "spectra_rel_diff": max(
      float(np.max(np.abs(g.singular_values - w.singular_values)) / np.max(w.singular_values))
      for g, w in zip(got_report.modules, want_report.modules)),
  })
  if (method, precision, dtype) == ("qr_core", "float64", "float32"):
    again, _ = sharded_squeeze.squeeze_on_mesh(
      got, 2, mesh=mesh, method=method, precision=precision, min_shard_size=1)  # r 3 -> 2: a second layout
    result["second_squeeze_split"] = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(again))

def matrices(adapter):  # path -> (a (m, r), b (r, n)) in float64
  return {path: (np.asarray(m["a"], np.float64).reshape(-1, m["a"].shape[-1]),
                 np.asarray(m["b"], np.float64).reshape(m["b"].shape[0], -1))
          for path, m in lora_tree.find_lora_modules(adapter).items()}

for dtype in DTYPES:
  for cond in CONDITIONS:
    host = conditioned_adapter(7, cond, dtype=DTYPES[dtype])
    got, got_report = sharded_squeeze.squeeze_on_mesh(
      sharding.shard_params(host, mesh, min_size=1), R_TGT, mesh=mesh, precision="float32", min_shard_size=1)
    spectra = {m.path: m.singular_values for m in got_report.modules}
    exact = {path: np.linalg.svd(a @ b, compute_uv=False)[: a.shape[1]] for path, (a, b) in matrices(host).items()}
    row = {"dtype": dtype, "cond": cond, "split": sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(got))}
    row["spectrum_vs_exact"] = max(float(np.max(np.abs(spectra[p] - s)) / s[0]) for p, s in exact.items())
    for precision in ("float32", "float64"):
      want, want_report = lora_tree.squeeze_tree(host, R_TGT, precision=precision)
      products = {p: a @ b for p, (a, b) in matrices(want).items()}
      row[f"product_vs_{precision}"] = max(
        float(np.linalg.norm(a @ b - products[p]) / exact[p][0]) for p, (a, b) in matrices(got).items())
      row[f"spectrum_vs_{precision}"] = max(
        float(np.max(np.abs(spectra[m.path] - m.singular_values)) / exact[m.path][0]) for m in want_report.modules)
    result["conditioned"].append(row)

# An adapter a squeeze has just balanced (aᵀa = b bᵀ = diag(σ)), squeezed again: its core M is
# diagonal up to rounding, the case where the SVD's signs hinged on rounding-level values.
for seed in range(3):
  balanced = balanced_adapter(seed)
  got, _ = sharded_squeeze.squeeze_on_mesh(
    sharding.shard_params(balanced, mesh, min_size=1), 2, mesh=mesh, precision="float32", min_shard_size=1)
  for precision in ("float32", "float64"):
    result.setdefault("balanced", []).append(max_rel_diff(got, lora_tree.squeeze_tree(balanced, 2, precision=precision)[0]))

collectives = []
for path in glob.glob(sys.argv[1] + "/*jit_sharded_squeeze*after_optimizations.txt"):
  text = open(path).read()
  programs = len(re.findall(r"\bENTRY\b", text))
  for shape, op in re.findall(r"= ([a-z0-9]+\[[0-9,]*\])\S* (all-gather|all-to-all|collective-permute|all-reduce|"
                              r"reduce-scatter)\(", text):
    collectives.append([path.rsplit("/", 1)[-1], shape, op])
  collectives.extend([[path.rsplit("/", 1)[-1], str(programs), "programs"]])
result["collectives"] = collectives
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
  dump = tmp_path_factory.mktemp("xla_dump")
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": (
      f"--xla_force_host_platform_device_count=2 --xla_dump_to={dump} --xla_dump_hlo_pass_re=^$ "
      "--xla_dump_hlo_module_re=.*sharded_squeeze.*"
    ),
  }
  done = subprocess.run(
    ["timeout", "-s", "KILL", "600", sys.executable, "-c", _SCRIPT, str(dump)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=630,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_equals_the_unsharded_squeeze_for_every_method_and_keeps_the_declared_shardings(two_devices):
  assert len(two_devices["cases"]) == 5
  for case in two_devices["cases"]:
    name = f"{case['method']}/{case['precision']}/{case['dtype']}"
    assert case["inputs_split"] == 16, name  # every factor of the 8 modules is split over both devices
    assert case["structure_equal"] and case["shapes_equal"] and case["paths_equal"], name
    assert case["shardings_as_declared"], name
    assert case["outputs_split"] >= 14, (name, case["outputs_split"])  # all but b (3, 64) of "o", "linear"
    assert case["dtypes"] == [case["dtype"]], name
    # Sharded sums add in another order: float32 (bfloat16 storage: one rounding) apart.
    tolerance = {"float32": 2e-5, "bfloat16": 1e-2}[case["dtype"]]
    assert case["max_rel_diff"] <= tolerance, (name, case["max_rel_diff"])
    assert case["spectra_rel_diff"] <= 2e-5, (name, case["spectra_rel_diff"])
    np.testing.assert_allclose(*case["retention"], rtol=1e-6, err_msg=name)
  assert two_devices["second_squeeze_split"] >= 14


def test_qr_core_float64_only_all_reduces_the_gram_matrices(two_devices):
  programs = [c for c in two_devices["collectives"] if c[2] == "programs"]
  # One compiled program per squeeze layout, precision and storage (qr_core: 2 layouts in float64
  # and float32 storage, one for bfloat16; float32 in both storages, and its balanced re-squeeze
  # r 3 -> 2; rsvd_factored one).
  assert len(programs) == 7, programs
  by_program = {}
  for name, shape, op in two_devices["collectives"]:
    if op != "programs":
      by_program.setdefault(name, []).append((shape, op))
  clean = [
    ops
    for ops in by_program.values()
    if ops and all(op == "all-reduce" and re.fullmatch(r"f64\[\d+,\d+\]", shape) for shape, op in ops)
  ]
  # The float64 qr_core programs (r 8 -> 3, then 3 -> 2; float32 and bfloat16 storage): nothing but
  # r_src x r_src float64 all-reduces, 2 per shape group (a and b).
  assert len(clean) >= 3, by_program
  for ops in clean:
    assert {shape for shape, _ in ops} <= {f"f64[{R_SRC},{R_SRC}]", "f64[3,3]"}, ops
    assert len(ops) == 8, ops  # 4 shape groups (q, o, gating, linear), a and b


def test_qr_core_float32_only_gathers_the_r_blocks_of_its_tsqr(two_devices):
  # The float32 (TPU) path: each device's r_src x r_src R block of a and of bᵀ, stacked
  # (2 modules per shape group, 2 devices x r_src rows); the stacked factors (2, 64..192, 8) never.
  assert two_devices["float32_f64_values"] == {"float32": 0, "bfloat16": 0}  # a TPU has no float64
  for dtype, ops in two_devices["float32_collectives"].items():
    gathers = [shape for shape, op in ops if op == "all-gather"]
    assert gathers == [f"f32[2,{2 * R_SRC},{R_SRC}]"] * 8, (dtype, ops)  # 4 shape groups, a and b
    # The rest: the finiteness flags of the factors (one all-reduce of booleans).
    others = [(shape, op) for shape, op in ops if op != "all-gather"]
    assert others and all(
      op == "all-reduce" and re.fullmatch(r"\(?(pred\[\d+\],?)+\)?", shape) for shape, op in others
    ), (
      dtype,
      others,
    )


def test_qr_core_float32_on_the_mesh_equals_both_unsharded_paths_at_any_condition(two_devices):
  rows = two_devices["conditioned"]
  assert [(r["dtype"], r["cond"]) for r in rows] == [(d, c) for d in ("float32", "bfloat16") for c in CONDITIONS]
  for row in rows:
    name = f"{row['dtype']} cond {row['cond']:g}"
    assert row["split"] >= 14, name
    # Singular values (all r_src, float32 arithmetic on the stored values): to ~1e-6·σ₁ of the
    # float64 SVD of the stored a @ b, and of both unsharded paths.
    for key in ("spectrum_vs_exact", "spectrum_vs_float32", "spectrum_vs_float64"):
      assert row[key] <= 2e-6, (name, key, row[key])
    # a_t @ b_t (rank 3), ‖·‖_F / σ₁: float32 rounding; in bfloat16 storage one rounding of the factors (2^-8).
    tolerance = {"float32": 1e-5, "bfloat16": 4e-3}[row["dtype"]]
    for key in ("product_vs_float32", "product_vs_float64"):
      assert row[key] <= tolerance, (name, key, row[key])


def test_resqueezing_a_balanced_adapter_on_the_mesh_gives_the_unsharded_factors_with_their_signs(two_devices):
  # Factors, not products: without squeeze_qr_core.canonical_signs these differ by 1.7..2.0 (a
  # column of a_t and the row of b_t flipped together), the 2-process check's 0.088 of session 22.
  assert len(two_devices["balanced"]) == 6
  assert max(two_devices["balanced"]) <= 1e-5, two_devices["balanced"]


def test_resqueezing_a_balanced_adapter_gives_the_same_factors_in_both_precisions():
  # The same case on one device: without canonical_signs float32 and float64 flipped singular
  # pairs against each other (seeds 0..2: factors 2.0, 1.6, 2.0 apart; equal products).
  for seed in range(3):
    balanced = balanced_adapter(seed)
    got, _ = lora_tree.squeeze_tree(balanced, 2, precision="float32")
    want, _ = lora_tree.squeeze_tree(balanced, 2, precision="float64")
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5 * float(np.max(np.abs(y))))


def test_one_device_equals_the_unsharded_squeeze():
  host = gemma_like_adapter(1, layers=1)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  got, report = sharded_squeeze.squeeze_on_mesh(host, R_TGT, mesh=mesh)
  want, want_report = lora_tree.squeeze_tree(host, R_TGT)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  assert report.overall_retention == pytest.approx(want_report.overall_retention, rel=1e-9)
  assert report.retention_curve().tolist() == pytest.approx(want_report.retention_curve().tolist(), rel=1e-9)


def test_bad_input_names_the_value():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  host = gemma_like_adapter(2, layers=1)
  with pytest.raises(
    ValueError, match=r"^method must be one of \('qr_core', 'rsvd', 'rsvd_factored', 'svd'\), got 'qr'"
  ):
    sharded_squeeze.squeeze_on_mesh(host, 2, mesh=mesh, method="qr")
  with pytest.raises(ValueError, match=r"rank must be a positive integer, got 0"):
    sharded_squeeze.squeeze_on_mesh(host, 0, mesh=mesh)
  with pytest.raises(ValueError, match=r"^method 'rsvd' is randomized and needs a PRNG key, got key=None$"):
    sharded_squeeze.squeeze_on_mesh(host, 2, mesh=mesh, method="rsvd")
  with pytest.raises(ValueError, match=r"precision"):
    sharded_squeeze.squeeze_on_mesh(host, 2, mesh=mesh, precision="float16")
  host["layer_0"]["o"]["lora"]["b"][1, 5] = np.nan
  with pytest.raises(ValueError, match=r"^layer_0/o/lora: b contains non-finite values \(NaN or Inf\)$"):
    sharded_squeeze.squeeze_on_mesh(host, 2, mesh=mesh)
  bad = {"m": {"a": np.zeros((4, 3), np.float32), "b": np.zeros((2, 4), np.float32)}}
  with pytest.raises(ValueError, match=r"^m: inner ranks differ"):
    sharded_squeeze.squeeze_on_mesh(bad, 1, mesh=mesh)


def test_compile_on_mesh_compiles_what_squeeze_on_mesh_then_runs(caplog):
  host = gemma_like_adapter(3, layers=1)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])

  def compiled_squeezes():
    return sum("XLA compilation of jit(sharded_squeeze)" in r.getMessage() for r in caplog.records)

  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    for rank, method, key in ((4, "qr_core", None), (4, "rsvd_factored", jax.random.key(2))):
      before = compiled_squeezes()
      sharded_squeeze.compile_on_mesh(abstract, rank, mesh=mesh, method=method, key=key)
      assert compiled_squeezes() == before + 1, method
      sharded_squeeze.squeeze_on_mesh(host, rank, mesh=mesh, method=method, key=key)
      assert compiled_squeezes() == before + 1, method  # found compiled
