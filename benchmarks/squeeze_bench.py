"""Wall time and extra memory of the four squeeze methods on Gemma 3 LoRA module shapes.

Methods: (i) "svd" full SVD of the formed ΔW (the reference), (ii) "rsvd" Alg. 1 on the formed
ΔW, (iii) "rsvd_factored" Alg. 1 on x ↦ a(b x), (iv) "qr_core" Alg. 2. Shapes are read from the
gemma configs (gm.nn.Gemma3_*.config) for the q, kv, o (attn_vec), gating and linear targets.

    .venv/bin/python benchmarks/squeeze_bench.py            # 270M, 1B, 4B, 27B × r_src {16,64,128} → r_tgt {1,8}
    .venv/bin/python benchmarks/squeeze_bench.py --quick    # a few shapes
    .venv/bin/python benchmarks/squeeze_bench.py --whole-4b # only the whole 4B adapter vs numpy's full SVD (~3 min)

Then it times the whole Gemma 3 4B adapter (every module, r=128 → 8): qr_core and rsvd_factored
through ``lora_tree.squeeze_tree`` end to end; svd and rsvd as (time of each distinct module
shape, measured once) × (its count), which the output says.

Extra memory is XLA's compiled memory analysis of the jitted method (temporaries + outputs: what
the call allocates beyond its inputs; LAPACK's internal workspace is not included). Times are the
best of a few warm calls through the public API (validation included); the first call's time
(compilation) is reported separately. Writes JSON to benchmarks/results/ and prints the results as
Markdown tables (`--markdown JSON` prints them again from a saved run, without measuring).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import lora_tree, squeeze, squeeze_base

METHOD_LABELS = {
  "svd": "(i) svd(ΔW)",
  "rsvd": "(ii) Alg.1(ΔW)",
  "rsvd_factored": "(iii) rsvd a(bx)",
  "qr_core": "(iv) qr_core",
}
METHOD_ORDER = ("svd", "rsvd", "rsvd_factored", "qr_core")
MODELS = {"270m": "Gemma3_270M", "1b": "Gemma3_1B", "4b": "Gemma3_4B", "27b": "Gemma3_27B"}


def module_shapes(model: str) -> tuple[int, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
  """(num_layers, target -> (in_dims, out_dims)) in the gemma LoRA layout a (*in, r), b (r, *out)."""
  from gemma import gm  # imported here: it is slow, and only the shapes are needed

  config = getattr(gm.nn, MODELS[model]).config
  d, heads, head_dim, kv_heads, hidden = (
    config.embed_dim,
    config.num_heads,
    config.head_dim,
    config.num_kv_heads,
    config.hidden_dim,
  )
  return config.num_layers, {
    "q": ((d,), (heads, head_dim)),
    "kv": ((d,), (2, kv_heads, head_dim)),
    "o": ((heads, head_dim), (d,)),
    "gating": ((d,), (2, hidden)),
    "linear": ((hidden,), (d,)),
  }


def lora_factors(rng: np.random.Generator, m: int, n: int, r: int) -> tuple[jax.Array, jax.Array]:
  """a (m, r), b (r, n) float32 with a decaying spectrum, like a trained LoRA."""
  a = rng.standard_normal((m, r), dtype=np.float32) * (0.9 ** np.arange(r, dtype=np.float32))
  b = rng.standard_normal((r, n), dtype=np.float32) / np.float32(math.sqrt(n))
  return jnp.asarray(a), jnp.asarray(b)


def best_time(fn, *, reps: int, budget_s: float) -> tuple[float, float]:
  """(first call seconds incl. compilation, best warm seconds over ≤ reps calls within budget_s)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times: list[float] = []
  while len(times) < reps and sum(times) < budget_s:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, min(times)


def extra_bytes(method: str, a: jax.Array, b: jax.Array, r_tgt: int) -> int:
  """Temporaries + outputs XLA allocates for one call (its compiled memory analysis)."""
  key = jax.random.key(0)
  fn = jax.jit(lambda x, y: squeeze.squeeze_factors(x, y, r_tgt, method=method, key=key))
  analysis = fn.lower(a, b).compile().memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def bench_module(a, b, r_tgt: int, method: str, *, reps: int) -> dict:
  key = jax.random.key(0)
  first, best = best_time(lambda: squeeze.squeeze_factors(a, b, r_tgt, method=method, key=key), reps=reps, budget_s=2.0)
  return {"first_s": first, "time_s": best, "extra_bytes": extra_bytes(method, a, b, r_tgt)}


