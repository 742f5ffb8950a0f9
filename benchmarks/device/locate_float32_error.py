"""Which float32 operation of qr_core's float32 path loses accuracy on this backend?

On one H200 the float32 path's singular values were off by 1e-5–3e-5·σ₁ at every condition number
(3e-7–7e-7 on CPU; docs/squeeze.md, "On a GPU"). This times nothing: it measures each of the
path's operations alone on the default device against numpy float64 run on the same float32
inputs, for the Gemma 3 4B q shape (a 2560 × 128, b 128 × 2048) at condition numbers 1e2 and 1e6:

* ``qr``: R of a float32 Householder QR (``squeeze_qr_core.qr_root_f32``) against numpy's
  float64 R (both with a non-negative diagonal), max entry error / ‖x‖₂;
* ``core matmul``: R_A R_Bᵀ with ``Precision.HIGHEST`` and with the default precision, max entry
  error / (‖R_A‖₂‖R_B‖₂);
* ``svd``: the singular values of the float32 core M (exactly representable) with each
  ``jax.lax.linalg.SvdAlgorithm`` against numpy's float64 SVD of the same M, max error / σ₁.

    python -m benchmarks.device.locate_float32_error [--out PATH]

Prints one line per measurement and writes JSON (default: stdout only).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_squeeze import squeeze_qr_core

M, N, R = 2560, 2048, 128


def ill_conditioned(rng: np.random.Generator, m: int, r: int, cond: float) -> np.ndarray:
  u, _ = np.linalg.qr(rng.standard_normal((m, r)))
  v, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return (u * np.logspace(0, -np.log10(cond), r)) @ v.T


def positive_r(x: np.ndarray) -> np.ndarray:
  r = np.linalg.qr(x, mode="r")
  return r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None]


def measure(cond: float, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  a = ill_conditioned(rng, M, R, cond).astype(np.float32)
  b = ill_conditioned(rng, N, R, cond).T.astype(np.float32)
  rows = []
  # QR of each factor (b as bᵀ, as the path does).
  roots = {}
  for side, x, tall in (("a", a, a), ("b", b, b.T)):
    got = np.asarray(jax.jit(squeeze_qr_core.qr_root_f32, static_argnums=1)(jnp.asarray(x), side), np.float64)
    ref = positive_r(tall.astype(np.float64))
    roots[side] = got
    rows.append({"op": f"qr ({side})", "error": float(np.max(np.abs(got - ref)) / np.linalg.norm(tall, 2))})
  # The core product at two precisions.
  ra, rb = (roots[s].astype(np.float32) for s in ("a", "b"))
  exact = ra.astype(np.float64) @ rb.T.astype(np.float64)
  scale = np.linalg.norm(ra, 2) * np.linalg.norm(rb, 2)
  for name, precision in (("HIGHEST", lax.Precision.HIGHEST), ("DEFAULT", lax.Precision.DEFAULT)):
    got = np.asarray(jax.jit(lambda x, y, p=precision: jnp.matmul(x, y.T, precision=p))(ra, rb), np.float64)
    rows.append({"op": f"core matmul {name}", "error": float(np.max(np.abs(got - exact)) / scale)})
  # The SVD of the (float32) core.
  core = exact.astype(np.float32)
  s_ref = np.linalg.svd(core.astype(np.float64), compute_uv=False)
  for algorithm in ("DEFAULT", "QR", "JACOBI", "DIVIDE_AND_CONQUER", "POLAR"):
    alg = getattr(lax.linalg.SvdAlgorithm, algorithm)
    fn = jax.jit(lambda x, alg=alg: lax.linalg.svd(x, algorithm=alg)[1])
    try:
      s = np.asarray(fn(jnp.asarray(core)), np.float64)
    except Exception as error:  # noqa: BLE001 - an algorithm a backend lacks is a result, not a failure
      rows.append({"op": f"svd {algorithm}", "error": None, "note": f"{type(error).__name__}: {error}"[:200]})
      continue
    rows.append({"op": f"svd {algorithm}", "error": float(np.max(np.abs(s - s_ref)) / s_ref[0])})
  for row in rows:
    row["cond"] = cond
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="JSON path (default: none)")
  args = parser.parse_args()
  rows = [row for cond in (1e2, 1e6) for row in measure(cond)]
  device = jax.devices()[0]
  print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  for row in rows:
    error = "-" if row["error"] is None else f"{row['error']:.1e}"
    print(f"cond {row['cond']:.0e}  {row['op']:<24} {error:>8}  {row.get('note', '')}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": device.device_kind, "backend": jax.default_backend(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
