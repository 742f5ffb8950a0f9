"""In-Squeeze (§4.1): anneal 128 -> 64 -> ... -> 1 within one training budget, squeezing between
stages; "proportional" gives each stage steps proportional to its rank, "min_steps" first gives
every stage min_steps (200) and splits the rest proportionally. `steps` is the whole budget
N + M (paper: 10,000 + 200), so it compares with Cont-Squeeze and "Direct +M" at equal cost.

    lora-squeeze train --config=configs/in_squeeze.py:task=boolq,scheme=min_steps --workdir=runs/x
    lora-squeeze train --config=configs/in_squeeze.py:task=piqa,ranks=16+8+4+2+1,scheme=proportional \\
        --config.checkpoint=/ckpt/gemma3-1b-it --config.model=gemma3_1b --workdir=runs/y

Keys: lora_squeeze/config_lib.py (schema). Each stage uses the packaged LR table (lora_squeeze/lr_table.json) at its rank unless lr is set.
"""

import ml_collections

from lora_squeeze import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_lib.base_config("in_squeeze")
  config.steps = 10_200
  config.ranks = config_lib.PAPER_RANKS
  config.scheme = "min_steps"
  config.min_steps = 200
  config.stage_warmup = 100
  return config_lib.apply_arg(config, arg)
