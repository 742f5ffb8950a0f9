"""How big an adapter is: ‖ΔW‖_F and the RMS of its factors, logged at the end of every stage so a
reader of metrics.jsonl sees that (and how much) the adapter moved.

ΔW = A @ B per module (lora_tree: A = (prod(in), r), B = (r, prod(out))); its Frobenius norm comes
from the r x r Gram matrices, ‖A B‖_F^2 = tr((AᵀA)(B Bᵀ)), without forming the (in, out) matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lora_squeeze import lora_tree


def adapter_size(lora: Any) -> dict[str, float]:
  """{"delta_w_fro": sqrt(sum over modules of ‖ΔW‖_F^2), "a_rms", "b_rms": RMS over all entries of
  the A / B factors, "modules": how many LoRA modules} of a LoRA param tree; ValueError with none."""
  modules = lora_tree.find_lora_modules(lora)
  if not modules:
    raise ValueError("adapter_size: the tree has no LoRA modules ({'a', 'b'} mappings)")
  fro2, a2, b2, a_n, b_n = 0.0, 0.0, 0.0, 0, 0
  for module in modules.values():
    a = np.asarray(module["a"], np.float64)
    b = np.asarray(module["b"], np.float64)
    r = a.shape[-1]
    a = a.reshape(-1, r)
    b = b.reshape(r, -1)
    fro2 += float(np.trace((a.T @ a) @ (b @ b.T)))
    a2, b2 = a2 + float(np.sum(a * a)), b2 + float(np.sum(b * b))
    a_n, b_n = a_n + a.size, b_n + b.size
  return {
    "delta_w_fro": math.sqrt(max(fro2, 0.0)),
    "a_rms": math.sqrt(a2 / a_n),
    "b_rms": math.sqrt(b2 / b_n),
    "modules": len(modules),
  }
