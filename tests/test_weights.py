"""GGUF → gemma mapping, the verified cache, and the real Gemma 3 270M (slow: 238 MB weights)."""

import concurrent.futures
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import model as M
from lora_squeeze.weights import cache as cache_lib
from lora_squeeze.weights import gguf as gguf_lib

N, K, H, D, F, V, LAYERS = 4, 2, 3, 5, 7, 11, 2
PARAGRAPH = pathlib.Path(__file__).parent / "data" / "english_paragraph.txt"
# Measured 13.9 (float32 base) on the paragraph; see docs/model.md for why 20.
PERPLEXITY_THRESHOLD = 20.0


def _fake_gguf_tensors(rng):
  """Random tensors in llama.cpp's (out_features, in_features) layout, norms stored as 1 + scale."""
  t = {"token_embd.weight": rng.normal(size=(V, D)), "output_norm.weight": rng.normal(size=(D,))}
  for i in range(LAYERS):
    b = f"blk.{i}."
    t[b + "attn_q.weight"] = rng.normal(size=(N * H, D))
    t[b + "attn_k.weight"] = rng.normal(size=(K * H, D))
    t[b + "attn_v.weight"] = rng.normal(size=(K * H, D))
    t[b + "attn_output.weight"] = rng.normal(size=(D, N * H))
    t[b + "ffn_gate.weight"] = rng.normal(size=(F, D))
    t[b + "ffn_up.weight"] = rng.normal(size=(F, D))
    t[b + "ffn_down.weight"] = rng.normal(size=(D, F))
    for norm, size in [
      ("attn_norm", D),
      ("post_attention_norm", D),
      ("ffn_norm", D),
      ("post_ffw_norm", D),
      ("attn_q_norm", H),
      ("attn_k_norm", H),
    ]:
      t[f"{b}{norm}.weight"] = rng.normal(size=(size,))
  return t


def _map(tensors):
  return gguf_lib.gguf_to_params(tensors, num_layers=LAYERS, num_heads=N, num_kv_heads=K, head_dim=H)


def test_gguf_mapping_computes_what_the_pytorch_layout_computes():
  rng = np.random.default_rng(0)
  t = _fake_gguf_tensors(rng)
  p = _map(t)
  x = rng.normal(size=(D,))
  layer, b = p["layer_1"], "blk.1."
  # y = W x in PyTorch layout must equal gemma's einsums (the strings gemma's modules use).
  q = np.einsum("D,NDH->NH", x, layer["attn"]["q_einsum"]["w"])
  np.testing.assert_allclose(q.reshape(-1), t[b + "attn_q.weight"] @ x)
  k, v = np.einsum("D,CKDH->CKH", x, layer["attn"]["kv_einsum"]["w"])
  np.testing.assert_allclose(k.reshape(-1), t[b + "attn_k.weight"] @ x)
  np.testing.assert_allclose(v.reshape(-1), t[b + "attn_v.weight"] @ x)
  heads = rng.normal(size=(N, H))
  out = np.einsum("NH,NHD->D", heads, layer["attn"]["attn_vec_einsum"]["w"])
  np.testing.assert_allclose(out, t[b + "attn_output.weight"] @ heads.reshape(-1))
  gate, up = np.einsum("F,NHF->NH", x, layer["mlp"]["gating_einsum"])  # transposed gating layout
  np.testing.assert_allclose(gate, t[b + "ffn_gate.weight"] @ x)
  np.testing.assert_allclose(up, t[b + "ffn_up.weight"] @ x)
  act = rng.normal(size=(F,))
  np.testing.assert_allclose(np.einsum("H,HF->F", act, layer["mlp"]["linear"]), t[b + "ffn_down.weight"] @ act)
  np.testing.assert_allclose(layer["attn"]["_query_norm"]["scale"], t[b + "attn_q_norm.weight"] - 1.0)
  np.testing.assert_allclose(layer["attn"]["_key_norm"]["scale"], t[b + "attn_k_norm.weight"] - 1.0)
  np.testing.assert_allclose(layer["pre_ffw_norm"]["scale"], t[b + "ffn_norm.weight"] - 1.0)
  np.testing.assert_allclose(p["final_norm"]["scale"], t["output_norm.weight"] - 1.0)
  np.testing.assert_array_equal(p["embedder"]["input_embedding"], t["token_embd.weight"])


def test_gguf_mapping_rejects_missing_and_unused_tensors():
  t = _fake_gguf_tensors(np.random.default_rng(0))
  extra = dict(t, **{"rope_freqs.weight": np.zeros(3)})
  with pytest.raises(ValueError, match=r"GGUF has tensors the Gemma 3 mapping does not use: \['rope_freqs.weight'\]"):
    _map(extra)
  del t["blk.1.ffn_up.weight"]
  with pytest.raises(ValueError, match=r"GGUF lacks tensor 'blk.1.ffn_up.weight'"):
    _map(t)


@pytest.fixture
def small_tree():
  rng = np.random.default_rng(1)
  return {"a": {"w": rng.normal(size=(3, 4)).astype(np.float32)}, "b": rng.normal(size=(5,)).astype(np.float32)}


