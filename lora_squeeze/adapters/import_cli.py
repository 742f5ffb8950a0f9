"""`lora-squeeze import PEFT_ADAPTER OUT [--model M] [--rank R]`.

Turns a PEFT LoRA adapter for Hugging Face Gemma 3 (text-only or multimodal class) into one of our
adapter folders, exactly (K/V and gate/up pairs become one fused module of rank r_k + r_v with a
block-diagonal b), or squeezed to one rank with --rank. Start a training run from it with
`--config.init_adapter=OUT` (see docs/export.md).

    lora-squeeze import my_peft_adapter runs/imported
    lora-squeeze import my_peft_adapter runs/imported_r16 --rank=16
"""

from __future__ import annotations

import json
import sys

from absl import flags, logging

from lora_squeeze.errors import UserInputError
from lora_squeeze.adapters.import_peft import import_peft

_MODEL = flags.DEFINE_string("model", None, "Model name (default: inferred from the module shapes).")
_RANK = flags.DEFINE_integer("rank", None, "Squeeze every module to this rank (default: exact, r_k + r_v for kv).")

USAGE = "usage: lora-squeeze import PEFT_ADAPTER OUT [--model=M] [--rank=R]"


def main(argv: list[str]) -> None:
  args = argv[1:]
  if len(args) != 2:
    sys.exit(f"{USAGE}\n(got positional arguments {args})")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    meta = import_peft(args[0], args[1], model=_MODEL.value, rank=_RANK.value)
  except UserInputError as e:  # only bad input: a bug keeps its traceback
    sys.exit(f"lora-squeeze import: error: {e}")
  ranks = sorted(set(meta["ranks"].values()))
  print(
    f"wrote {args[1]}: model {meta['model']}, targets {json.dumps(meta['targets'])}, "
    f"{len(meta['ranks'])} modules, ranks {ranks}"
  )
