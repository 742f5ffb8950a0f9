"""Direct LoRA fine-tuning at one rank (the paper's baseline, §4.1), optionally "+M" more steps.

    lora-squeeze train --config=configs/direct.py:task=boolq,rank=8 --workdir=runs/direct_boolq_r8
    lora-squeeze train --config=configs/direct.py:task=anli_r2,rank=1,extra_steps=200 \\
        --config.checkpoint=/ckpt/gemma3-4b-it --workdir=runs/direct_anli_r1_plus200

Keys: lora_squeeze/config_lib.py (schema). lr None = the packaged LR table (lora_squeeze/lr_table.json) at (model, rank).
"""

import ml_collections

from lora_squeeze import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_lib.base_config("direct")
  config.rank = 16
  config.extra_steps = 0
  config.extra_warmup = 100
  return config_lib.apply_arg(config, arg)
