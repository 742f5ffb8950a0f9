"""Evaluation as in the paper: scored options for classification and multiple choice, greedy
decoding for the generative tasks (DROP, VQA), and the tasks' standard metrics.

Scoring: the log-likelihood of an option is the sum of its tokens' log-probs given the prompt;
the prediction is the option with the highest one. Only the logits at the option-token positions
are computed (model.hidden_states + model.logits_at): the 262k-row unembedding would otherwise
dominate the cost of the 270M model.

Metrics (per example, averaged over the split):
  accuracy          predicted option in the example's correct set
  option_nll        (scored tasks) -log of the probability the options' softmax gives the correct
                    set: a continuous companion to accuracy that moves before the argmax does
  drop              DROP exact match and F1 (the official DROP answer normalization and bag alignment)
  vqa               VQA accuracy: min(#matching humans / 3, 1), averaged over the 10 leave-one-out
                    subsets of the references, after the official VQA answer normalization
  exact_match       normalized prediction equals a reference (TallyQA, GQA)
  anls              average normalized Levenshtein similarity, threshold 0.5 (DocVQA)
  relaxed_accuracy  numbers within 5 % of the reference, else exact match (ChartQA)
"""

from __future__ import annotations

import functools
import re
import string
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special

from lora_squeeze import decoding
from lora_squeeze import model as model_lib
from lora_squeeze.data import batching
from lora_squeeze.data.tasks import Example, Task