def test_cache_round_trip(tmp_path, small_tree):
  cache_lib.save_entry(tmp_path / "entry", small_tree)
  got = cache_lib.load_entry(tmp_path / "entry")
  np.testing.assert_array_equal(got["a"]["w"], small_tree["a"]["w"])
  np.testing.assert_array_equal(got["b"], small_tree["b"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temporary left behind


def test_cache_without_manifest_is_partial(tmp_path, small_tree):
  cache_lib.save_entry(tmp_path / "entry", small_tree)
  (tmp_path / "entry" / "manifest.json").unlink()
  with pytest.raises(cache_lib.CacheError, match="is incomplete: no manifest.json"):
    cache_lib.load_entry(tmp_path / "entry")


def test_cache_detects_changed_values(tmp_path, small_tree):
  cache_lib.save_entry(tmp_path / "entry", small_tree)
  manifest_path = tmp_path / "entry" / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest["arrays"]["a/w"]["sha256"] = "0" * 64
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(cache_lib.CacheError, match="a/w fails its sha256 check"):
    cache_lib.load_entry(tmp_path / "entry")
  manifest["arrays"]["a/w"]["shape"] = [4, 3]
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(cache_lib.CacheError, match=r"a/w is float32\[3, 4\], manifest says float32\[4, 3\]"):
    cache_lib.load_entry(tmp_path / "entry")


def test_cache_detects_damaged_checkpoint_files(tmp_path, small_tree):
  cache_lib.save_entry(tmp_path / "entry", small_tree)
  data_files = [p for p in (tmp_path / "entry" / "params").rglob("*") if p.is_file() and p.stat().st_size > 0]
  for p in data_files:
    p.write_bytes(b"\0" * p.stat().st_size)
  with pytest.raises(cache_lib.CacheError, match="cache entry"):
    cache_lib.load_entry(tmp_path / "entry")


def test_load_or_build_rebuilds_a_corrupt_entry_and_reuses_a_good_one(tmp_path, small_tree):
  calls = []

  def build():
    calls.append(1)
    return small_tree

  entry = tmp_path / "entry"
  cache_lib.load_or_build(entry, build)
  cache_lib.load_or_build(entry, build)
  assert len(calls) == 1
  (entry / "manifest.json").write_text("{not json")
  got = cache_lib.load_or_build(entry, build)
  assert len(calls) == 2
  np.testing.assert_array_equal(got["a"]["w"], small_tree["a"]["w"])
  cache_lib.load_entry(entry)  # the rebuilt entry verifies


def test_load_or_build_builds_once_under_concurrent_callers(tmp_path, small_tree):
  calls = []

  def slow_build():
    calls.append(1)
    time.sleep(0.5)
    return small_tree

  entry = tmp_path / "entry"
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(lambda _: cache_lib.load_or_build(entry, slow_build), range(3)))
  assert len(calls) == 1
  for got in results:
    np.testing.assert_array_equal(got["b"], small_tree["b"])


def test_cache_root_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv(cache_lib.CACHE_ENV, str(tmp_path / "c"))
  assert cache_lib.cache_root() == tmp_path / "c"
  assert (tmp_path / "c").is_dir()
  assert cache_lib.cache_root(tmp_path / "d") == tmp_path / "d"


def _perplexity(params, tokenizer, text):
  model = M.make_model("gemma3_270m")
  ids = jnp.asarray([[2] + tokenizer.encode(text)])
  hidden = M.hidden_states(model, params, ids)
  logits = M.logits_at(params, hidden, jnp.arange(ids.shape[1] - 1)[None])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp[0], ids[0, 1:, None], axis=-1).mean()
  return float(jnp.exp(nll))


@pytest.mark.slow
def test_real_270m_is_a_language_model(gemma3_270m_params, gemma3_tokenizer):
  text = PARAGRAPH.read_text().strip()
  ppl = _perplexity(gemma3_270m_params, gemma3_tokenizer, text)
  assert 1.0 < ppl < PERPLEXITY_THRESHOLD, ppl
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), gemma3_270m_params)
  assert _perplexity(bf16, gemma3_tokenizer, text) < PERPLEXITY_THRESHOLD


@pytest.mark.slow
def test_real_270m_counts_on(gemma3_270m_params, gemma3_tokenizer):
  model = M.make_model("gemma3_270m")
  ids = [2] + gemma3_tokenizer.encode("One, two, three, four,")
  hidden = M.hidden_states(model, gemma3_270m_params, jnp.asarray([ids]))
  greedy = int(jnp.argmax(M.logits_at(gemma3_270m_params, hidden, jnp.asarray([[len(ids) - 1]]))[0, 0]))
  assert gemma3_tokenizer.decode([greedy]) == " five"


@pytest.mark.slow
def test_real_270m_params_are_cached_and_verified(gemma3_270m_params):
  from lora_squeeze.weights import pretrained

  entry = cache_lib.cache_root() / pretrained.GGUF_CACHE_ENTRY
  manifest = json.loads((entry / "manifest.json").read_text())
  assert manifest["arrays"]["layer_0/attn/q_einsum/w"]["shape"] == [4, 640, 256]
  assert len(manifest["arrays"]) == len(jax.tree.leaves(gemma3_270m_params))
  assert M.count_params(gemma3_270m_params) == 268_098_176
