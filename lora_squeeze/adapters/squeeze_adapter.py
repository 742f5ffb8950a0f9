"""`squeeze_adapter`: change the rank of an adapter on disk, file to file, one module at a time.

For each LoRA module (ΔW = a @ b, a: (d_in, r_src), b: (r_src, d_out), any format scale folded in)
it computes the exact spectrum of ΔW without forming it (QR-core, Alg. 2), picks the target rank
(`rank`, or the smallest r with V_r >= `energy`, Eq. 10) and writes the best rank-r_tgt factors
(√S split to each side) in the input's own format. Memory: one module's factors plus the squeezed
(small) factors of the modules done so far. The source is never modified (see atomic.py).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from lora_squeeze import atomic as _atomic
from lora_squeeze import squeeze
from lora_squeeze.adapters import atomic, factors_io, orbax_io, peft_io
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.modules import AdapterSource, Factors, ModuleInfo

FORMATS = ("peft", "orbax", "safetensors", "npz")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleRow:
  """One module of the squeeze: its ranks and the energy kept, V_r = Σ_{i<=r_tgt} s_i² / Σ_i s_i²."""

  name: str
  r_src: int
  r_tgt: int
  retention: float
  energy: float  # Σ_i s_i² = ‖ΔW‖_F², to weight modules in the overall retention


@dataclasses.dataclass(frozen=True, kw_only=True)
class SqueezeSummary:
  """What a squeeze did (or, with dry_run, would do)."""

  format: str
  src: str
  dst: str | None
  rows: tuple[ModuleRow, ...]
  overall_retention: float  # Σ over modules of kept s_i² / Σ of all s_i²
  written: bool
  seconds: float

  def table(self) -> str:
    """The per-module table: module, r_src, r_tgt, V_r."""
    total = f"all {len(self.rows)} modules"
    width = max([len(total), *(len(r.name) for r in self.rows)])
    lines = [f"{'module':<{width}}  {'r_src':>5}  {'r_tgt':>5}  {'V_r':>8}"]
    lines += [f"{r.name:<{width}}  {r.r_src:>5}  {r.r_tgt:>5}  {r.retention:>8.5f}" for r in self.rows]
    r_src = sum(r.r_src for r in self.rows)
    r_tgt = sum(r.r_tgt for r in self.rows)
    lines.append(f"{total:<{width}}  {r_src:>5}  {r_tgt:>5}  {self.overall_retention:>8.5f}")
    return "\n".join(lines)


def open_adapter(path: str | os.PathLike) -> AdapterSource:
  """Opens an adapter by what is at `path`: a PEFT folder (adapter_config.json), our Orbax folder
  (lora_squeeze_adapter.json), or a bare .safetensors / .npz of gemma-layout factors."""
  path = pathlib.Path(path)
  if not path.exists():
    raise AdapterError(f"input {path} does not exist")
  if peft_io.is_peft_folder(path):
    return peft_io.open_peft(path)
  if orbax_io.is_orbax_adapter(path):
    return orbax_io.open_orbax(path)
  if path.is_file() and path.suffix in factors_io.SUFFIXES:
    return factors_io.open_factors(path)
  raise AdapterError(
    f"unknown adapter format at {path}: expected a PEFT folder ({peft_io.CONFIG_FILE} + "
    f"{peft_io.WEIGHTS_FILE}), a lora-squeeze adapter folder ({orbax_io.INDEX_FILE} + "
    f"{orbax_io.PARAMS_DIR}/), or a .safetensors / .npz file of '<path>/a', '<path>/b' factors"
  )


def squeeze_adapter(
  src: str | os.PathLike,
  dst: str | os.PathLike | None = None,
  *,
  rank: int | None = None,
  energy: float | None = None,
  max_rank: int | None = None,
  method: str = "qr_core",
  seed: int = 0,
  dry_run: bool = False,
  precision: str = "auto",
  force: bool = False,
  on_module: Callable[[int, int, ModuleRow], None] | None = None,
) -> SqueezeSummary:
  """Squeezes every LoRA module of the adapter at `src` and writes the result to `dst`.

  Args:
    src: the input adapter (see `open_adapter`); never modified.
    dst: the output path, same format as src (a folder, or a file with the same suffix); it must
      not be src, lie inside it, or contain it, and must not exist unless `force`. Not needed
      (and not checked for existence) with `dry_run`.
    rank: one target rank for every module (may exceed r_src: zero-padded, ΔW unchanged).
    energy: instead of `rank`: per module the smallest r >= 1 with V_r >= energy, in (0, 1],
      on the exact spectrum; at most `max_rank` when given.
    method: one of squeeze.METHODS; the spectrum (and so r_tgt and V_r) is exact whatever the method.
    precision: qr_core's arithmetic, one of squeeze.PRECISIONS ("auto": float64 on CPU/GPU,
      float32 Householder QR on TPU).
    seed: PRNG seed of the randomized methods (module i uses fold_in(PRNGKey(seed), i)).
    dry_run: compute the table only; write nothing.
    force: replace an existing dst (only once the new output is complete).
    on_module: called as on_module(i, n_modules, row) after each module (progress).

  Returns:
    The per-module table and totals.
  """
  _check_target(rank=rank, energy=energy, max_rank=max_rank, method=method)
  if precision not in squeeze.PRECISIONS:
    raise AdapterError(f"unknown precision {precision!r}; allowed: {', '.join(squeeze.PRECISIONS)}")
  start = time.perf_counter()
  if dst is not None:
    _atomic.check_output_name(dst, error=AdapterError)
    atomic.check_distinct(src, dst)
  elif not dry_run:
    raise AdapterError("an output path is needed unless dry_run is set")
  adapter = open_adapter(src)
  if dst is not None and not dry_run:
    _check_same_kind(adapter, pathlib.Path(dst))
    atomic.check_writable(dst, force=force)
  key = jax.random.PRNGKey(seed)
  rows, squeezed = [], {}
  for i, module in enumerate(adapter.modules):
    a, b = adapter.read(module)
    factors, row = _squeeze_module(
      a,
      b,
      module,
      rank=rank,
      energy=energy,
      max_rank=max_rank,
      method=method,
      key=jax.random.fold_in(key, i),
      spectrum_only=dry_run,
      precision=precision,
    )
    rows.append(row)
    if factors is not None:
      squeezed[module.name] = factors
    if on_module is not None:
      on_module(i, len(adapter.modules), row)
  provenance = {
    "source": os.fspath(src),
    "method": method,
    "rank": rank,
    "energy": energy,
    "max_rank": max_rank,
    "seed": seed,
    "r_src": {r.name: r.r_src for r in rows},
  }
  if not dry_run:
    with atomic.atomic_output(dst, force=force, mode_like=src) as target:
      adapter.write(target, squeezed, provenance=provenance)
  return SqueezeSummary(
    format=adapter.format,
    src=os.fspath(src),
    dst=None if dst is None else os.fspath(dst),
    rows=tuple(rows),
    overall_retention=_overall_retention(rows),
    written=not dry_run,
    seconds=time.perf_counter() - start,
  )


def _check_target(*, rank: int | None, energy: float | None, max_rank: int | None, method: str) -> None:
  if (rank is None) == (energy is None):
    raise AdapterError(f"give exactly one of rank and energy, got rank={rank!r}, energy={energy!r}")
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
    raise AdapterError(f"rank must be an integer >= 1, got {rank!r}")
  if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
    raise AdapterError(f"energy must be a number in (0, 1], got {energy!r}")
  if max_rank is not None:
    if energy is None:
      raise AdapterError(f"max_rank={max_rank!r} applies only with energy; with rank it has no meaning")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
      raise AdapterError(f"max_rank must be an integer >= 1, got {max_rank!r}")
  if method not in squeeze.METHODS:
    raise AdapterError(f"unknown method {method!r}; allowed: {', '.join(squeeze.METHODS)}")


def _check_same_kind(adapter: AdapterSource, dst: pathlib.Path) -> None:
  if adapter.path.is_file() and dst.suffix != adapter.path.suffix:
    raise AdapterError(
      f"output {dst} must be a {adapter.path.suffix} file like the input {adapter.path} (same format in and out)"
    )


def _squeeze_module(
  a: np.ndarray,
  b: np.ndarray,
  module: ModuleInfo,
  *,
  rank: int | None,
  energy: float | None,
  max_rank: int | None,
  method: str,
  key: jax.Array,
  spectrum_only: bool,
  precision: str = "auto",
) -> tuple[Factors | None, ModuleRow]:
  """a: (d_in, r_src), b: (r_src, d_out) -> squeezed (a_t: (d_in, r_tgt), b_t: (r_tgt, d_out)), row."""
  if method == "qr_core" and not spectrum_only:
    # One QR-core call gives both the exact spectrum and the factors: at r_src for --energy,
    # cut below once r_tgt is known.
    a_t, b_t, s = squeeze.qr_core(a, b, module.r_src if rank is None else rank, precision=precision)
  else:
    _, _, s = squeeze.qr_core(a, b, 1, precision=precision)
  s = np.asarray(s, np.float64)
  r_tgt = rank if rank is not None else int(squeeze.rank_for_energy(s, energy, max_rank=max_rank))
  row = ModuleRow(
    name=module.name,
    r_src=module.r_src,
    r_tgt=r_tgt,
    retention=float(squeeze.variance_retention(s, r_tgt)),
    energy=float(np.sum(s**2)),
  )
  if spectrum_only:
    return None, row
  if row.energy == 0:
    return _zero_update(a, b, module, r_tgt), row
  if method == "qr_core":
    # The columns of an exact SVD with √S split per column are nested: the first r_tgt of them
    # are the rank-r_tgt optimum (Eckart–Young).
    a_t, b_t = a_t[:, :r_tgt], b_t[:r_tgt]
  else:
    a_t, b_t, _ = squeeze.squeeze_factors(a, b, r_tgt, method=method, key=key)
  return (np.asarray(a_t, np.float32), np.asarray(b_t, np.float32)), row


def _zero_update(a: np.ndarray, b: np.ndarray, module: ModuleInfo, r_tgt: int) -> Factors:
  """ΔW = 0 (typically B all zero, as at LoRA's init): its SVD would give A = B = 0, an adapter
  gradient descent cannot leave (B's gradient is Aᵀ·(...)). Our choice: keep B = 0 (ΔW stays 0)
  and an A that spans the source A's column space: the first r_tgt columns of an orthonormal basis
  of it (QR), scaled to the source columns' RMS norm, so training continues as from the source."""
  a64 = np.asarray(a, np.float64)
  scale = float(np.linalg.norm(a64)) / np.sqrt(a64.shape[1])
  if scale == 0:
    logging.warning("module %s: A and B are both zero (ΔW = 0); the squeezed factors are zero too", module.name)
    return np.zeros((module.d_in, r_tgt), np.float32), np.zeros((r_tgt, module.d_out), np.float32)
  q, _ = np.linalg.qr(a64)
  a_t = np.zeros((module.d_in, r_tgt))
  k = min(r_tgt, q.shape[1])
  a_t[:, :k] = q[:, :k] * scale
  logging.warning(
    "module %s: B is all zero (ΔW = 0, nothing to squeeze); kept B = 0 and %d orthonormal columns of the "
    "source A (RMS norm %.3g) so the adapter can still train",
    module.name,
    k,
    scale,
  )
  return a_t.astype(np.float32), np.zeros((r_tgt, module.d_out), np.float32)


def _overall_retention(rows: list[ModuleRow]) -> float:
  total = sum(r.energy for r in rows)
  if total == 0:
    return 1.0
  return sum(r.retention * r.energy for r in rows) / total
