"""lora-squeeze export / import (ours <-> PEFT for Hugging Face Gemma 3) and --budget allocation.

The logits tests run the real transformers + PEFT in the test-only venv .venv-peft through
tests/hf_gemma3_helper.py: the same random tiny Gemma 3 base on both sides (ours exported to the
Hugging Face layout), our adapter exported to PEFT, and the logits compared with ours in JAX.
"""

import functools
import json
import pathlib
import subprocess
import sys

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from lora_squeeze import model as model_lib
from lora_squeeze import squeeze
from lora_squeeze.adapters import AdapterError, hf_gemma3, load_adapter, save_adapter
from lora_squeeze.adapters import budget as budget_lib
from lora_squeeze.adapters.export import export_peft
from lora_squeeze.adapters.import_peft import fit_initial_adapter, import_peft

REPO = pathlib.Path(__file__).resolve().parent.parent
PEFT_PYTHON = REPO / ".venv-peft" / "bin" / "python"
HELPER = REPO / "tests" / "hf_gemma3_helper.py"
# Longer than the tiny model's sliding window (8), so both attention types are exercised.
TOKENS = np.array([[5, 17, 300, 4000, 2, 99, 1234, 7, 8, 9, 10, 11, 262143], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9]])


def run_helper(*args: str) -> None:
  if not PEFT_PYTHON.exists():
    pytest.fail(f"{PEFT_PYTHON} is missing: run `bash scripts/setup.sh` to create the PEFT test environment")
  done = subprocess.run(
    [str(PEFT_PYTHON), str(HELPER), *args], capture_output=True, text=True, timeout=900, check=False
  )
  assert done.returncode == 0, done.stderr[-3000:]


