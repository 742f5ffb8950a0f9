"""What ``lora_tree.squeeze_tree`` takes and returns: per-module target ranks and squeeze reports.

Target ranks: an int for every module, ``RankRules`` (by path regex) or ``EnergyRank`` (one rank
that keeps an energy target in every module, Eq. 10). Reports: ``ModuleReport`` per module and
``SqueezeReport`` for the tree (retention, the retention curve, JSON rows). ``lora_tree``
re-exports all four, so ``lora_tree.RankRules`` etc. stay where callers find them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from lora_squeeze import squeeze, validation


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankRules:
  """Per-module target ranks: ordered (regex, rank) pairs; the first ``re.search`` hit on the path wins.

  Example: ``RankRules(rules=((r"/mlp/", 16), (r"q_einsum", 4)), default=8)``. A module that no
  rule matches gets ``default``; without a default that is an error naming the module.
  """

  rules: tuple[tuple[str, int], ...]
  default: int | None = None

  def __post_init__(self):
    for pair in self.rules:
      if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
        raise ValueError(f"each rule must be a (regex, rank) pair, got {pair!r}")
      try:
        re.compile(pair[0])
      except re.error as err:
        raise ValueError(f"rule pattern {pair[0]!r} is not a valid regex: {err}") from err
      squeeze.check_rank(pair[1], name=f"rank of rule {pair[0]!r}")
    if self.default is not None:
      squeeze.check_rank(self.default, name="default rank")

  def rank_for(self, path: str) -> int:
    """The target rank of the module at ``path``."""
    for pattern, rank in self.rules:
      if re.search(pattern, path):
        return int(rank)
    if self.default is None:
      patterns = [p for p, _ in self.rules]
      raise ValueError(f"{path}: no rank rule matches this module (patterns {patterns}) and no default is set")
    return int(self.default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnergyRank:
  """One rank for all modules from an energy target.

  r = the smallest rank at which every module keeps at least ``tau`` of its energy
  (V_r ≥ tau, Eq. 10), capped at ``max_rank``. Every module gets this r, so an adapter with
  heterogeneous source ranks comes out homogeneous (modules with r_src < r are zero-padded).
  """

  tau: float
  max_rank: int | None = None

  def __post_init__(self):
    validation.fraction("tau", self.tau)
    if self.max_rank is not None:
      squeeze.check_rank(self.max_rank, name="max_rank")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleReport:
  """What squeezing did to one module.

  singular_values: (*stack, r_src) all singular values of ΔW, descending (exact, float32).
  retention: V_r (Eq. 10) of the module, summed over its stacked layers when it has any.
  """

  path: str
  r_src: int
  r_tgt: int
  singular_values: np.ndarray
  retention: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class SqueezeReport:
  """Per-module reports and the energy kept over all modules (Σ kept s_i² / Σ all s_i²)."""

  modules: tuple[ModuleReport, ...]
  overall_retention: float
  method: str

  def retention_curve(self) -> np.ndarray:
    """(max r_src,) float64: the overall V_r (Eq. 10 over all modules) at every target rank
    r = 1, 2, ..., max r_src, as if every module were squeezed to r; 1.0 for an all-zero adapter.

    Entry r_tgt - 1 equals `overall_retention` when every module was squeezed to r_tgt.
    """
    r_max = max(m.r_src for m in self.modules)
    kept = np.zeros(r_max, np.float64)
    for m in self.modules:
      energy = np.square(np.asarray(m.singular_values, np.float64)).reshape(-1, m.r_src).sum(axis=0)
      cumulative = np.cumsum(energy)
      kept += np.concatenate([cumulative, np.full(r_max - m.r_src, cumulative[-1])])
    return kept / kept[-1] if kept[-1] > 0 else np.ones(r_max)

  def to_rows(self) -> list[dict[str, Any]]:
    """One JSON-ready dict per module (path, r_src, r_tgt, retention, singular_values)."""
    return [
      {
        "path": m.path,
        "r_src": m.r_src,
        "r_tgt": m.r_tgt,
        "retention": m.retention,
        "singular_values": np.asarray(m.singular_values, np.float64).tolist(),
      }
      for m in self.modules
    ]
