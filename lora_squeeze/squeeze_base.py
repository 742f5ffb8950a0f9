"""What the squeeze modules share: method and precision names, dtypes, input checks, LAPACK scope.

``lora_squeeze.squeeze`` is the public API (and derives the math); ``squeeze_rsvd`` (Alg. 1 and
the formed-ΔW methods) and ``squeeze_qr_core`` (Alg. 2) implement it on top of this module.
Checks here look at shapes and dtypes only (static under jit), so bad input fails before any
work starts; finiteness is checked inside the compiled computations and raised here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from lora_squeeze import validation

METHODS = ("qr_core", "rsvd", "rsvd_factored", "svd")
CORES = ("svd", "rsvd")
# Arithmetic of qr_core: "float64" (Gram matrices and products in float64), "float32" (Householder
# QR in float32, for backends without float64: TPU), "auto" (float64 where the backend has it).
PRECISIONS = ("auto", "float64", "float32")
# Backends with native float64 arithmetic; on the others (TPU, ...) "auto" means "float32".
FLOAT64_BACKENDS = ("cpu", "gpu", "cuda", "rocm")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "float64")

F32 = jnp.float32
F64 = jnp.float64
EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
# Full float32 products on every backend (TPU/GPU default to reduced-precision passes).
matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class NonFiniteError(ValueError):
  """A factor holds NaN or Inf.

  Attributes:
    operand: which input ("a", "b" or "w").
    batch_index: index into the leading batch axes of the first offending matrix (() if none).
  """

  def __init__(self, operand: str, batch_index: tuple[int, ...]):
    where = f" at batch index {batch_index}" if batch_index else ""
    super().__init__(f"{operand} contains non-finite values (NaN or Inf){where}")
    self.operand = operand
    self.batch_index = batch_index


# --------------------------------------------------------------------------------------------
# Input checks (host side: shapes and dtypes are static, so they fail before any work starts).
# --------------------------------------------------------------------------------------------


def check_rank(rank: Any, *, name: str = "rank") -> int:
  """Returns ``rank`` as an int; UserInputError (a ValueError) unless it is an integer ≥ 1."""
  return int(validation.positive_int(name, rank))


def resolve_precision(precision: Any = "auto", *, backend: str | None = None) -> str:
  """ "float64" or "float32": the arithmetic qr_core uses for ``precision`` (one of PRECISIONS).

  "auto" is "float64" on backends with native float64 (FLOAT64_BACKENDS: CPU, GPU) and
  "float32" elsewhere (TPU). ``backend`` defaults to ``jax.default_backend()``.
  """
  validation.one_of("precision", precision, PRECISIONS)
  if precision != "auto":
    return precision
  backend = jax.default_backend() if backend is None else backend
  return "float64" if backend in FLOAT64_BACKENDS else "float32"


def check_count(value: Any, name: str) -> int:
  return int(validation.integer(name, value, minimum=0))


def check_dtype(x: Any, name: str) -> None:
  dtype = jnp.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  if dtype.name not in SUPPORTED_DTYPES:
    raise ValueError(f"{name} has unsupported dtype {dtype.name}; allowed: {', '.join(SUPPORTED_DTYPES)}")


def validate_factors(a: Any, b: Any) -> None:
  """Static checks of a LoRA pair ``a: (..., m, r)``, ``b: (..., r, n)``; ValueError naming the problem.

  Checks dtypes, ranks of the arrays (≥ 2), equal leading batch axes and equal inner rank r.
  Finiteness is checked by the squeeze functions themselves, inside their compiled computation.
  """
  check_dtype(a, "a")
  check_dtype(b, "b")
  if np.ndim(a) < 2 or np.ndim(b) < 2:
    raise ValueError(
      f"a and b must be matrices (..., m, r) and (..., r, n), got shapes {np.shape(a)} and {np.shape(b)}"
    )
  if np.shape(a)[-1] != np.shape(b)[-2]:
    raise ValueError(
      f"inner ranks differ: a has r={np.shape(a)[-1]} (shape {np.shape(a)}) "
      f"but b has r={np.shape(b)[-2]} (shape {np.shape(b)})"
    )
  if np.shape(a)[:-2] != np.shape(b)[:-2]:
    raise ValueError(
      f"batch axes differ: a {np.shape(a)[:-2]} vs b {np.shape(b)[:-2]} (shapes {np.shape(a)}, {np.shape(b)})"
    )


def run_single_threaded_lapack(fn: Callable[[], Any]) -> Any:
  """Runs fn to completion with OpenBLAS (used by XLA's CPU LAPACK kernels) on one thread.

  The r×r decompositions are far too small to split; OpenBLAS's spinning worker threads made
  them ~5× slower on 2 shared cores (measured). The limit is scoped and restored, and the
  result is awaited inside it because XLA runs asynchronously. Under a caller's jit it only
  traces.
  """
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    out = fn()
    leaves = jax.tree.leaves(out)
    if not any(isinstance(x, jax.core.Tracer) for x in leaves):
      jax.block_until_ready(out)
  return out


def check_key(key: Any, method: str) -> None:
  if key is None:
    raise ValueError(f"method {method!r} is randomized and needs a PRNG key, got key=None")


def raise_if_nonfinite(flags: dict[str, jax.Array]) -> None:
  """flags: operand name -> bool array over the batch axes (True = finite)."""
  for operand, finite in flags.items():
    if isinstance(finite, jax.core.Tracer):
      continue  # inside a caller's jit: values are unknown until run time
    # An explicit fetch of the small flags (..batch) only: under jax.transfer_guard("disallow")
    # any implicit fetch, e.g. of a whole factor, would be an error (tests/test_lora_tree.py).
    finite = np.asarray(jax.device_get(finite))
    if not finite.all():
      bad = np.argwhere(~finite)[0] if finite.ndim else ()
      raise NonFiniteError(operand, tuple(int(i) for i in bad))
