"""Evaluation as in the paper: scored options for classification and multiple choice, greedy
decoding for the generative tasks (DROP, VQA), and the tasks' standard metrics; and the reference
target's log-likelihood under teacher forcing (token_nll).

Scoring: the log-likelihood of an option is the sum of its tokens' log-probs given the prompt;
the prediction is the option with the highest one. Only the logits at the option-token positions
are computed (model.hidden_states + model.logits_at): the 262k-row unembedding would otherwise
dominate the cost of the 270M model. token_nll scores the target the same way, as the one option
of its training row (batching.target_row): logits only at the target positions.

Metrics (per example, averaged over the split):
  accuracy          predicted option in the example's correct set
  option_nll        (scored tasks) -log of the probability the options' softmax gives the correct
                    set: a continuous companion to accuracy that moves before the argmax does
  token_nll         sum over examples of -log p(target tokens | prompt), the end-of-answer token
                    included (exactly the training loss's tokens), over the total number of target
                    tokens: nats per token, lower is better. Per item: each example's summed NLL
                    (per_item["token_nll"]) and its token count (per_item["target_tokens"]), so the
                    paired bootstrap resamples the ratio of sums exactly (lora_squeeze.bootstrap)
  drop, vqa, exact_match, anls, relaxed_accuracy
                    (generative tasks) the answer metrics of lora_squeeze.answer_metrics on the
                    greedily decoded text
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from lora_squeeze import answer_metrics, decoding
from lora_squeeze import model as model_lib
from lora_squeeze import param_trees
from lora_squeeze.data import batching
from lora_squeeze.data.tasks import Example, Task
from lora_squeeze.param_trees import Params


# ---------------------------------------------------------------------------------------------
# Scoring.


@functools.partial(jax.jit, static_argnames=("model",))
def slot_log_probs(
  model,
  params: Params,
  tokens: jax.Array,
  slot_positions: jax.Array,
  slot_ids: jax.Array,
  images: jax.Array | None = None,
) -> jax.Array:
  """log p(slot_ids[k] | the tokens of its row up to and including flat position slot_positions[k]):
  tokens (B, T), slots (K,) with positions into the flattened (B * T) tokens -> (K,) float32."""
  hidden = model_lib.hidden_states(model, params, tokens, images=images)
  b, t, d = hidden.shape
  softcap = model_lib.base_model(model).config.final_logit_softcap
  logits = model_lib.logits_at(params, hidden.reshape(1, b * t, d), slot_positions[None], final_logit_softcap=softcap)
  logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, slot_ids[:, None], axis=-1)[:, 0]


def score_options(
  model,
  params: Params,
  tokenizer,
  examples: Sequence[Example],
  *,
  max_len: int,
  batch_size: int = 8,
  template: str = "chat",
  buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
  image_size: int | None = None,
  progress: Callable[[str], None] | None = None,
) -> list[np.ndarray]:
  """The log-likelihood of every option of every example: a list of (n_options,) float arrays.

  Args:
    model: a (LoRA-wrapped) model from model.make_model; params: its merged params.
    tokenizer: has encode(str) -> list[int] (gm.text.Gemma3Tokenizer).
    examples: scored examples (non-empty `options`).
    max_len: longest row; prompts are cut from the start of their text to fit.
    batch_size: rows per forward pass (the last batch of a bucket is padded to keep shapes static).
    image_size: resize images to this square size (vision tasks); None for text.
    progress: receives a progress line every ~10 s.
  """
  rows = [
    row
    for i, ex in enumerate(examples)
    for row in batching.scoring_rows(tokenizer, ex, i, max_len=max_len, template=template)
  ]
  return _score_rows(
    model,
    params,
    rows,
    examples,
    [len(ex.options) for ex in examples],
    max_len=max_len,
    batch_size=batch_size,
    buckets=buckets,
    image_size=image_size,
    progress=progress,
  )


def target_nll_items(
  model,
  params: Params,
  tokenizer,
  examples: Sequence[Example],
  *,
  max_len: int,
  batch_size: int = 8,
  template: str = "chat",
  buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
  image_size: int | None = None,
  progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(summed NLL in nats (n,) float64, target tokens (n,) int64) of each example's reference target
  (its end-of-answer token included) given its prompt, under teacher forcing; token_nll is
  sum(nll) / sum(tokens). Rows are the training rows (batching.target_row): the same truncation,
  so this is the training loss on held-out examples. Arguments as score_options'."""
  rows = [batching.target_row(tokenizer, ex, i, max_len=max_len, template=template) for i, ex in enumerate(examples)]
  log_likelihoods = _score_rows(
    model,
    params,
    rows,
    examples,
    [1] * len(examples),
    max_len=max_len,
    batch_size=batch_size,
    buckets=buckets,
    image_size=image_size,
    progress=progress,
  )
  return -np.array([s[0] for s in log_likelihoods]), np.array([len(r.slot_ids) for r in rows], np.int64)


