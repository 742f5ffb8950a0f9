"""Accuracy of qr_core's float32-only path (what runs on TPUs) against its float64 path.

For LoRA pairs a (m, r), b (r, n) of the Gemma 3 4B q shape (2560 × 2048, r = 128) whose factors
(both, or only a) have condition numbers 1e2 … 1e6, stored in float32 or bfloat16, it squeezes to
r_tgt ∈ {8, 32}
with

* ``float64``: squeeze.qr_core(precision="float64") (float64 Gram matrices; CPU/GPU default),
* ``float32``: squeeze.qr_core(precision="float32") (float32 Householder QR; TPU default),
* ``float32 Gram``: the rejected alternative, measured here for comparison only: R from the
  Cholesky factor (eigendecomposition where it fails) of a float32 Gram matrix, all in float32.
  Its factors are left in float32 (qr_core rounds its outputs to the storage dtype), so for
  bfloat16 storage only its spectrum column compares with the other two.

and reports, relative to σ₁ of the stored a @ b: the largest error of the r singular values and
the excess of ‖a_t b_t − a b‖_F over the Eckart–Young optimum. The reference is numpy float64
(Householder QR of the stored factors and the SVD of the r × r core). Several seeds; the worst
is reported. Writes benchmarks/results/squeeze_precision_bench.json and prints a Markdown table.

    .venv/bin/python benchmarks/squeeze_precision_bench.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import squeeze

CONDS = (1e2, 1e3, 1e4, 1e5, 1e6)
# Which factors are ill-conditioned: both (singular values logspaced over cond, random singular
# vectors), or only a (b Gaussian, well conditioned).
CASES = ("a only", "a and b")
STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
M, N, R = 2560, 2048, 128
R_TGTS = (8, 32)


def ill_conditioned(rng: np.random.Generator, m: int, r: int, cond: float) -> np.ndarray:
  """(m, r) with singular values logspaced from 1 to 1/cond and random singular vectors."""
  u, _ = np.linalg.qr(rng.standard_normal((m, r)))
  v, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return (u * np.logspace(0, -np.log10(cond), r)) @ v.T


@jax.jit
def _gram_f32_core(a, b):
  """The rejected float32 Gram path: R from chol(aᵀa) (eigh where it fails), SVD of the core."""

  def root(g):
    chol = jnp.linalg.cholesky(g)
    w, v = jnp.linalg.eigh(g)
    eig_root = jnp.sqrt(jnp.maximum(w, 0.0))[:, None] * v.T
    return jnp.where(jnp.all(jnp.isfinite(chol)), chol.T, eig_root)

  hi = jax.lax.Precision.HIGHEST
  ra, rb = root(jnp.matmul(a.T, a, precision=hi)), root(jnp.matmul(b, b.T, precision=hi))
  u, s, vt = jnp.linalg.svd(jnp.matmul(ra, rb.T, precision=hi))
  return ra, rb, u, s, vt


def gram_f32_squeeze(a, b, r_tgt):
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  ra, rb, u, s, vt = _gram_f32_core(a32, b32)
  k = r_tgt
  keep = s[:k] > 0
  inv = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, s[:k], 1.0)), 0.0)
  hi = jax.lax.Precision.HIGHEST
  a_t = jnp.matmul(a32, jnp.matmul(rb.T, vt[:k].T, precision=hi) * inv, precision=hi)
  b_t = jnp.matmul(inv[:, None] * jnp.matmul(u[:, :k].T, ra, precision=hi), b32, precision=hi)
  return a_t, b_t, s


def errors(a64, b64, s_ref, product, result, r_tgt) -> tuple[float, float]:
  a_t, b_t, s = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in result)
  s1 = s_ref[0]
  spectrum = float(np.max(np.abs(s[: len(s_ref)] - s_ref)) / s1)
  optimum = float(np.sqrt(np.sum(np.square(s_ref[r_tgt:]))))
  excess = float((np.linalg.norm(a_t @ b_t - product) - optimum) / s1)
  return spectrum, excess


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--out", default="benchmarks/results/squeeze_precision_bench.json")
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
  parser.add_argument("--storage", nargs="+", default=list(STORAGE), choices=list(STORAGE))
  parser.add_argument("--conds", nargs="+", type=float, default=list(CONDS))
  parser.add_argument(
    "--merge", default=None, help="a JSON of an earlier run whose rows to keep (rows measured now replace equal ones)"
  )
  args = parser.parse_args()
  rows = []
  for case in args.cases:
    for storage_name in args.storage:
      storage = STORAGE[storage_name]
      for cond in args.conds:
        worst: dict[tuple[str, int], list[float]] = {}
        for seed in range(args.seeds):
          rng = np.random.default_rng(seed)
          a = jnp.asarray(ill_conditioned(rng, M, R, cond), storage)
          if case == "a and b":
            b = jnp.asarray(ill_conditioned(rng, N, R, cond).T * 0.05, storage)
          else:  # only a ill-conditioned: its small directions reach a @ b unchanged
            b = jnp.asarray(rng.standard_normal((R, N)) / np.sqrt(N), storage)
          a64 = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
          b64 = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
          ra, rb = np.linalg.qr(a64, mode="r"), np.linalg.qr(b64.T, mode="r")
          s_ref = np.linalg.svd(ra @ rb.T, compute_uv=False)
          product = a64 @ b64
          for r_tgt in R_TGTS:
            results = {
              "float64": squeeze.qr_core(a, b, r_tgt, precision="float64"),
              "float32": squeeze.qr_core(a, b, r_tgt, precision="float32"),
              "float32 Gram": gram_f32_squeeze(a, b, r_tgt),
            }
            for path, result in results.items():
              errs = errors(a64, b64, s_ref, product, result, r_tgt)
              cur = worst.setdefault((path, r_tgt), [0.0, -np.inf])
              worst[(path, r_tgt)] = [max(cur[0], errs[0]), max(cur[1], errs[1])]
        for (path, r_tgt), (spectrum, excess) in worst.items():
          rows.append(
            {
              "case": case,
              "storage": storage_name,
              "cond": cond,
              "path": path,
              "r_tgt": r_tgt,
              "spectrum_error": spectrum,
              "reconstruction_excess": excess,
            }
          )
          print(
            f"{case}: {storage_name} cond {cond:.0e} {path:13s} r_tgt {r_tgt:3d}: max |Δσ|/σ₁ {spectrum:.2e}, "
            f"excess error/σ₁ {excess:.2e}",
            flush=True,
          )
  if args.merge:
    with open(args.merge) as f:
      earlier = json.load(f)["rows"]
    key = lambda r: (r["case"], r["storage"], r["cond"], r["path"], r["r_tgt"])  # noqa: E731
    measured = {key(r) for r in rows}
    rows = [r for r in earlier if key(r) not in measured] + rows
  result = {
    "machine": {"platform": platform.platform(), "jax": jax.__version__, "backend": jax.default_backend()},
    "shape": {"m": M, "n": N, "r_src": R},
    "seeds": args.seeds,
    "rows": rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}\n")
  print(markdown(result), end="")


def markdown(result: dict) -> str:
  lines = [
    "| ill-conditioned | storage | cond | "
    + " | ".join(f"{p}: max abs. σ error / σ₁" for p in ("float64", "float32", "float32 Gram"))
    + " | "
    + " | ".join(f"{p}: excess error / σ₁ (r_tgt 8, 32)" for p in ("float64", "float32", "float32 Gram"))
    + " |",
    "|---|---|---|" + "---|" * 6,
  ]
  table: dict = {}
  for row in result["rows"]:
    table.setdefault((row["case"], row["storage"], row["cond"]), {}).setdefault(row["path"], {})[row["r_tgt"]] = row
  for (case, storage, cond), paths in table.items():
    spectrum = [
      f"{max(r['spectrum_error'] for r in paths[p].values()):.1e}" for p in ("float64", "float32", "float32 Gram")
    ]
    excess = [
      ", ".join(f"{paths[p][k]['reconstruction_excess']:.1e}" for k in R_TGTS)
      for p in ("float64", "float32", "float32 Gram")
    ]
    lines.append(f"| {case} | {storage} | {cond:.0e} | " + " | ".join(spectrum) + " | " + " | ".join(excess) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
