"""Gemma 3 270M on CPU: GGUF conversion time and peak RSS, cached load, forward tokens/s.

    .venv/bin/python benchmarks/model_bench.py [--out benchmarks/results/model_bench.json]

Conversion and loading run in fresh subprocesses (a cold conversion into a temporary cache, then a
load from that cache), so that peak RSS is theirs alone. Forward = `hidden_states` (the decoder up
to the final norm, no vocabulary projection) on a batch of 2, after one compile call; tokens/s =
2 * T / median time of 3 calls. The machine load (`uptime`) is recorded: others share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json, resource, sys, time
import jax.numpy as jnp
from lora_squeeze import model
start = time.perf_counter()
model.load_base_params("gemma3_270m", cache_dir=sys.argv[1], dtype=jnp.bfloat16 if sys.argv[2] == "bf16" else jnp.float32)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def _load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _run_child(cache_dir: str, dtype: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _CHILD, cache_dir, dtype], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _link_gguf(cache_dir: pathlib.Path) -> None:
  """Reuses the already assembled GGUF (sha256-checked on use) so that only the conversion is timed."""
  from lora_squeeze.weights import cache as cache_lib
  from lora_squeeze.weights import gguf as gguf_lib

  source = gguf_lib.assemble_gguf(cache_lib.cache_root())
  (cache_dir / source.name).symlink_to(source)


def bench_conversion() -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    _link_gguf(pathlib.Path(tmp))
    for step, dtype in [
      ("convert GGUF + write cache (float32)", "f32"),
      ("load verified cache (float32)", "f32"),
      ("load verified cache (bf16)", "bf16"),
    ]:
      load = _load_average()
      result = _run_child(tmp, dtype)
      rows.append(
        {
          "step": step,
          "seconds": round(result["seconds"], 1),
          "peak_rss_gb": round(result["peak_rss_gb"], 2),
          "load_avg": load,
        }
      )
      print(
        f"{step:40s} {result['seconds']:7.1f} s  peak RSS {result['peak_rss_gb']:5.2f} GB  (load {load})", flush=True
      )
  return rows


def bench_forward(seq_lens=(128, 512), batch=2, repeats=3) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lora_squeeze import model

  net = model.make_model("gemma3_270m")
  params32 = model.load_base_params("gemma3_270m")
  rows = []
  for dtype_name, dtype in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
    params = jax.tree.map(lambda x, d=dtype: x.astype(d), params32)
    for seq_len in seq_lens:
      tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200_000, (batch, seq_len)), jnp.int32)
      load = _load_average()
      start = time.perf_counter()
      model.hidden_states(net, params, tokens).block_until_ready()
      compile_s = time.perf_counter() - start
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        model.hidden_states(net, params, tokens).block_until_ready()
        times.append(time.perf_counter() - start)
      median = float(np.median(times))
      row = {
        "base_dtype": dtype_name,
        "batch": batch,
        "seq_len": seq_len,
        "first_call_s": round(compile_s, 2),
        "step_s": round(median, 3),
        "tokens_per_s": round(batch * seq_len / median, 1),
        "load_avg": load,
      }
      rows.append(row)
      print(
        f"forward {dtype_name:8s} B={batch} T={seq_len:4d}  {row['tokens_per_s']:8.1f} tok/s"
        f"  ({median:.3f} s/call, first call {compile_s:.1f} s, load {load})",
        flush=True,
      )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "model_bench.json"))
  args = parser.parse_args()
  import jax

  results = {
    "machine": {
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "device": str(jax.devices()[0]),
      "load_avg_start": _load_average(),
    },
    "conversion": bench_conversion(),
    "forward": bench_forward(),
  }
  results["machine"]["load_avg_end"] = _load_average()
  results["machine"]["bench_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(json.dumps(results, indent=2) + "\n")
  os.replace(tmp, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
