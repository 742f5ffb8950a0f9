"""Handwritten digits: a small real-image task that runs offline, the VL smoke test and example.

The images are the 1,797 8×8 handwritten digits (UCI "Optical Recognition of Handwritten Digits",
test part) that scikit-learn ships as `sklearn/datasets/data/digits.csv.gz`: 64 grey levels 0–16
and the label per row. The file is read directly (no sklearn import). Every fifth row (index
% 5 == 0, 360 images) is the eval split, the other 1,437 the train split: deterministic, and
each split holds every digit 34–37 times.

Two tasks share the images and the split (a project choice: the paper has no digit task):
  digits      "Which digit is shown?", scored over the options "0".."9" (accuracy, option_nll):
              the VL path of scored evaluation, one forward pass per example.
  digits_gen  the same question answered by greedy decoding, exact match: the VL path of
              generative evaluation (KV-cached decoding, the image encoded once per prompt).
Images are 8×8 RGB uint8 (grey level × 255/16); the batchers resize them to `image_size`.
"""

from __future__ import annotations

import functools

import numpy as np

from lora_squeeze.data import readers
from lora_squeeze.data.tasks import Example, Source, Task

PACKAGE_FILE = ("sklearn", "datasets/data/digits.csv.gz")
EVAL_EVERY = 5
QUESTION = "Which digit is shown in the image?"
DIGITS = tuple(str(d) for d in range(10))


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """(images (1797, 8, 8, 3) uint8, labels (1797,) int) from scikit-learn's bundled file."""
  table = np.loadtxt(readers.package_file(*PACKAGE_FILE), delimiter=",")
  grey = np.rint(table[:, :64].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
  images = np.repeat(grey[..., None], 3, axis=-1)
  images.setflags(write=False)
  return images, table[:, 64].astype(int)


def records(split: str, data_dir) -> list[dict]:
  """Rows of `split` ("train" | "eval"): {id, image (8, 8, 3) uint8, label}."""
  del data_dir  # the data ships with the package
  images, labels = _digits()
  in_eval = np.arange(len(labels)) % EVAL_EVERY == 0
  keep = np.flatnonzero(in_eval if split == "eval" else ~in_eval)
  return [{"id": int(i), "image": images[i], "label": int(labels[i])} for i in keep]


def scored_example(record, index: int) -> Example:
  del index
  label = record["label"]
  return Example(
    example_id=str(record["id"]),
    prompt=f"{QUESTION}\nAnswer with the digit.",
    target=DIGITS[label],
    options=DIGITS,
    correct=(label,),
    image=record["image"],
  )


def generative_example(record, index: int) -> Example:
  del index
  label = DIGITS[record["label"]]
  return Example(
    example_id=str(record["id"]),
    prompt=f"{QUESTION}\nAnswer with the digit.",
    target=label,
    answers=(label,),
    image=record["image"],
  )


def _source(to_example) -> Source:
  return Source(
    name="sklearn",
    splits={"train": "train", "eval": "eval"},
    read=records,
    to_example=to_example,
    prepare="install scikit-learn (it ships the digits file): pip install scikit-learn",
  )


DIGITS_TASKS = (
    Task(name="digits", title="Digits (scikit-learn)", modality="vision", metric="accuracy",
         sources={"sklearn": _source(scored_example)}, default_source="sklearn"),
    Task(name="digits_gen", title="Digits, generated answer (scikit-learn)", modality="vision", metric="exact_match",
         sources={"sklearn": _source(generative_example)}, default_source="sklearn", max_new_tokens=4),
)  # fmt: skip
