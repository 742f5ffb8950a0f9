"""The source x target rank heatmap study (paper Fig. 4/9, Table 6; Fig. 5 for qr_core vs rsvd):
one run per task x source rank, each squeezed to every lower rank and compared with direct training.

    python -m experiments.heatmap --config=configs/heatmap.py:reduced --workdir=studies/heatmap
    python -m experiments.heatmap --config=configs/heatmap.py:paper \\
        --config.train_overrides.checkpoint=/ckpt/gemma3-4b-it --workdir=studies/heatmap_4b

The argument is a preset: "paper", "reduced" (the embedded 270M + mmlu_field on CPU) or "tiny" (tests).
The study's keys and its driver live in experiments/heatmap.py.
"""

import ml_collections

from experiments import heatmap


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return heatmap.get_config(arg)
