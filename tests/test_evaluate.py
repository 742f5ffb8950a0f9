"""Scoring against full-logit references on the tiny model, greedy decoding against a step-by-step
reference, and the task metrics on hand-checked cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import answer_metrics, evaluate, param_trees
from lora_squeeze import model as model_lib
from lora_squeeze.data import Example, batching, get_task, text_tasks


@pytest.fixture(scope="module")
def tiny():
  """A rank-2 LoRA tiny model with non-zero LoRA weights: (model, base, lora, merged params)."""
  model = model_lib.make_model("tiny", lora_rank=2)
  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(1))
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  lora = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return model, base, lora, param_trees.merge_params(base, lora)


def full_log_softmax(model, params, sequences, length):
  """(N, length, V) log-softmax of the model's full logits over right-padded `sequences` (right
  padding cannot change earlier positions of a causal model, and one shape compiles once)."""
  tokens = jnp.asarray(batching.pad_to([np.asarray(s, np.int32) for s in sequences], length))
  return jax.nn.log_softmax(model.apply({"params": params}, tokens).logits.astype(jnp.float32), axis=-1)


EXAMPLES = [
  Example(example_id="mc", prompt="Which one?\nA. x\nB. y\nC. z", target="B", options=("A", "B", "C"), correct=(1,)),
  Example(
    example_id="nli",
    prompt="Premise: it rains. Hypothesis: it is wet.",
    target="entailment",
    options=text_tasks.ANLI_LABELS,
    correct=(0,),
  ),
  Example(
    example_id="long", prompt="word " * 120 + "Answer yes or no.", target="no", options=("yes", "no"), correct=(1,)
  ),
]


def test_scores_equal_the_full_logit_log_likelihood(tiny, gemma3_tokenizer):
  model, _, _, params = tiny
  tok = gemma3_tokenizer
  scores = evaluate.score_options(model, params, tok, EXAMPLES, max_len=64, batch_size=4, buckets=(64,))
  sequences, targets = [], []  # targets: (example, option, prompt length, option ids)
  for e, ex in enumerate(EXAMPLES):
    options = [tok.encode(o) for o in ex.options]
    budget = 64 if all(len(o) == 1 for o in options) else 64 - max(len(o) for o in options)
    prompt = batching.encode_prompt(tok, ex.prompt).fit(budget)
    for j, ids in enumerate(options):
      sequences.append(prompt + ids)
      targets.append((e, j, len(prompt), ids))
  logp = full_log_softmax(model, params, sequences, 72)
  want = [np.zeros(len(ex.options)) for ex in EXAMPLES]
  for row, (e, j, n, ids) in enumerate(targets):
    want[e][j] = sum(float(logp[row, n - 1 + k, t]) for k, t in enumerate(ids))
  for got, expected in zip(scores, want):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_accuracy_counts_any_correct_option():
  examples = [
    Example(example_id=str(i), prompt="p", target="a", options=("a", "b", "c"), correct=c)
    for i, c in enumerate([(0,), (1, 2), (2,)])
  ]
  scores = [np.array([0.0, -1.0, -2.0]), np.array([-3.0, -2.0, -0.5]), np.array([-1.0, -0.1, -2.0])]
  assert evaluate.option_accuracy(scores, examples) == pytest.approx(2 / 3)


def test_option_nll_renormalises_over_the_options():
  examples = [
    Example(example_id=str(i), prompt="p", target="a", options=("a", "b", "c"), correct=c)
    for i, c in enumerate([(0,), (1, 2)])
  ]
  scores = [np.log(np.array([0.2, 0.3, 0.5]) * 1e-3), np.log(np.array([0.5, 0.1, 0.4]))]
  # Example 0: p(a) = 0.2 after renormalising; example 1: any correct option, p = 0.1 + 0.4.
  assert evaluate.option_nll(scores, examples) == pytest.approx(-(np.log(0.2) + np.log(0.5)) / 2)
  assert evaluate.option_nll_items(scores, examples) == pytest.approx([-np.log(0.2), -np.log(0.5)])
  uniform = [np.full(3, -7.0), np.full(3, 2.0)]
  assert evaluate.option_nll(uniform, examples[:1]) == pytest.approx(np.log(3))
  with pytest.raises(ValueError, match="no examples"):
    evaluate.option_nll([], [])


def test_folded_evaluation_equals_the_lora_model(tiny, gemma3_tokenizer):
  model, base, lora, _ = tiny
  task = get_task("boolq")
  kwargs = {"max_len": 64, "batch_size": 4, "buckets": (64,)}
  examples = EXAMPLES[:1]
  merged = evaluate.score_options(model, param_trees.merge_params(base, lora), gemma3_tokenizer, examples, **kwargs)
  folded = evaluate.score_options(
    model_lib.make_model("tiny"), param_trees.fold_lora(base, lora), gemma3_tokenizer, examples, **kwargs
  )
  for a, b in zip(merged, folded):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  evaluator = evaluate.make_evaluator(
    lambda rank: model, base, gemma3_tokenizer, task, examples, plain_model=model_lib.make_model("tiny"), **kwargs
  )
  result = evaluator(2, lora)
  # The evaluator runs the folded forward pass: its scores are `folded`'s to the bit (and equal
  # `merged`'s to rounding, above: which bits differ depends on how XLA compiled each program).
  assert result == {
    "accuracy": evaluate.option_accuracy(folded, examples),
    "option_nll": evaluate.option_nll(folded, examples),
    evaluate.PER_ITEM: {
      "accuracy": [evaluate.option_accuracy(folded, examples)],
      "option_nll": [evaluate.option_nll(folded, examples)],
    },
  }
  assert result["option_nll"] == pytest.approx(evaluate.option_nll(merged, examples), rel=1e-5)


def test_greedy_decode_matches_step_by_step_argmax(tiny, gemma3_tokenizer):
  model, _, _, params = tiny
  prompts = [batching.encode_prompt(gemma3_tokenizer, p).fit(40) for p in ("hi", "tell me a longer story please")]
  got = evaluate.greedy_decode(
    model, params, prompts, max_new_tokens=4, stop_ids=(batching.EOS,), batch_size=2, buckets=(16, 32)
  )
  sequences = [list(p) for p in prompts]
  for _ in range(4):
    logp = full_log_softmax(model, params, sequences, 48)
    for i, seq in enumerate(sequences):
      seq.append(int(jnp.argmax(logp[i, len(seq) - 1])))
  assert got == [seq[len(p) :] for seq, p in zip(sequences, prompts)]


def test_greedy_decode_stops_at_a_stop_token(tiny, gemma3_tokenizer):
  model, _, _, params = tiny
  prompt = batching.encode_prompt(gemma3_tokenizer, "hi").fit(40)
  (free,) = evaluate.greedy_decode(model, params, [prompt], max_new_tokens=4, stop_ids=(batching.EOS,), buckets=(32,))
  (stopped,) = evaluate.greedy_decode(model, params, [prompt], max_new_tokens=4, stop_ids=(free[1],), buckets=(32,))
  assert stopped == free[: free.index(free[1])]


def test_generative_task_metrics_run_end_to_end(tiny, gemma3_tokenizer):
  model, _, _, params = tiny
  examples = [Example(example_id="d", prompt="How many?", target="2", answers=("2", "two"))]
  metrics = evaluate.evaluate_examples(
    model, params, gemma3_tokenizer, get_task("drop"), examples, max_len=64, buckets=(64,)
  )
  prediction = gemma3_tokenizer.decode(
    evaluate.greedy_decode(
      model, params, [batching.encode_prompt(gemma3_tokenizer, "How many?").fit(48)], max_new_tokens=16, buckets=(48,)
    )[0]
  ).strip()
  assert metrics == dict(zip(("f1", "em"), reversed(answer_metrics.drop_metrics(prediction, ("2", "two")))))


# ---------------------------------------------------------------------------------------------
# DROP.


@pytest.mark.parametrize(
  "prediction, gold, em, f1",
  [
    ("The Cat", "cat", 1.0, 1.0),
    ("1,000", "1000", 1.0, 1.0),
    ("john smith", "smith", 0.0, 0.67),
    ("5 yards", "6 yards", 0.0, 0.0),  # a gold number must appear in the prediction
    (["paris", "rome"], ["rome", "paris"], 1.0, 1.0),
    (["paris"], ["rome", "paris"], 0.0, 0.5),
    ("twenty-one", "twenty one", 1.0, 1.0),
  ],
)
def test_drop_em_f1(prediction, gold, em, f1):
  assert answer_metrics.drop_em_f1(prediction, gold) == (em, f1)


def test_drop_takes_the_best_reference():
  assert answer_metrics.drop_metrics("four", ["4", "four"]) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# VQA accuracy and friends.


def test_vqa_accuracy_leave_one_out():
  assert answer_metrics.vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
  assert answer_metrics.vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
  assert answer_metrics.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
  assert answer_metrics.vqa_accuracy("maybe", ["yes"] * 10) == 0.0


def test_vqa_normalization():
  assert answer_metrics.vqa_normalize("Two.") == "2"
  assert answer_metrics.vqa_normalize("The Dog!") == "dog"
  assert answer_metrics.vqa_normalize("dont") == "don't"
  assert answer_metrics.vqa_normalize("1,000") == "1000"
  assert answer_metrics.vqa_accuracy("a dog", ["dog"] * 10) == 1.0


def test_short_answer_metrics():
  assert answer_metrics.exact_match("Three", ["3"]) == 1.0 and answer_metrics.exact_match("4", ["3"]) == 0.0
  assert answer_metrics.anls("hellp", ["hello"]) == pytest.approx(0.8)
  assert answer_metrics.anls("abc", ["xyz"]) == 0.0
  assert answer_metrics.anls("Hello  World", ["hello world"]) == 1.0
  assert answer_metrics.relaxed_accuracy("104", ["100"]) == 1.0
  assert answer_metrics.relaxed_accuracy("106", ["100"]) == 0.0
  assert answer_metrics.relaxed_accuracy("45%", ["45"]) == 1.0
  assert answer_metrics.relaxed_accuracy("Yes", ["yes"]) == 1.0
