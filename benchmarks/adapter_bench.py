"""Squeezing a Gemma-3-4B-sized PEFT adapter file to file: LoRA-Squeeze vs the full-SVD path.

    .venv/bin/python benchmarks/adapter_bench.py                       # baseline on 7 modules, extrapolated
    .venv/bin/python benchmarks/adapter_bench.py --baseline-modules=14
    .venv/bin/python benchmarks/adapter_bench.py --full                # baseline on all 238 modules (~1 h)

The benchmark writes a real PEFT folder with random factors (no torch needed): LoRA on q, k, v, o,
gate, up and down of 34 layers (hidden 2560, intermediate 10240, 8 query heads and 4 kv heads of
256), r = 128, alpha = 256, float32 (953 MB). Both paths then turn it into a rank-8 PEFT folder, each
in its own subprocess so that its RSS high-water mark is its own:

* squeeze: `squeeze_adapter(..., method="qr_core")`: streams module pairs, never forms ΔW.
* full_svd: the way PEFT's SVD merging and kohya's resize_lora do it: load the whole state dict,
  per module form ΔW = scale·B@A, full SVD (scipy gesdd, like torch.linalg.svd), truncate, save.

With --baseline-modules N the baseline runs on N modules covering every projection shape in turn;
its time is extrapolated as load + Σ_shape count(shape)·mean time(shape) + save, and marked
"extrapolated" in the table and JSON. Its peak memory is measured (the whole file is loaded either
way). The load average is recorded: other jobs share the 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/lora_squeeze_adapter_bench", "Where the adapters are written.")
_OUT = flags.DEFINE_string(
  "out", str(pathlib.Path(__file__).parent / "results" / "adapter_bench.json"), "JSON results file."
)
_RANK = flags.DEFINE_integer("rank", 8, "Target rank.")
_R_SRC = flags.DEFINE_integer("r_src", 128, "Source rank of the generated adapter.")
_LAYERS = flags.DEFINE_integer("layers", 34, "Decoder layers of the generated adapter (Gemma 3 4B: 34).")
_BASELINE_MODULES = flags.DEFINE_integer(
  "baseline-modules", 7, "Modules the full-SVD baseline runs on (the rest is extrapolated by shape)."
)
_FULL = flags.DEFINE_bool("full", False, "Run the full-SVD baseline on every module (about an hour on 2 cores).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the generated adapters in --workdir.")
_WORKER = flags.DEFINE_enum("worker", None, ["squeeze", "full_svd"], "Internal: run one path and print JSON.")
_SRC = flags.DEFINE_string("src", None, "Internal: worker input.")
_DST = flags.DEFINE_string("dst", None, "Internal: worker output.")

HIDDEN, INTERMEDIATE, HEAD_DIM, N_HEADS, N_KV_HEADS = 2560, 10240, 256, 8, 4
# projection -> (d_in, d_out), HF Gemma 3 module names
PROJECTIONS = {
  "self_attn.q_proj": (HIDDEN, N_HEADS * HEAD_DIM),
  "self_attn.k_proj": (HIDDEN, N_KV_HEADS * HEAD_DIM),
  "self_attn.v_proj": (HIDDEN, N_KV_HEADS * HEAD_DIM),
  "self_attn.o_proj": (N_HEADS * HEAD_DIM, HIDDEN),
  "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
  "mlp.up_proj": (HIDDEN, INTERMEDIATE),
  "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}
ALPHA_PER_RANK = 2  # lora_alpha = 2 r, a common choice


def module_names(layers: int) -> list[str]:
  return [f"model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS]


def write_source(folder: pathlib.Path, *, layers: int, r: int, seed: int = 0) -> None:
  """A PEFT LoRA folder with random (non-zero) factors; factors written one module at a time."""
  from lora_squeeze.adapters import safetensors_io

  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True)
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "google/gemma-3-4b-pt",
    "r": r,
    "lora_alpha": ALPHA_PER_RANK * r,
    "lora_dropout": 0.0,
    "bias": "none",
    "use_rslora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_modules": sorted(p.split(".")[1] for p in PROJECTIONS),
  }
  (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
  tensors = []
  for name in module_names(layers):
    d_in, d_out = PROJECTIONS[name.split(".", 3)[3]]
    a = rng.standard_normal((r, d_in), dtype=np.float32) / math.sqrt(d_in)
    b = rng.standard_normal((d_out, r), dtype=np.float32) / math.sqrt(r)
    tensors += [(f"base_model.model.{name}.lora_A.weight", a), (f"base_model.model.{name}.lora_B.weight", b)]
  safetensors_io.write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})


def peak_rss_mb() -> float:
  """This process's RSS high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
  fork + exec, so a worker would report its parent's peak (the generated adapter)."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024  # kB
  raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker_squeeze(src: str, dst: str, rank: int) -> dict:
  from lora_squeeze.adapters import squeeze_adapter

  rss_imports = peak_rss_mb()
  start = time.perf_counter()
  summary = squeeze_adapter(src, dst, rank=rank, method="qr_core")
  return {
    "seconds": time.perf_counter() - start,
    "modules": len(summary.rows),
    "peak_rss_mb": peak_rss_mb(),
    "rss_after_imports_mb": rss_imports,
  }


