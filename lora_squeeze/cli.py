"""The `lora-squeeze` console script: one entry point, one sub-command per job.

    lora-squeeze train   --config=configs/default.py --workdir=runs/default
    lora-squeeze squeeze IN OUT --rank=8 [--method=qr_core] [--dry-run]
    lora-squeeze export  ADAPTER OUT --to=peft [--rank=R | --energy=TAU | --budget=N]
    lora-squeeze import  PEFT_ADAPTER OUT [--rank=R]

Each sub-command lives in its own module, which defines its absl flags at import time and a
`main(argv)`. Only the chosen module is imported, so the flags of one command never clash with (or
slow down) another.
"""

import importlib
import sys

from absl import app
from absl import flags

from lora_squeeze import allocator

COMMANDS = {
  "train": ("lora_squeeze.train_cli", "train LoRA by a protocol config (direct, post/cont/in-squeeze)"),
  "squeeze": ("lora_squeeze.adapters.squeeze_cli", "change the rank of an existing adapter offline"),
  "export": ("lora_squeeze.adapters.export_cli", "our adapter -> a PEFT folder for Hugging Face Gemma 3"),
  "import": ("lora_squeeze.adapters.import_cli", "a PEFT adapter for Gemma 3 -> one of ours"),
}


def usage() -> str:
  lines = ["usage: lora-squeeze <command> [flags]", "", "commands:"]
  lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
  lines += ["", "Run `lora-squeeze <command> --help` for the flags of one command."]
  return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
  """Dispatches `lora-squeeze <command> ...` to the command's module. From the command line (argv
  None) the process first restarts itself with huge pages for large host buffers (allocator)."""
  from_command_line = argv is None
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"lora-squeeze: unknown command {command!r}; allowed: {', '.join(COMMANDS)}\n", file=sys.stderr)
    print(usage(), file=sys.stderr)
    sys.exit(2)
  if from_command_line:
    allocator.restart_with_huge_pages()  # before JAX is imported; glibc reads it at process start
  module = importlib.import_module(COMMANDS[command][0])
  program = f"lora-squeeze {command}"
  # absl's --help lists the key flags of the main module, which it names by sys.argv[0] (this
  # console script), so the command module's flags are declared key flags of that name.
  for flag in flags.FLAGS.get_flags_for_module(module.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  # A command may parse its own flags (train_cli.parse_flags: one-line errors for config keys).
  flags_parser = getattr(module, "parse_flags", app.parse_flags_with_usage)
  app.run(module.main, argv=[program, *argv[2:]], flags_parser=flags_parser)


if __name__ == "__main__":
  run()
