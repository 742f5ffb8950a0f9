"""Reset vs projected optimizer state across squeezes, at an equal step budget (issue 18).

A small, CPU-sized measurement until the science issue (16) fixes the study's task: the tiny
Gemma 3 (random base, lora_squeeze.model "tiny") learns a synthetic copy task (copy the `HALF`
tokens after a separator), with In-Squeeze (standard and min-steps schemes) and Cont-Squeeze,
each run once with `optimizer_state_at_squeeze='reset'` (fresh Adafactor + `stage_warmup` per
stage, today's trainer) and once with `'project'` (state carried, `warmup_after_projection`
steps of warmup), on the same seeds, data order, LoRA init and step budget. Scores: the mean
target NLL on held-out copy examples after training, and the mean training loss of the last 10
steps; the difference project - reset is paired per seed, with a 95% t interval.

    PYTHONPATH=. nice -n 10 timeout 3000 .venv/bin/python -m experiments.opt_state_projection \
        --seeds=3 --out=docs/results/opt_state_projection

writes results.json (every run and the paired summary), summary.md and summary.png there.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402

from lora_squeeze import model as model_lib  # noqa: E402
from lora_squeeze import opt_state_projection  # noqa: E402
from lora_squeeze import protocols  # noqa: E402
from lora_squeeze import train  # noqa: E402

HALF = 6
LENGTH = 2 * HALF + 2
VOCAB = (4, 68)  # token ids of the copied symbols


def copy_examples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
  """[2, x_1..x_H, 3, x_1..x_H] with targets on the second copy."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    x = rng.integers(*VOCAB, HALF)
    tokens = np.concatenate([[2], x, [3], x]).astype(np.int32)
    mask = np.zeros(LENGTH, bool)
    mask[HALF + 2:] = True
    out.append({"tokens": tokens, "target_mask": mask})
  return out


def plans(args) -> dict[str, protocols.Plan]:
  lr = lambda rank: args.lr  # noqa: E731  one lr for every rank: the comparison is reset vs project
  ranks = tuple(args.ranks)
  return {
      "in_squeeze_standard": protocols.in_squeeze(
          ranks=ranks, total_steps=args.steps, lr_for_rank=lr, scheme="proportional", warmup=args.warmup,
          stage_warmup=args.stage_warmup),
      "in_squeeze_min_steps": protocols.in_squeeze(
          ranks=ranks, total_steps=args.steps, lr_for_rank=lr, scheme="min_steps", min_steps=args.min_steps,
          warmup=args.warmup, stage_warmup=args.stage_warmup),
      "cont_squeeze": protocols.cont_squeeze(
          r_src=ranks[0], r_tgt=ranks[-1], steps=args.steps - args.extra_steps, extra_steps=args.extra_steps,
          lr_src=args.lr, lr_tgt=args.lr, warmup=args.warmup, extra_warmup=args.stage_warmup),
  }


def run_one(plan, mode, seed, args, base, eval_batch, workdir) -> dict:
  if mode == "project":
    plan = opt_state_projection.with_projected_warmup(plan, args.warmup_after_projection)
  setup = train.RunSetup(
      model_for_rank=lambda r: model_lib.make_model("tiny", lora_rank=r),
      base_params=base,
      batches=train.batch_dataset(copy_examples(args.train_examples, 1000 + seed), batch_size=args.batch_size,
                                  seed=seed),
      workdir=workdir,
      key=jax.random.key(seed),
      max_targets=HALF,
      run_config={"mode": mode, "seed": seed},
      checkpoint_every=10**9,
      log_every=10**9,
      printer=lambda line: None,
      optimizer_state_at_squeeze=mode,
  )
  start = time.perf_counter()
  out = train.execute_plan(plan, setup)
  seconds = time.perf_counter() - start
  model = model_lib.make_model("tiny", lora_rank=out["rank"])
  loss, _ = train.loss_fn(out["lora"], base, eval_batch, model=model, max_targets=HALF)
  metrics = [json.loads(line) for line in (workdir / train.METRICS_FILE).read_text().splitlines()]
  losses = [r["loss"] for r in metrics if r["event"] == "train"]
  return {"eval_nll": float(loss), "final_train_loss": float(np.mean(losses[-10:])), "seconds": seconds,
          "rank": out["rank"], "loss_curve": losses}