@functools.cache
def tiny_base():
  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  # gemma initializes the norm scales to 0; random ones check that they map too.
  leaves, treedef = jax.tree.flatten(base)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(
    treedef, [x + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
  )


def random_lora(model_name: str, rank: int, *, seed: int, scale: float = 0.2) -> dict:
  """Random non-zero LoRA factors of every target at `rank`, in the tree make_model's LoRA uses."""
  dims, rng = hf_gemma3.dims(model_name), np.random.default_rng(seed)
  tree: dict = {}
  for layer in range(dims.num_layers):
    for kind in hf_gemma3.KINDS:
      node = tree
      for key in hf_gemma3.our_name(layer, kind).split("/"):
        node = node.setdefault(key, {})
      shape_a, shape_b = dims.stored_shapes(kind, rank)
      node["a"] = (scale * rng.standard_normal(shape_a)).astype(np.float32)
      node["b"] = (scale * rng.standard_normal(shape_b)).astype(np.float32)
  return tree


def our_logits(base, lora) -> np.ndarray:
  """JAX logits of the base with every ΔW = a @ b folded in (any rank per module)."""
  plain = model_lib.make_model("tiny")
  return np.asarray(plain.apply({"params": model_lib.fold_lora(base, lora)}, jnp.asarray(TOKENS)).logits)


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
  """Exports (exact, both classes; budgeted) and the Hugging Face logits for each."""
  root = tmp_path_factory.mktemp("hf")
  base = tiny_base()
  lora = random_lora("tiny", 4, seed=2)
  save_adapter(root / "ours", lora, {"model": "tiny"})
  dims = hf_gemma3.dims("tiny")
  save_file(
    hf_gemma3.hf_text_state_dict(
      jax.device_get(base), num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim
    ),
    str(root / "base.safetensors"),
  )
  export_peft(root / "ours", root / "causal", hf_class="Gemma3ForCausalLM")
  export_peft(root / "ours", root / "multimodal", hf_class="Gemma3ForConditionalGeneration")
  export_peft(root / "ours", root / "budget", budget=2000, allowed_ranks=[1, 2, 4])
  cases = {
    "causal": "Gemma3ForCausalLM",
    "multimodal": "Gemma3ForConditionalGeneration",
    "budget": "Gemma3ForCausalLM",
    "base": "Gemma3ForCausalLM",
  }
  args = []
  for name, hf_class in cases.items():
    spec = {
      "hf_class": hf_class,
      "text_config": hf_gemma3.hf_text_config("tiny"),
      "base": str(root / "base.safetensors"),
      "adapter": None if name == "base" else str(root / name),
      "tokens": TOKENS.tolist(),
    }
    (root / f"{name}.json").write_text(json.dumps(spec))
    args += [str(root / f"{name}.json"), str(root / f"{name}.npz")]
  run_helper("logits", *args)
  return {
    "root": root,
    "base": base,
    "lora": lora,
    "out": {name: dict(np.load(root / f"{name}.npz")) for name in cases},
  }


@pytest.mark.parametrize("case", ["causal", "multimodal"])
def test_exported_adapter_gives_our_logits_in_transformers(hf_runs, case):
  ours = our_logits(hf_runs["base"], hf_runs["lora"])
  theirs = hf_runs["out"][case]["logits"]
  np.testing.assert_allclose(theirs, ours, atol=2e-5 * np.abs(ours).max())
  # The adapter matters (it is not a no-op), and exactly the 7 projections of both layers are adapted.
  assert np.abs(ours - hf_runs["out"]["base"]["logits"]).max() > 100 * 2e-5 * np.abs(ours).max()
  prefix = hf_gemma3.HF_CLASSES[{"causal": "Gemma3ForCausalLM", "multimodal": "Gemma3ForConditionalGeneration"}[case]]
  want = sorted(prefix.format(i=i) + p.hf_name for i in range(2) for k in hf_gemma3.KINDS for p in k.parts)
  assert list(hf_runs["out"][case]["adapted"]) == want


def test_the_base_alone_matches_(hf_runs):
  plain = model_lib.make_model("tiny")
  ours = np.asarray(plain.apply({"params": hf_runs["base"]}, jnp.asarray(TOKENS)).logits)
  np.testing.assert_allclose(hf_runs["out"]["base"]["logits"], ours, atol=2e-5 * np.abs(ours).max())


def test_budgeted_export_with_rank_pattern_loads_in_peft_and_imports_back(hf_runs, tmp_path):
  root = hf_runs["root"]
  config = json.loads((root / "budget" / "adapter_config.json").read_text())
  tensors = load_file(root / "budget" / "adapter_model.safetensors")
  n_params = sum(v.size for v in tensors.values())
  assert n_params <= 2000 and config["rank_pattern"], (n_params, config)
  assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")} <= {1, 2, 4}
  # What PEFT computes with heterogeneous ranks equals our model with the imported adapter.
  import_peft(root / "budget", tmp_path / "back")
  back, meta = load_adapter(tmp_path / "back")
  assert meta["model"] == "tiny"
  ours = our_logits(hf_runs["base"], back)
  # Looser than the exact export: the squeezed factors come out of an SVD in float32.
  np.testing.assert_allclose(hf_runs["out"]["budget"]["logits"], ours, atol=1e-4 * np.abs(ours).max())


def write_peft(
  folder: pathlib.Path, factors: dict, *, r: int, alpha: float, rank_pattern=None, **extra
) -> pathlib.Path:
  folder.mkdir()
  tensors = {}
  for name, (a, b) in factors.items():
    tensors[f"base_model.model.{name}.lora_A.weight"] = a
    tensors[f"base_model.model.{name}.lora_B.weight"] = b
  save_file(tensors, str(folder / "adapter_model.safetensors"))
  config = {
    "peft_type": "LORA",
    "r": r,
    "lora_alpha": alpha,
    "rank_pattern": rank_pattern or {},
    "target_modules": ["q_proj", "v_proj", "up_proj"],
    **extra,
  }
  (folder / "adapter_config.json").write_text(json.dumps(config))
  return folder


def peft_factors(rng, ranks: dict) -> dict:
  dims = hf_gemma3.dims("tiny")
  out = {}
  for name, r in ranks.items():
    d_out, d_in = dims.hf_shape(name.split(".", 3)[-1])
    out[name] = (rng.standard_normal((r, d_in)).astype(np.float32), rng.standard_normal((d_out, r)).astype(np.float32))
  return out


RANKS = {
  "model.layers.0.self_attn.q_proj": 4,
  "model.layers.0.self_attn.v_proj": 2,
  "model.layers.1.mlp.up_proj": 4,
  "model.layers.1.self_attn.k_proj": 3,
}


@pytest.mark.parametrize("alpha", [4, 8])  # PEFT scale 1 and 2 (a power of two: folding it is exact)
def test_import_then_export_gives_back_the_peft_tensors_exactly(tmp_path, alpha):
  factors = peft_factors(np.random.default_rng(0), RANKS)
  src = write_peft(
    tmp_path / "src",
    factors,
    r=4,
    alpha=alpha,
    rank_pattern={"model.layers.0.self_attn.v_proj": 2, "k_proj": 3},
    alpha_pattern={"k_proj": 3 * alpha / 4, "v_proj": 2 * alpha / 4},
  )
  meta = import_peft(src, tmp_path / "ours")
  # q alone, v alone in a kv module of rank r_k + r_v = 0 + 2, k alone (3), up alone in gating (4).
  assert meta["ranks"]["layer_0/attn/kv_einsum/_LoRAEinsum_0/lora"] == 2
  export_peft(tmp_path / "ours", tmp_path / "out")
  out = load_file(tmp_path / "out" / "adapter_model.safetensors")
  config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  assert sorted(config["target_modules"]) == sorted(RANKS)
  scale = alpha / 4
  for name, (a, b) in factors.items():
    key = f"base_model.model.{name}"
    np.testing.assert_array_equal(out[key + ".lora_A.weight"], a)
    np.testing.assert_array_equal(out[key + ".lora_B.weight"], b * np.float32(scale))
  # And back again: our format -> PEFT -> ours is bit for bit.
  import_peft(tmp_path / "out", tmp_path / "ours2")
  first, second = load_adapter(tmp_path / "ours")[0], load_adapter(tmp_path / "ours2")[0]
  jax.tree.map(np.testing.assert_array_equal, first, second)


def test_import_fuses_k_and_v_block_diagonally(tmp_path):
  ranks = {"model.layers.0.self_attn.k_proj": 3, "model.layers.0.self_attn.v_proj": 2}
  factors = peft_factors(np.random.default_rng(1), ranks)
  src = write_peft(tmp_path / "src", factors, r=3, alpha=3, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 2})
  import_peft(src, tmp_path / "ours")
  lora, _ = load_adapter(tmp_path / "ours")
  ab = lora["layer_0"]["attn"]["kv_einsum"]["_LoRAEinsum_0"]["lora"]
  assert ab["a"].shape == (32, 5) and ab["b"].shape == (5, 2, 1, 8)
  delta = np.einsum("dr,rckh->ckhd", ab["a"], ab["b"]).reshape(2, 8, 32)
  for slot, name in enumerate(ranks):
    a, b = factors[name]
    np.testing.assert_allclose(delta[slot], b @ a, rtol=1e-5, atol=1e-5)
  assert not ab["b"][:3, 1].any() and not ab["b"][3:, 0].any()


