"""Gemma 3 models through the `gemma` library, with LoRA on the text decoder only.

Parameter trees are the *inner* Flax dicts (what `model.init(...)['params']` holds and what
`gm.ckpts.load_params` returns); call a model as `model.apply({'params': params}, tokens)`.

LoRA follows gemma's convention: a wrapped weight `w` becomes `w + ΔW` with `ΔW = a @ b`
(reshaped to `w`'s layout), **no alpha / rank scaling**. A LoRA module lives at
`<layer>/<einsum>/_LoRAEinsum_<x>/lora` = {'a': (*in, r), 'b': (r, *out)} and its params are
float32 whatever the dtype of the frozen base (bf16 LoRA params lose small updates to rounding).

Unlike `gm.nn.LoRA`, which wraps every Dense/Einsum it meets (the SigLIP vision encoder and the
multimodal projection included), `make_model` wraps only the einsums of the decoder blocks
`layer_<i>` that belong to the chosen targets.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from gemma import gm
from gemma import peft
from gemma.gm.nn import _layers
from gemma.gm.nn import _lora as gm_lora
from gemma.gm.nn import config as gm_config
from gemma.gm.nn.vision import _vision as gm_vision
from gemma.gm.nn.vision import _vision_utils as gm_vision_utils

from lora_squeeze import param_trees, validation

# The tree operations callers have used as model.*: defined in param_trees, imported from there.
from lora_squeeze.param_trees import (  # noqa: F401
  Params,
  check_base_shapes,
  count_params,
  fold_lora,
  lora_leaf_paths,
  merge_params,
  split_params,
)
from lora_squeeze.weights import pretrained


MODEL_NAMES = ("gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b", "tiny", "tiny_vision")
MULTIMODAL_MODEL_NAMES = ("gemma3_4b", "gemma3_12b", "gemma3_27b", "tiny_vision")
LORA_TARGETS = ("q", "kv", "attn_out", "gating", "linear")

# The full Gemma 3 vocabulary, so that any id the real tokenizer produces (the image tokens
# 255999/256000 included) is valid on the tiny configs too.
_GEMMA3_VOCAB = 262_144

_GEMMA_CLASSES = {
  "gemma3_270m": gm.nn.Gemma3_270M,
  "gemma3_1b": gm.nn.Gemma3_1B,
  "gemma3_4b": gm.nn.Gemma3_4B,
  "gemma3_12b": gm.nn.Gemma3_12B,
  "gemma3_27b": gm.nn.Gemma3_27B,
}


def _tiny_config(*, vision: bool) -> gm_config.TransformerConfig:
  """Two decoder layers (one sliding, one global), GQA, QK-norm: Gemma 3's structure, tiny dims.

  The vision variant has a one-layer SigLIP on 28×28 images (4 patches of 14×14 → 4 soft tokens).
  """
  vision_encoder = None
  if vision:
    vision_encoder = gm_vision.SigLiPFromPatches(
      siglip_encoder=gm_vision_utils.ViTModel(width=16, depth=1, mlp_dim=32, num_heads=2),
      siglip_exit=gm_vision.VisionExit(output_length=4),
      num_mm_tokens_per_image_prepool=4,
      num_mm_tokens_per_image=4,
      image_height=28,
      image_width=28,
    )
  return gm_config.TransformerConfig(
    num_embed=_GEMMA3_VOCAB,
    embed_dim=32,
    hidden_dim=48,
    num_heads=4,
    head_dim=8,
    num_kv_heads=1,
    final_logit_softcap=None,
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
    use_qk_norm=True,
    attention_types=(gm_config.AttentionType.LOCAL_SLIDING, gm_config.AttentionType.GLOBAL),
    query_pre_attn_norm=gm_config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
    sliding_window_size=8,
    transpose_gating_einsum=True,
    local_base_frequency=10_000,
    global_base_frequency=1_000_000,
    vision_encoder=vision_encoder,
  )


TINY_CONFIG = _tiny_config(vision=False)
TINY_VISION_CONFIG = _tiny_config(vision=True)


def check_model_name(name: str) -> None:
  """Raises ValueError when `name` is not one of MODEL_NAMES."""
  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_NAMES)}")


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
  if isinstance(targets, str):
    raise ValueError(f"LoRA targets must be a sequence of names, got the string {targets!r}")
  targets = tuple(targets)
  bad = [t for t in targets if t not in LORA_TARGETS]
  if bad or not targets:
    raise ValueError(f"bad LoRA targets {targets!r}; choose a non-empty subset of {LORA_TARGETS}")
  return targets


def lora_target_of(path: Sequence[str], weight_name: str) -> str | None:
  """The LoRA target ('q', 'kv', ...) of a gemma Einsum, or None outside the decoder blocks.

  Args:
    path: the Flax module path, e.g. ('layer_0', 'attn', 'q_einsum') or ('layer_3', 'mlp').
    weight_name: the Einsum's parameter name ('w', 'gating_einsum' or 'linear').
  """
  if not path or not path[0].startswith("layer_"):
    return None  # vision encoder, multimodal projection, embedder
  if weight_name == "gating_einsum":
    return "gating"
  if weight_name == "linear":
    return "linear"
  # Every Gemma 3 size uses separate q / kv einsums (GQA); a fused `qkv_einsum` (equal head
  # counts, Gemma 1/2 style) has no target here and is left unwrapped.
  return {"q_einsum": "q", "kv_einsum": "kv", "attn_vec_einsum": "attn_out"}.get(path[-1])


def _replace_decoder_einsum(module: nn.Module, *, rank: int, targets: tuple[str, ...]) -> nn.Module:
  """Interceptor callback: LoRA-wrap a decoder Einsum whose target is chosen, leave the rest."""
  if not isinstance(module, _layers.Einsum):
    return module
  if lora_target_of(module.path, module.weight_name) not in targets:
    return module
  # Same naming as gm.nn.LoRA, so trees and checkpoints are interchangeable with gemma's.
  name = None if module.weight_name == "w" else f"_LoRAEinsum_{module.weight_name}"
  return gm_lora._LoRAEinsum(name=name, rank=rank, dtype=jnp.float32, wrapped=module)


class DecoderLoRA(gm.nn.LoRA):
  """`gm.nn.LoRA` restricted to the chosen einsums of the text decoder blocks (float32 LoRA).

  Attributes:
    targets: subset of LORA_TARGETS to wrap.
  """

  _: dataclasses.KW_ONLY
  targets: tuple[str, ...] = LORA_TARGETS

  @nn.compact
  def __call__(self, *args, **kwargs):
    replace = functools.partial(_replace_decoder_einsum, rank=self.rank, targets=self.targets)
    with peft.ModuleInterceptor(replace):
      return self.model(*args, **kwargs)


def make_model(
  name: str,
  *,
  lora_rank: int | None = None,
  lora_targets: Sequence[str] = LORA_TARGETS,
  text_only: bool = True,
) -> nn.Module:
  """A Gemma 3 flax module, LoRA-wrapped on the text decoder when `lora_rank` is set.

  Args:
    name: one of MODEL_NAMES.
    lora_rank: LoRA rank r (positive int) or None for the plain base model.
    lora_targets: subset of LORA_TARGETS ("q", "kv", "attn_out", "gating", "linear").
    text_only: drop the vision encoder of a multimodal model (no effect on text-only ones).

  Returns:
    The module; its params are created in float32 by `init` (real weights come from
    `load_base_params` in whatever dtype was asked).
  """
  check_model_name(name)
  targets = _check_targets(lora_targets)
  if lora_rank is not None:
    validation.positive_int("lora_rank", lora_rank)
  signature = () if lora_rank is None else (lora_rank, targets)
  kwargs: dict[str, Any] = {"dtype": jnp.float32, "lora_signature": signature}
  if name in ("tiny", "tiny_vision"):
    config = TINY_VISION_CONFIG if name == "tiny_vision" else TINY_CONFIG
    if text_only:
      config = dataclasses.replace(config, vision_encoder=None)
    model = _signed(gm.nn.Transformer)(config=config, **kwargs)
  elif name in MULTIMODAL_MODEL_NAMES:
    model = _signed(_GEMMA_CLASSES[name])(text_only=text_only, **kwargs)
  else:
    model = _signed(_GEMMA_CLASSES[name])(**kwargs)
  if lora_rank is None:
    return model
  return DecoderLoRA(rank=lora_rank, model=model, dtype=jnp.float32, targets=targets)


@functools.cache
def _signed(cls: type[nn.Module]) -> type[nn.Module]:
  """`cls` with a `lora_signature` field: (rank, targets), or () without LoRA.

  The Transformer's `__call__` is an `nn.jit` whose trace cache is keyed on the module's
  fields only, not on the LoRA interceptor around it: without this field, a model with
  another rank or other targets (or none) silently reuses the first traced LoRA layout.
  """
  return type(
    cls.__name__, (cls,), {"__annotations__": {"lora_signature": tuple}, "lora_signature": (), "__module__": __name__}
  )


def base_model(model: nn.Module) -> nn.Module:
  """The underlying gemma Transformer of a (possibly LoRA-wrapped) model."""
  return model.model if isinstance(model, gm.nn.LoRA) else model


def _dummy_tokens() -> jax.Array:
  return jnp.zeros((1, 4), jnp.int32)


def abstract_params(model: nn.Module) -> Params:
  """Shapes/dtypes (jax.ShapeDtypeStruct) of all the model's params, nothing materialized."""
  variables = jax.eval_shape(lambda k: model.init(k, _dummy_tokens()), jax.random.key(0))
  return variables["params"]


