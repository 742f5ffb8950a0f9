"""Ten vision-language QA tasks read from a user's download folder (no TFDS builders exist).

OK-VQA and TallyQA are the two the paper names (App. H); the other eight are the standard
Gemma/PaliGemma transfer tasks: VQAv2, GQA, TextVQA, DocVQA, ChartQA, AI2D, ScienceQA (image
questions) and A-OKVQA (multiple choice). Each task reads the standard annotation files and image
folder, unpacked as published, from `<data_dir>/<task name>/` (layouts in docs/tasks.md), like
big_vision's builders read a local download folder. An example holds its image as an
`images.ImageFile` (a path); batches decode the images they need (lora_squeeze/data/images.py).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_squeeze.data import images, readers
from lora_squeeze.data.tasks import Example, Source, Task
from lora_squeeze.data.text_tasks import multiple_choice

SHORT_ANSWER = "Answer with a single word or phrase."


def load_image(path: Path) -> images.ImageFile:
  """The image at `path`, decoded only when a batch needs it (np.asarray(image): (H, W, 3) uint8 RGB)."""
  return images.ImageFile(path)


def task_dir(name: str, data_dir: Path | None) -> Path:
  return (readers.default_data_dir() if data_dir is None else data_dir) / name


def vqa_answers(record: Mapping[str, Any]) -> tuple[str, ...]:
  return tuple(a["answer"] for a in record["answers"])


def generative(record: Mapping[str, Any], prompt_suffix: str = SHORT_ANSWER) -> Example:
  """A short-answer example; the target is the most frequent reference answer (VQA convention)."""
  answers = tuple(record["answers"])
  values, counts = np.unique(np.asarray(answers, dtype=object).astype(str), return_counts=True)
  return Example(
    example_id=str(record["id"]),
    prompt=f"{record['question']}\n{prompt_suffix}",
    target=str(values[np.argmax(counts)]),
    answers=answers,
    image=load_image(record["image"]),
  )


def chosen(record: Mapping[str, Any]) -> Example:
  """A multiple-choice example with an image; the letters are scored."""
  example = multiple_choice(str(record["id"]), record["question"], record["choices"], record["answer"])
  return dataclasses.replace(example, image=load_image(record["image"]))


# --- readers: (split, data_dir) -> list of {id, question, image, answers | choices+answer} -------


def coco_vqa_records(name: str, question_file: str, annotation_file: str, coco_year: int = 2014):
  """Readers for the VQA-format tasks (VQAv2, OK-VQA): questions JSON + annotations JSON + COCO images."""

  def read(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
    root = task_dir(name, data_dir)
    prepare = f"unpack the {name} {split} questions, annotations and COCO {split}{coco_year} images into {root}"
    questions = readers.read_json(root / question_file.format(split=split), prepare=prepare)["questions"]
    annotations = readers.read_json(root / annotation_file.format(split=split), prepare=prepare)["annotations"]
    by_id = {a["question_id"]: a for a in annotations}
    return [
      {
        "id": q["question_id"],
        "question": q["question"],
        "answers": vqa_answers(by_id[q["question_id"]]),
        "image": root / f"{split}{coco_year}" / f"COCO_{split}{coco_year}_{q['image_id']:012d}.jpg",
      }
      for q in questions
    ]

  return read


def tallyqa_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  root = task_dir("tallyqa", data_dir)
  rows = readers.read_json(root / f"{split}.json", prepare=f"unpack tallyqa.zip and its COCO/VG images into {root}")
  return [
    {"id": r["question_id"], "question": r["question"], "answers": (str(r["answer"]),), "image": root / r["image"]}
    for r in rows
  ]


def gqa_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  root = task_dir("gqa", data_dir)
  prepare = f"unpack GQA questions1.2.zip and images.zip into {root}"
  rows = readers.read_json(root / "questions1.2" / f"{split}_balanced_questions.json", prepare=prepare)
  return [
    {"id": qid, "question": r["question"], "answers": (r["answer"],), "image": root / "images" / f"{r['imageId']}.jpg"}
    for qid, r in rows.items()
  ]


def textvqa_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  root = task_dir("textvqa", data_dir)
  prepare = f"put TextVQA_0.5.1_{split}.json and train_images/ into {root}"
  rows = readers.read_json(root / f"TextVQA_0.5.1_{split}.json", prepare=prepare)["data"]
  return [
    {
      "id": r["question_id"],
      "question": r["question"],
      "answers": tuple(r["answers"]),
      "image": root / "train_images" / f"{r['image_id']}.jpg",  # val images ship in train_images/ too
    }
    for r in rows
  ]


def docvqa_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  root = task_dir("docvqa", data_dir) / split
  rows = readers.read_json(root / f"{split}_v1.0.json", prepare=f"unpack the DocVQA {split} archive into {root}")
  return [
    {"id": r["questionId"], "question": r["question"], "answers": tuple(r["answers"]), "image": root / r["image"]}
    for r in rows["data"]
  ]


def chartqa_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  root = task_dir("chartqa", data_dir) / "ChartQA Dataset" / split
  prepare = f"unpack ChartQA into {root.parent.parent} (it makes 'ChartQA Dataset/')"
  records = []
  for part in ("human", "augmented"):
    for i, r in enumerate(readers.read_json(root / f"{split}_{part}.json", prepare=prepare)):
      image = root / "png" / r["imgname"]
      records.append({"id": f"{part}/{i}", "question": r["query"], "answers": (str(r["label"]),), "image": image})
  return records


def ai2d_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  """AI2D: questions/<image>.json per diagram; the test diagrams are listed in ai2d_test_ids.csv."""
  root = task_dir("ai2d", data_dir)
  prepare = f"unpack ai2d-all.zip into {root} and put ai2d_test_ids.csv beside its questions/ folder"
  test_ids_path = root / "ai2d_test_ids.csv"
  if not test_ids_path.is_file():
    raise readers.DatasetNotPreparedError(f"no such file: {test_ids_path}; {prepare}")
  with test_ids_path.open(encoding="utf-8") as f:
    test_ids = {row[0].strip() for row in csv.reader(f) if row}
  records = []
  for path in sorted((root / "questions").glob("*.json")):
    diagram = path.name.removesuffix(".png.json")
    if (diagram in test_ids) != (split == "test"):
      continue
    content = readers.read_json(path, prepare=prepare)
    for question, q in content["questions"].items():
      records.append(
        {
          "id": q["questionId"],
          "question": question,
          "choices": q["answerTexts"],
          "answer": int(q["correctAnswer"]),
          "image": root / "images" / content["imageName"],
        }
      )
  return records


def scienceqa_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  """ScienceQA's questions that have an image (problems.json + pid_splits.json + images/<split>/<pid>/)."""
  root = task_dir("scienceqa", data_dir)
  prepare = f"put ScienceQA's problems.json, pid_splits.json and images/ into {root}"
  problems = readers.read_json(root / "problems.json", prepare=prepare)
  pids = readers.read_json(root / "pid_splits.json", prepare=prepare)[split]
  records = []
  for pid in pids:
    p = problems[pid]
    if not p.get("image"):
      continue
    question = f"Context: {p['hint']}\nQuestion: {p['question']}" if p.get("hint") else f"Question: {p['question']}"
    records.append({
        "id": pid, "question": question, "choices": p["choices"], "answer": int(p["answer"]),
        "image": root / "images" / split / pid / p["image"],
    })  # fmt: skip
  return records


