"""Model construction, decoder-only LoRA, param split/merge/fold, hidden_states/logits_at (tiny configs)."""

import dataclasses
import re

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from gemma import gm
from gemma import peft
from hypothesis import strategies as st

from lora_squeeze import model as M
from lora_squeeze import param_trees as P

TOKENS = jnp.array([[2, 818, 5279, 529, 7001, 563], [2, 10, 20, 30, 40, 50]], jnp.int32)
LORA_MODULE = re.compile(
  r"^(layer_\d+)/(attn/q_einsum/_LoRAEinsum_0|attn/kv_einsum/_LoRAEinsum_0|"
  r"attn/attn_vec_einsum/_LoRAEinsum_0|mlp/_LoRAEinsum_gating_einsum|mlp/_LoRAEinsum_linear)/lora/[ab]$"
)
TARGET_OF_MODULE = {
  "attn/q_einsum/_LoRAEinsum_0": "q",
  "attn/kv_einsum/_LoRAEinsum_0": "kv",
  "attn/attn_vec_einsum/_LoRAEinsum_0": "attn_out",
  "mlp/_LoRAEinsum_gating_einsum": "gating",
  "mlp/_LoRAEinsum_linear": "linear",
}


@pytest.fixture(scope="module")
def tiny_base():
  return M.init_base_params("tiny", key=jax.random.key(0))


def _nll(model, params, tokens):
  hidden = M.hidden_states(model, params, tokens)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1] - 1), (tokens.shape[0], tokens.shape[1] - 1))
  logp = jax.nn.log_softmax(M.logits_at(params, hidden, positions), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def test_unknown_model_name():
  with pytest.raises(ValueError, match=r"unknown model name 'gemma3_2b'; allowed: gemma3_270m, gemma3_1b"):
    M.make_model("gemma3_2b")


@pytest.mark.parametrize("targets", [("q", "mlp"), ()])
def test_bad_targets(targets):
  with pytest.raises(ValueError, match="bad LoRA targets"):
    M.make_model("tiny", lora_rank=4, lora_targets=targets)
  with pytest.raises(ValueError, match="LoRA targets must be a sequence of names, got the string 'kv'"):
    M.make_model("tiny", lora_rank=4, lora_targets="kv")


@pytest.mark.parametrize("rank", [0, -2, 2.5, True])
def test_bad_rank(rank):
  with pytest.raises(ValueError, match=r"lora_rank must be a positive integer, got"):
    M.make_model("tiny", lora_rank=rank)


def test_all_sizes_build_with_expected_layer_count():
  # Abstract shapes only: nothing is materialized, so even 27B is cheap.
  expected_layers = {"gemma3_270m": 18, "gemma3_1b": 26, "gemma3_4b": 34}
  for name, layers in expected_layers.items():
    params = M.abstract_params(M.make_model(name))
    assert sum(k.startswith("layer_") for k in params) == layers
  embed = M.abstract_params(M.make_model("gemma3_270m"))["embedder"]["input_embedding"]
  assert embed.shape == (262_144, 640)


def test_lora_with_zero_b_gives_base_logits_exactly(tiny_base):
  base_logits = M.make_model("tiny").apply({"params": tiny_base}, TOKENS).logits
  model = M.make_model("tiny", lora_rank=4)
  lora = M.init_lora_params(model, tiny_base, key=jax.random.key(1))
  assert all(
    np.all(np.asarray(x) == 0) for p, x in zip(P.lora_leaf_paths(lora), jax.tree.leaves(lora)) if p.endswith("/b")
  )
  lora_logits = model.apply({"params": P.merge_params(tiny_base, lora)}, TOKENS).logits
  np.testing.assert_array_equal(np.asarray(lora_logits), np.asarray(base_logits))


def test_gradient_step_changes_logits_and_touches_only_lora(tiny_base):
  model = M.make_model("tiny", lora_rank=4)
  lora = M.init_lora_params(model, tiny_base, key=jax.random.key(1))
  loss_fn = lambda lo: _nll(model, P.merge_params(tiny_base, lo), TOKENS)
  loss0, grads = jax.value_and_grad(loss_fn)(lora)
  assert jax.tree.structure(grads) == jax.tree.structure(lora)
  stepped = jax.tree.map(lambda p, g: p - 0.5 * g, lora, grads)
  assert float(loss_fn(stepped)) < float(loss0)
  before = model.apply({"params": P.merge_params(tiny_base, lora)}, TOKENS).logits
  after = model.apply({"params": P.merge_params(tiny_base, stepped)}, TOKENS).logits
  assert float(jnp.abs(after - before).max()) > 1e-4


@pytest.mark.parametrize("targets", [("q",), ("kv", "linear"), ("attn_out", "gating"), M.LORA_TARGETS])
def test_only_chosen_targets_carry_lora(tiny_base, targets):
  model = M.make_model("tiny", lora_rank=3, lora_targets=targets)
  paths = P.lora_leaf_paths(M.init_lora_params(model, tiny_base, key=jax.random.key(0)))
  got = set()
  for path in paths:
    match = LORA_MODULE.match(path)
    assert match, path
    got.add((match.group(1), TARGET_OF_MODULE[match.group(2)]))
  assert got == {(f"layer_{i}", t) for i in range(2) for t in targets}


def test_lora_params_are_float32_and_shaped_for_rank_over_bf16_base(tiny_base):
  base_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_base)
  model = M.make_model("tiny", lora_rank=5)
  lora = M.init_lora_params(model, base_bf16, key=jax.random.key(2))
  mod = lora["layer_0"]["attn"]["q_einsum"]["_LoRAEinsum_0"]["lora"]
  assert mod["a"].shape == (32, 5) and mod["b"].shape == (5, 4, 8)
  assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.float32)}
  # gemma's LoRA init for a: kaiming-uniform, |a| <= sqrt(6 / fan_in) with fan_in = prod(in dims).
  a_out = lora["layer_0"]["attn"]["attn_vec_einsum"]["_LoRAEinsum_0"]["lora"]["a"]  # (N, H, r)
  assert float(jnp.abs(a_out).max()) <= np.sqrt(6 / (4 * 8))
  assert float(jnp.abs(a_out).max()) > 0.5 * np.sqrt(6 / (4 * 8))
  hidden = M.hidden_states(model, P.merge_params(base_bf16, lora), TOKENS)
  assert hidden.shape == (2, 6, 32)


