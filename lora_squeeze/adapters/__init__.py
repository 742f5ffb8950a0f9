"""Adapters on disk: PEFT folders, our Orbax adapter format and bare factor files, in and out.

`squeeze_adapter(src, dst, rank=... | energy=...)` squeezes any of them file to file;
`save_adapter` / `load_adapter` are the project's own exported-adapter format (the trainer's export).
"""

from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.orbax_io import load_adapter, save_adapter
from lora_squeeze.adapters.squeeze_adapter import ModuleRow, SqueezeSummary, open_adapter, squeeze_adapter

__all__ = [
  "AdapterError",
  "ModuleRow",
  "SqueezeSummary",
  "load_adapter",
  "open_adapter",
  "save_adapter",
  "squeeze_adapter",
]
