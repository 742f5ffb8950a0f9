"""The learning-rate sweep study (paper App. A, Table 2; Fig. 3): direct LoRA at every rank x lr of
the grid {1e-3, 3e-3, 1e-2, 3e-2, 1e-1}, the best lr per rank, then Post-Squeeze from the source
rank at its best lr. Writes lr_table.json in the format of configs/lr_table.json.

    python -m experiments.lr_sweep --config=configs/lr_sweep.py:reduced --workdir=studies/lr_sweep
    python -m experiments.lr_sweep --config=configs/lr_sweep.py:paper \\
        --config.train_overrides.checkpoint=/ckpt/gemma3-4b-it --workdir=studies/lr_sweep_4b

The argument is a preset: "paper" (Gemma 3 4B, 13 text tasks), "reduced" (the embedded 270M +
mmlu_field on CPU) or "tiny" (tests). The study's keys and its driver live in experiments/lr_sweep.py;
each run's training config is `train_config` (a file of this folder) plus `train_overrides`.
"""

import ml_collections

from experiments import lr_sweep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return lr_sweep.get_config(arg)