def init_base_params(
  model_name: str, *, key: jax.Array, dtype: jnp.dtype = jnp.float32, text_only: bool = True
) -> Params:
  """Random base params (gemma's initializers) for tests and the tiny configs.

  Args:
    model_name: one of MODEL_NAMES.
    key: PRNG key.
    dtype: storage dtype of the returned params.
    text_only: as in make_model.
  """
  model = make_model(model_name, text_only=text_only)
  params = jax.jit(lambda k: model.init(k, _dummy_tokens())["params"])(key)
  return jax.tree.map(lambda x: x.astype(dtype), params)


def load_base_params(
  model_name: str,
  *,
  checkpoint: str | os.PathLike | None = None,
  cache_dir: str | os.PathLike | None = None,
  dtype: jnp.dtype = jnp.float32,
  text_only: bool = True,
) -> Params:
  """Real base weights, checked against the model's shapes and cast to `dtype`.

  Args:
    model_name: one of MODEL_NAMES except the tiny ones.
    checkpoint: an official gemma Orbax checkpoint directory (required for 1B–27B; for the 270M
      it replaces the embedded GGUF).
    cache_dir: cache of the converted GGUF (default $LORA_SQUEEZE_CACHE or ~/.cache/lora_squeeze).
    dtype: storage dtype of the returned params (e.g. jnp.bfloat16 for a frozen base).
    text_only: drop the vision params of a multimodal checkpoint (match make_model's text_only).

  Raises:
    ValueError: unknown or tiny model, no checkpoint for 1B–27B, or a shape mismatch.
    FileNotFoundError: the checkpoint path does not exist.
  """
  check_model_name(model_name)
  if model_name in ("tiny", "tiny_vision"):
    raise ValueError(f"{model_name!r} has no real weights; use init_base_params")
  if checkpoint is None and model_name != "gemma3_270m":
    raise ValueError(f"{model_name!r} needs checkpoint=<official gemma Orbax checkpoint directory>")
  if checkpoint is None:
    params = pretrained.embedded_270m_params(cache_dir)
  else:
    params = pretrained.load_orbax_params(checkpoint, text_only=text_only)
  param_trees.check_base_shapes(abstract_params(make_model(model_name, text_only=text_only)), params)
  flat = param_trees.flatten(params)
  del params
  # Leaf by leaf, dropping each source array; casting in numpy avoids a float32 device copy.
  return traverse_util.unflatten_dict({path: _to_device(flat.pop(path), jnp.dtype(dtype)) for path in list(flat)})


