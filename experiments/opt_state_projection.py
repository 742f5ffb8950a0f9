"""Reset vs projected optimizer state across squeezes, at an equal step budget (issue 18).

A small, CPU-sized measurement until the science issue (16) fixes the study's task. Protocols:
In-Squeeze (standard and min-steps schemes) and Cont-Squeeze, from lora_squeeze.protocols. Arms,
on the same seeds, data, init and step budget:

  reset                 today's trainer: fresh Adafactor + `stage_warmup` after every squeeze
  project               state carried (lora_squeeze.opt_state_projection), `warmup_after_projection`
  project_same_warmup   state carried, with reset's `stage_warmup`: the state's effect alone
  reset_no_warmup       (control) fresh state, with project's `warmup_after_projection`

Settings:

  lowrank     (default; seconds per run) LoRA factors a (d, r), b (r, d) fitting y = x W* + noise,
              W* with singular values exp(-i/4), trained with the trainer's optimizer
              (optim.make_optimizer: Adafactor + warmup), squeezed with qr_core and projected with
              the module the runner uses. Score: held-out excess MSE ‖ΔW − W*‖²_F / d above the
              best fit at the final rank (0 = the Eckart-Young optimum).
  tiny_gemma  (minutes per run on 2 idle cores) the trainer's runner (train.execute_plan) on the
              tiny Gemma 3 (random base) and a synthetic copy task. Score: held-out target NLL.

Also the mean training loss of the last 10 steps. Differences arm − reset are paired per seed,
with a 95% t interval.

    PYTHONPATH=. nice -n 5 timeout 1500 .venv/bin/python -m experiments.opt_state_projection \
        --setting lowrank --seeds 5 --ranks 16 8 4 2 1 --steps 120 --warmup 12 --stage_warmup 10 \
        --min_steps 15 --extra_steps 30 --lr 0.03 --batch_size 32 --out docs/results/opt_state_projection

writes results.json (every run, its loss curve and the paired summary), summary.md and summary.png.
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
    mask[HALF + 2 :] = True
    out.append({"tokens": tokens, "target_mask": mask})
  return out


def plans(args) -> dict[str, protocols.Plan]:
  lr = lambda rank: args.lr  # noqa: E731  one lr for every rank: the comparison is reset vs project
  ranks = tuple(args.ranks)
  return {
    "in_squeeze_standard": protocols.in_squeeze(
      ranks=ranks,
      total_steps=args.steps,
      lr_for_rank=lr,
      scheme="proportional",
      warmup=args.warmup,
      stage_warmup=args.stage_warmup,
    ),
    "in_squeeze_min_steps": protocols.in_squeeze(
      ranks=ranks,
      total_steps=args.steps,
      lr_for_rank=lr,
      scheme="min_steps",
      min_steps=args.min_steps,
      warmup=args.warmup,
      stage_warmup=args.stage_warmup,
    ),
    "cont_squeeze": protocols.cont_squeeze(
      r_src=ranks[0],
      r_tgt=ranks[-1],
      steps=args.steps - args.extra_steps,
      extra_steps=args.extra_steps,
      lr_src=args.lr,
      lr_tgt=args.lr,
      warmup=args.warmup,
      extra_warmup=args.stage_warmup,
    ),
  }


def mode_plan(plan, mode, args):
  """(plan, optimizer_state_at_squeeze) of an arm: 'project_same_warmup' keeps the reset arm's
  stage warmups, so its difference to 'reset' is the carried state alone."""
  if mode == "project":
    return opt_state_projection.with_projected_warmup(plan, args.warmup_after_projection), "project"
  if mode == "project_same_warmup":
    return opt_state_projection.with_projected_warmup(plan, args.stage_warmup), "project"
  if mode == "reset_no_warmup":  # a control: fresh state, with project's warmup
    return opt_state_projection.with_projected_warmup(plan, args.warmup_after_projection), "reset"
  return plan, "reset"


def run_one(plan, mode, seed, args, base, eval_batch, workdir) -> dict:
  plan, mode = mode_plan(plan, mode, args)
  setup = train.RunSetup(
    model_for_rank=lambda r: model_lib.make_model("tiny", lora_rank=r),
    base_params=base,
    batches=train.batch_dataset(copy_examples(args.train_examples, 1000 + seed), batch_size=args.batch_size, seed=seed),
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
  return {
    "eval_loss": float(loss),
    "final_train_loss": float(np.mean(losses[-10:])),
    "seconds": seconds,
    "rank": out["rank"],
    "loss_curve": losses,
  }


def lowrank_problem(seed: int, args):
  """A LoRA-shaped regression: y = x W* + noise with W* (d×d) of spectrum exp(-i/4), so rank matters."""
  rng = np.random.default_rng(10_000 + seed)
  d = args.dim
  u, _ = np.linalg.qr(rng.normal(size=(d, d)))
  v, _ = np.linalg.qr(rng.normal(size=(d, d)))
  w_star = (u * np.exp(-np.arange(d) / 4.0)) @ v.T
  return w_star.astype(np.float32), rng


def run_lowrank(plan, mode, seed, args) -> dict:
  """The plan on the regression problem, with the trainer's optimizer (optim.make_optimizer:
  Adafactor + warmup), the real squeeze (qr_core) and opt_state_projection at every squeeze."""
  import jax.numpy as jnp
  import optax

  from lora_squeeze import optim

  plan, mode = mode_plan(plan, mode, args)
  w_star, rng = lowrank_problem(seed, args)
  d, noise = args.dim, 0.1
  first = next(p for p in plan if isinstance(p, protocols.Stage))
  key = jax.random.key(seed)
  params = {
    "m": {
      "lora": {
        "a": jax.random.normal(key, (d, first.rank), jnp.float32) / np.sqrt(d),
        "b": jnp.zeros((first.rank, d), jnp.float32),
      }
    }
  }

  def loss(p, x, y):
    return jnp.mean(jnp.square(x @ p["m"]["lora"]["a"] @ p["m"]["lora"]["b"] - y))

  steps_cache = {}

  def step_fn(lr, warmup):
    if (lr, warmup) not in steps_cache:
      opt = optim.make_optimizer(lr, warmup)

      @jax.jit
      def step(p, s, x, y):
        value, g = jax.value_and_grad(loss)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

      steps_cache[lr, warmup] = step
    return steps_cache[lr, warmup]

  losses, state, last_stage = [], None, None
  for i, item in enumerate(plan):
    if isinstance(item, protocols.Stage):
      optimizer = optim.make_optimizer(item.lr, item.warmup)
      if state is None:
        state = optimizer.init(params)
      step = step_fn(item.lr, item.warmup)
      for _ in range(item.steps):
        x = rng.normal(size=(args.batch_size, d)).astype(np.float32)
        y = x @ w_star + noise * rng.normal(size=(args.batch_size, d)).astype(np.float32)
        params, state, value = step(params, state, x, y)
        losses.append(float(value))
      last_stage = item
      state = state if mode == "project" and opt_state_projection.carried_at(plan, i + 1) else None
    elif isinstance(item, protocols.Squeeze):
      new, _, bases = opt_state_projection.squeeze_with_basis(params, item.rank, method=item.method)
      if state is not None:
        nxt = next(p for p in plan[i:] if isinstance(p, protocols.Stage))
        state = opt_state_projection.project_opt_state(
          state, optim.make_optimizer(nxt.lr, nxt.warmup), params, new, bases=bases
        )
      params = new
  delta = np.asarray(params["m"]["lora"]["a"] @ params["m"]["lora"]["b"], np.float64)
  # Held-out excess MSE = E‖x (ΔW − W*)‖² / d = ‖ΔW − W*‖²_F / d for x ~ N(0, I).
  # Reported above the best fit at the final rank (Eckart-Young), so 0 = that optimum.
  s = np.linalg.svd(w_star.astype(np.float64), compute_uv=False)
  excess = float(np.sum(np.square(delta - w_star)) / d - np.sum(np.square(s[last_stage.rank :])) / d)
  return {
    "eval_loss": excess,
    "final_train_loss": float(np.mean(losses[-10:])),
    "seconds": 0.0,
    "rank": last_stage.rank,
    "loss_curve": losses,
  }


def paired(diffs: list[float]) -> dict:
  d = np.asarray(diffs, np.float64)
  mean = float(d.mean())
  if len(d) < 2:
    return {"mean": mean, "ci95": [float("nan")] * 2, "n": len(d)}
  half = float(scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(d)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--setting",
    choices=("lowrank", "tiny_gemma"),
    default="lowrank",
    help="lowrank: LoRA factors on a regression with a decaying spectrum (seconds per run); "
    "tiny_gemma: the trainer's runner on the tiny Gemma 3 and a copy task (minutes per run)",
  )
  parser.add_argument("--dim", type=int, default=64, help="lowrank: d of the d×d target")
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
  parser.add_argument(
    "--modes",
    nargs="+",
    default=["reset", "project", "project_same_warmup"],
    help="arms; each is paired with 'reset' (which must come first)",
  )
  parser.add_argument("--out", default="docs/results/opt_state_projection")
  args = parser.parse_args(argv)

  base = eval_batch = None
  if args.setting == "tiny_gemma":
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
        for mode in args.modes:
          start = time.perf_counter()
          if args.setting == "lowrank":
            row = run_lowrank(all_plans[name], mode, seed, args)
          else:
            row = run_one(
              all_plans[name], mode, seed, args, base, eval_batch, pathlib.Path(tmp) / f"{name}_{mode}_{seed}"
            )
          row["seconds"] = time.perf_counter() - start
          runs.append({"protocol": name, "mode": mode, "seed": seed, **row})
          print(
            f"{name:22s} seed {seed} {mode:8s} eval {row['eval_loss']:.4f} "
            f"train loss {row['final_train_loss']:.4f} ({row['seconds']:.1f}s)",
            flush=True,
          )
      write_outputs(args, names, all_plans, runs)


def write_outputs(args, names, all_plans, runs):
  """results.json, summary.md (paired differences with 95% t intervals) and summary.png."""
  summary = {}
  for name in names:
    by = {(r["mode"], r["seed"]): r for r in runs if r["protocol"] == name}
    arms = [m for m in args.modes if m != "reset"]
    seeds = sorted({s for m, s in by if all((a, s) in by for a in args.modes)})
    summary[name] = {}
    for metric in ("eval_loss", "final_train_loss"):
      reset = [by["reset", s][metric] for s in seeds]
      summary[name][metric] = {"reset_mean": float(np.mean(reset)) if seeds else float("nan")}
      for arm in arms:
        values = [by[arm, s][metric] for s in seeds]
        summary[name][metric][arm] = {
          "mean": float(np.mean(values)) if seeds else float("nan"),
          "minus_reset": paired([v - r for v, r in zip(values, reset)]),
          "ratio_to_reset": float(np.mean(values) / np.mean(reset)) if seeds else float("nan"),
        }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1))
  lines = [
    "| protocol | metric | reset | arm | arm mean | arm − reset (95% CI, paired over seeds) | arm / reset |",
    "|---|---|---|---|---|---|---|",
  ]
  for name in names:
    for metric, s in summary[name].items():
      for arm in [m for m in args.modes if m != "reset"]:
        d = s[arm]["minus_reset"]
        lines.append(
          f"| {name} | {metric} | {s['reset_mean']:.4f} | {arm} | {s[arm]['mean']:.4f} | "
          f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (n={d['n']}) | "
          f"{s[arm]['ratio_to_reset']:.2f} |"
        )
  table = "\n".join(lines)
  (out / "summary.md").write_text(table + "\n")
  print(table, flush=True)

  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    for mode, color in zip(args.modes, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
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