def test_rank_change_in_one_process_gets_new_shapes(tiny_base):
  # gemma's Transformer.__call__ is an nn.jit cached on module fields; the LoRA layout must not leak
  # between models that differ only in rank or targets.
  for rank, targets in [(2, ("q",)), (6, M.LORA_TARGETS), (3, ("linear",))]:
    model = M.make_model("tiny", lora_rank=rank, lora_targets=targets)
    lora = M.init_lora_params(model, tiny_base, key=jax.random.key(0))
    assert len(P.lora_leaf_paths(lora)) == 2 * 2 * len(targets)
    assert {x.shape[-1] for p, x in zip(P.lora_leaf_paths(lora), jax.tree.leaves(lora)) if p.endswith("/a")} == {rank}
    params = P.merge_params(tiny_base, lora)
    assert model.apply({"params": params}, TOKENS).logits.shape == (2, 6, 262_144)


def test_no_lora_under_vision_encoder():
  image = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3)), jnp.uint8)
  tokens = jnp.array([[2, 10, 255999, 30, 40, 50]] * 2, jnp.int32)
  model = M.make_model("tiny_vision", lora_rank=4, text_only=False)
  params = jax.eval_shape(lambda k: model.init(k, tokens, images=image), jax.random.key(0))["params"]
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert any(p.startswith("vision_encoder/siglip_encoder") for p in paths)
  assert any(p.startswith("embedder/mm_input_projection") for p in paths)
  assert [p for p in P.lora_leaf_paths(params) if not p.startswith("layer_")] == []
  # The same tiny vision tower under gm.nn.LoRA does get LoRA outside the decoder (a different
  # vision config, so that gemma's jit cache is not shared with the model above).
  control_config = dataclasses.replace(
    M.TINY_VISION_CONFIG,
    vision_encoder=dataclasses.replace(M.TINY_VISION_CONFIG.vision_encoder, apply_stop_gradient=False),
  )
  control = gm.nn.LoRA(rank=4, model=gm.nn.Transformer(config=control_config, dtype=jnp.float32))
  control_params = jax.eval_shape(lambda k: control.init(k, tokens, images=image), jax.random.key(0))["params"]
  assert [p for p in P.lora_leaf_paths(control_params) if not p.startswith("layer_")]


def test_vision_model_runs_with_images_and_lora():
  base = M.init_base_params("tiny_vision", key=jax.random.key(0), text_only=False)
  model = M.make_model("tiny_vision", lora_rank=2, text_only=False)
  params = P.merge_params(base, M.init_lora_params(model, base, key=jax.random.key(1)))
  image = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 28, 28, 3)), jnp.uint8)
  tokens = jnp.array([[2, 10, 255999, 30, 40]], jnp.int32)
  hidden = M.hidden_states(model, params, tokens, images=image)
  full = model.apply({"params": params}, tokens, images=image, return_hidden_states=True)
  assert hidden.shape == (1, 5, 32)  # the 4 inserted soft tokens are removed again
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(full.hidden_states), atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_hidden_states_and_logits_at_match_full_logits(tiny_base, softcap):
  config = dataclasses.replace(M.TINY_CONFIG, final_logit_softcap=softcap)
  model = gm.nn.Transformer(config=config, dtype=jnp.float32)
  full = model.apply({"params": tiny_base}, TOKENS, return_hidden_states=True)
  hidden = M.hidden_states(model, tiny_base, TOKENS)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(full.hidden_states), atol=1e-6)
  positions = jnp.array([[0, 5, 2], [4, 4, 1]])
  got = M.logits_at(tiny_base, hidden, positions, final_logit_softcap=softcap)
  want = jnp.take_along_axis(full.logits, positions[..., None], axis=1)
  assert got.shape == (2, 3, 262_144)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  if softcap is not None:
    assert float(jnp.abs(got).max()) <= softcap