def _to_device(x: Any, dtype: jnp.dtype) -> jax.Array:
  x = np.asarray(x)
  return jnp.asarray(x, dtype) if x.dtype == dtype else jnp.asarray(x.astype(dtype, copy=False))


def init_lora_params(model: nn.Module, base_params: Params, *, key: jax.Array) -> Params:
  """Fresh LoRA params for a LoRA-wrapped model: a ~ gemma's kaiming-uniform, b = 0 (float32).

  Shapes come from `jax.eval_shape` of the model's init (no second copy of the base).

  Args:
    model: a model from make_model(..., lora_rank=r).
    base_params: the frozen base; checked against the model's expected shapes.
    key: PRNG key (one fold per LoRA module, in path order).

  Returns:
    A nested dict holding only the LoRA modules, e.g.
    {'layer_0': {'attn': {'q_einsum': {'_LoRAEinsum_0': {'lora': {'a': (640, r), 'b': (r, 4, 256)}}}}}}.
  """
  if not isinstance(model, gm.nn.LoRA):
    raise ValueError("init_lora_params needs a LoRA model: make_model(..., lora_rank=r)")
  shapes = param_trees.flatten(abstract_params(model))
  param_trees.check_base_shapes({p: s for p, s in shapes.items() if not param_trees.is_lora_path(p)}, base_params)
  a_init = nn.initializers.kaiming_uniform()
  lora = {}
  lora_paths = sorted(p for p in shapes if param_trees.is_lora_path(p))
  for i, path in enumerate(lora_paths):
    shape = shapes[path].shape
    if path[-1] == "a":
      lora[path] = a_init(jax.random.fold_in(key, i), shape, jnp.float32)
    else:
      lora[path] = jnp.zeros(shape, jnp.float32)
  return traverse_util.unflatten_dict(lora)


