"""Per-module ranks under one global parameter budget: `--budget=N` (parameters) or `--budget=N MiB`.

Module m at rank r keeps E_m(r) = Σ_{i≤r} s_{m,i}² of its update's energy (the exact spectrum of
ΔW_m, from the QR core) and costs r·c_m parameters, c_m = d_in + d_out (one column of a, one row of
b; for an export, summed over the Hugging Face modules it is served as). We want

    max Σ_m E_m(r_m)   subject to   Σ_m r_m·c_m <= N,   r_m in the allowed ranks,

a multiple-choice knapsack. Stepping module m from one allowed rank to the next gains the s² of the
singular values in between at a cost of (rank difference)·c_m; since s is sorted, a module's gain
per parameter never increases along its ladder, so taking steps in order of gain per parameter
keeps every module's ranks a prefix, and the result is optimal for the budget it spends, up to the
one step that did not fit (the fractional-knapsack argument). That leftover can make plain greedy
lose to a uniform rank (a cheap module's small values taken before an expensive module's large
one); so the greedy fill is also run from every uniform allocation that fits, and the best total is
kept: the result is never below any uniform rank of at most the same size.

`allowed_ranks` (e.g. vLLM's supported ranks) restricts every module's rank; the smallest allowed
rank is every module's minimum, so the budget must cover it.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np

from lora_squeeze import squeeze
from lora_squeeze.adapters import atomic
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.squeeze_adapter import (
  ModuleRow,
  SqueezeSummary,
  open_adapter,
)

_BUDGET = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(MiB|M|k)?\s*")


def parse_budget(text: str | int, *, bytes_per_param: int) -> int:
  """'1234567' or '1.2M' / '500k' (parameters) or '12MiB' (stored bytes at bytes_per_param) -> parameters."""
  if isinstance(text, int) and not isinstance(text, bool):
    value, unit = float(text), None
  else:
    m = _BUDGET.fullmatch(str(text))
    if not m:
      raise AdapterError(
        f"budget {text!r} is not a number of parameters (e.g. 2500000, 2.5M, 500k) or MiB (e.g. 10MiB)"
      )
    value, unit = float(m.group(1)), m.group(2)
  params = {None: value, "k": value * 1e3, "M": value * 1e6, "MiB": value * 2**20 / bytes_per_param}[unit]
  if params < 1:
    raise AdapterError(f"budget {text!r} must allow at least one parameter")
  return int(params)


def parse_allowed_ranks(texts: Sequence[str] | None) -> tuple[int, ...] | None:
  """The --allowed-ranks flag's strings ('8', '16', ...) -> sorted distinct ranks."""
  if texts is None:
    return None
  for t in texts:
    if not t.strip().isdigit():
      raise AdapterError(f"allowed rank {t!r} is not a positive integer; e.g. --allowed-ranks=8,16,32,64")
  return check_allowed_ranks([int(t) for t in texts])


