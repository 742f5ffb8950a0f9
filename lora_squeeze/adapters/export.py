"""`export_peft`: one of our adapters -> a PEFT LoRA folder for Hugging Face Gemma 3, optionally squeezed.

Each of our modules is split into its Hugging Face modules (hf_gemma3.py): A = aᵀ, B = b_partᵀ, the
shared `a` of a fused module duplicated. Rank columns whose b_part is exactly zero add nothing to
that part's ΔW and are dropped (an imported K/V pair comes back at r_k and r_v, bit for bit); a part
whose ΔW is exactly zero is not exported. Gemma applies ΔW = a @ b unscaled, so every module gets
lora_alpha = r (PEFT's scale alpha / r = 1): `r`/`lora_alpha` are the most common rank, and
`rank_pattern`/`alpha_pattern` name each other module exactly.

With `rank`, `energy` or `budget`, each *Hugging Face* module is squeezed on its own exact spectrum
(QR core): K and V, gate and up are separate adapters once served, so each gets its own optimal
truncation and the budget counts exactly the parameters PEFT will hold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_squeeze import squeeze
from lora_squeeze.adapters import atomic, hf_gemma3, peft_io, safetensors_io
from lora_squeeze.adapters import budget as budget_lib
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.squeeze_adapter import (
  ModuleRow,
  SqueezeSummary,
  open_adapter,
)

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype("bfloat16"), "float16": np.dtype(np.float16)}


def _model_of(adapter, model: str | None) -> str:
  if model is not None:
    return model
  meta = adapter.index.get("metadata", {}) if hasattr(adapter, "index") else {}
  if "model" not in meta:
    raise AdapterError(f"{adapter.path}: the adapter does not record its model; pass --model (e.g. gemma3_270m)")
  return meta["model"]


def plan_parts(adapter, dims: hf_gemma3.Dims) -> list[tuple[Any, int, hf_gemma3.Kind]]:
  """(module info, layer, kind) per module, after checking names and shapes against the model."""
  out = []
  for info in adapter.modules:
    layer, kind = hf_gemma3.parse_our_name(info.name, where=adapter.path)
    shape_a, shape_b = dims.stored_shapes(kind, info.r_src)
    want = (int(np.prod(shape_a[:-1])), int(np.prod(shape_b[1:])))
    if layer >= dims.num_layers or (info.d_in, info.d_out) != want:
      raise AdapterError(
        f"{adapter.path}: module {info.name!r} has (d_in, d_out) = {(info.d_in, info.d_out)}, but "
        f"{dims.model} (layers 0..{dims.num_layers - 1}) expects {want}: the adapter is for another model size"
      )
    out.append((info, layer, kind))
  return out


def _split(a: np.ndarray, b: np.ndarray, part: hf_gemma3.Part) -> tuple[np.ndarray, np.ndarray]:
  """One Hugging Face module's (a, b_part), without the rank columns whose b_part is exactly zero."""
  b_part = b if part.slot is None else b.reshape(b.shape[0], 2, -1)[:, part.slot]
  live = np.any(b_part != 0, axis=1)
  return a[:, live], b_part[live]


