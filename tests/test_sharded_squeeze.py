"""sharded_squeeze.squeeze_on_mesh: the squeeze inside a run, on factors split over the mesh.

It must equal the unsharded lora_tree.squeeze_tree (every method and precision), place every
factor as sharding.param_shardings says, and (qr_core, float64) keep the factors split: the
compiled program's only collectives are all-reduces of r_src × r_src Gram matrices. The 2-device
cases run in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=2); the 2-process
case is in tests/test_multiprocess.py.
"""

import json
import logging
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


def gemma_like_adapter(seed: int, *, layers: int = 2, dtype=np.float32) -> dict:
  """Random factors in the gemma LoRA layout, with split dimensions that are not the first one
  (o: a (heads, head_dim, r); q: b (r, heads, head_dim)) and a decaying spectrum."""
  rng = np.random.default_rng(seed)
  shapes = {"q": ((64,), (2, 96)), "o": ((2, 96), (64,)), "gating": ((64,), (2, 128)), "linear": ((128,), (64,))}
  scale = 0.7 ** np.arange(R_SRC)
  adapter = {}
  for layer in range(layers):
    for name, (in_dims, out_dims) in shapes.items():
      a = rng.standard_normal((*in_dims, R_SRC)) * scale
      b = rng.standard_normal((R_SRC, *out_dims))
      adapter.setdefault(f"layer_{layer}", {})[name] = {"lora": {"a": a.astype(dtype), "b": b.astype(dtype)}}
  return adapter


_SCRIPT = r"""
import glob, json, re, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_sharded_squeeze import gemma_like_adapter, R_TGT
from lora_squeeze import lora_tree, sharding, sharded_squeeze

mesh = sharding.make_mesh(data=1, fsdp=2)
result = {"cases": []}
cases = [("qr_core", "float64", "float32"), ("qr_core", "float32", "float32"), ("qr_core", "float64", "bfloat16"),
         ("rsvd_factored", "float64", "float32")]
for method, precision, dtype in cases:
  host = gemma_like_adapter(0, dtype=np.dtype(dtype) if dtype != "bfloat16" else jax.numpy.bfloat16)
  placed = sharding.shard_params(host, mesh, min_size=1)
  key = jax.random.key(5)
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
    "max_rel_diff": max(
      float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) /
            max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30))
      for x, y in zip(leaves, jax.tree.leaves(want))),
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
  assert len(two_devices["cases"]) == 4
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
  # One compiled program per squeeze layout and precision (qr_core: 2 layouts in float64, one in
  # float32, one for bfloat16 storage; rsvd_factored one).
  assert len(programs) == 5, programs
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
