"""lora_squeeze.adapters: squeezing adapters on disk (PEFT, our Orbax format, bare factor files).

The PEFT tests use the real `peft` library: tests/peft_helper.py, run by the test-only venv
.venv-peft (made by scripts/setup.sh), builds adapters with PEFT and loads ours back with PEFT.
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import hypothesis
import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from lora_squeeze.adapters import AdapterError, load_adapter, save_adapter, squeeze_adapter
from lora_squeeze.adapters.atomic import atomic_output

REPO = pathlib.Path(__file__).resolve().parent.parent
PEFT_PYTHON = REPO / ".venv-peft" / "bin" / "python"
HELPER = REPO / "tests" / "peft_helper.py"

# Source adapters made by PEFT: (LoraConfig fields, squeeze arguments).
PEFT_CASES = {
  "plain": ({"r": 8, "lora_alpha": 16, "seed": 1}, {"rank": 3}),
  "patterns": (
    {
      "r": 8,
      "lora_alpha": 16,
      "rank_pattern": {"layers.0.q": 4, "embed": 6},
      "alpha_pattern": {"layers.1.o": 32},
      "seed": 2,
    },
    {"rank": 5},  # heterogeneous in, homogeneous out; layers.0.q goes up from 4 (zero-padded)
  ),
  "rslora": (
    {"r": 8, "lora_alpha": 4, "use_rslora": True, "rank_pattern": {"layers.1.q": 5}, "seed": 3},
    {"energy": 0.9},
  ),
}


def run_peft_helper(*args: str) -> None:
  if not PEFT_PYTHON.exists():
    pytest.fail(f"{PEFT_PYTHON} is missing: run `bash scripts/setup.sh` to create the PEFT test environment")
  done = subprocess.run([str(PEFT_PYTHON), str(HELPER), *args], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]


def best_rank_r(delta: np.ndarray, r: int) -> np.ndarray:
  """Eckart–Young: the optimal rank-r approximation of delta (float64 SVD)."""
  u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


def smallest_rank_keeping(delta: np.ndarray, tau: float) -> int:
  s2 = np.linalg.svd(delta.astype(np.float64), compute_uv=False) ** 2
  return int(np.argmax(np.cumsum(s2) / s2.sum() >= tau - 1e-9)) + 1


def tiny_model_outputs(dump: dict, deltas: dict) -> np.ndarray:
  """numpy twin of peft_helper.TinyModel: base weights + deltas, the adapter's head."""
  w = lambda name: dump[f"base/{name}"] + deltas.get(name.rsplit(".", 1)[0], 0)  # noqa: E731
  h = w("embed.weight")[dump["tokens"]]
  for i in range(2):
    q = np.tanh(h @ w(f"layers.{i}.q.weight").T + dump[f"base/layers.{i}.q.bias"])
    h = h + q @ w(f"layers.{i}.o.weight").T + dump[f"base/layers.{i}.o.bias"]
  return h @ dump["head/weight"].T + dump["head/bias"]


def deltas_of(dump) -> dict[str, np.ndarray]:
  return {k[len("delta/") :]: dump[k] for k in dump.files if k.startswith("delta/")}


