"""The VL smoke test and example: Cont-Squeeze on handwritten digits with images, offline.

The `digits` task (lora_squeeze/data/digits.py: scikit-learn's bundled 8×8 digits, 1,437 train /
360 eval images) through the same plan runner as the text tasks: rank 4 for `steps`, squeezed to
rank 2, `extra_steps` more at rank 2, the adapter scored before and after the squeeze with the
image of each example. By default the random `tiny_vision` Gemma 3 (a one-layer SigLIP on 28×28
images): it runs in about a minute on 2 CPU cores and checks the VL path end to end, not accuracy.

    lora-squeeze train --config=configs/vl_digits.py --workdir=runs/vl_digits
    lora-squeeze train --config=configs/vl_digits.py:task=digits_gen --workdir=runs/vl_digits_gen   # greedy answers

With an official Gemma 3 4B checkpoint (SigLIP at 896×896, LoRA on the text decoder only):

    lora-squeeze train --config=configs/vl_digits.py:model=gemma3_4b,r_src=16,r_tgt=1 \\
        --config.checkpoint=/ckpt/gemma3-4b-it --config.tokenizer=/ckpt/tokenizer.model \\
        --config.image_size=896 --config.template=chat --config.dtype=bfloat16 \\
        --config.lr=0.003 --config.lr_tgt=0.03 --workdir=runs/vl_digits_4b   # lr_table.json: rank 16, rank 1

Keys: lora_squeeze/config_lib.py (schema).
"""

import ml_collections

from lora_squeeze import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_lib.base_config("cont_squeeze")
  config.model = "tiny_vision"
  config.dtype = "float32"
  config.task = "digits"
  config.template = "plain"
  config.image_size = 28  # tiny_vision's SigLIP input; Gemma 3 4B-27B take 896
  config.max_len = 64
  config.buckets = (64,)
  config.batch_size = 8
  config.steps = 30
  config.warmup = 2
  config.lr = 0.5  # the random tiny model; real weights take the packaged LR table's rates
  config.r_src = 4
  config.r_tgt = 2
  config.extra_steps = 10
  config.extra_warmup = 2
  config.lr_tgt = 0.5
  config.eval.examples = 40
  config.eval.batch_size = 8
  config.checkpoint_every = 10
  config.log_every = 5
  return config_lib.apply_arg(config, arg)