def aokvqa_records(split: str, data_dir: Path | None) -> list[dict[str, Any]]:
  root = task_dir("aokvqa", data_dir)
  prepare = f"put aokvqa_v1p0_{split}.json and the COCO {split}2017/ images into {root}"
  rows = readers.read_json(root / f"aokvqa_v1p0_{split}.json", prepare=prepare)
  return [
    {
      "id": r["question_id"],
      "question": f"Question: {r['question']}",
      "choices": r["choices"],
      "answer": int(r["correct_choice_idx"]),
      "image": root / f"{split}2017" / f"{r['image_id']:012d}.jpg",
    }
    for r in rows
  ]


def vl_task(
  name: str, title: str, metric: str, splits: Mapping[str, str], read: Callable, *, prompt_suffix: str = SHORT_ANSWER
) -> Task:
  scored = metric == "accuracy"
  if scored:
    to_example = lambda r, i: chosen(r)  # noqa: E731
  else:
    to_example = lambda r, i: generative(r, prompt_suffix)  # noqa: E731
  source = Source(
      name="local", splits=splits, read=read, to_example=to_example,
      prepare=f"download {title} and unpack it into DATA_DIR/{name}/ (layout: docs/tasks.md)",
  )  # fmt: skip
  return Task(
      name=name, title=title, modality="vision", metric=metric, sources={"local": source},
      default_source="local", max_new_tokens=0 if scored else 16,
  )  # fmt: skip


VL_TASKS = (
  vl_task(
    "okvqa",
    "OK-VQA",
    "vqa",
    {"train": "train", "eval": "val"},
    coco_vqa_records("okvqa", "OpenEnded_mscoco_{split}2014_questions.json", "mscoco_{split}2014_annotations.json"),
  ),  # fmt: skip
  vl_task(
    "tallyqa",
    "TallyQA",
    "exact_match",
    {"train": "train", "eval": "test"},
    tallyqa_records,
    prompt_suffix="Answer with a number.",
  ),  # fmt: skip
  vl_task(
    "vqav2",
    "VQAv2",
    "vqa",
    {"train": "train", "eval": "val"},
    coco_vqa_records(
      "vqav2", "v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json"
    ),
  ),  # fmt: skip
  vl_task("gqa", "GQA", "exact_match", {"train": "train", "eval": "testdev"}, gqa_records),
  vl_task("textvqa", "TextVQA", "vqa", {"train": "train", "eval": "val"}, textvqa_records),
  vl_task("docvqa", "DocVQA", "anls", {"train": "train", "eval": "val"}, docvqa_records),
  vl_task("chartqa", "ChartQA", "relaxed_accuracy", {"train": "train", "eval": "test"}, chartqa_records),
  vl_task("ai2d", "AI2D", "accuracy", {"train": "train", "eval": "test"}, ai2d_records),
  vl_task("scienceqa", "ScienceQA-IMG", "accuracy", {"train": "train", "eval": "test"}, scienceqa_records),
  vl_task("aokvqa", "A-OKVQA (MC)", "accuracy", {"train": "train", "eval": "val"}, aokvqa_records),
)