def test_import_with_rank_squeezes_every_module_to_it(tmp_path):
  factors = peft_factors(np.random.default_rng(2), RANKS)
  src = write_peft(
    tmp_path / "src",
    factors,
    r=4,
    alpha=4,
    rank_pattern={"v_proj": 2, "k_proj": 3},
    alpha_pattern={"v_proj": 2, "k_proj": 3},
  )
  meta = import_peft(src, tmp_path / "ours", rank=2)
  assert set(meta["ranks"].values()) == {2}
  lora, _ = load_adapter(tmp_path / "ours")
  ab = lora["layer_0"]["attn"]["q_einsum"]["_LoRAEinsum_0"]["lora"]
  a, b = factors["model.layers.0.self_attn.q_proj"]
  delta = (b @ a).T.astype(np.float64)
  u, s, vt = np.linalg.svd(delta, full_matrices=False)
  np.testing.assert_allclose(ab["a"] @ ab["b"].reshape(2, -1), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


# --- bad input: one-line error naming the module, nothing written -------------------------------------


def test_export_of_an_adapter_for_another_model_size_names_the_module(tmp_path):
  save_adapter(tmp_path / "ours", random_lora("tiny", 2, seed=3), {"model": "tiny"})
  with pytest.raises(
    AdapterError,
    match=r"module 'layer_0/attn/attn_vec_einsum/_LoRAEinsum_0/lora' has .* gemma3_270m .*another model size",
  ):
    export_peft(tmp_path / "ours", tmp_path / "out", model="gemma3_270m")
  assert not (tmp_path / "out").exists()


def test_export_of_an_unknown_module_names_it(tmp_path):
  np.savez(
    tmp_path / "f.npz",
    **{
      "layer_0/attn/foo/lora/a": np.ones((32, 2), np.float32),
      "layer_0/attn/foo/lora/b": np.ones((2, 32), np.float32),
    },
  )
  with pytest.raises(AdapterError, match=r"module 'layer_0/attn/foo/lora' has no Hugging Face Gemma 3 counterpart"):
    export_peft(tmp_path / "f.npz", tmp_path / "out", model="tiny")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
  "extra, tensors, match",
  [
    ({"use_dora": True}, {}, "use_dora=True is not supported"),
    ({"bias": "all"}, {}, "bias='all'"),
    (
      {},
      {
        "base_model.model.model.embed_tokens.lora_embedding_A": np.ones((2, 262144), np.float32),
        "base_model.model.model.embed_tokens.lora_embedding_B": np.ones((32, 2), np.float32),
      },
      "module 'model.embed_tokens' is an embedding LoRA",
    ),
    (
      {},
      {
        "base_model.model.model.layers.0.self_attn.qkv.lora_A.weight": np.ones((2, 32), np.float32),
        "base_model.model.model.layers.0.self_attn.qkv.lora_B.weight": np.ones((32, 2), np.float32),
      },
      "PEFT module 'model.layers.0.self_attn.qkv' is not a Gemma 3 text-decoder projection",
    ),
    (
      {},
      {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 640), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 2), np.float32),
      },
      r"\(d_out, d_in\) = \(32, 640\), which matches no Gemma 3 size",
    ),
  ],
)
def test_import_refuses_what_it_cannot_map(tmp_path, extra, tensors, match):
  if tensors:
    (tmp_path / "src").mkdir()
    save_file(tensors, str(tmp_path / "src" / "adapter_model.safetensors"))
    (tmp_path / "src" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    src = tmp_path / "src"
  else:
    src = write_peft(
      tmp_path / "src",
      peft_factors(np.random.default_rng(0), {"model.layers.0.self_attn.q_proj": 4}),
      r=4,
      alpha=4,
      **extra,
    )
  with pytest.raises(AdapterError, match=match):
    import_peft(src, tmp_path / "out")
  assert not (tmp_path / "out").exists()


# --- the budget allocation ----------------------------------------------------------------------------


@st.composite
def spectra_and_costs(draw):
  n = draw(st.integers(1, 6))
  spectra, costs = {}, {}
  for i in range(n):
    r = draw(st.integers(1, 8))
    s = np.sort(np.array(draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=r, max_size=r))))[::-1]
    spectra[f"m{i}"] = s
    costs[f"m{i}"] = draw(st.integers(1, 50))
  return spectra, costs