@pytest.fixture(scope="module")
def peft_runs(tmp_path_factory):
  """Each case: PEFT source adapter, our squeezed adapter, and PEFT's view of both."""
  root = tmp_path_factory.mktemp("peft")
  build_args, dump_args, runs = [], [], {}
  for name, (spec, _) in PEFT_CASES.items():
    build_args += [str(root / f"{name}_src"), json.dumps(spec)]
  run_peft_helper("build", *build_args)
  for name, (_, squeeze_args) in PEFT_CASES.items():
    src, dst = root / f"{name}_src", root / f"{name}_out"
    summary = squeeze_adapter(src, dst, **squeeze_args)
    runs[name] = {"src": src, "dst": dst, "summary": summary}
    dump_args += [str(src), str(root / f"{name}_src.npz"), str(dst), str(root / f"{name}_out.npz")]
  run_peft_helper("dump", *dump_args)
  for name, run in runs.items():
    run["src_dump"] = np.load(root / f"{name}_src.npz")
    run["out_dump"] = np.load(root / f"{name}_out.npz")
  return runs


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_squeezed_delta_is_the_optimal_rank_r_approximation(peft_runs, case):
  run = peft_runs[case]
  src, out = deltas_of(run["src_dump"]), deltas_of(run["out_dump"])
  assert sorted(src) == sorted(out) == ["embed", "layers.0.o", "layers.0.q", "layers.1.o", "layers.1.q"]
  squeeze_args = PEFT_CASES[case][1]
  for module, delta in src.items():
    r_tgt = squeeze_args.get("rank") or smallest_rank_keeping(delta, squeeze_args["energy"])
    assert int(run["out_dump"][f"r/{module}"]) == r_tgt, module
    np.testing.assert_allclose(out[module], best_rank_r(delta, r_tgt), atol=2e-5 * np.abs(delta).max())


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_model_outputs_match_a_numpy_reference(peft_runs, case):
  run = peft_runs[case]
  squeeze_args = PEFT_CASES[case][1]
  reference_deltas = {}
  for module, delta in deltas_of(run["src_dump"]).items():
    r_tgt = squeeze_args.get("rank") or smallest_rank_keeping(delta, squeeze_args["energy"])
    reference_deltas[module] = best_rank_r(delta, r_tgt)
  expected = tiny_model_outputs(run["src_dump"], reference_deltas)
  np.testing.assert_allclose(run["out_dump"]["outputs"], expected, rtol=1e-4, atol=1e-4)
  # The source through the same numpy model: the reference itself is right.
  np.testing.assert_allclose(
    run["src_dump"]["outputs"], tiny_model_outputs(run["src_dump"], deltas_of(run["src_dump"])), atol=1e-4
  )


def test_peft_heterogeneous_ranks_in_homogeneous_out(peft_runs):
  run = peft_runs["patterns"]
  src = json.loads((run["src"] / "adapter_config.json").read_text())
  out = json.loads((run["dst"] / "adapter_config.json").read_text())
  assert (out["r"], out["rank_pattern"], out["alpha_pattern"]) == (5, {}, {})
  assert {k: v for k, v in src.items() if k not in ("r", "rank_pattern", "alpha_pattern")} == {
    k: v for k, v in out.items() if k not in ("r", "rank_pattern", "alpha_pattern")
  }
  assert {int(run["out_dump"][k]) for k in run["out_dump"].files if k.startswith("r/")} == {5}
  # scale folding: alpha stays, so PEFT's scale is lora_alpha / r_tgt for every module
  assert {float(run["out_dump"][k]) for k in run["out_dump"].files if k.startswith("scaling/")} == {16 / 5}


def test_peft_energy_writes_a_rank_pattern_that_peft_applies_per_module(peft_runs):
  run = peft_runs["rslora"]
  out = json.loads((run["dst"] / "adapter_config.json").read_text())
  ranks = {row.name: row.r_tgt for row in run["summary"].rows}
  assert len(set(ranks.values())) > 1
  assert out["use_rslora"] is True and out["lora_alpha"] == 4
  for module, r in ranks.items():
    assert int(run["out_dump"][f"r/{module}"]) == r
    assert float(run["out_dump"][f"scaling/{module}"]) == pytest.approx(4 / math.sqrt(r))
  for row in run["summary"].rows:
    assert row.retention >= 0.9 and row.r_tgt <= row.r_src


def test_peft_non_lora_tensors_and_files_are_copied_through(peft_runs):
  run = peft_runs["patterns"]
  src = load_file(run["src"] / "adapter_model.safetensors")
  out = load_file(run["dst"] / "adapter_model.safetensors")
  assert sorted(src) == sorted(out)
  for key in ("base_model.model.head.weight", "base_model.model.head.bias"):
    np.testing.assert_array_equal(out[key], src[key])
  assert (run["dst"] / "README.md").read_bytes() == (run["src"] / "README.md").read_bytes()
  np.testing.assert_array_equal(run["out_dump"]["head/weight"], run["src_dump"]["head/weight"])


