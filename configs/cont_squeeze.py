"""Cont-Squeeze (§4.1): train N steps at r_src, squeeze to r_tgt, continue M steps at r_tgt with a
fresh optimizer, a 100-step warmup and the r_tgt learning rate (paper: 128 -> 1, M = 200 or 700).

    lora-squeeze train --config=configs/cont_squeeze.py:task=mmlu,r_src=128,r_tgt=1 --workdir=runs/x
    lora-squeeze train --config=configs/cont_squeeze.py:task=boolq,extra_steps=700 \\
        --config.checkpoint=/ckpt/gemma3-4b-it --workdir=runs/y

Keys: lora_squeeze/config_lib.py (schema). lr (r_src) and lr_tgt (r_tgt) None = the packaged LR table (lora_squeeze/lr_table.json).
"""

import ml_collections
from ml_collections import config_dict

from lora_squeeze import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_lib.base_config("cont_squeeze")
  config.r_src = 128
  config.r_tgt = 1
  config.extra_steps = 200
  config.extra_warmup = 100
  config.lr_tgt = config_dict.placeholder(float)
  return config_lib.apply_arg(config, arg)
