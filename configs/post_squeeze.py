"""Post-Squeeze (§3.1): train once at r_src, then squeeze a copy to every target rank and
evaluate each (no further training).

    lora-squeeze train --config=configs/post_squeeze.py:task=boolq,r_src=128 --workdir=runs/x
    lora-squeeze train --config=configs/post_squeeze.py:task=drop,r_src=16,targets=8+4+2+1 \\
        --config.squeeze.method=rsvd --config.checkpoint=/ckpt/gemma3-4b-it --workdir=runs/y

Keys: lora_squeeze/config_lib.py (schema). Targets default to every paper rank below r_src.
"""

import ml_collections

from lora_squeeze import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_lib.base_config("post_squeeze")
  config.r_src = 128
  config.targets = tuple(r for r in config_lib.PAPER_RANKS if r < 128)
  return config_lib.apply_arg(config, arg)