# ---------------------------------------------------------------- hand-made PEFT folders (no torch)


def write_peft(folder: pathlib.Path, tensors: dict, **config) -> pathlib.Path:
  folder.mkdir()
  (folder / "adapter_config.json").write_text(
    json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], **config})
  )
  save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
  return folder


def peft_tensors(rng, modules=("layers.0.q", "layers.1.q"), r=4, d_in=6, d_out=5, dtype=np.float32):
  tensors = {}
  for m in modules:
    tensors[f"base_model.model.{m}.lora_A.weight"] = rng.normal(size=(r, d_in)).astype(dtype)
    tensors[f"base_model.model.{m}.lora_B.weight"] = rng.normal(size=(d_out, r)).astype(dtype)
  return tensors


def assert_nothing_written(parent: pathlib.Path, expected: set[str]) -> None:
  assert {p.name for p in parent.iterdir()} == expected


@pytest.mark.parametrize(
  "corrupt, message",
  [
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), r"adapter_model.safetensors is truncated: tensor 'base_model"),
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json here!}"), "header is not JSON"),
    (lambda p: p.write_bytes(b"\xff" * 64), "not a valid safetensors file"),
    (lambda p: p.write_bytes(b"abc"), "not a safetensors file"),
  ],
)
def test_corrupt_safetensors_is_named_and_leaves_no_output(tmp_path, corrupt, message):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  corrupt(src / "adapter_model.safetensors")
  with pytest.raises(AdapterError, match=message):
    squeeze_adapter(src, tmp_path / "out", rank=2)
  assert_nothing_written(tmp_path, {"src"})


def test_mismatched_a_b_shapes_are_named(tmp_path):
  tensors = peft_tensors(np.random.default_rng(0))
  tensors["base_model.model.layers.1.q.lora_B.weight"] = np.ones((5, 3), np.float32)
  src = write_peft(tmp_path / "src", tensors)
  with pytest.raises(AdapterError, match=r"mismatched LoRA shapes: 'base_model.model.layers.1.q.lora_A.weight'"):
    squeeze_adapter(src, tmp_path / "out", rank=2)
  assert_nothing_written(tmp_path, {"src"})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_in_a_late_module_leave_nothing_behind(tmp_path, bad):
  tensors = peft_tensors(np.random.default_rng(0), modules=("a.0", "a.1", "a.2"))
  tensors["base_model.model.a.2.lora_B.weight"][3, 1] = bad
  src = write_peft(tmp_path / "src", tensors)
  with pytest.raises(AdapterError, match=r"tensor 'base_model.model.a.2.lora_B.weight' holds 1 NaN/inf"):
    squeeze_adapter(src, tmp_path / "out", rank=2)
  assert_nothing_written(tmp_path, {"src"})


def test_a_lora_b_without_its_lora_a_is_named(tmp_path):
  tensors = peft_tensors(np.random.default_rng(0))
  del tensors["base_model.model.layers.1.q.lora_A.weight"]
  src = write_peft(tmp_path / "src", tensors)
  with pytest.raises(AdapterError, match=r"'base_model.model.layers.1.q.lora_B.weight' has no matching lora_A"):
    squeeze_adapter(src, tmp_path / "out", rank=2)


def test_config_rank_that_disagrees_with_the_tensors_is_refused(tmp_path):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)), rank_pattern={"layers.1.q": 3})
  with pytest.raises(AdapterError, match=r"'base_model.model.layers.1.q.lora_A.weight' has rank 4 .* r=3"):
    squeeze_adapter(src, tmp_path / "out", rank=2)


def test_dora_is_refused(tmp_path):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)), use_dora=True)
  with pytest.raises(AdapterError, match="use_dora=True is not supported"):
    squeeze_adapter(src, tmp_path / "out", rank=2)