@functools.partial(jax.jit, static_argnames=("model",))
def _hidden_states(model: nn.Module, params: Params, tokens: jax.Array, images: jax.Array | None) -> jax.Array:
  # Under jit the unused full (B, T, V) logits are dead code and XLA drops them.
  out = model.apply({"params": params}, tokens, images=images, return_hidden_states=True)
  return out.hidden_states


def hidden_states(model: nn.Module, params: Params, tokens: jax.Array, *, images: jax.Array | None = None) -> jax.Array:
  """Final hidden states, after the final RMSNorm: tokens (B, T) -> (B, T, D).

  With images (B, [N,] H, W, C) uint8, the inserted soft-token positions are removed again, so
  position t indexes tokens[:, t]. Never materializes the (B, T, V) logits.
  """
  return _hidden_states(model, params, jnp.asarray(tokens), images)


def logits_at(
  params: Params, hidden: jax.Array, positions: jax.Array, *, final_logit_softcap: float | None = None
) -> jax.Array:
  """Logits only at `positions`: hidden (B, T, D), positions (B, K) int -> (B, K, V).

  The unembedding is the input embedding transposed (tied), as in gemma's Embedder.decode,
  then the config's final soft-cap (None for every Gemma 3 size).
  """
  h = jnp.take_along_axis(hidden, jnp.asarray(positions)[..., None], axis=1)
  table = params["embedder"]["input_embedding"]
  logits = jnp.dot(h, table.T)
  if final_logit_softcap is not None:
    logits = jnp.tanh(logits / final_logit_softcap) * final_logit_softcap
  return logits
