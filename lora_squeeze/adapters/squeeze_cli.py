"""`lora-squeeze squeeze IN OUT (--rank R | --energy TAU [--max-rank R]) [--method M] [--dry-run]`.

Changes the rank of an existing adapter, file to file, in its own format: a PEFT folder, a
lora-squeeze (Orbax) adapter folder, or a bare .safetensors / .npz of gemma-layout factors.

    lora-squeeze squeeze runs/boolq/adapter_r128 runs/boolq/adapter_r8 --rank=8
    lora-squeeze squeeze my_peft_adapter my_peft_adapter_r16 --rank=16 --method=rsvd
    lora-squeeze squeeze my_peft_adapter --energy=0.9 --max-rank=64 --dry-run
    lora-squeeze squeeze adapter_r128 adapter_r8 --rank=8 --precision=float32   # no float64 (as on TPU)
    lora-squeeze squeeze my_peft_adapter --budget=2.5M --allowed-ranks=8,16,32 --dry-run   (docs/export.md)

Prints the per-module table (module, r_src, r_tgt, V_r); `--dry-run` prints it and writes nothing.
The input is never modified; OUT appears complete or not at all.
"""

from __future__ import annotations

import sys
import time

from absl import flags, logging

from lora_squeeze import durations, squeeze
from lora_squeeze.errors import UserInputError
from lora_squeeze.adapters.squeeze_adapter import ModuleRow, squeeze_adapter

_RANK = flags.DEFINE_integer("rank", None, "Target rank, the same for every module.")
_ENERGY = flags.DEFINE_float(
  "energy", None, "Instead of --rank: per module the smallest rank keeping V_r >= ENERGY (Eq. 10), in (0, 1]."
)
_MAX_RANK = flags.DEFINE_integer("max-rank", None, "With --energy: never choose a rank above this.")
_METHOD = flags.DEFINE_enum(
  "method",
  "qr_core",
  list(squeeze.METHODS),
  "qr_core: exact, never forms ΔW (Alg. 2); rsvd: randomized SVD of ΔW (Alg. 1); rsvd_factored: "
  "Alg. 1 on the factored operator; svd: forms ΔW and runs a full SVD (reference).",
)
_PRECISION = flags.DEFINE_enum(
  "precision",
  "auto",
  list(squeeze.PRECISIONS),
  "qr_core's arithmetic: auto (float64 on CPU/GPU, float32 Householder QR on TPU, which has no "
  "float64), float64 or float32 (docs/squeeze.md).",
)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the randomized methods.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the per-module table only; write nothing.")
_FORCE = flags.DEFINE_bool("force", False, "Replace OUT if it exists (only once the new adapter is complete).")
_QUIET = flags.DEFINE_bool("quiet", False, "No per-module progress lines on stderr.")
_BUDGET = flags.DEFINE_string(
  "budget", None, "Instead of --rank: total parameters (2.5M) or size (8MiB) of the output."
)
_ALLOWED = flags.DEFINE_list("allowed-ranks", None, "With --budget: the ranks a module may take, e.g. 8,16,32,64.")

USAGE = "usage: lora-squeeze squeeze IN OUT (--rank=R | --energy=TAU [--max-rank=R]) [--method=M] [--dry-run] [--force]"


def main(argv: list[str]) -> None:
  args = argv[1:]
  if not (len(args) == 2 or (len(args) == 1 and _DRY_RUN.value)):
    sys.exit(f"{USAGE}\n(got positional arguments {args}; OUT may be left out only with --dry-run)")
  src, dst = args[0], (args[1] if len(args) == 2 else None)
  if not flags.FLAGS["verbosity"].present:
    # JAX logs its backend probing (no TPU, no proxy) at INFO: noise next to the progress lines.
    logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()

  def progress(i: int, n: int, row: ModuleRow) -> None:
    if _QUIET.value:
      return
    elapsed = time.perf_counter() - start
    left = durations.eta(elapsed, i + 1, n)
    print(
      f"[{i + 1}/{n}] {row.name}: r {row.r_src} -> {row.r_tgt}, V_r {row.retention:.4f} "
      f"({durations.format_duration(elapsed)} elapsed, ETA {durations.format_duration(left)})",
      file=sys.stderr,
      flush=True,
    )

  if _BUDGET.value is not None:
    from lora_squeeze.adapters import budget

    try:
      summary, table = budget.squeeze_to_budget(
        src,
        dst,
        budget=_BUDGET.value,
        allowed_ranks=budget.parse_allowed_ranks(_ALLOWED.value),
        dry_run=_DRY_RUN.value,
        force=_FORCE.value,
      )
    except UserInputError as e:
      sys.exit(f"lora-squeeze squeeze: error: {e}")
    print(table)
    print(f"wrote {summary.dst}" if summary.written else "dry run: nothing written")
    return
  try:
    summary = squeeze_adapter(
      src,
      dst,
      rank=_RANK.value,
      energy=_ENERGY.value,
      max_rank=_MAX_RANK.value,
      method=_METHOD.value,
      seed=_SEED.value,
      dry_run=_DRY_RUN.value,
      precision=_PRECISION.value,
      force=_FORCE.value,
      on_module=progress,
    )
  except UserInputError as e:  # only bad input: a bug in the code keeps its traceback
    sys.exit(f"lora-squeeze squeeze: error: {e}")
  print(summary.table())
  if summary.written:
    print(f"wrote {summary.format} adapter {summary.dst} in {summary.seconds:.1f}s")
  else:
    print(f"dry run: nothing written ({summary.format} adapter {summary.src}, {summary.seconds:.1f}s)")