def test_unknown_format_is_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "folder").mkdir()
  for src in (tmp_path / "notes.txt", tmp_path / "folder"):
    with pytest.raises(AdapterError, match="unknown adapter format at"):
      squeeze_adapter(src, tmp_path / "out", rank=2)
  with pytest.raises(AdapterError, match="does not exist"):
    squeeze_adapter(tmp_path / "missing", tmp_path / "out", rank=2)


def test_output_paths_that_would_touch_the_input_are_refused(tmp_path):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  before = {p.name: p.read_bytes() for p in src.iterdir()}
  with pytest.raises(AdapterError, match="is the input"):
    squeeze_adapter(src, src, rank=2, force=True)
  with pytest.raises(AdapterError, match="lies inside the input"):
    squeeze_adapter(src, src / "squeezed", rank=2)
  with pytest.raises(AdapterError, match="lies inside the output"):
    squeeze_adapter(src, tmp_path, rank=2, force=True)
  assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_existing_output_needs_force_and_is_replaced_only_when_complete(tmp_path):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "old.txt").write_text("old")
  with pytest.raises(AdapterError, match="already exists; pass --force"):
    squeeze_adapter(src, dst, rank=2)
  assert (dst / "old.txt").exists()
  squeeze_adapter(src, dst, rank=2, force=True)
  assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  assert_nothing_written(tmp_path, {"src", "out"})


def test_atomic_output_removes_a_half_written_output(tmp_path):
  with pytest.raises(RuntimeError, match="disk full"):
    with atomic_output(tmp_path / "out") as target:
      target.mkdir()
      (target / "part").write_text("half")
      raise RuntimeError("disk full")
  assert_nothing_written(tmp_path, set())


def test_dry_run_writes_nothing_and_reports_the_exact_spectrum(tmp_path):
  rng = np.random.default_rng(0)
  tensors = peft_tensors(rng, modules=("m",), r=6, d_in=9, d_out=7)
  src = write_peft(tmp_path / "src", tensors, r=6, lora_alpha=3)
  summary = squeeze_adapter(src, tmp_path / "out", energy=0.8, dry_run=True)
  assert_nothing_written(tmp_path, {"src"})
  delta = 0.5 * tensors["base_model.model.m.lora_B.weight"] @ tensors["base_model.model.m.lora_A.weight"]
  s2 = np.linalg.svd(delta.astype(np.float64), compute_uv=False) ** 2
  (row,) = summary.rows
  assert (row.name, row.r_src, row.r_tgt) == ("m", 6, smallest_rank_keeping(delta, 0.8))
  assert row.retention == pytest.approx(s2[: row.r_tgt].sum() / s2.sum(), rel=1e-5)
  assert re.search(rf"^m +6 +{row.r_tgt} +{row.retention:.5f}$", summary.table(), re.M)
  assert not summary.written


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({}, "exactly one of rank and energy"),
    ({"rank": 2, "energy": 0.9}, "exactly one of rank and energy"),
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"energy": 1.5}, r"energy must be a number in \(0, 1\], got 1.5"),
    ({"rank": 2, "max_rank": 4}, "max_rank=4 applies only with energy"),
    ({"rank": 2, "method": "magic"}, "unknown method 'magic'; allowed: qr_core"),
  ],
)
def test_bad_targets_are_refused(tmp_path, kwargs, message):
  src = write_peft(tmp_path / "src", peft_tensors(np.random.default_rng(0)))
  with pytest.raises(AdapterError, match=message):
    squeeze_adapter(src, tmp_path / "out", **kwargs)


def test_bf16_peft_factors_stay_bf16(tmp_path):
  tensors = peft_tensors(np.random.default_rng(0), dtype=ml_dtypes.bfloat16)
  src = write_peft(tmp_path / "src", tensors)
  squeeze_adapter(src, tmp_path / "out", rank=2)
  out = load_file(tmp_path / "out" / "adapter_model.safetensors")
  a, b = out["base_model.model.layers.0.q.lora_A.weight"], out["base_model.model.layers.0.q.lora_B.weight"]
  assert (a.dtype, a.shape, b.shape) == (np.dtype(ml_dtypes.bfloat16), (2, 6), (5, 2))
  delta = (
    2.0
    * tensors["base_model.model.layers.0.q.lora_B.weight"].astype(np.float32)
    @ tensors["base_model.model.layers.0.q.lora_A.weight"].astype(np.float32)
  )
  np.testing.assert_allclose(
    4.0 * b.astype(np.float32) @ a.astype(np.float32), best_rank_r(delta, 2), atol=0.05 * np.abs(delta).max()
  )