def gemma4b_tree(rng: np.random.Generator, r: int) -> tuple[dict, dict[str, int]]:
  """A Gemma 3 4B LoRA tree (every text-decoder target, every layer) and its module shape counts."""
  n_layers, shapes = module_shapes("4b")
  paths = {
    "q": ("attn", "q_einsum", "_LoRAEinsum_0"),
    "kv": ("attn", "kv_einsum", "_LoRAEinsum_0"),
    "o": ("attn", "attn_vec_einsum", "_LoRAEinsum_0"),
    "gating": ("mlp", "_LoRAEinsum_gating_einsum"),
    "linear": ("mlp", "_LoRAEinsum_linear"),
  }
  tree: dict = {}
  for layer in range(n_layers):
    for target, (in_dims, out_dims) in shapes.items():
      a, b = lora_factors(rng, math.prod(in_dims), math.prod(out_dims), r)
      node = tree.setdefault(f"layer_{layer}", {})
      for name in paths[target]:
        node = node.setdefault(name, {})
      node["lora"] = {"a": a.reshape(*in_dims, r), "b": b.reshape(r, *out_dims)}
  return tree, {target: n_layers for target in shapes}


def qr_core_variants(tree: dict, *, reps: int, only: tuple[str, ...] | None = None) -> dict[str, dict]:
  """The whole-adapter qr_core time, one way at a time, measured in turns (best of ``reps``).

  * one call per tree: ``squeeze_tree`` (every group, reshape and stack in one compiled call);
  * one call per group: ``squeeze.qr_core`` on each stacked group of equal-shaped modules (how
    squeeze_tree ran before), stacking included;
  * one call per module: ``squeeze.qr_core`` on each of the 170 modules;
  * float32 path: ``squeeze_tree(precision="float32")`` (Householder QR, what TPUs run);
  * float64 Gram floor: only the float64 Gram products aᵀa and b bᵀ of every module, in one
    compiled call: the arithmetic no exact float64 path can skip;
  * r×r LAPACK floor: the two Cholesky factorizations and the SVD of a 128×128 float64 core per
    module (170 of each, one batched call each, one OpenBLAS thread as qr_core runs them).

  ``only``: the names of the variants to measure (default all).
  """
  modules = [lora_tree._as_matrices(p, m, 0) for p, m in lora_tree.find_lora_modules(tree).items()]  # noqa: SLF001
  groups = lora_tree._group_by_shape(modules, {m.path: 8 for m in modules})  # noqa: SLF001
  pairs = [(m.a, m.b) for m in modules]
  stacked = [(jnp.stack([m.a for m in g]), jnp.stack([m.b for m in g])) for g in groups]
  jax.block_until_ready((pairs, stacked))

  @jax.jit
  def gram_floor(pairs):
    gram = lambda x, spec: jnp.einsum(spec, x, x, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    return [(gram(a.astype(jnp.float64), "mi,mj->ij"), gram(b.astype(jnp.float64), "in,jn->ij")) for a, b in pairs]

  def floor():
    with jax.enable_x64(True):
      return gram_floor(pairs)

  cores = jnp.asarray(np.random.default_rng(1).standard_normal((len(modules), 128, 128)))

  @jax.jit
  def lapack_floor(m):
    spd = m @ jnp.swapaxes(m, -1, -2) + 128 * jnp.eye(128, dtype=m.dtype)  # positive definite, like a Gram
    return jnp.linalg.cholesky(spd), jnp.linalg.cholesky(spd), jnp.linalg.svd(m)

  def lapack():
    with jax.enable_x64(True):
      return squeeze_base.run_single_threaded_lapack(lambda: lapack_floor(cores.astype(jnp.float64)))

  variants = {
    "one call per tree (squeeze_tree)": lambda: lora_tree.squeeze_tree(tree, 8)[0],
    "one call per group": lambda: [
      squeeze.qr_core(jnp.stack([m.a for m in g]), jnp.stack([m.b for m in g]), 8) for g in groups
    ],
    "one call per module": lambda: [squeeze.qr_core(a, b, 8) for a, b in pairs],
    "float32 path, one call per tree": lambda: lora_tree.squeeze_tree(tree, 8, precision="float32")[0],
    "float64 Gram products alone (floor)": floor,
    "r×r LAPACK work alone (2 Cholesky + SVD per module, float64)": lapack,
  }
  if only is not None:
    variants = {name: fn for name, fn in variants.items() if name in only}
  firsts = {}
  for name, fn in variants.items():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    firsts[name] = time.perf_counter() - start
  times = {name: [] for name in variants}
  for _ in range(reps):  # in turns, so that a change of load hits every variant alike
    for name, fn in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  out = {name: {"first_s": firsts[name], "time_s": min(times[name])} for name in variants}
  for name, cell in out.items():
    print(f"  qr_core {name:40s} {cell['time_s']:9.3f} s warm (first call {cell['first_s']:.2f} s)", flush=True)
  return out


def numpy_full_svd(rng: np.random.Generator, counts: dict[str, int]) -> dict:
  """What full-SVD tools run (PEFT/torch, scipy): form ΔW = a @ b in float32 and take its SVD.

  numpy.linalg.svd (LAPACK gesdd, OpenBLAS on every core), one call per distinct 4B module shape
  (compiles nothing, so one call is its time) × the number of modules of that shape.
  """
  _, shapes = module_shapes("4b")
  per_shape, total = {}, 0.0
  for target, (in_dims, out_dims) in shapes.items():
    m, n = math.prod(in_dims), math.prod(out_dims)
    a, b = (np.asarray(x) for x in lora_factors(rng, m, n, 128))
    start = time.perf_counter()
    np.linalg.svd(a @ b, full_matrices=False)
    seconds = time.perf_counter() - start
    per_shape[target] = {"m": m, "n": n, "time_s": seconds, "count": counts[target]}
    total += seconds * counts[target]
    print(f"  numpy full SVD of ΔW {target:7s} {m}×{n}: {seconds:.2f} s × {counts[target]}", flush=True)
  return {
    "time_s": total,
    "per_shape": per_shape,
    "how": "numpy.linalg.svd(a @ b), each distinct shape once × its count",
  }


def whole_4b(args: argparse.Namespace) -> None:
  """The whole Gemma 3 4B adapter (r = 128 → 8): qr_core against the full SVD, in one run."""
  load_before = os.getloadavg()
  rng = np.random.default_rng(0)
  tree, counts = gemma4b_tree(rng, 128)
  jax.block_until_ready(tree)
  only = (
    "one call per tree (squeeze_tree)",
    "float32 path, one call per tree",
    "float64 Gram products alone (floor)",
    "r×r LAPACK work alone (2 Cholesky + SVD per module, float64)",
  )
  variants = qr_core_variants(tree, reps=args.reps, only=only)
  reference = numpy_full_svd(rng, counts)
  for cell in variants.values():
    cell["speedup_vs_full_svd"] = reference["time_s"] / cell["time_s"]
  result = {
    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__},
    "load_average": {"before": load_before, "after": os.getloadavg()},
    "n_modules": sum(counts.values()),
    "full_svd_numpy": reference,
    "qr_core_variants": variants,
  }
  out = args.out or "benchmarks/results/squeeze_bench_4b.json"
  with open(out + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(out + ".tmp", out)
  print(f"\nwrote {out}\n")
  print(f"| whole Gemma 3 4B adapter, r 128 → 8 ({result['n_modules']} modules) | time | speed-up over the full SVD |")
  print("|---|---|---|")
  print(f"| full SVD of each ΔW (numpy) | {reference['time_s']:.1f} s | 1× |")
  for name, cell in variants.items():
    print(
      f"| qr_core: {name} | {cell['time_s']:.3f} s (first call {cell['first_s']:.1f} s) | {cell['speedup_vs_full_svd']:,.0f}× |"
    )
  print(f"\nload average (1, 5, 15 min) before {load_before}, after {result['load_average']['after']}")


def markdown(result: dict) -> str:
  """The JSON result as Markdown: per-module table (time, ratio to (i), extra MiB) and the 4B total."""
  lines = [
    "| model | module | m×n | r_src | r_tgt | " + " | ".join(METHOD_LABELS[m] for m in METHOD_ORDER) + " |",
    "|---|---|---|---|---|" + "---|" * len(METHOD_ORDER),
  ]
  for row in result["modules"]:
    base = row["methods"]["svd"]["time_s"]
    cells = []
    for method in METHOD_ORDER:
      cell = row["methods"][method]
      ratio = "" if method == "svd" else f" ({base / cell['time_s']:,.0f}×)"
      cells.append(f"{cell['time_s']:.4g} s{ratio}, {cell['extra_bytes'] / 2**20:,.1f} MiB")
    lines.append(
      f"| {row['model']} | {row['module']} | {row['m']}×{row['n']} | {row['r_src']} | {row['r_tgt']} | "
      + " | ".join(cells)
      + " |"
    )
  whole = result["whole_gemma3_4b_r128_to_8"]
  lines += [
    "",
    f"Whole Gemma 3 4B adapter, r = 128 → 8 ({whole['n_modules']} modules):",
    "",
    "| method | time | speed-up over (i) | how |",
    "|---|---|---|---|",
  ]
  for method in METHOD_ORDER:
    cell = whole["methods"][method]
    lines.append(
      f"| {METHOD_LABELS[method]} | {cell['time_s']:.4g} s | {cell['speedup_vs_svd']:,.0f}× | {cell['how']} |"
    )
  variants = whole.get("qr_core_variants", {})
  if variants:
    lines += [
      "",
      "qr_core on the same adapter, one way at a time (in turns, best of the warm calls):",
      "",
      "| qr_core variant | time | speed-up over (i) |",
      "|---|---|---|",
    ]
    for name, cell in variants.items():
      lines.append(f"| {name} | {cell['time_s']:.4g} s | {cell['speedup_vs_svd']:,.0f}× |")
  load = result["load_average"]
  lines += [
    "",
    f"Load average (1, 5, 15 min) before {load['before']}, at the 4B total {load['whole_4b']}, "
    f"after {load['after']}; {result['machine']['cpus']} CPUs, jax {result['machine']['jax']}.",
  ]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a few shapes (270M and 4B q, gating) only")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/squeeze_bench[_quick].json)")
  parser.add_argument("--reps", type=int, default=3, help="warm calls per measurement (best is kept)")
  parser.add_argument(
    "--markdown",
    metavar="JSON",
    default=None,
    help="only print the Markdown table of an earlier run's JSON (no measuring)",
  )
  parser.add_argument(
    "--qr-core-only",
    action="store_true",
    help="only the whole 4B adapter's qr_core variants (no SVD reference; minutes less)",
  )
  parser.add_argument(
    "--whole-4b",
    action="store_true",
    help="only the whole 4B adapter: qr_core (squeeze_tree and its floors) against numpy's full SVD of each ΔW",
  )
  args = parser.parse_args()
  if args.whole_4b:
    whole_4b(args)
    return
  if args.qr_core_only:
    load_before = os.getloadavg()
    tree, counts = gemma4b_tree(np.random.default_rng(0), 128)
    jax.block_until_ready(tree)
    variants = qr_core_variants(tree, reps=args.reps)
    result = {
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__},
      "load_average": {"before": load_before, "after": os.getloadavg()},
      "n_modules": sum(counts.values()),
      "qr_core_variants": variants,
    }
    out = args.out or "benchmarks/results/squeeze_bench_qr_core.json"
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {out}; load average before {load_before}, after {result['load_average']['after']}")
    return
  if args.markdown:
    with open(args.markdown) as f:
      print(markdown(json.load(f)), end="")
    return
  rng = np.random.default_rng(0)
  load_before = os.getloadavg()

  if args.quick:
    grid = [("270m", ("q", "gating"), (16, 128), (1, 8)), ("4b", ("q", "gating"), (128,), (8,))]
  else:
    grid = [(model, ("q", "kv", "o", "gating", "linear"), (16, 64, 128), (1, 8)) for model in MODELS]

  rows: list[dict] = []
  svd_cache: dict[tuple[int, int, int], dict] = {}
  for model, targets, r_srcs, r_tgts in grid:
    _, shapes = module_shapes(model)
    for target in targets:
      in_dims, out_dims = shapes[target]
      m, n = math.prod(in_dims), math.prod(out_dims)
      for r_src in r_srcs:
        a, b = lora_factors(rng, m, n, r_src)
        for r_tgt in r_tgts:
          cells = {}
          for method in METHOD_ORDER:
            # A full SVD costs the same for every r_tgt: measured once per (m, n, r_src).
            if method == "svd" and (m, n, r_src) in svd_cache:
              cells[method] = dict(svd_cache[(m, n, r_src)], reused=True)
              continue
            cells[method] = bench_module(a, b, r_tgt, method, reps=1 if method == "svd" else args.reps)
            if method == "svd":
              svd_cache[(m, n, r_src)] = cells[method]
          row = {"model": model, "module": target, "m": m, "n": n, "r_src": r_src, "r_tgt": r_tgt, "methods": cells}
          rows.append(row)
          base = cells["svd"]["time_s"]
          ratios = ", ".join(f"{k} {v['time_s']:.4f}s ({base / v['time_s']:.0f}× faster)" for k, v in cells.items())
          print(f"[{model} {target} {m}×{n} {r_src}→{r_tgt}] {ratios}", flush=True)
  print("\nWhole Gemma 3 4B adapter, r = 128 → 8 (every q, kv, o, gating, linear module of 34 layers)")
  tree, counts = gemma4b_tree(rng, 128)
  jax.block_until_ready(tree)
  n_modules = sum(counts.values())
  load_at_total = os.getloadavg()
  whole: dict[str, dict] = {}
  for method in ("qr_core", "rsvd_factored"):
    key = jax.random.key(0)
    first, best = best_time(
      lambda: lora_tree.squeeze_tree(tree, 8, method=method, key=key)[0],
      reps=args.reps if method == "qr_core" else 1,
      budget_s=10.0,
    )
    whole[method] = {"first_s": first, "time_s": best, "how": "squeeze_tree end to end (warm)"}
    print(f"  {METHOD_LABELS[method]:20s} {best:9.3f} s warm   (first call with compilation {first:.2f} s)", flush=True)
  qr_variants = qr_core_variants(tree, reps=args.reps)
  _, shapes = module_shapes("4b")
  for method in ("svd", "rsvd"):
    total = 0.0
    for target, (in_dims, out_dims) in shapes.items():
      m, n = math.prod(in_dims), math.prod(out_dims)
      cached = next(
        (r["methods"][method] for r in rows if (r["m"], r["n"], r["r_src"], r["r_tgt"]) == (m, n, 128, 8)),
        None,
      )
      if cached is None:
        a, b = lora_factors(rng, m, n, 128)
        cached = bench_module(a, b, 8, method, reps=1)
      total += cached["time_s"] * counts[target]
    whole[method] = {"time_s": total, "how": "each distinct module shape timed once (warm) × its count"}
    print(f"  {METHOD_LABELS[method]:20s} {total:9.3f} s   (each distinct shape timed once × its count)", flush=True)
  base = whole["svd"]["time_s"]
  for method in METHOD_ORDER:
    whole[method]["speedup_vs_svd"] = base / whole[method]["time_s"]
  print("  speed-up over (i): " + ", ".join(f"{m} {whole[m]['speedup_vs_svd']:.0f}×" for m in METHOD_ORDER))
  load_after = os.getloadavg()

  for variant in qr_variants.values():
    variant["speedup_vs_svd"] = base / variant["time_s"]
  result = {
    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__},
    "load_average": {"before": load_before, "whole_4b": load_at_total, "after": load_after},
    "quick": args.quick,
    "modules": rows,
    "whole_gemma3_4b_r128_to_8": {"n_modules": n_modules, "methods": whole, "qr_core_variants": qr_variants},
  }
  out = args.out or f"benchmarks/results/squeeze_bench{'_quick' if args.quick else ''}.json"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(out + ".tmp", out)
  print(f"wrote {out}")
  print()
  print(markdown(result), end="")


if __name__ == "__main__":
  main()
