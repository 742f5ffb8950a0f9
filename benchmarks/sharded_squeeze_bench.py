"""The cost of the squeeze at a stage boundary of a run whose LoRA factors are split over the mesh.

Side by side, in the same processes and alternating which goes first:

* ``before``: what the runner did until now: ``lora_tree.squeeze_tree`` (jitted, shardings left
  to propagation), then ``sharding.shard_params`` to put the result where the train step wants it;
* ``after``: ``sharded_squeeze.squeeze_on_mesh``: one jitted call with declared in/out shardings.

Adapters: the tiny model's (what tests/multiprocess_run.py trains, r 4 → 2) and Gemma 3 270M's
module shapes (18 layers × 5 targets, r 16 → 8, random factors), every factor split over the fsdp
axis (min_shard_size = 1, as a large model's LoRA would be). Meshes: one process with 2 CPU
devices, and 2 processes with one CPU device each over gloo on 127.0.0.1 (the multi-process
test's setting). For each: the first call (tracing + compilation + run, what a run pays at a rank
change) and the median of warm calls; every process times the same collective calls.

    .venv/bin/python benchmarks/sharded_squeeze_bench.py [--reps 15] [--out benchmarks/results/sharded_squeeze_bench.json]

Writes the JSON and prints a Markdown table. The 2 processes share the machine's cores with each
other (and with whatever else runs), and their warm calls are a few hundred gloo round trips:
on 2 shared cores they swing 3× from call to call, hence the quartiles. Quote ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
ADAPTERS = {"tiny": (4, 2), "270m": (16, 8)}


def adapter(name: str, r_src: int):
  """Random factors in the gemma LoRA layout with a decaying spectrum (host numpy)."""
  import numpy as np

  if name == "tiny":
    shapes = {
      "attn/q_einsum": ((32,), (4, 8)),
      "attn/kv_einsum": ((32,), (2, 1, 8)),
      "attn/attn_vec_einsum": ((4, 8), (32,)),
      "mlp/gating": ((32,), (2, 48)),
      "mlp/linear": ((48,), (32,)),
    }
    layers = 2
  else:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import squeeze_bench

    layers, targets = squeeze_bench.module_shapes(name)
    shapes = {f"{k}_einsum": v for k, v in targets.items()}
  rng = np.random.default_rng(0)
  scale = (0.8 ** np.arange(r_src)).astype(np.float32)
  tree = {}
  for layer in range(layers):
    for path, (in_dims, out_dims) in shapes.items():
      node = tree.setdefault(f"layer_{layer}", {})
      for part in path.split("/"):
        node = node.setdefault(part, {})
      node["lora"] = {
        "a": rng.standard_normal((*in_dims, r_src), dtype=np.float32) * scale,
        "b": rng.standard_normal((r_src, *out_dims), dtype=np.float32) / np.float32(np.sqrt(np.prod(out_dims))),
      }
  return tree


def worker(reps: int) -> None:
  """One process of a configuration: times both variants on every adapter; process 0 prints JSON."""
  import jax
  import numpy as np

  from lora_squeeze import lora_tree, sharded_squeeze, sharding

  sharding.maybe_initialize_distributed(timeout_s=120)
  mesh = sharding.make_mesh(data=1, fsdp=jax.device_count())

  def before(lora, r_tgt):
    new, report = lora_tree.squeeze_tree(lora, r_tgt)
    return sharding.shard_params(jax.block_until_ready(new), mesh, min_size=1), report

  def after(lora, r_tgt):
    return sharded_squeeze.squeeze_on_mesh(lora, r_tgt, mesh=mesh, min_shard_size=1)

  variants = {"before": before, "after": after}
  rows = []
  for k, (name, (r_src, r_tgt)) in enumerate(ADAPTERS.items()):
    lora = sharding.shard_params(adapter(name, r_src), mesh, min_size=1)

    def timed(variant):
      start = time.perf_counter()
      jax.block_until_ready(variants[variant](lora, r_tgt)[0])
      return time.perf_counter() - start

    # The first (compiling) calls, the adapters take turns going first; then warm calls, alternating.
    first = {v: timed(v) for v in (("before", "after") if k % 2 == 0 else ("after", "before"))}
    warm = {v: [] for v in variants}
    for i in range(reps):
      for v in ("before", "after") if i % 2 == 0 else ("after", "before"):
        warm[v].append(timed(v))
    rows.append(
      {
        "adapter": name,
        "r_src": r_src,
        "r_tgt": r_tgt,
        "modules": len(lora_tree.find_lora_modules(lora)),
        "first_s": first,
        "warm_median_s": {v: float(np.median(t)) for v, t in warm.items()},
        "warm_quartiles_s": {v: [float(np.quantile(t, 0.25)), float(np.quantile(t, 0.75))] for v, t in warm.items()},
        "warm_s": warm,
        "first_ratio": first["before"] / first["after"],
        "warm_ratio": float(np.median(warm["before"]) / np.median(warm["after"])),
      }
    )
  if jax.process_index() == 0:
    print("RESULT " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count(), "rows": rows}))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_configuration(processes: int, devices_per_process: int, reps: int) -> dict:
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
  }
  port = free_port()
  procs = []
  for i in range(processes):
    extra = {}
    if processes > 1:
      extra = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes)}
      extra["JAX_PROCESS_ID"] = str(i)
    procs.append(
      subprocess.Popen(
        ["timeout", "-s", "KILL", "1800", sys.executable, __file__, "--worker", f"--reps={reps}"],
        env={**env, **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outputs):
    if p.returncode:
      raise RuntimeError(f"worker failed ({p.returncode}): {err[-3000:]}")
  line = next(x for x in outputs[0][0].splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


def quartiles(row: dict, variant: str) -> str:
  low, high = row["warm_quartiles_s"][variant]
  return f"{1e3 * row['warm_median_s'][variant]:.1f} [{1e3 * low:.0f}–{1e3 * high:.0f}]"


def markdown(configurations: list[dict]) -> str:
  lines = [
    "| mesh | adapter | modules | first call before / after (s) | ratio | warm before / after, median [quartiles] (ms)"
    " | ratio |",
    "|---|---|---|---|---|---|---|",
  ]
  for c in configurations:
    mesh = f"{c['processes']} process(es), {c['devices']} devices"
    for r in c["rows"]:
      lines.append(
        f"| {mesh} | {r['adapter']} r{r['r_src']}→{r['r_tgt']} | {r['modules']} | "
        f"{r['first_s']['before']:.2f} / {r['first_s']['after']:.2f} | {r['first_ratio']:.2f}× | "
        f"{quartiles(r, 'before')} / {quartiles(r, 'after')} | "
        f"{r['warm_ratio']:.2f}× |"
      )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=15, help="warm calls of each variant")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharded_squeeze_bench.json"))
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.reps)
    return
  start = time.perf_counter()
  configurations = [run_configuration(1, 2, args.reps), run_configuration(2, 1, args.reps)]
  load = os.getloadavg()
  result = {
    "benchmark": "sharded_squeeze_bench",
    "command": "benchmarks/sharded_squeeze_bench.py " + " ".join(sys.argv[1:]),
    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": load},
    "wall_s": time.perf_counter() - start,
    "configurations": configurations,
  }
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(markdown(configurations))
  print(f"load average at the end: {load[0]:.1f}; JSON: {args.out}")


if __name__ == "__main__":
  main()