def export_peft(
  src: str | os.PathLike,
  dst: str | os.PathLike | None,
  *,
  model: str | None = None,
  hf_class: str | None = None,
  base_model: str | None = None,
  rank: int | None = None,
  energy: float | None = None,
  max_rank: int | None = None,
  budget: str | int | None = None,
  allowed_ranks: Sequence[int] | None = None,
  dtype: str = "float32",
  dry_run: bool = False,
  force: bool = False,
) -> tuple[SqueezeSummary, str | None]:
  """Writes the PEFT folder `dst` for the adapter at `src`; returns the per-module summary and,
  with `budget`, the allocation table."""
  if sum(x is not None for x in (rank, energy, budget)) > 1:
    raise AdapterError(
      f"give at most one of rank, energy and budget, got rank={rank!r}, energy={energy!r}, budget={budget!r}"
    )
  if dtype not in DTYPES:
    raise AdapterError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
  if rank is not None:
    squeeze.check_rank(rank)
  if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
    raise AdapterError(f"energy must be a number in (0, 1], got {energy!r}")
  if max_rank is not None and energy is None:
    raise AdapterError(f"max_rank={max_rank!r} applies only with energy")
  allowed = budget_lib.check_allowed_ranks(allowed_ranks)
  if allowed is not None and budget is None:
    raise AdapterError("allowed ranks apply only with a budget")
  n_budget = None if budget is None else budget_lib.parse_budget(budget, bytes_per_param=DTYPES[dtype].itemsize)
  if dst is not None:
    atomic.check_distinct(src, dst)
    if not dry_run:
      atomic.check_writable(dst, force=force)
  elif not dry_run:
    raise AdapterError("an output path is needed unless dry_run is set")
  adapter = open_adapter(src)
  if adapter.format == "peft":
    raise AdapterError(
      f"{src} is already a PEFT adapter; export reads our formats (use `lora-squeeze squeeze` to change its rank)"
    )
  model = _model_of(adapter, model)
  dims = hf_gemma3.dims(model)
  hf_class = hf_class or hf_gemma3.default_hf_class(model)
  if hf_class not in hf_gemma3.HF_CLASSES:
    raise AdapterError(f"unknown Hugging Face class {hf_class!r}; allowed: {', '.join(hf_gemma3.HF_CLASSES)}")
  modules = plan_parts(adapter, dims)

  def parts():  # (hf module name, a_part, b_part), one of our modules read at a time
    for info, layer, kind in modules:
      a, b = adapter.read(info)
      for part in kind.parts:
        a_p, b_p = _split(a, b, part)
        if a_p.shape[1]:
          yield hf_gemma3.hf_module_name(layer, part, hf_class), a_p, b_p

  spectra, costs = {}, {}
  squeezing = rank is not None or energy is not None or n_budget is not None
  if squeezing:
    for name, a_p, b_p in parts():
      spectra[name] = np.asarray(squeeze.singular_values(a_p, b_p), np.float64)
      costs[name] = a_p.shape[0] + b_p.shape[1]
  table = None
  if n_budget is not None:
    allocation = budget_lib.allocate(spectra, costs, n_budget, allowed_ranks=allowed)
    targets = allocation.ranks
    table = budget_lib.allocation_table(allocation, spectra, costs, budget=n_budget)
  elif rank is not None:
    targets = {n: rank for n in spectra}
  elif energy is not None:
    targets = {n: int(squeeze.rank_for_energy(s, energy, max_rank=max_rank)) for n, s in spectra.items()}
  rows, tensors = [], []
  out_dtype = DTYPES[dtype]
  for name, a_p, b_p in [] if dry_run and squeezing else parts():
    r_src = a_p.shape[1]
    if squeezing:
      a_p, b_p = budget_lib.truncate(a_p, b_p, targets[name])
    key = f"base_model.model.{name}"
    tensors += [
      (key + ".lora_A.weight", np.ascontiguousarray(a_p.T).astype(out_dtype)),
      (key + ".lora_B.weight", np.ascontiguousarray(b_p.T).astype(out_dtype)),
    ]
    rows.append(_row(name, r_src, a_p.shape[1], spectra.get(name)))
  if dry_run and squeezing:
    rows = [_row(n, len(s), targets[n], s) for n, s in spectra.items()]
  if not rows and not dry_run:
    raise AdapterError(f"{src}: every LoRA update is exactly zero; there is nothing to export")
  ranks = {row.name: row.r_tgt for row in rows}
  provenance = {
    "source": os.fspath(src),
    "model": model,
    "rank": rank,
    "energy": energy,
    "max_rank": max_rank,
    "budget": n_budget,
    "allowed_ranks": allowed,
  }
  if not dry_run:
    config = peft_config(ranks, base_model=base_model or hf_gemma3.HF_REPOS[model])
    with atomic.atomic_output(dst, force=force) as target:
      target.mkdir()
      safetensors_io.write_safetensors(
        target / peft_io.WEIGHTS_FILE, tensors, {"format": "pt", "lora_squeeze": json.dumps(provenance, sort_keys=True)}
      )
      (target / peft_io.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  total = sum(r.energy for r in rows)
  overall = 1.0 if total == 0 else sum(r.retention * r.energy for r in rows) / total
  summary = SqueezeSummary(
    format="peft",
    src=os.fspath(src),
    dst=None if dst is None else os.fspath(dst),
    rows=tuple(rows),
    overall_retention=overall,
    written=not dry_run,
    seconds=0.0,
  )
  return summary, table


def _row(name: str, r_src: int, r_tgt: int, s: np.ndarray | None) -> ModuleRow:
  if s is None:  # exact export: everything kept
    return ModuleRow(name=name, r_src=r_src, r_tgt=r_tgt, retention=1.0, energy=1.0)
  return ModuleRow(
    name=name,
    r_src=r_src,
    r_tgt=r_tgt,
    retention=float(squeeze.variance_retention(s, r_tgt)),
    energy=float(np.sum(np.square(s))),
  )


def peft_config(ranks: dict[str, int], *, base_model: str) -> dict[str, Any]:
  """A PEFT LoraConfig (as JSON) adapting exactly the named modules at scale 1 (alpha = r)."""
  counts: dict[int, int] = {}
  for r in ranks.values():
    counts[r] = counts.get(r, 0) + 1
  r_main = max(counts, key=lambda r: (counts[r], r))
  others = {peft_io.exact_pattern_key(n): r for n, r in ranks.items() if r != r_main}
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model,
    "r": r_main,
    "lora_alpha": r_main,
    "rank_pattern": others,
    "alpha_pattern": dict(others),
    "target_modules": sorted(ranks),
    "lora_dropout": 0.0,
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "revision": None,
  }