def test_merge_split_round_trip(tiny_base):
  model = M.make_model("tiny", lora_rank=4, lora_targets=("q", "gating"))
  lora = M.init_lora_params(model, tiny_base, key=jax.random.key(3))
  base2, lora2 = P.split_params(P.merge_params(tiny_base, lora))
  assert jax.tree.structure(base2) == jax.tree.structure(tiny_base)
  assert jax.tree.structure(lora2) == jax.tree.structure(lora)
  for x, y in zip(jax.tree.leaves(lora2), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match=r"LoRA param layer_0/attn/q_einsum/_LoRAEinsum_0/lora/a already exists"):
    P.merge_params(P.merge_params(tiny_base, lora), lora)


def test_param_paths_come_in_jax_order_and_gemma_peft_split_merge_differ(tiny_base):
  # param_trees.flatten (flax.traverse_util, sorted) lists leaves in the order jax.tree flattens them.
  model = M.make_model("tiny", lora_rank=2)
  lora = M.init_lora_params(model, tiny_base, key=jax.random.key(1))
  merged = P.merge_params(tiny_base, lora)
  jax_paths = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(merged)[0]]
  assert list(P.flatten(merged)) == jax_paths
  assert P.lora_leaf_paths(merged) == ["/".join(p) for p in jax_paths if "lora" in p]
  # Why merge_params/split_params stay ours: gemma.peft's split leaves an empty module in the base
  # per LoRA wrapper, and its merge keeps the base's leaf where ours rejects a duplicate.
  g_base, g_lora = peft.split_params(merged)
  assert jax.tree.structure(g_lora) == jax.tree.structure(lora)
  assert g_base["layer_0"]["attn"]["q_einsum"]["_LoRAEinsum_0"] == {}
  assert "_LoRAEinsum_0" not in P.split_params(merged)[0]["layer_0"]["attn"]["q_einsum"]
  assert jax.tree.structure(peft.merge_params(merged, lora)) == jax.tree.structure(merged)


def test_fold_lora_equals_lora_forward(tiny_base):
  model = M.make_model("tiny", lora_rank=3)
  lora = M.init_lora_params(model, tiny_base, key=jax.random.key(4))
  keys = iter(jax.random.split(jax.random.key(5), 100))
  lora = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), lora)  # b != 0
  with_lora = M.hidden_states(model, P.merge_params(tiny_base, lora), TOKENS)
  folded = P.fold_lora(tiny_base, lora)
  merged = M.hidden_states(M.make_model("tiny"), folded, TOKENS)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(with_lora), atol=2e-4, rtol=2e-4)
  base_only = M.hidden_states(M.make_model("tiny"), tiny_base, TOKENS)
  assert float(jnp.abs(base_only - with_lora).max()) > 1e-2
  # ΔW of q: matrix view (D, r) @ (r, N·H) reshaped to gemma's (N, D, H).
  mod = lora["layer_1"]["attn"]["q_einsum"]["_LoRAEinsum_0"]["lora"]
  delta = (np.asarray(mod["a"]) @ np.asarray(mod["b"]).reshape(3, -1)).reshape(32, 4, 8).transpose(1, 0, 2)
  got = np.asarray(folded["layer_1"]["attn"]["q_einsum"]["w"]) - np.asarray(
    tiny_base["layer_1"]["attn"]["q_einsum"]["w"]
  )
  np.testing.assert_allclose(got, delta, atol=1e-6)


def test_init_lora_params_rejects_wrong_base_shapes(tiny_base):
  model = M.make_model("tiny", lora_rank=2)
  bad = jax.tree.map(lambda x: x, tiny_base)
  bad["layer_1"]["mlp"]["linear"] = jnp.zeros((48, 31))
  with pytest.raises(
    ValueError, match=r"shape mismatch at layer_1/mlp/linear: params have \(48, 31\), the model expects \(48, 32\)"
  ):
    M.init_lora_params(model, bad, key=jax.random.key(0))
  with pytest.raises(ValueError, match="needs a LoRA model"):
    M.init_lora_params(M.make_model("tiny"), tiny_base, key=jax.random.key(0))


