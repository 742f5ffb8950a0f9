"""Placing a host parameter tree on a mesh that spans processes: `jax.device_put` against
`sharding.place` (what `sharding.shard_params` uses since session 24).

Every process of a job holds the same whole tree on its host (the base weights it loaded) and puts
it on an fsdp mesh over all processes. `jax.device_put` first checks that the value is equal on
every process by all-gathering each array whole (`multihost_utils.assert_equal`), one compiled
all-gather per shape; `sharding.place` cuts each process's slices out of its own copy
(`jax.make_array_from_callback`). Side by side in the same 2 processes (one CPU device each, gloo on
127.0.0.1; both processes must run the same way at the same time, as device_put's check is a
collective): `place` first, then `device_put`, each twice on its own copy of the tree (`--mb` MiB
of float32 in `--leaves` arrays, all in memory before the first): wall time of the first placement
(compilation included) and of the second. What the check costs grows with the job: each process
receives every array from each of the n - 1 others.

    .venv/bin/python benchmarks/placement_bench.py [--mb 256] [--leaves 16] [--out benchmarks/results/placement_bench.json]

Writes the JSON and prints a Markdown table. Quote ratios, not seconds: the 2 processes share the
machine's cores.
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


def worker(mb: int, leaves: int) -> dict:
  """One process of the job: both ways, `place` first, in the same order on every process."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  sys.path.insert(0, str(ROOT))
  from lora_squeeze import multihost, sharding

  sharding.maybe_initialize_distributed(timeout_s=60)
  mesh = sharding.make_mesh(data=1, fsdp=jax.device_count())
  rows = mb * 2**20 // 4 // 1024 // leaves
  rng = np.random.default_rng(0)  # the same tree in every process
  trees = {
    way: [rng.standard_normal((rows, 1024), dtype=np.float32) + i for i in range(leaves)]
    for way in ("device_put", "place")
  }
  spec = NamedSharding(mesh, PartitionSpec(sharding.FSDP_AXIS))
  ways = {
    "device_put": lambda tree: [jax.device_put(x, spec) for x in tree],
    "place": lambda tree: [sharding.place(x, spec) for x in tree],
  }
  out = {}
  for name in ("place", "device_put"):
    # A tiny collective first, so that both processes start the timed placements together.
    float(jax.jit(lambda x: x.sum())(sharding.place(np.ones(2 * jax.device_count(), np.float32), spec)))
    times = []
    for _ in range(2):
      start = time.perf_counter()
      placed = jax.block_until_ready(ways[name](trees[name]))
      times.append(time.perf_counter() - start)
    out[name] = {
      "first_s": times[0],
      "second_s": times[1],
      "equal": bool(all(np.array_equal(multihost.gather_to_host(p), x) for p, x in zip(placed[:2], trees[name][:2]))),
    }
    del placed
  return {"process": jax.process_index(), "ways": out}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mb", type=int, default=256, help="MiB of float32 in the tree")
  parser.add_argument("--leaves", type=int, default=16)
  parser.add_argument("--out", default="benchmarks/results/placement_bench.json")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(worker(args.mb, args.leaves)), flush=True)
    return

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  load_before = os.getloadavg()
  procs = []
  for i in range(2):
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i),
    }
    env.pop("XLA_FLAGS", None)
    cmd = ["timeout", "600", sys.executable, __file__, "--worker", f"--mb={args.mb}", f"--leaves={args.leaves}"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  results = []
  for p in procs:
    text = p.communicate()[0]
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
      sys.exit(f"placement_bench: a worker failed (exit {p.returncode}):\n{text[-3000:]}")
    results.append(json.loads(lines[0][len("RESULT ") :]))
  result = {
    "mb": args.mb,
    "leaves": args.leaves,
    "processes": results,
    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    "load_average": {"before": load_before, "after": os.getloadavg()},
  }
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"{args.mb} MiB float32 in {args.leaves} arrays, 2 processes x 1 CPU device, fsdp over both\n")
  print("| process | way | first (s) | second (s) | equal to the host tree |")
  print("|---|---|---|---|---|")
  for r in results:
    for name, w in r["ways"].items():
      print(f"| {r['process']} | {name} | {w['first_s']:.2f} | {w['second_s']:.2f} | {w['equal']} |")
  print(f"\nload average before {load_before}, after {result['load_average']['after']}; JSON: {args.out}")


if __name__ == "__main__":
  main()