def energy_at(spectra, ranks):
  return sum(float(np.sum(np.square(s[: ranks[m]]))) for m, s in spectra.items())


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
  data=spectra_and_costs(), budget_scale=st.floats(1.0, 10.0), allowed=st.sampled_from([None, (1, 2, 4, 8), (2, 3, 8)])
)
def test_budget_allocation_fits_and_beats_every_uniform_rank(data, budget_scale, allowed):
  spectra, costs = data
  ladder_min = 1 if allowed is None else min(allowed)
  budget = int(budget_scale * ladder_min * sum(costs.values()))
  allocation = budget_lib.allocate(spectra, costs, budget, allowed_ranks=allowed)
  assert allocation.params == sum(allocation.ranks[m] * costs[m] for m in spectra) <= budget
  if allowed is not None:
    assert set(allocation.ranks.values()) <= set(allowed)
  np.testing.assert_allclose(allocation.kept, energy_at(spectra, allocation.ranks), rtol=1e-9)
  for r in allowed or range(1, 9):
    if r * sum(costs.values()) <= budget:
      assert allocation.kept >= energy_at(spectra, {m: r for m in spectra}) * (1 - 1e-12)


def test_budget_below_the_minimum_is_refused():
  with pytest.raises(AdapterError, match="budget of 10 parameters is below the 48 that rank 8 on all 2 modules needs"):
    budget_lib.allocate({"a": np.ones(8), "b": np.ones(8)}, {"a": 1, "b": 5}, 10, allowed_ranks=[8, 16])