def _score_rows(
  model,
  params: Params,
  rows: Sequence[batching.ScoringRow],
  examples: Sequence[Example],
  n_options: Sequence[int],
  *,
  max_len: int,
  batch_size: int,
  buckets: Sequence[int],
  image_size: int | None,
  progress: Callable[[str], None] | None,
) -> list[np.ndarray]:
  """Sum of the slot log-probs per (example, option) of the scoring `rows` made from `examples`
  (their images, for vision tasks): a list of (n_options[example],) float64 arrays."""
  images = [ex.image for ex in examples] if image_size is not None else None
  scores = [np.zeros(n, np.float64) for n in n_options]
  start = last = time.monotonic()
  done = 0
  for members, batch in batching.scoring_batches(
    rows, batch_size=batch_size, buckets=batching.buckets_for(max_len, buckets), images=images, image_size=image_size
  ):
    logp = np.asarray(
      slot_log_probs(model, params, batch["tokens"], batch["slot_positions"], batch["slot_ids"], batch.get("images"))
    )
    for b, row_index in enumerate(members):
      mine = batch["slot_rows"] == b
      np.add.at(scores[rows[row_index].example], batch["slot_options"][mine], logp[mine])
    done += len(members)
    if progress is not None and time.monotonic() - last > 10:
      last = time.monotonic()
      rate = done / (last - start)
      progress(f"scored {done}/{len(rows)} rows, {rate:.2f} rows/s, ETA {(len(rows) - done) / rate:.0f} s")
  return scores


def option_accuracy(scores: Sequence[np.ndarray], examples: Sequence[Example]) -> float:
  """Fraction of examples whose highest-scoring option is a correct one."""
  if not examples:
    raise ValueError("no examples to score")
  return float(np.mean([int(np.argmax(s)) in ex.correct for s, ex in zip(scores, examples)]))


def option_nll(scores: Sequence[np.ndarray], examples: Sequence[Example]) -> float:
  """Mean over examples of -log sum_{c in correct} softmax(scores)[c], in nats.

  The option log-likelihoods are renormalised over the example's options, so a uniform guess
  over k options scores log k and a certain, correct one 0.
  """
  if not examples:
    raise ValueError("no examples to score")
  return float(np.mean(option_nll_items(scores, examples)))


def option_nll_items(scores: Sequence[np.ndarray], examples: Sequence[Example]) -> list[float]:
  """Per example: -log sum_{c in correct} softmax(scores)[c] (option_nll is their mean)."""
  losses = []
  for s, ex in zip(scores, examples):
    logp = np.asarray(s, np.float64) - scipy.special.logsumexp(s)
    losses.append(float(-scipy.special.logsumexp(logp[list(ex.correct)])))
  return losses


# The key under which the trainer's evaluator returns per-example scores next to the metrics:
# {"accuracy": [0/1 per example], "option_nll": [nats per example]} for scored tasks,
# {"token_nll": [summed nats per example], "target_tokens": [tokens per example]} for token_nll
# tasks, the metric's per-example values for decoded ones. The paired bootstraps of the closing
# table and experiments/stats.py need them (lora_squeeze.bootstrap.compare_items).
PER_ITEM = "per_item"


