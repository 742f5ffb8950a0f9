"""Social IQa (Sap et al., 2019) as a TFDS builder over the public `socialiqa-train-dev` files.

manual_dir must hold (from https://maartensap.com/social-iqa/data/socialIQa_v1.4.tgz or the
AI2 `socialiqa-train-dev.zip`, unpacked): train.jsonl, train-labels.lst, dev.jsonl, dev-labels.lst
(directly or inside a `socialiqa-train-dev/` folder). Labels are 1-based in the .lst files.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

FILES = {"train": "train", "validation": "dev"}


def find_file(manual_dir: Path, name: str) -> Path:
  """`name` directly in manual_dir or in its `socialiqa-train-dev/` subfolder."""
  for path in (manual_dir / name, manual_dir / "socialiqa-train-dev" / name):
    if path.is_file():
      return path
  raise FileNotFoundError(f"SIQA: {name} not found in {manual_dir} (nor in its socialiqa-train-dev/ folder)")


class Siqa(tfds.core.GeneratorBasedBuilder):
  """Social IQa: context, question, three answers, the index of the right one."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "context": tfds.features.Text(),
          "question": tfds.features.Text(),
          "answerA": tfds.features.Text(),
          "answerB": tfds.features.Text(),
          "answerC": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["A", "B", "C"]),
        }
      ),
      homepage="https://leaderboard.allenai.org/socialiqa",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = Path(dl_manager.manual_dir)
    return {split: self._generate_examples(manual_dir, stem) for split, stem in FILES.items()}

  def _generate_examples(self, manual_dir: Path, stem: str):
    questions = find_file(manual_dir, f"{stem}.jsonl").read_text(encoding="utf-8").splitlines()
    labels = find_file(manual_dir, f"{stem}-labels.lst").read_text(encoding="utf-8").split()
    questions = [q for q in questions if q.strip()]
    if len(questions) != len(labels):
      raise ValueError(f"SIQA {stem}: {len(questions)} questions but {len(labels)} labels")
    for i, (line, label) in enumerate(zip(questions, labels)):
      r = json.loads(line)
      keys = ("context", "question", "answerA", "answerB", "answerC")
      yield i, {k: r[k] for k in keys} | {"label": int(label) - 1}