def worker_full_svd(src: str, dst: str, rank: int, n_modules: int | None) -> dict:
  """Load all, per module form ΔW = scale·B@A, full SVD (gesdd), keep the top `rank`, save all."""
  import scipy.linalg
  from safetensors.numpy import load_file, save_file

  rss_imports = peak_rss_mb()
  src_path = pathlib.Path(src)
  config = json.loads((src_path / "adapter_config.json").read_text())
  scale_in = config["lora_alpha"] / config["r"]
  scale_out = config["lora_alpha"] / rank
  start = time.perf_counter()
  tensors = load_file(src_path / "adapter_model.safetensors")
  load_seconds = time.perf_counter() - start
  names = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}, key=_module_order)
  # Sorted by (layer, projection): the first n modules take every projection shape in turn.
  chosen = names if n_modules is None else names[:n_modules]
  out, per_module = {}, {}
  for name in chosen:
    t0 = time.perf_counter()
    a = tensors[f"{name}.lora_A.weight"].astype(np.float32)
    b = tensors[f"{name}.lora_B.weight"].astype(np.float32)
    delta = scale_in * (b @ a)  # (d_out, d_in)
    u, s, vt = scipy.linalg.svd(delta, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    root = np.sqrt(s[:rank] / scale_out)
    out[f"{name}.lora_B.weight"] = np.ascontiguousarray(u[:, :rank] * root)
    out[f"{name}.lora_A.weight"] = np.ascontiguousarray(root[:, None] * vt[:rank])
    per_module[name] = time.perf_counter() - t0
  t0 = time.perf_counter()
  dst_path = pathlib.Path(dst)
  dst_path.mkdir()
  save_file(out, dst_path / "adapter_model.safetensors", metadata={"format": "pt"})
  (dst_path / "adapter_config.json").write_text(json.dumps({**config, "r": rank}))
  save_seconds = time.perf_counter() - t0
  return {
    "seconds": time.perf_counter() - start,
    "load_seconds": load_seconds,
    "save_seconds": save_seconds,
    "per_module_seconds": per_module,
    "modules": len(chosen),
    "modules_total": len(names),
    "peak_rss_mb": peak_rss_mb(),
    "rss_after_imports_mb": rss_imports,
  }


def _module_order(stem: str) -> tuple[int, int]:
  layer, projection = stem.split("layers.", 1)[1].split(".", 1)
  return int(layer), list(PROJECTIONS).index(projection)


def _projection(stem: str) -> str:
  return stem.split("layers.", 1)[1].split(".", 1)[1]


def run_worker(kind: str, src: pathlib.Path, dst: pathlib.Path, rank: int, n_modules: int | None) -> dict:
  command = [sys.executable, __file__, f"--worker={kind}", f"--src={src}", f"--dst={dst}", f"--rank={rank}"]
  if n_modules is not None:
    command.append(f"--baseline-modules={n_modules}")
  load_before = os.getloadavg()[0]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-4000:]}")
  return {**json.loads(done.stdout.strip().splitlines()[-1]), "loadavg_1min": [load_before, os.getloadavg()[0]]}


def extrapolate(baseline: dict) -> float:
  """load + Σ_projection count·mean per-module time + save scaled to all modules."""
  by_projection: dict[str, list[float]] = {}
  for stem, seconds in baseline["per_module_seconds"].items():
    by_projection.setdefault(_projection(stem), []).append(seconds)
  missing = set(PROJECTIONS) - set(by_projection)
  if missing:
    raise ValueError(f"--baseline-modules must cover every projection; missing {sorted(missing)}")
  layers = baseline["modules_total"] // len(PROJECTIONS)
  compute = sum(layers * float(np.mean(t)) for t in by_projection.values())
  save = baseline["save_seconds"] * baseline["modules_total"] / baseline["modules"]
  return baseline["load_seconds"] + compute + save