# ---------------------------------------------------------------- our formats


def gemma_lora_tree(rng, r=6):
  """A LoRA tree in the gemma layout (multi-axis einsum factors), float32."""
  return {
    "layer_0": {
      "attn": {
        "q_einsum": {"_LoRAEinsum_0": {"lora": {"a": rng.normal(size=(12, r)), "b": rng.normal(size=(r, 2, 4))}}},
        "attn_vec_einsum": {
          "_LoRAEinsum_0": {"lora": {"a": rng.normal(size=(2, 4, r)), "b": rng.normal(size=(r, 12))}}
        },
      },
      "mlp": {"_LoRAEinsum_linear": {"lora": {"a": rng.normal(size=(16, r)), "b": rng.normal(size=(r, 12))}}},
    }
  }


def flat_tree(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(flat_tree(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v, np.float32)})
  return out


def assert_squeezed(src_flat: dict, out_flat: dict, r_tgt: int) -> None:
  for key in src_flat:
    if not key.endswith("/a"):
      continue
    stem = key[:-2]
    a, b, a_t, b_t = src_flat[key], src_flat[stem + "/b"], out_flat[key], out_flat[stem + "/b"]
    assert a_t.shape == (*a.shape[:-1], r_tgt) and b_t.shape == (r_tgt, *b.shape[1:])
    delta = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
    got = a_t.reshape(-1, r_tgt) @ b_t.reshape(r_tgt, -1)
    np.testing.assert_allclose(got, best_rank_r(delta, r_tgt), atol=1e-4 * np.abs(delta).max())


def test_orbax_adapter_round_trip_and_squeeze(tmp_path):
  tree = gemma_lora_tree(np.random.default_rng(0))
  save_adapter(tmp_path / "adapter", tree, {"model": "tiny", "targets": ["q", "attn_out", "linear"]})
  loaded, metadata = load_adapter(tmp_path / "adapter")
  assert flat_tree(loaded).keys() == flat_tree(tree).keys()
  for key, value in flat_tree(tree).items():
    np.testing.assert_array_equal(flat_tree(loaded)[key], value)
  assert metadata == {
    "model": "tiny",
    "targets": ["q", "attn_out", "linear"],
    "ranks": {
      "layer_0/attn/q_einsum/_LoRAEinsum_0/lora": 6,
      "layer_0/attn/attn_vec_einsum/_LoRAEinsum_0/lora": 6,
      "layer_0/mlp/_LoRAEinsum_linear/lora": 6,
    },
  }
  with pytest.raises(AdapterError, match="already exists"):
    save_adapter(tmp_path / "adapter", tree, {})

  summary = squeeze_adapter(tmp_path / "adapter", tmp_path / "squeezed", rank=2)
  assert summary.format == "orbax"
  squeezed, metadata = load_adapter(tmp_path / "squeezed")
  assert_squeezed(flat_tree(tree), flat_tree(squeezed), 2)
  assert set(metadata["ranks"].values()) == {2} and metadata["model"] == "tiny"
  assert metadata["lora_squeeze"]["r_src"]["layer_0/mlp/_LoRAEinsum_linear/lora"] == 6