@pytest.mark.parametrize("text, params", [("2500", 2500), ("2.5M", 2_500_000), ("500k", 500_000), ("1MiB", 262_144)])
def test_parse_budget(text, params):
  assert budget_lib.parse_budget(text, bytes_per_param=4) == params


def test_squeeze_cli_budget_writes_at_most_the_budget(tmp_path):
  lora = random_lora("tiny", 4, seed=5)
  save_adapter(tmp_path / "ours", lora, {"model": "tiny"})
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "lora_squeeze.cli",
      "squeeze",
      str(tmp_path / "ours"),
      str(tmp_path / "out"),
      "--budget=1000",
      "--allowed-ranks=1,2,3",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  out, meta = load_adapter(tmp_path / "out")
  used = sum(x.size for x in jax.tree.leaves(out))
  assert used <= 1000 and set(meta["ranks"].values()) <= {1, 2, 3}
  kept = total = 0.0
  for name, r in meta["ranks"].items():
    node_in, node_out = lora, out
    for key in name.split("/"):
      node_in, node_out = node_in[key], node_out[key]
    a, b = node_in["a"].reshape(-1, 4), node_in["b"].reshape(4, -1)
    s = np.asarray(squeeze.singular_values(a, b), np.float64)
    kept, total = kept + np.sum(s[:r] ** 2), total + np.sum(s**2)
    delta = node_out["a"].reshape(-1, r) @ node_out["b"].reshape(r, -1)
    u, sv, vt = np.linalg.svd((a @ b).astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(delta, (u[:, :r] * sv[:r]) @ vt[:r], atol=1e-5)
  assert f"overall V_r {kept / total:.5f}" in done.stdout


# --- an imported adapter as the start of a training run ------------------------------------------------


def test_fit_initial_adapter_pads_with_fresh_columns_and_squeezes_down():
  fresh = random_lora("tiny", 4, seed=7)
  small = random_lora("tiny", 2, seed=8)
  big = random_lora("tiny", 6, seed=9)
  up = fit_initial_adapter(small, fresh, where="t")
  down = fit_initial_adapter(big, fresh, where="t")
  ab_small, ab_up = (
    small["layer_1"]["mlp"]["_LoRAEinsum_linear"]["lora"],
    up["layer_1"]["mlp"]["_LoRAEinsum_linear"]["lora"],
  )
  ab_fresh = fresh["layer_1"]["mlp"]["_LoRAEinsum_linear"]["lora"]
  np.testing.assert_array_equal(ab_up["a"][:, :2], ab_small["a"])
  np.testing.assert_array_equal(ab_up["a"][:, 2:], ab_fresh["a"][:, 2:])
  np.testing.assert_allclose(ab_up["a"] @ ab_up["b"], ab_small["a"] @ ab_small["b"], rtol=1e-6)
  ab_big, ab_down = (
    big["layer_1"]["mlp"]["_LoRAEinsum_linear"]["lora"],
    down["layer_1"]["mlp"]["_LoRAEinsum_linear"]["lora"],
  )
  u, s, vt = np.linalg.svd((ab_big["a"] @ ab_big["b"]).astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(ab_down["a"] @ ab_down["b"], (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
  with pytest.raises(AdapterError, match="another model size"):
    bad = jax.tree.map(lambda x: x, small)
    bad["layer_0"]["mlp"]["_LoRAEinsum_linear"]["lora"]["b"] = np.ones((2, 7), np.float32)
    fit_initial_adapter(bad, fresh, where="t")


# --- slow: the real 270M, loaded from its GGUF by transformers itself --------------------------------


@pytest.mark.slow
def test_real_270m_from_gguf_in_transformers_matches_our_model(tmp_path):
  from lora_squeeze.weights import cache as cache_lib
  from lora_squeeze.weights import gguf as gguf_lib

  gguf_path = gguf_lib.assemble_gguf(cache_lib.cache_root(None))
  base = model_lib.load_base_params("gemma3_270m")
  lora = random_lora("gemma3_270m", 4, seed=11, scale=0.05)
  save_adapter(tmp_path / "ours", lora, {"model": "gemma3_270m"})
  export_peft(tmp_path / "ours", tmp_path / "peft")
  tokens = TOKENS[:, :12]
  spec = {
    "hf_class": "Gemma3ForCausalLM",
    "gguf_dir": str(gguf_path.parent),
    "gguf": gguf_path.name,
    "adapter": str(tmp_path / "peft"),
    "tokens": tokens.tolist(),
  }
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  run_helper("logits", str(tmp_path / "spec.json"), str(tmp_path / "out.npz"))
  plain = model_lib.make_model("gemma3_270m")
  ours = np.asarray(plain.apply({"params": model_lib.fold_lora(base, lora)}, jnp.asarray(tokens)).logits)
  theirs = np.load(tmp_path / "out.npz")["logits"]
  np.testing.assert_allclose(theirs, ours, atol=2e-3 * np.abs(ours).max())


def test_a_run_with_an_initial_adapter_starts_from_it(tmp_path):
  from lora_squeeze import protocols, train

  initial = random_lora("tiny", 2, seed=12)
  seen = {}

  def capture(rank, lora):
    seen[rank] = jax.device_get(lora)
    return {"score": 0.0}

  tokens = np.array([[2, 5, 6, 7, 3, 5, 6, 7]] * 4, np.int32)
  examples = [{"tokens": t, "target_mask": np.arange(8) > 4} for t in tokens]
  setup = train.RunSetup(
    model_for_rank=lambda r: model_lib.make_model("tiny", lora_rank=r),
    base_params=tiny_base(),
    batches=train.batch_dataset(examples, batch_size=2, seed=0),
    workdir=tmp_path / "run",
    key=jax.random.key(3),
    max_targets=3,
    evaluate=capture,
    adapter_metadata={"model": "tiny"},
    printer=lambda line: None,
    initial_lora=initial,
  )
  plan = protocols.validate_plan((protocols.Evaluate(tag="start"), protocols.Stage(rank=4, steps=1, lr=1e-3, warmup=0)))
  train.execute_plan(plan, setup)
  start = seen[4]["layer_0"]["attn"]["q_einsum"]["_LoRAEinsum_0"]["lora"]
  init = initial["layer_0"]["attn"]["q_einsum"]["_LoRAEinsum_0"]["lora"]
  np.testing.assert_array_equal(start["a"][:, :2], init["a"])
  np.testing.assert_array_equal(start["b"][:2], init["b"])
  assert not np.any(start["b"][2:]) and np.any(start["a"][:, 2:])