def max_delta_difference(ours: pathlib.Path, theirs: pathlib.Path, stems: list[str]) -> float:
  """max over the baseline's modules of ‖ΔW_ours − ΔW_svd‖_F / ‖ΔW_svd‖_F."""
  from safetensors import safe_open

  worst = 0.0
  with (
    safe_open(ours / "adapter_model.safetensors", "numpy") as f,
    safe_open(theirs / "adapter_model.safetensors", "numpy") as g,
  ):
    for stem in stems:
      mine = f.get_tensor(f"{stem}.lora_B.weight") @ f.get_tensor(f"{stem}.lora_A.weight")
      ref = g.get_tensor(f"{stem}.lora_B.weight") @ g.get_tensor(f"{stem}.lora_A.weight")
      worst = max(worst, float(np.linalg.norm(mine - ref) / np.linalg.norm(ref)))
  return worst


def main(argv: list[str]) -> None:
  del argv
  n_modules = None if _FULL.value else _BASELINE_MODULES.value
  if _WORKER.value == "squeeze":
    print(json.dumps(worker_squeeze(_SRC.value, _DST.value, _RANK.value)))
    return
  if _WORKER.value == "full_svd":
    print(json.dumps(worker_full_svd(_SRC.value, _DST.value, _RANK.value, n_modules)))
    return

  workdir = pathlib.Path(_WORKDIR.value)
  shutil.rmtree(workdir, ignore_errors=True)
  src = workdir / "source_r128"
  t0 = time.perf_counter()
  write_source(src, layers=_LAYERS.value, r=_R_SRC.value)
  size_mb = (src / "adapter_model.safetensors").stat().st_size / 2**20
  print(f"wrote source adapter {src} ({size_mb:.0f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
  load_before = os.getloadavg()
  print("running squeeze (qr_core) ...", flush=True)
  ours = run_worker("squeeze", src, workdir / "squeeze_r8", _RANK.value, None)
  print(f"  {ours['seconds']:.1f}s, peak RSS {ours['peak_rss_mb']:.0f} MB", flush=True)
  print(f"running full SVD baseline on {'all' if n_modules is None else n_modules} modules ...", flush=True)
  base = run_worker("full_svd", src, workdir / "full_svd_r8", _RANK.value, n_modules)
  load_after = os.getloadavg()
  extrapolated = base["modules"] < base["modules_total"]
  base_total = extrapolate(base) if extrapolated else base["seconds"]
  agreement = max_delta_difference(workdir / "squeeze_r8", workdir / "full_svd_r8", list(base["per_module_seconds"]))

  rows = [
    (
      "squeeze (qr_core, streaming)",
      ours["seconds"],
      f"measured, {ours['modules']} modules",
      ours["peak_rss_mb"],
      ours["rss_after_imports_mb"],
    ),
    (
      "full SVD (load all, form ΔW, gesdd)",
      base_total,
      f"extrapolated from {base['modules']} modules" if extrapolated else f"measured, {base['modules']} modules",
      base["peak_rss_mb"],
      base["rss_after_imports_mb"],
    ),
  ]
  print(
    f"\nGemma-3-4B-sized PEFT adapter: {len(module_names(_LAYERS.value))} modules, r {_R_SRC.value} -> "
    f"{_RANK.value}, {size_mb:.0f} MB float32; load average {load_before[0]:.2f} -> {load_after[0]:.2f}"
  )
  print(f"{'path':<38} {'seconds':>9}  {'how':<32} {'peak RSS MB':>11} {'after imports':>13}  {'load':>11}")
  for (path, seconds, how, rss, rss0), run in zip(rows, (ours, base)):
    load = "{:.1f}->{:.1f}".format(*run["loadavg_1min"])
    print(f"{path:<38} {seconds:>9.1f}  {how:<32} {rss:>11.0f} {rss0:>13.0f}  {load:>11}")
  print(
    f"speed-up {base_total / ours['seconds']:.1f}x; ΔW agreement on the baseline's modules: "
    f"max relative Frobenius difference {agreement:.2e}"
  )

  result = {
    "adapter": {
      "modules": len(module_names(_LAYERS.value)),
      "layers": _LAYERS.value,
      "r_src": _R_SRC.value,
      "r_tgt": _RANK.value,
      "dtype": "float32",
      "size_mb": size_mb,
      "projections": PROJECTIONS,
    },
    "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after},
    "squeeze": ours,
    "full_svd": {**base, "total_seconds": base_total, "extrapolated": extrapolated},
    "speedup": base_total / ours["seconds"],
    "max_relative_delta_difference": agreement,
  }
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  os.replace(tmp, out)
  print(f"wrote {out}")
  if not _KEEP.value:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
