"""Gemma's LoRA layout <-> Hugging Face Gemma 3 module names and Linear layouts.

Our LoRA module `layer_<i>/<einsum path>/lora` holds a: (*in, r), b: (r, *out) with ΔW = a @ b (in/out
axes flattened, no scale). Hugging Face's Gemma 3 decoder (transformers' modeling_gemma3.py) has one
nn.Linear per projection, weight (d_out, d_in); PEFT adapts it by ΔW_hf = scale · B @ A with
A: (r, d_in), B: (d_out, r). The flattened axis orders agree (the GGUF mapping in weights/gguf.py is
the same correspondence for the base weights: q rows are n·H + h, o columns n·H + h), so

    ours                                  Hugging Face (per decoder layer i)     part of b
    attn/q_einsum           a (D, r)      b (r, N, H)   self_attn.q_proj  (N·H × D)   all
    attn/kv_einsum          a (D, r)      b (r, 2, K, H) self_attn.k_proj (K·H × D)   b[:, 0]
                                                        self_attn.v_proj  (K·H × D)   b[:, 1]
    attn/attn_vec_einsum    a (N, H, r)   b (r, D)      self_attn.o_proj  (D × N·H)   all
    mlp gating_einsum       a (D, r)      b (r, 2, F)   mlp.gate_proj     (F × D)     b[:, 0]
                                                        mlp.up_proj       (F × D)     b[:, 1]
    mlp linear              a (F, r)      b (r, D)      mlp.down_proj     (D × F)     all

and A = aᵀ, B = b_partᵀ for each Hugging Face module. Gemma 3's q/k RMSNorm acts on the output of
q_proj / k_proj per head, after the LoRA update on either side, so it does not enter the mapping.
A fused module's shared `a` is duplicated into both of its Hugging Face modules; the other way, K
and V adapters of ranks r_k and r_v become one kv module of rank r_k + r_v with a = [A_kᵀ | A_vᵀ]
and a block-diagonal b.

The decoder layers are `model.layers.<i>` in the text-only Gemma3ForCausalLM and
`model.language_model.layers.<i>` in the multimodal Gemma3ForConditionalGeneration (transformers
>= 4.52; older releases used `language_model.model.layers.<i>`, which import also reads).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_squeeze.adapters.errors import AdapterError

# PEFT's `base_model_name_or_path` per model: the Hugging Face repos of the same weights.
HF_REPOS = {
  "gemma3_270m": "google/gemma-3-270m",
  "gemma3_1b": "google/gemma-3-1b-pt",
  "gemma3_4b": "google/gemma-3-4b-pt",
  "gemma3_12b": "google/gemma-3-12b-pt",
  "gemma3_27b": "google/gemma-3-27b-pt",
  "tiny": "tiny",
  "tiny_vision": "tiny_vision",
}
# Hugging Face class -> prefix of decoder layer i.
HF_CLASSES = {
  "Gemma3ForCausalLM": "model.layers.{i}.",
  "Gemma3ForConditionalGeneration": "model.language_model.layers.{i}.",
}
_LEGACY_PREFIXES = {"language_model.model.layers.{i}.": "Gemma3ForConditionalGeneration"}
HF_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_hf_class(model_name: str) -> str:
  """The class the Hugging Face checkpoints of this size load as (multimodal from 4B up)."""
  from lora_squeeze import model as model_lib

  return "Gemma3ForConditionalGeneration" if model_name in model_lib.MULTIMODAL_MODEL_NAMES else "Gemma3ForCausalLM"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Part:
  """One Hugging Face module of one of our modules: name relative to the layer, slot of b."""

  hf_name: str  # e.g. "self_attn.k_proj"
  slot: int | None  # index into the fused axis of b (None: b is not fused)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kind:
  """One of our LoRA module kinds: its path below `layer_<i>/`, stored shapes and HF parts."""

  target: str  # model.LORA_TARGETS
  path: str
  parts: tuple[Part, ...]


KINDS = (
  Kind(target="q", path="attn/q_einsum/_LoRAEinsum_0/lora", parts=(Part(hf_name="self_attn.q_proj", slot=None),)),
  Kind(
    target="kv",
    path="attn/kv_einsum/_LoRAEinsum_0/lora",
    parts=(Part(hf_name="self_attn.k_proj", slot=0), Part(hf_name="self_attn.v_proj", slot=1)),
  ),
  Kind(
    target="attn_out",
    path="attn/attn_vec_einsum/_LoRAEinsum_0/lora",
    parts=(Part(hf_name="self_attn.o_proj", slot=None),),
  ),
  Kind(
    target="gating",
    path="mlp/_LoRAEinsum_gating_einsum/lora",
    parts=(Part(hf_name="mlp.gate_proj", slot=0), Part(hf_name="mlp.up_proj", slot=1)),
  ),
  Kind(target="linear", path="mlp/_LoRAEinsum_linear/lora", parts=(Part(hf_name="mlp.down_proj", slot=None),)),
)
_KIND_BY_PATH = {k.path: k for k in KINDS}
_KIND_BY_HF = {p.hf_name: (k, p) for k in KINDS for p in k.parts}
_OUR_NAME = re.compile(r"layer_(\d+)/(.+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dims:
  """The text decoder's sizes: L layers, D model, F MLP hidden, N query heads, K kv heads, H head dim."""

  model: str
  num_layers: int
  d_model: int
  d_ff: int
  num_heads: int
  num_kv_heads: int
  head_dim: int

  def stored_shapes(self, kind: Kind, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Our (a, b) shapes of a module of this kind at rank r."""
    d, f, n, k, h = self.d_model, self.d_ff, self.num_heads, self.num_kv_heads, self.head_dim
    return {
      "q": ((d, r), (r, n, h)),
      "kv": ((d, r), (r, 2, k, h)),
      "attn_out": ((n, h, r), (r, d)),
      "gating": ((d, r), (r, 2, f)),
      "linear": ((f, r), (r, d)),
    }[kind.target]

  def hf_shape(self, hf_name: str) -> tuple[int, int]:
    """(d_out, d_in) of a Hugging Face decoder Linear."""
    d, f, n, k, h = self.d_model, self.d_ff, self.num_heads, self.num_kv_heads, self.head_dim
    return {
      "self_attn.q_proj": (n * h, d),
      "self_attn.k_proj": (k * h, d),
      "self_attn.v_proj": (k * h, d),
      "self_attn.o_proj": (d, n * h),
      "mlp.gate_proj": (f, d),
      "mlp.up_proj": (f, d),
      "mlp.down_proj": (d, f),
    }[hf_name]


@functools.cache
def dims(model_name: str) -> Dims:
  """Dims of one of model.MODEL_NAMES, from gemma's own config (nothing materialized)."""
  from lora_squeeze import model as model_lib

  if model_name not in model_lib.MODEL_NAMES:
    raise AdapterError(f"unknown model {model_name!r}; allowed: {', '.join(model_lib.MODEL_NAMES)}")
  c = model_lib.base_model(model_lib.make_model(model_name, text_only=True)).config
  return Dims(
    model=model_name,
    num_layers=c.num_layers,
    d_model=c.embed_dim,
    d_ff=c.hidden_dim,
    num_heads=c.num_heads,
    num_kv_heads=c.num_kv_heads,
    head_dim=c.head_dim,
  )


def parse_our_name(name: str, *, where: Any) -> tuple[int, Kind]:
  """(layer index, kind) of one of our module names, e.g. 'layer_3/attn/kv_einsum/_LoRAEinsum_0/lora'."""
  m = _OUR_NAME.fullmatch(name)
  kind = _KIND_BY_PATH.get(m.group(2)) if m else None
  if kind is None:
    raise AdapterError(
      f"{where}: LoRA module {name!r} has no Hugging Face Gemma 3 counterpart; allowed: "
      f"layer_<i>/ + one of {', '.join(_KIND_BY_PATH)}"
    )
  return int(m.group(1)), kind


def our_name(layer: int, kind: Kind) -> str:
  return f"layer_{layer}/{kind.path}"


def hf_module_name(layer: int, part: Part, hf_class: str) -> str:
  return HF_CLASSES[hf_class].format(i=layer) + part.hf_name


def parse_hf_name(name: str, *, where: Any) -> tuple[int, Kind, Part, str]:
  """(layer, kind, part, hf_class) of a PEFT module name such as 'model.layers.3.self_attn.k_proj'."""
  for prefix, hf_class in [*((p, c) for c, p in HF_CLASSES.items()), *_LEGACY_PREFIXES.items()]:
    pattern = re.escape(prefix).replace(re.escape("{i}"), r"(\d+)") + r"(.+)"
    m = re.fullmatch(pattern, name)
    if m and m.group(2) in _KIND_BY_HF:
      kind, part = _KIND_BY_HF[m.group(2)]
      return int(m.group(1)), kind, part, hf_class
  raise AdapterError(
    f"{where}: PEFT module {name!r} is not a Gemma 3 text-decoder projection we can map; allowed: "
    f"<decoder layer i>.{{{', '.join(_KIND_BY_HF)}}} under 'model.layers.<i>' or "
    "'model.language_model.layers.<i>'"
  )


def hf_text_config(model_name: str) -> dict[str, Any]:
  """Gemma3TextConfig fields equal to gemma's config of `model_name` (for the tiny models in tests)."""
  from gemma.gm.nn import config as gm_config

  from lora_squeeze import model as model_lib

  c = model_lib.base_model(model_lib.make_model(model_name, text_only=True)).config
  if c.query_pre_attn_norm == gm_config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM:
    query_scalar = c.head_dim
  else:
    query_scalar = c.embed_dim // c.num_heads
  types = [c.attention_types[i % len(c.attention_types)] for i in range(c.num_layers)]
  global_rope = {"rope_type": "default", "rope_theta": float(c.global_base_frequency)}
  if c.global_scale_factor != 1.0:
    global_rope = {
      "rope_type": "linear",
      "factor": float(c.global_scale_factor),
      "rope_theta": float(c.global_base_frequency),
    }
  return {
    "vocab_size": c.num_embed,
    "hidden_size": c.embed_dim,
    "intermediate_size": c.hidden_dim,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    "query_pre_attn_scalar": query_scalar,
    "sliding_window": c.sliding_window_size,
    "layer_types": [
      "sliding_attention" if t == gm_config.AttentionType.LOCAL_SLIDING else "full_attention" for t in types
    ],
    "rope_parameters": {
      "sliding_attention": {"rope_type": "default", "rope_theta": float(c.local_base_frequency)},
      "full_attention": global_rope,
    },
    "final_logit_softcapping": c.final_logit_softcap,
    "attn_logit_softcapping": c.attn_logits_soft_cap,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
  }


def hf_text_state_dict(
  params: Mapping[str, Any], *, num_heads: int, num_kv_heads: int, head_dim: int, prefix: str = "model."
) -> dict[str, np.ndarray]:
  """Our base params (gemma tree, text decoder) -> Hugging Face Gemma 3 text-model weights (float32).

  The inverse of weights/gguf.py's mapping, with the norms kept as gemma's `scale` (Gemma3RMSNorm
  also multiplies by 1 + weight). `prefix` is 'model.' (Gemma3ForCausalLM) or
  'model.language_model.' (Gemma3ForConditionalGeneration); the LM head is tied to the embedding.
  """
  f32 = lambda x: np.asarray(x, np.float32)
  out = {
    prefix + "embed_tokens.weight": f32(params["embedder"]["input_embedding"]),
    prefix + "norm.weight": f32(params["final_norm"]["scale"]),
  }
  i = 0
  while f"layer_{i}" in params:
    layer, p = params[f"layer_{i}"], f"{prefix}layers.{i}."
    attn = layer["attn"]
    q = f32(attn["q_einsum"]["w"])  # (N, D, H)
    kv = f32(attn["kv_einsum"]["w"])  # (2, K, D, H)
    o = f32(attn["attn_vec_einsum"]["w"])  # (N, H, D)
    heads_first = lambda w, n: w.transpose(0, 2, 1).reshape(n * head_dim, w.shape[1])
    out[p + "self_attn.q_proj.weight"] = heads_first(q, num_heads)
    out[p + "self_attn.k_proj.weight"] = heads_first(kv[0], num_kv_heads)
    out[p + "self_attn.v_proj.weight"] = heads_first(kv[1], num_kv_heads)
    out[p + "self_attn.o_proj.weight"] = o.reshape(num_heads * head_dim, o.shape[-1]).T
    out[p + "self_attn.q_norm.weight"] = f32(attn["_query_norm"]["scale"])
    out[p + "self_attn.k_norm.weight"] = f32(attn["_key_norm"]["scale"])
    gating = f32(layer["mlp"]["gating_einsum"])  # (2, F, D)
    out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gating[0], gating[1]
    out[p + "mlp.down_proj.weight"] = f32(layer["mlp"]["linear"]).T
    for ours, theirs in (
      ("pre_attention_norm", "input_layernorm"),
      ("post_attention_norm", "post_attention_layernorm"),
      ("pre_ffw_norm", "pre_feedforward_layernorm"),
      ("post_ffw_norm", "post_feedforward_layernorm"),
    ):
      out[p + theirs + ".weight"] = f32(layer[ours]["scale"])
    i += 1
  # Transposed views would be written in their memory order by safetensors.
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