def check_allowed_ranks(ranks: Sequence[int] | None) -> tuple[int, ...] | None:
  if ranks is None:
    return None
  ranks = tuple(ranks)
  if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
    raise AdapterError(f"allowed ranks must be integers >= 1, got {list(ranks)}")
  return tuple(sorted(set(ranks)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Allocation:
  ranks: dict[str, int]
  params: int  # Σ r_m·c_m
  kept: float  # Σ E_m(r_m)
  total: float  # Σ_m ‖ΔW_m‖_F²

  @property
  def retention(self) -> float:
    return 1.0 if self.total == 0 else self.kept / self.total


def _ladder(r_src: int, allowed: tuple[int, ...] | None) -> list[int]:
  """The ranks module may take: allowed ranks up to the first that covers r_src (more keeps no more)."""
  ranks = allowed or tuple(range(1, r_src + 1))
  ladder = []
  for r in ranks:
    ladder.append(r)
    if r >= r_src:
      break
  return ladder


def _energy(cumulative: np.ndarray, r: int) -> float:
  return float(cumulative[min(r, len(cumulative) - 1)])


def _greedy(start: dict[str, int], budget: int, ladders, cumulative, costs) -> dict[str, int]:
  """Greedy fill from `start` (ladder indices): best gain per parameter first, a module stops at
  its first step that does not fit."""
  pos = dict(start)
  spent = sum(ladders[m][i] * costs[m] for m, i in pos.items())
  heap = []

  def push(m: str) -> None:
    i = pos[m]
    if i + 1 < len(ladders[m]):
      lo, hi = ladders[m][i], ladders[m][i + 1]
      gain = _energy(cumulative[m], hi) - _energy(cumulative[m], lo)
      cost = (hi - lo) * costs[m]
      heapq.heappush(heap, (-gain / cost, m, cost))

  for m in pos:
    push(m)
  while heap:
    _, m, cost = heapq.heappop(heap)
    if spent + cost > budget:
      continue
    spent += cost
    pos[m] += 1
    push(m)
  return pos


def allocate(
  spectra: Mapping[str, np.ndarray],
  costs: Mapping[str, int],
  budget: int,
  *,
  allowed_ranks: Sequence[int] | None = None,
) -> Allocation:
  """Ranks per module maximising the energy kept within `budget` parameters (see module docstring).

  Args:
    spectra: module -> its singular values s (r_src,), descending.
    costs: module -> parameters per unit of rank (d_in + d_out).
    budget: parameters allowed in total.
    allowed_ranks: the ranks a module may take (None: 1..r_src).
  """
  allowed = check_allowed_ranks(allowed_ranks)
  names = list(spectra)
  cumulative = {m: np.concatenate([[0.0], np.cumsum(np.square(np.asarray(spectra[m], np.float64)))]) for m in names}
  ladders = {m: _ladder(len(spectra[m]), allowed) for m in names}
  minimum = sum(ladders[m][0] * costs[m] for m in names)
  if minimum > budget:
    raise AdapterError(
      f"budget of {budget} parameters is below the {minimum} that rank {min(ladder[0] for ladder in ladders.values())} "
      f"on all {len(names)} modules needs"
    )
  candidates = [_greedy({m: 0 for m in names}, budget, ladders, cumulative, costs)]
  for r in sorted({r for ladder in ladders.values() for r in ladder}):
    uniform = {m: max(i for i, q in enumerate(ladders[m]) if q <= r) for m in names}
    if sum(ladders[m][i] * costs[m] for m, i in uniform.items()) <= budget:
      candidates.append(_greedy(uniform, budget, ladders, cumulative, costs))

  def kept(pos):
    return sum(_energy(cumulative[m], ladders[m][i]) for m, i in pos.items())

  best = max(candidates, key=kept)
  ranks = {m: ladders[m][i] for m, i in best.items()}
  return Allocation(
    ranks=ranks,
    params=sum(ranks[m] * costs[m] for m in names),
    kept=kept(best),
    total=sum(float(c[-1]) for c in cumulative.values()),
  )


def allocation_table(
  allocation: Allocation, spectra: Mapping[str, np.ndarray], costs: Mapping[str, int], *, budget: int
) -> str:
  """The dry-run table: module, r_src, r_tgt, params, V_r; then the totals and the overall V_r."""
  names = list(spectra)
  total_line = f"all {len(names)} modules"
  width = max([len(total_line), *(len(n) for n in names)])
  lines = [f"{'module':<{width}}  {'r_src':>5}  {'r_tgt':>5}  {'params':>10}  {'V_r':>8}"]
  for m in names:
    s2 = np.square(np.asarray(spectra[m], np.float64))
    r = allocation.ranks[m]
    v = 1.0 if s2.sum() == 0 else float(s2[:r].sum() / s2.sum())
    lines.append(f"{m:<{width}}  {len(s2):>5}  {r:>5}  {r * costs[m]:>10}  {v:>8.5f}")
  lines.append(
    f"{total_line:<{width}}  {sum(len(spectra[m]) for m in names):>5}  "
    f"{sum(allocation.ranks.values()):>5}  {allocation.params:>10}  {allocation.retention:>8.5f}"
  )
  lines.append(
    f"budget {budget} parameters, used {allocation.params} ({allocation.params / budget:.1%}); "
    f"overall V_r {allocation.retention:.5f}"
  )
  return "\n".join(lines)


def truncate(a: np.ndarray, b: np.ndarray, r_tgt: int) -> tuple[np.ndarray, np.ndarray]:
  """The Eckart–Young rank-r_tgt factors (√S on each side) of a @ b, float32.

  QR core at r_src, then the first r_tgt columns: those of an exact SVD are nested, and one
  compiled call per factor shape serves every target rank (a call per rank recompiles per rank).
  """
  a_t, b_t, _ = squeeze.qr_core(a, b, max(r_tgt, a.shape[1]))
  return np.asarray(a_t[:, :r_tgt], np.float32), np.asarray(b_t[:r_tgt], np.float32)


def squeeze_to_budget(
  src: str | os.PathLike,
  dst: str | os.PathLike | None,
  *,
  budget: str | int,
  allowed_ranks: Sequence[int] | None = None,
  dry_run: bool = False,
  force: bool = False,
) -> tuple[SqueezeSummary, str]:
  """`squeeze_adapter` with per-module ranks from `allocate`: two passes over the modules (the
  spectra, then the factors), so memory stays at one module. The budget counts parameters of the
  output (in MiB: at the input's float32 factor size, 4 bytes each)."""
  allowed = check_allowed_ranks(allowed_ranks)
  n_budget = parse_budget(budget, bytes_per_param=4)
  start = time.perf_counter()
  if dst is not None:
    atomic.check_distinct(src, dst)
  elif not dry_run:
    raise AdapterError("an output path is needed unless dry_run is set")
  adapter = open_adapter(src)
  if dst is not None and not dry_run:
    atomic.check_writable(dst, force=force)
  spectra, costs = {}, {}
  for module in adapter.modules:
    spectra[module.name] = np.asarray(squeeze.singular_values(*adapter.read(module)), np.float64)
    costs[module.name] = module.d_in + module.d_out
  allocation = allocate(spectra, costs, n_budget, allowed_ranks=allowed)
  table = allocation_table(allocation, spectra, costs, budget=n_budget)
  rows = tuple(
    ModuleRow(
      name=m.name,
      r_src=m.r_src,
      r_tgt=allocation.ranks[m.name],
      retention=float(squeeze.variance_retention(spectra[m.name], allocation.ranks[m.name])),
      energy=float(np.sum(np.square(spectra[m.name]))),
    )
    for m in adapter.modules
  )
  if not dry_run:
    squeezed = {}
    for module in adapter.modules:
      squeezed[module.name] = truncate(*adapter.read(module), allocation.ranks[module.name])
    provenance = {
      "source": os.fspath(src),
      "method": "qr_core",
      "budget": n_budget,
      "allowed_ranks": allowed,
      "r_src": {m.name: m.r_src for m in adapter.modules},
    }
    with atomic.atomic_output(dst, force=force) as target:
      adapter.write(target, squeezed, provenance=provenance)
  summary = SqueezeSummary(
    format=adapter.format,
    src=os.fspath(src),
    dst=None if dst is None else os.fspath(dst),
    rows=rows,
    overall_retention=allocation.retention,
    written=not dry_run,
    seconds=time.perf_counter() - start,
  )
  return summary, table