Params = Any


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
  """log p(slot_ids[b, k] | tokens[b, : slot_positions[b, k] + 1]): tokens (B, T), slots (B, K) -> (B, K) float32."""
  hidden = model_lib.hidden_states(model, params, tokens, images=images)
  softcap = model_lib.base_model(model).config.final_logit_softcap
  logits = model_lib.logits_at(params, hidden, slot_positions, final_logit_softcap=softcap)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, slot_ids[..., None], axis=-1)[..., 0]


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
  scores = [np.zeros(len(ex.options), np.float64) for ex in examples]
  images = [ex.image for ex in examples] if image_size is not None else None
  start = last = time.monotonic()
  done = 0
  for members, batch in batching.scoring_batches(
    rows, batch_size=batch_size, buckets=batching.buckets_for(max_len, buckets), images=images, image_size=image_size
  ):
    logp = np.asarray(
      slot_log_probs(model, params, batch["tokens"], batch["slot_positions"], batch["slot_ids"], batch.get("images"))
    )
    for b, row_index in enumerate(members):
      used = batch["slot_options"][b] >= 0
      np.add.at(scores[rows[row_index].example], batch["slot_options"][b][used], logp[b][used])
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
# {"accuracy": [0/1 per example], "option_nll": [nats per example]} for scored tasks, the metric's
# per-example values for generative ones. The paired bootstrap of experiments/stats.py needs them.
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
# DROP (exact match and F1 with the official answer normalization and multi-span bag alignment).


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def drop_normalize(text: str) -> str:
  """Lowercase; drop punctuation (not inside numbers), articles and extra spaces; numbers as floats."""
  parts = []
  for token in re.split(" |-", text):
    token = token.lower()
    if not _is_number(token):
      token = "".join(ch for ch in token if ch not in string.punctuation)
    if _is_number(token):
      token = str(float(token))
    token = " ".join(re.sub(r"\b(a|an|the)\b", " ", token).split())
    if token.strip():
      parts.append(token)
  return " ".join(parts).strip()


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
  common = len(gold & predicted)
  precision = common / len(predicted) if predicted else 1.0
  recall = common / len(gold) if gold else 1.0
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], predicted: set[str]) -> bool:
  """A gold span with numbers only counts when the prediction shares one of them."""
  gold_numbers = {w for w in gold if _is_number(w)}
  return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def drop_em_f1(prediction: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
  """(exact match, F1) of one prediction against one gold answer; each a span or a list of spans.

  Spans are matched one-to-one by the assignment that maximizes the summed F1 (scipy's
  linear_sum_assignment); F1 is averaged over max(#gold, #predicted) spans and rounded to 2 places.
  """
  pred_spans = [prediction] if isinstance(prediction, str) else list(prediction)
  gold_spans = [gold] if isinstance(gold, str) else list(gold)
  pred_norm = [drop_normalize(s) for s in pred_spans]
  gold_norm = [drop_normalize(s) for s in gold_spans]
  exact = float(sorted(set(pred_norm)) == sorted(set(gold_norm)) and len(pred_norm) == len(gold_norm))
  pred_bags = [set(s.split()) for s in pred_norm]
  gold_bags = [set(s.split()) for s in gold_norm]
  scores = np.zeros((len(gold_bags), len(pred_bags)))
  for g, gold_bag in enumerate(gold_bags):
    for p, pred_bag in enumerate(pred_bags):
      if _numbers_agree(gold_bag, pred_bag):
        scores[g, p] = _bag_f1(pred_bag, gold_bag)
  rows, cols = scipy.optimize.linear_sum_assignment(-scores)
  best = np.zeros(max(len(gold_bags), len(pred_bags)))
  for r, c in zip(rows, cols):
    best[r] = max(best[r], scores[r, c])
  return exact, round(float(np.mean(best)), 2)


def drop_metrics(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
  """(EM, F1) against the best of several gold answers (DROP's validated answers)."""
  pairs = [drop_em_f1(prediction, gold) for gold in answers]
  return max(p[0] for p in pairs), max(p[1] for p in pairs)


# ---------------------------------------------------------------------------------------------
# VQA accuracy and the other short-answer metrics.

_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                    "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer: str) -> str:
  """The VQA evaluation's answer normalization: punctuation, digits for number words, no articles,
  standard contractions (the official script's rules)."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  for p in _VQA_PUNCTUATION:
    if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
      text = text.replace(p, "")
    else:
      text = text.replace(p, " ")
  text = _PERIOD_STRIP.sub("", text)
  words = []
  for word in text.lower().split():
    word = _VQA_NUMBERS.get(word, word)
    if word not in _VQA_ARTICLES:
      words.append(_VQA_CONTRACTIONS.get(word, word))
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy: mean over each reference left out of min(#other references == prediction / 3, 1)."""
  if not answers:
    raise ValueError("VQA accuracy needs at least one reference answer")
  pred = vqa_normalize(prediction)
  gold = [vqa_normalize(a) for a in answers]
  if len(gold) == 1:
    return float(pred == gold[0])
  matches = np.array([g == pred for g in gold])
  return float(np.mean([min(1.0, (matches.sum() - m) / 3.0) for m in matches]))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  """1 if the normalized prediction equals a normalized reference (VQA normalization)."""
  return float(vqa_normalize(prediction) in {vqa_normalize(a) for a in answers})


def _levenshtein(a: str, b: str) -> int:
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def anls(prediction: str, answers: Sequence[str], *, threshold: float = 0.5) -> float:
  """Normalized Levenshtein similarity to the closest reference, 0 below `threshold` (DocVQA)."""
  pred = " ".join(prediction.lower().split())
  best = 0.0
  for answer in answers:
    gold = " ".join(answer.lower().split())
    distance = _levenshtein(pred, gold) / max(len(pred), len(gold), 1)
    best = max(best, 1.0 - distance if distance < threshold else 0.0)
  return best


def relaxed_accuracy(prediction: str, answers: Sequence[str], *, tolerance: float = 0.05) -> float:
  """ChartQA: a number within `tolerance` (relative) of a numeric reference, else exact match."""

  def number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "")
    return float(text) if _is_number(text) else None

  pred_number = number(prediction)
  for answer in answers:
    gold_number = number(answer)
    if pred_number is not None and gold_number is not None and gold_number != 0:
      if abs(pred_number - gold_number) / abs(gold_number) <= tolerance:
        return 1.0
    elif prediction.strip().lower() == answer.strip().lower():
      return 1.0
  return 0.0


GENERATIVE_METRICS: Mapping[str, Callable[[str, Sequence[str]], float]] = {
    "vqa": vqa_accuracy, "exact_match": exact_match, "anls": anls, "relaxed_accuracy": relaxed_accuracy,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A task's metrics, and the trainer's evaluator.


def evaluate_examples(
  model, params: Params, tokenizer, task: Task, examples: Sequence[Example], **options: Any
) -> dict[str, float]:
  """The task's metrics over `examples`: {"accuracy", "option_nll"} for scored tasks, {"f1", "em"} for DROP,
  {metric name} for the other generative ones. The first key is the headline score. `options` are
  evaluate_items' keyword arguments (max_len, batch_size, template, buckets, image_size, progress)."""
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
  their mean)."""
  if not examples:
    raise ValueError(f"task {task.name}: no examples to evaluate")
  if not task.generative:
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
    batching.encode_prompt(tokenizer, ex.prompt, template=template, image=ex.image is not None).fit(
      max_len - task.max_new_tokens
    )
    for ex in examples
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
    pairs = np.array([drop_metrics(p, ex.answers) for p, ex in zip(predictions, examples)])
    items = {"f1": [float(x) for x in pairs[:, 1]], "em": [float(x) for x in pairs[:, 0]]}
  else:
    metric = GENERATIVE_METRICS[task.metric]
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
  weights (model.fold_lora) and every rank runs the same compiled forward pass: a Post-Squeeze
  sweep then compiles once per length bucket instead of once per rank and bucket. Fold only a
  float32 base: added to bfloat16 weights, a small ΔW loses most of its bits.
  kwargs go to evaluate_examples (max_len, batch_size, template, buckets, image_size, progress).
  """

  def evaluate(rank: int, lora: Params) -> dict[str, Any]:
    if plain_model is not None:
      metrics, items = evaluate_items(
        plain_model, model_lib.fold_lora(base_params, lora), tokenizer, task, examples, **kwargs
      )
    else:
      params = model_lib.merge_params(base_params, lora)
      metrics, items = evaluate_items(model_for_rank(rank), params, tokenizer, task, examples, **kwargs)
    return {**metrics, PER_ITEM: items}

  return evaluate