def test_load_base_params_bad_input(tmp_path):
  with pytest.raises(ValueError, match="'tiny' has no real weights; use init_base_params"):
    M.load_base_params("tiny")
  with pytest.raises(ValueError, match=r"'gemma3_1b' needs checkpoint="):
    M.load_base_params("gemma3_1b")
  with pytest.raises(ValueError, match="unknown model name 'gemma4'"):
    M.load_base_params("gemma4")
  with pytest.raises(FileNotFoundError, match=r"checkpoint path '.*nowhere' does not exist"):
    M.load_base_params("gemma3_1b", checkpoint=tmp_path / "nowhere")


def test_load_base_params_shape_mismatch_from_a_saved_checkpoint(tmp_path):
  # A checkpoint with the 270M's tree but tiny arrays (2 per axis): saved, then loaded through gemma.
  wrong = jax.tree.map(
    lambda s: np.zeros((2,) * len(s.shape), np.float32), M.abstract_params(M.make_model("gemma3_270m"))
  )
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", wrong)
  with pytest.raises(
    ValueError,
    match=r"shape mismatch at embedder/input_embedding: params have \(2, 2\), the model expects \(262144, 640\)",
  ):
    M.load_base_params("gemma3_270m", checkpoint=tmp_path / "ckpt")


def test_official_checkpoint_loader_round_trip(tiny_base, tmp_path):
  from lora_squeeze.weights import pretrained

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", jax.tree.map(np.asarray, tiny_base))
  restored = pretrained.load_orbax_params(tmp_path / "ckpt", text_only=True)
  assert jax.tree.structure(restored) == jax.tree.structure(tiny_base)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(tiny_base)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y))


# (gemma module's einsum, weight shape from dims, LoRA wrapper path, base weight path) per target.
_MODULE_EINSUMS = {
  "q": (
    "BTD,NDH->BTNH",
    lambda d: (d["N"], d["D"], d["H"]),
    ("attn", "q_einsum", "_LoRAEinsum_0"),
    ("attn", "q_einsum", "w"),
  ),
  "kv": (
    "BSD,CKDH->CBSKH",
    lambda d: (2, d["K"], d["D"], d["H"]),
    ("attn", "kv_einsum", "_LoRAEinsum_0"),
    ("attn", "kv_einsum", "w"),
  ),
  "attn_out": (
    "BTNH,NHD->BTD",
    lambda d: (d["N"], d["H"], d["D"]),
    ("attn", "attn_vec_einsum", "_LoRAEinsum_0"),
    ("attn", "attn_vec_einsum", "w"),
  ),
  "gating": (
    "BTF,NHF->BTNH",
    lambda d: (2, d["F"], d["D"]),
    ("mlp", "_LoRAEinsum_gating_einsum"),
    ("mlp", "gating_einsum"),
  ),
  "linear": ("BTH,HF->BTF", lambda d: (d["F"], d["D"]), ("mlp", "_LoRAEinsum_linear"), ("mlp", "linear")),
}


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
  target=st.sampled_from(M.LORA_TARGETS),
  rank=st.integers(1, 6),
  dims=st.fixed_dictionaries({k: st.integers(1, 5) for k in "NKDHF"}),
  seed=st.integers(0, 2**16),
)
def test_fold_lora_matches_gemmas_lora_einsum(target, rank, dims, seed):
  from gemma.peft import _einsum_utils

  eqn, weight_shape, wrapper, weight_path = _MODULE_EINSUMS[target]
  shape = weight_shape(dims)
  lora_eqn, a_shape, b_shape = _einsum_utils.get_lora_einsum_str_and_shapes(
    einsum_str=eqn, weights_shape=shape, rank=rank
  )
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=a_shape).astype(np.float32), rng.normal(size=b_shape).astype(np.float32)
  w = rng.normal(size=shape).astype(np.float32)
  base = traverse_util.unflatten_dict({("layer_0", *weight_path): w})
  lora = traverse_util.unflatten_dict({("layer_0", *wrapper, "lora", "a"): a, ("layer_0", *wrapper, "lora", "b"): b})
  folded = P.flatten(P.fold_lora(base, lora))[("layer_0", *weight_path)]
  x_shape = [2, 3] + [dict(zip(eqn.split(",")[1].split("-")[0], shape))[c] for c in eqn.split(",")[0][2:]]
  x = rng.normal(size=x_shape).astype(np.float32)
  want = np.einsum(eqn, x, w) + np.einsum(lora_eqn, x, a, b)
  np.testing.assert_allclose(np.einsum(eqn, x, np.asarray(folded)), want, rtol=1e-4, atol=1e-4)