def paired(diffs: list[float]) -> dict:
  d = np.asarray(diffs, np.float64)
  mean = float(d.mean())
  if len(d) < 2:
    return {"mean": mean, "ci95": [float("nan")] * 2, "n": len(d)}
  half = float(scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(d)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=160, help="total steps of every run")
  parser.add_argument("--ranks", type=int, nargs="+", default=[8, 4, 2, 1])
  parser.add_argument("--lr", type=float, default=0.3)
  parser.add_argument("--warmup", type=int, default=16, help="warmup of the first stage")
  parser.add_argument("--stage_warmup", type=int, default=8, help="warmup of a later stage with 'reset'")
  parser.add_argument("--warmup_after_projection", type=int, default=0)
  parser.add_argument("--min_steps", type=int, default=30)
  parser.add_argument("--extra_steps", type=int, default=40, help="Cont-Squeeze's M (at the last rank)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--train_examples", type=int, default=2048)
  parser.add_argument("--eval_examples", type=int, default=256)
  parser.add_argument("--protocols", nargs="+", default=None)
  parser.add_argument("--out", default="docs/results/opt_state_projection")
  args = parser.parse_args(argv)

  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  held_out = copy_examples(args.eval_examples, 7)
  eval_batch = {k: np.stack([e[k] for e in held_out]) for k in ("tokens", "target_mask")}
  all_plans = plans(args)
  names = args.protocols or list(all_plans)
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    # Seeds outermost: a run cut short by its timeout still has every protocol on its first seeds.
    for seed in range(args.seeds):
      for name in names:
        for mode in ("reset", "project"):
          row = run_one(all_plans[name], mode, seed, args, base, eval_batch, pathlib.Path(tmp) / f"{name}_{mode}_{seed}")
          runs.append({"protocol": name, "mode": mode, "seed": seed, **row})
          print(f"{name:22s} seed {seed} {mode:8s} eval NLL {row['eval_nll']:.4f} "
                f"train loss {row['final_train_loss']:.4f} ({row['seconds']:.1f}s)", flush=True)
      write_outputs(args, names, all_plans, runs)


def write_outputs(args, names, all_plans, runs):
  """results.json, summary.md (paired differences with 95% t intervals) and summary.png."""
  summary = {}
  for name in names:
    by = {(r["mode"], r["seed"]): r for r in runs if r["protocol"] == name}
    seeds = sorted({s for m, s in by if ("reset", s) in by and ("project", s) in by})
    summary[name] = {}
    for metric in ("eval_nll", "final_train_loss"):
      reset = [by["reset", s][metric] for s in seeds]
      project = [by["project", s][metric] for s in seeds]
      summary[name][metric] = {
          "reset_mean": float(np.mean(reset)), "project_mean": float(np.mean(project)),
          "project_minus_reset": paired([p - r for p, r in zip(project, reset)]),
      }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1))
  lines = ["| protocol | metric | reset | project | project − reset (95% CI, paired over seeds) |",
           "|---|---|---|---|---|"]
  for name in names:
    for metric, s in summary[name].items():
      d = s["project_minus_reset"]
      lines.append(f"| {name} | {metric} | {s['reset_mean']:.4f} | {s['project_mean']:.4f} | "
                   f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (n={d['n']}) |")
  table = "\n".join(lines)
  (out / "summary.md").write_text(table + "\n")
  print(table, flush=True)

  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    for mode, color in (("reset", "tab:blue"), ("project", "tab:orange")):
      curves = np.array([r["loss_curve"] for r in runs if r["protocol"] == name and r["mode"] == mode])
      smooth = np.array([np.convolve(c, np.ones(5) / 5, mode="valid") for c in curves])
      ax.plot(smooth.mean(0), color=color, label=f"{mode} (mean of {len(curves)} seeds)")
    for item_step in np.cumsum([p.steps for p in all_plans[name] if isinstance(p, protocols.Stage)])[:-1]:
      ax.axvline(item_step, color="gray", lw=0.5)
    ax.set_title(name)
    ax.set_xlabel("step (gray: squeezes)")
    ax.set_ylabel("train loss (5-step mean)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "summary.png", dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
