"""The trainer (see runner.py); `from lora_squeeze import train` keeps its public names."""

from lora_squeeze.train.runner import *  # noqa: F401,F403
from lora_squeeze.train.runner import _train_step  # noqa: F401  (tests read its compilation cache)
