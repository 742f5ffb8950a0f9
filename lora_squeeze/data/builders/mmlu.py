"""MMLU (Hendrycks et al., 2021) as a TFDS builder over the public `data.tar` files.

manual_dir must hold the unpacked https://people.eecs.berkeley.edu/~hendrycks/data.tar, i.e. a
`data/` folder (or its contents) with auxiliary_train/, dev/, val/ and test/ CSV files
(question, A, B, C, D, answer letter; no header). The paper fine-tunes on auxiliary_train.
"""

from __future__ import annotations

import csv
from pathlib import Path

import tensorflow_datasets as tfds

SPLIT_FOLDERS = {"train": "auxiliary_train", "dev": "dev", "validation": "val", "test": "test"}


def data_root(manual_dir: Path) -> Path:
  """The folder that holds auxiliary_train/, dev/, val/, test/."""
  for root in (manual_dir / "data", manual_dir):
    if (root / "test").is_dir():
      return root
  raise FileNotFoundError(f"MMLU: no test/ folder in {manual_dir} nor in {manual_dir / 'data'}")


def subject(csv_path: Path, folder: str) -> str:
  """'high_school_physics_test.csv' -> 'high school physics' (auxiliary files name their source)."""
  stem = csv_path.stem.removesuffix(f"_{folder}")
  return stem.replace("_", " ")


class Mmlu(tfds.core.GeneratorBasedBuilder):
  """MMLU: question, four choices, the index of the right one, the subject."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "question": tfds.features.Text(),
          "choices": tfds.features.Sequence(tfds.features.Text(), length=4),
          "answer": tfds.features.ClassLabel(names=["A", "B", "C", "D"]),
          "subject": tfds.features.Text(),
        }
      ),
      homepage="https://github.com/hendrycks/test",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = data_root(Path(dl_manager.manual_dir))
    return {split: self._generate_examples(root / folder, folder) for split, folder in SPLIT_FOLDERS.items()}

  def _generate_examples(self, folder_path: Path, folder: str):
    for csv_path in sorted(folder_path.glob("*.csv")):
      with csv_path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
          if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
            raise ValueError(f"MMLU {csv_path}:{i + 1}: expected question,A,B,C,D,answer; got {row!r}")
          example = {"question": row[0], "choices": row[1:5], "answer": row[5], "subject": subject(csv_path, folder)}
          yield f"{csv_path.stem}/{i}", example
