"""Greedy decoding with a KV cache: one prefill pass over the prompts (images encoded there, once
per prompt), then one single-token pass per new token that attends to the cached keys and values.

Why our own loop and not `gm.text.Sampler`: the sampler takes text prompts and applies its own
tokenization and turn formatting, while our evaluation feeds token ids that `batching` built
(template, prompt truncation from the start, length buckets) and must decode exactly what the
uncached reference decodes; it also keeps its state in a Python-level sampler object per call. The
model-level pieces are gemma's own, used as the sampler uses them: `config.init_cache`, the
Transformer's `cache=` / `positions=` / `attention_mask=` call, and `gemma.gm.utils._types.Input`
for the positions and the causal + bidirectional (image) attention mask of the prompt. Any model
from `model.make_model` works, LoRA-wrapped or plain (the LoRA einsums run inside the same call).

Layout. Prompts are right-padded to a bucket length L (L_mm after gemma inserts each image's soft
tokens). The cache holds L_mm + max_new_tokens slots; all rows write new token i at slot L_mm + i
(gemma's cache has one write index for the batch), while its RoPE position is the row's own
next position (prompt length + i), so a short prompt sees exactly the keys of its own tokens,
as in the uncached decoder where the new token sits right after the prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from gemma.gm.utils import _types as gm_types

from lora_squeeze import model as model_lib
from lora_squeeze.data import batching
from lora_squeeze.param_trees import Params


def _param_dtype(params: Params) -> jnp.dtype:
  return params["embedder"]["input_embedding"].dtype


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def cached_greedy(
  model, params: Params, tokens: jax.Array, stop_ids: jax.Array, images: jax.Array | None, *, max_new_tokens: int
) -> jax.Array:
  """Greedy continuations with a KV cache.

  Args:
    model: a model from model.make_model (LoRA-wrapped or plain); params: its (merged) params.
    tokens: (B, L) int32 prompts, right-padded with 0.
    stop_ids: (S,) int32; a row stops after emitting one (later tokens are 0).
    images: (B, [N,] H, W, 3) uint8 or None.
    max_new_tokens: static bound.

  Returns:
    (B, max_new_tokens) int32 generated ids (the stop token included, then 0s).
  """
  base = model_lib.base_model(model)
  if images is not None and images.ndim == 4:
    images = einops.rearrange(images, "b h w c -> b 1 h w c")
  prompt = gm_types.Input(text=tokens, images=images, config=base.config.input_config)
  batch, length_mm = tokens.shape[0], prompt.length_with_mm
  cache_length = length_mm + max_new_tokens
  cache = base.config.init_cache(batch_size=batch, dtype=_param_dtype(params), cache_length=cache_length)
  # Prefill: the prompt's own mask, no key beyond it (the generated slots are still empty).
  prefill_mask = jnp.pad(prompt.attention_mask, ((0, 0), (0, 0), (0, max_new_tokens)))
  out = model.apply(
    {"params": params},
    tokens,
    images=images,
    cache=cache,
    positions=prompt.positions,
    attention_mask=prefill_mask,
    return_last_only=True,
  )
  last_pos = prompt.last_token_pos  # (B,) position of each row's last prompt token (with soft tokens)
  # Keys a new token may attend to: the row's prompt tokens, then the generated slots so far.
  visible = jnp.pad(prompt.inputs_mask, ((0, 0), (0, max_new_tokens)))
  first = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
  generated = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_ids)

  def step(state):
    i, token, cache, visible, generated, done = state
    visible = visible.at[:, length_mm + i].set(True)
    out = model.apply(
      {"params": params},
      token[:, None],
      cache=cache,
      positions=(last_pos + 1 + i)[:, None],
      attention_mask=visible[:, None, :],
      return_last_only=True,
    )
    new = jnp.where(done, batching.PAD, jnp.argmax(out.logits, axis=-1).astype(jnp.int32))
    generated = generated.at[:, i + 1].set(new)
    return i + 1, new, out.cache, visible, generated, done | jnp.isin(new, stop_ids)

  def running(state):
    i, *_, done = state
    return (i + 1 < max_new_tokens) & ~jnp.all(done)

  state = (0, first, out.cache, visible, generated, done)
  return jax.lax.while_loop(running, step, state)[4]


def decode_batches(
  prompts: Sequence[Sequence[int]], *, buckets: Sequence[int], batch_size: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """The fixed-shape batches of a decoder: (bucket length, row indices, the indices padded to
  `batch_size` by repeating the first row), rows grouped by length bucket (one compilation each)."""
  bucket_of = np.array([batching.bucket_length(len(p), buckets) for p in prompts])
  for length in sorted(set(bucket_of.tolist())):
    members = np.flatnonzero(bucket_of == length)
    for start in range(0, len(members), batch_size):
      chunk = members[start : start + batch_size]
      yield length, chunk, np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])


def cut_at_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
  """`ids` up to (without) the first stop token."""
  stop_at = [k for k, t in enumerate(ids) if t in stop_ids]
  return ids[: stop_at[0]] if stop_at else ids


def cached_greedy_decode(
  model,
  params: Params,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  stop_ids: Sequence[int] = (batching.END_OF_TURN, batching.EOS),
  batch_size: int = 8,
  buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
  images: Sequence[Any] | None = None,
  image_size: int | None = None,
) -> list[list[int]]:
  """Like evaluate.greedy_decode (same arguments, same outputs token for token), with a KV cache.

  Rows are grouped by length bucket and padded to `batch_size` (static shapes: one compilation
  per bucket); images are decoded per batch (batching.resize_image).
  """
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  stops = jnp.asarray(stop_ids, jnp.int32)
  out: list[list[int]] = [[] for _ in prompts]
  for length, chunk, padded in decode_batches(prompts, buckets=buckets, batch_size=batch_size):
    tokens = batching.pad_to([np.asarray(prompts[i], np.int32) for i in padded], length)
    batch_images = None
    if images is not None:
      batch_images = np.stack([batching.resize_image(images[i], image_size) for i in padded])
    generated = np.asarray(cached_greedy(model, params, tokens, stops, batch_images, max_new_tokens=max_new_tokens))
    for b, i in enumerate(chunk):
      out[i] = cut_at_stop(generated[b].tolist(), stop_ids)
  return out