# ---------------------------------------------------------------------------------------------
# Greedy decoding.


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy(
  model,
  params: Params,
  tokens: jax.Array,
  lengths: jax.Array,
  stop_ids: jax.Array,
  images: jax.Array | None,
  *,
  max_new_tokens: int,
) -> jax.Array:
  batch = tokens.shape[0]
  softcap = model_lib.base_model(model).config.final_logit_softcap
  rows = jnp.arange(batch)

  def step(state):
    s, buffer, done = state
    hidden = model_lib.hidden_states(model, params, buffer, images=images)
    logits = model_lib.logits_at(params, hidden, (lengths + s - 1)[:, None], final_logit_softcap=softcap)[:, 0]
    token = jnp.where(done, batching.PAD, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    buffer = buffer.at[rows, lengths + s].set(token)
    return s + 1, buffer, done | jnp.isin(token, stop_ids)

  def running(state):
    s, _, done = state
    return (s < max_new_tokens) & ~jnp.all(done)

  _, buffer, _ = jax.lax.while_loop(running, step, (0, tokens, jnp.zeros(batch, bool)))
  index = lengths[:, None] + jnp.arange(max_new_tokens)[None, :]
  return jnp.take_along_axis(buffer, index, axis=1)


def greedy_decode(
  model,
  params: Params,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  stop_ids: Sequence[int] = (batching.END_OF_TURN, batching.EOS),
  batch_size: int = 8,
  buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
  images: Sequence[np.ndarray] | None = None,
  image_size: int | None = None,
  kv_cache: bool = True,
) -> list[list[int]]:
  """Greedy continuations of `prompts` (token ids), at most `max_new_tokens` each, stop token excluded.

  kv_cache=True (the default): lora_squeeze.decoding, one prefill pass (images encoded once per
  prompt) and one single-token pass per new token. kv_cache=False: the reference decoder, which
  reruns the forward pass over the (bucketed, right-padded) buffer for each new token (and
  re-encodes the images); both give the same tokens (tests/test_vl.py). Either loop is one jitted
  lax.while_loop that stops early once every row has emitted a stop token.
  """
  if kv_cache:
    return decoding.cached_greedy_decode(
      model,
      params,
      prompts,
      max_new_tokens=max_new_tokens,
      stop_ids=stop_ids,
      batch_size=batch_size,
      buckets=buckets,
      images=images,
      image_size=image_size,
    )
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  stops = jnp.asarray(stop_ids, jnp.int32)
  out: list[list[int]] = [[] for _ in prompts]
  lengths = np.array([len(p) for p in prompts])
  for length, chunk, padded in decoding.decode_batches(prompts, buckets=buckets, batch_size=batch_size):
    tokens = batching.pad_to([np.asarray(prompts[i], np.int32) for i in padded], length + max_new_tokens)
    batch_images = None
    if images is not None:
      batch_images = np.stack([batching.resize_image(images[i], image_size) for i in padded])
    generated = np.asarray(
      _greedy(
        model,
        params,
        tokens,
        jnp.asarray(lengths[padded], jnp.int32),
        stops,
        batch_images,
        max_new_tokens=max_new_tokens,
      )
    )
    for b, i in enumerate(chunk):
      out[i] = decoding.cut_at_stop(generated[b].tolist(), stop_ids)
  return out


# ---------------------------------------------------------------------------------------------
# A task's metrics, and the trainer's evaluator.


def evaluate_examples(
  model, params: Params, tokenizer, task: Task, examples: Sequence[Example], **options: Any
) -> dict[str, float]:
  """The task's metrics over `examples`: {"accuracy", "option_nll"} for scored tasks, {"token_nll"}
  for token_nll tasks, {"f1", "em"} for DROP, {metric name} for the other generative ones. The
  first key is the headline score. `options` are evaluate_items' keyword arguments (max_len,
  batch_size, template, buckets, image_size, progress)."""
  return evaluate_items(model, params, tokenizer, task, examples, **options)[0]


def evaluate_items(
  model,
  params: Params,
  tokenizer,
  task: Task,
  examples: Sequence[Example],
  *,
  max_len: int,
  batch_size: int = 8,
  template: str = "chat",
  buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
  image_size: int | None = None,
  progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
  """(metrics as evaluate_examples returns them, per-example values of each metric: the metric is
  their mean, or for token_nll the ratio of the sums of per_item["token_nll"] and
  per_item["target_tokens"])."""
  if not examples:
    raise ValueError(f"task {task.name}: no examples to evaluate")
  if task.metric == "token_nll":
    nll, counts = target_nll_items(
      model,
      params,
      tokenizer,
      examples,
      max_len=max_len,
      batch_size=batch_size,
      template=template,
      buckets=buckets,
      image_size=image_size,
      progress=progress,
    )
    items = {"token_nll": nll.tolist(), "target_tokens": counts.tolist()}
    return {"token_nll": float(nll.sum() / counts.sum())}, items
  if not task.decoded:
    scores = score_options(
      model,
      params,
      tokenizer,
      examples,
      max_len=max_len,
      batch_size=batch_size,
      template=template,
      buckets=buckets,
      image_size=image_size,
      progress=progress,
    )
    items = {
      "accuracy": [float(int(np.argmax(s)) in ex.correct) for s, ex in zip(scores, examples)],
      "option_nll": option_nll_items(scores, examples),
    }
    return {k: float(np.mean(v)) for k, v in items.items()}, items
  prompts = [
    batching.example_prompt(tokenizer, ex, template=template).fit(max_len - task.max_new_tokens) for ex in examples
  ]
  images = [ex.image for ex in examples] if image_size is not None else None
  generated = greedy_decode(
    model,
    params,
    prompts,
    max_new_tokens=task.max_new_tokens,
    stop_ids=(batching.end_of_answer(template), batching.EOS),
    batch_size=batch_size,
    buckets=batching.buckets_for(max_len - task.max_new_tokens, buckets),
    images=images,
    image_size=image_size,
  )
  predictions = [tokenizer.decode(ids).strip() for ids in generated]
  if task.metric == "drop":
    pairs = np.array([answer_metrics.drop_metrics(p, ex.answers) for p, ex in zip(predictions, examples)])
    items = {"f1": [float(x) for x in pairs[:, 1]], "em": [float(x) for x in pairs[:, 0]]}
  else:
    metric = answer_metrics.GENERATIVE_METRICS[task.metric]
    items = {task.metric: [float(metric(p, ex.answers)) for p, ex in zip(predictions, examples)]}
  return {k: float(np.mean(v)) for k, v in items.items()}, items


def make_evaluator(
  model_for_rank: Callable[[int], Any],
  base_params: Params,
  tokenizer,
  task: Task,
  examples: Sequence[Example],
  *,
  plain_model=None,
  **kwargs,
) -> Callable[[int, Params], dict[str, float]]:
  """The trainer's Evaluator: (rank, lora_params) -> the task's metrics on `examples`, and under
  PER_ITEM their per-example values.

  With `plain_model` (model.make_model(name) without LoRA) the adapter is folded into the base
  weights (param_trees.fold_lora) and every rank runs the same compiled forward pass: a Post-Squeeze
  sweep then compiles once per length bucket instead of once per rank and bucket. Fold only a
  float32 base: added to bfloat16 weights, a small ΔW loses most of its bits.
  kwargs go to evaluate_examples (max_len, batch_size, template, buckets, image_size, progress).
  """

  def evaluate(rank: int, lora: Params) -> dict[str, Any]:
    if plain_model is not None:
      metrics, items = evaluate_items(
        plain_model, param_trees.fold_lora(base_params, lora), tokenizer, task, examples, **kwargs
      )
    else:
      params = param_trees.merge_params(base_params, lora)
      metrics, items = evaluate_items(model_for_rank(rank), params, tokenizer, task, examples, **kwargs)
    return {**metrics, PER_ITEM: items}

  return evaluate