def test_save_adapter_refuses_a_tree_without_lora_modules(tmp_path):
  with pytest.raises(AdapterError, match="no LoRA modules"):
    save_adapter(tmp_path / "adapter", {"w": np.ones((2, 2))}, {})
  assert_nothing_written(tmp_path, set())


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_bare_factor_files_squeeze_and_copy_other_keys(tmp_path, suffix):
  flat = flat_tree(gemma_lora_tree(np.random.default_rng(1)))
  flat["final_norm/scale"] = np.arange(5, dtype=np.float32)
  src, dst = tmp_path / f"factors{suffix}", tmp_path / f"small{suffix}"
  if suffix == ".safetensors":
    save_file(flat, src)
  else:
    np.savez(src, **flat)
  squeeze_adapter(src, dst, rank=3)
  out = load_file(dst) if suffix == ".safetensors" else dict(np.load(dst))
  assert sorted(out) == sorted(flat)
  np.testing.assert_array_equal(out["final_norm/scale"], flat["final_norm/scale"])
  assert_squeezed(flat, out, 3)
  with pytest.raises(AdapterError, match=f"must be a {suffix} file like the input"):
    squeeze_adapter(src, tmp_path / "other.bin", rank=3)


def test_a_factor_without_its_partner_is_named(tmp_path):
  np.savez(tmp_path / "f.npz", **{"x/lora/a": np.ones((4, 2), np.float32), "y/lora/b": np.ones((2, 3), np.float32)})
  with pytest.raises(AdapterError, match=r"tensor 'x/lora/a' has no matching 'x/lora/b'"):
    squeeze_adapter(tmp_path / "f.npz", tmp_path / "g.npz", rank=1)


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  in_axes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
  out_axes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
  r_src=st.integers(1, 6),
  r_tgt=st.integers(1, 8),
  seed=st.integers(0, 2**16),
)
def test_einsum_shaped_factors_squeeze_to_the_optimum(tmp_path_factory, in_axes, out_axes, r_src, r_tgt, seed):
  rng = np.random.default_rng(seed)
  flat = {
    "m/a": rng.normal(size=(*in_axes, r_src)).astype(np.float32),
    "m/b": rng.normal(size=(r_src, *out_axes)).astype(np.float32),
  }
  folder = tmp_path_factory.mktemp("einsum")
  save_file(flat, folder / "in.safetensors")
  summary = squeeze_adapter(folder / "in.safetensors", folder / "out.safetensors", rank=r_tgt)
  assert_squeezed(flat, load_file(folder / "out.safetensors"), r_tgt)
  delta = flat["m/a"].reshape(-1, r_src) @ flat["m/b"].reshape(r_src, -1)
  s2 = np.linalg.svd(delta.astype(np.float64), compute_uv=False) ** 2
  assert summary.rows[0].retention == pytest.approx(s2[:r_tgt].sum() / s2.sum(), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- the command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
  script = REPO / ".venv" / "bin" / "lora-squeeze"
  command = [str(script)] if script.exists() else [sys.executable, "-m", "lora_squeeze.cli"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([*command, "squeeze", *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_squeezes_dry_runs_and_refuses(tmp_path):
  flat = flat_tree(gemma_lora_tree(np.random.default_rng(2)))
  np.savez(tmp_path / "in.npz", **flat)
  dry = run_cli(str(tmp_path / "in.npz"), "--energy=0.5", "--max-rank=2", "--dry-run")
  assert dry.returncode == 0, dry.stderr
  assert "module" in dry.stdout and "V_r" in dry.stdout and "dry run: nothing written" in dry.stdout
  assert "layer_0/mlp/_LoRAEinsum_linear/lora" in dry.stdout
  assert_nothing_written(tmp_path, {"in.npz"})

  done = run_cli(str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), "--rank=2", "--method=svd")
  assert done.returncode == 0, done.stderr
  assert "[3/3]" in done.stderr and "wrote npz adapter" in done.stdout
  # Progress in the trainer's duration format (lora_squeeze.durations): whole seconds, ETA 0s at the end.
  duration = r"(\d+h)?(\d+m)?\d+s"
  assert re.search(rf"^\[3/3\] \S+: r \d+ -> 2, V_r [\d.]+ \({duration} elapsed, ETA 0s\)$", done.stderr, re.M)
  assert_squeezed(flat, dict(np.load(tmp_path / "out.npz")), 2)

  again = run_cli(str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), "--rank=2")
  assert again.returncode != 0 and "already exists; pass --force" in again.stderr
