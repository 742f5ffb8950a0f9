"""`lora-squeeze export ADAPTER OUT --to=peft [--rank R | --energy TAU | --budget N [--allowed-ranks ...]]`.

Turns one of our adapters (the trainer's lora-squeeze adapter folder, or a bare .safetensors/.npz of
gemma-layout factors with --model) into a PEFT LoRA folder for the Hugging Face Gemma 3 model of the
same size, optionally squeezed in the same pass (see docs/export.md).

    lora-squeeze export runs/boolq/adapters/final runs/boolq/peft --to=peft
    lora-squeeze export runs/boolq/adapters/final runs/boolq/peft_r16 --to=peft --rank=16
    lora-squeeze export runs/boolq/adapters/final --to=peft --budget=8MiB --allowed-ranks=8,16,32,64 --dry-run
"""

from __future__ import annotations

import sys

from absl import flags, logging

from lora_squeeze.adapters.budget import parse_allowed_ranks
from lora_squeeze.errors import UserInputError
from lora_squeeze.adapters.export import DTYPES, export_peft
from lora_squeeze.adapters.hf_gemma3 import HF_CLASSES

_TO = flags.DEFINE_enum("to", "peft", ["peft"], "Output format.")
_MODEL = flags.DEFINE_string("model", None, "Model name (default: the one the adapter records), e.g. gemma3_270m.")
_HF_CLASS = flags.DEFINE_enum(
  "hf-class",
  None,
  list(HF_CLASSES),
  "Hugging Face class to load into (default: Gemma3ForCausalLM up to 1B, Gemma3ForConditionalGeneration from 4B).",
)
_BASE = flags.DEFINE_string("base-model", None, "base_model_name_or_path (default: google/gemma-3-<size>[-pt]).")
_RANK = flags.DEFINE_integer("rank", None, "Squeeze every exported module to this rank.")
_ENERGY = flags.DEFINE_float("energy", None, "Per module the smallest rank keeping V_r >= ENERGY.")
_MAX_RANK = flags.DEFINE_integer("max-rank", None, "With --energy: never choose a rank above this.")
_BUDGET = flags.DEFINE_string("budget", None, "Total parameters (2500000, 2.5M, 500k) or size (8MiB) of the export.")
_ALLOWED = flags.DEFINE_list("allowed-ranks", None, "With --budget: the ranks a module may take, e.g. 8,16,32,64.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored dtype of the PEFT factors.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the table only; write nothing.")
_FORCE = flags.DEFINE_bool("force", False, "Replace OUT if it exists (only once the new folder is complete).")

USAGE = "usage: lora-squeeze export ADAPTER OUT --to=peft [--rank=R | --energy=TAU | --budget=N] [--dry-run]"


def main(argv: list[str]) -> None:
  args = argv[1:]
  if not (len(args) == 2 or (len(args) == 1 and _DRY_RUN.value)):
    sys.exit(f"{USAGE}\n(got positional arguments {args}; OUT may be left out only with --dry-run)")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    allowed = parse_allowed_ranks(_ALLOWED.value)
    summary, table = export_peft(
      args[0],
      args[1] if len(args) == 2 else None,
      model=_MODEL.value,
      hf_class=_HF_CLASS.value,
      base_model=_BASE.value,
      rank=_RANK.value,
      energy=_ENERGY.value,
      max_rank=_MAX_RANK.value,
      budget=_BUDGET.value,
      allowed_ranks=allowed,
      dtype=_DTYPE.value,
      dry_run=_DRY_RUN.value,
      force=_FORCE.value,
    )
  except UserInputError as e:  # only bad input: a bug keeps its traceback
    sys.exit(f"lora-squeeze export: error: {e}")
  print(table or summary.table())
  print(f"wrote PEFT adapter {summary.dst}" if summary.written else "dry run: nothing written")
