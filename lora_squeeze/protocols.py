"""Training protocols as plans: Direct, Post-, Cont- and In-Squeeze (paper §3.1, §4.1).

Every protocol of the paper is a sequence of three kinds of items:

    Stage(rank, steps, lr, warmup)   train the LoRA params at `rank` (fresh optimizer, own warmup)
    Squeeze(rank, method)            compress the LoRA params to `rank` (lora_tree.squeeze_tree)
    Evaluate(tag)                    score the current adapter and export it as `tag`; before the
                                     first Stage it scores the fresh adapter (b = 0, so ΔW = 0:
                                     the base model, Table 1's zero-shot column)

plus `Branch(items)`, which runs Squeeze/Evaluate items on a copy of the adapter and then returns
to the trunk (Post-Squeeze makes many target ranks from one training run this way).

    direct(r, N, +M)       = Stage(r, N, lr_r, 1000), Evaluate, [Stage(r, M, lr_r, 100), Evaluate]
    post(r_src, N, tgts)   = Stage(r_src, N, lr_src, 1000), Evaluate, Branch(Squeeze(t), Evaluate) per t
    cont(r_src, r_tgt, N, M) = Stage(r_src, N, ...), Squeeze(r_tgt), Evaluate, Stage(r_tgt, M, lr_tgt, 100), Evaluate
    in(ranks, N + M)       = Stage(r_0, n_0), Squeeze(r_1), Stage(r_1, n_1), ..., Evaluate
                                                          with n_i from `stage_plan(N + M, ranks, scheme=...)`

The plan runner (lora_squeeze.train.run_plan) executes any plan; nothing here trains.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

from lora_squeeze import validation
from lora_squeeze.errors import UserInputError

SCHEMES = ("proportional", "min_steps")
# Mirrors lora_squeeze.squeeze.METHODS; kept here so that a config is checked before any JAX import.
SQUEEZE_METHODS = ("qr_core", "rsvd", "rsvd_factored", "svd")
PROTOCOLS = ("direct", "post_squeeze", "cont_squeeze", "in_squeeze")
_TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# Every item checks its own fields when it is made (UserInputError naming the field); validate_plan
# checks what only the whole plan shows (a Stage first, ranks that only fall, unique tags).


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
  """Train at `rank` for `steps` steps; lr warms up linearly over `warmup` steps, then stays."""

  rank: int
  steps: int
  lr: float
  warmup: int

  def __post_init__(self):
    validation.positive_int("Stage.rank", self.rank)
    validation.positive_int("Stage.steps", self.steps)
    validation.positive_number("Stage.lr", self.lr)
    validation.integer("Stage.warmup", self.warmup, minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Squeeze:
  """Compress every LoRA module to `rank` with `method` (one of SQUEEZE_METHODS)."""

  rank: int
  method: str = "qr_core"

  def __post_init__(self):
    validation.positive_int("Squeeze.rank", self.rank)
    validation.one_of("Squeeze.method", self.method, SQUEEZE_METHODS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluate:
  """Score the current adapter and export it under the name `tag`."""

  tag: str

  def __post_init__(self):
    if not isinstance(self.tag, str) or not _TAG_PATTERN.match(self.tag):
      validation.fail("Evaluate.tag", self.tag, "a file-name-safe string (letters, digits, _.+-)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Branch:
  """Run `items` (Squeeze and Evaluate only) on a copy of the adapter; the trunk is unchanged."""

  items: tuple[Squeeze | Evaluate, ...]

  def __post_init__(self):
    object.__setattr__(self, "items", tuple(self.items))
    for j, sub in enumerate(self.items):
      if not isinstance(sub, (Squeeze, Evaluate)):
        validation.fail(f"Branch.items[{j}]", sub, "a Squeeze or an Evaluate (a Branch holds only those)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restart:
  """Start over inside the same run: a fresh adapter at `rank` (the run's LoRA initialisation), a
  fresh optimizer, and the training data from its first batch again. What came before stays
  evaluated and exported. It puts a baseline into the run that it is compared with (e.g. direct
  training at a squeeze's target rank, trained on the same batches as the source), sharing the
  loaded model and the compiled steps; the next Stage must train at `rank`."""

  rank: int

  def __post_init__(self):
    validation.positive_int("Restart.rank", self.rank)


PlanItem = Stage | Squeeze | Evaluate | Branch | Restart
Plan = tuple[PlanItem, ...]


def _check_decreasing(ranks: Sequence[int]) -> None:
  for i, rank in enumerate(ranks):
    validation.positive_int(f"ranks[{i}]", rank)
  for i in range(1, len(ranks)):
    if ranks[i] >= ranks[i - 1]:
      raise UserInputError(
        f"ranks must strictly decrease, got {tuple(ranks)} ({ranks[i]} at position {i} is not below {ranks[i - 1]})"
      )


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
  """Splits the integer `total` in proportion to integer `weights`, summing exactly to `total`.

  share_i = floor(total * w_i / W) plus one step for the (total - sum floor) largest remainders
  (total * w_i mod W); ties go to the earlier (higher-rank) stage. Exact integer arithmetic.
  """
  weight_sum = sum(weights)
  shares = [total * w // weight_sum for w in weights]
  remainders = [total * w % weight_sum for w in weights]
  left = total - sum(shares)
  for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
    shares[i] += 1
  return shares


def stage_plan(
  total_steps: int,
  ranks: Sequence[int],
  *,
  scheme: str = "proportional",
  min_steps: int = 200,
) -> tuple[int, ...]:
  """Steps per In-Squeeze stage (paper §4.1); the result always sums to `total_steps`.

  scheme="proportional" (the paper's standard scheme): stage i gets total * r_i / sum(r).
  scheme="min_steps": every stage first gets `min_steps`, the rest is split proportionally.
  Fractions are resolved by largest-remainder rounding in exact integer arithmetic.

  Args:
    total_steps: N + M, the whole budget.
    ranks: the annealing ranks, strictly decreasing, e.g. (128, 64, ..., 1).
    scheme: one of SCHEMES.
    min_steps: the per-stage minimum of the "min_steps" scheme.

  Returns:
    steps per stage, aligned with `ranks`, each >= 1 (>= min_steps for "min_steps").

  Raises:
    UserInputError: bad ranks/steps/scheme, or a plan that cannot be met.
  """
  validation.positive_int("total_steps", total_steps)
  if not ranks:
    raise UserInputError("ranks must name at least one rank, got ()")
  _check_decreasing(ranks)
  if scheme == "proportional":
    steps = _largest_remainder(total_steps, list(ranks))
    if min(steps) == 0:
      short = ranks[steps.index(0)]
      raise UserInputError(
        f"total_steps={total_steps} is too small for ranks {tuple(ranks)} with scheme "
        f"'proportional': the rank-{short} stage would get 0 steps; raise total_steps or use "
        "scheme='min_steps'"
      )
    return tuple(steps)
  if scheme == "min_steps":
    validation.positive_int("min_steps", min_steps)
    floor_total = min_steps * len(ranks)
    if floor_total > total_steps:
      raise UserInputError(
        f"impossible plan: {len(ranks)} stages x min_steps {min_steps} = {floor_total} > total_steps {total_steps}"
      )
    rest = _largest_remainder(total_steps - floor_total, list(ranks))
    return tuple(min_steps + s for s in rest)
  raise UserInputError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def halving_ranks(r_src: int, r_tgt: int) -> tuple[int, ...]:
  """r_src, r_src/2, ..., r_tgt (paper: 128 -> 64 -> ... -> 1); r_tgt itself is always last.

  With a r_src / r_tgt ratio that is not a power of two, the last halving step that would
  undershoot r_tgt is replaced by r_tgt (e.g. 96 -> 48 -> 24 -> 12 -> 10 for r_tgt = 10).
  """
  validation.positive_int("r_src", r_src)
  validation.positive_int("r_tgt", r_tgt)
  if r_tgt > r_src:
    raise UserInputError(f"r_tgt={r_tgt} must not exceed r_src={r_src} for In-Squeeze")
  ranks = [r_src]
  while ranks[-1] // 2 > r_tgt:
    ranks.append(ranks[-1] // 2)
  if ranks[-1] != r_tgt:
    ranks.append(r_tgt)
  return tuple(ranks)


def validate_plan(plan: Sequence[PlanItem]) -> Plan:
  """Checks a plan and returns it as a tuple; raises UserInputError naming the bad item.

  The items checked their own fields when they were made; this checks how they fit together.
  """
  plan = tuple(plan)
  first = next((item for item in plan if not isinstance(item, Evaluate)), None)
  if not isinstance(first, Stage):
    raise UserInputError(
      f"a plan must start with a Stage (it sets the first rank), optionally after Evaluate items "
      f"(they score the untrained adapter, i.e. the base model), got {first!r} first"
    )
  tags = set()

  def check(item, where):
    if isinstance(item, Evaluate):
      if item.tag in tags:
        raise UserInputError(f"{where}: Evaluate.tag {item.tag!r} is used twice; tags name exports")
      tags.add(item.tag)
    elif not isinstance(item, (Stage, Squeeze, Restart)):
      raise UserInputError(f"{where}: unknown plan item {item!r}")

  rank = first.rank
  for i, item in enumerate(plan):
    if isinstance(item, Branch):
      branch_rank = rank
      for j, sub in enumerate(item.items):
        check(sub, f"plan[{i}].items[{j}]")
        if isinstance(sub, Squeeze):
          _check_squeeze_rank(sub, branch_rank, f"plan[{i}].items[{j}]")
          branch_rank = sub.rank
    else:
      check(item, f"plan[{i}]")
      if isinstance(item, Stage) and item.rank != rank:
        raise UserInputError(
          f"plan[{i}]: Stage at rank {item.rank} follows an adapter of rank {rank}; insert a Squeeze or a Restart"
        )
      if isinstance(item, Squeeze):
        _check_squeeze_rank(item, rank, f"plan[{i}]")
        rank = item.rank
      if isinstance(item, Restart):
        rank = item.rank
  return plan


def _check_squeeze_rank(item: Squeeze, rank: int, where: str) -> None:
  if item.rank > rank:
    raise UserInputError(
      f"{where}: Squeeze to rank {item.rank} above the adapter's rank {rank}; a squeeze only lowers it"
    )


def plan_record(plan: Sequence[PlanItem]) -> list[dict]:
  """A plan as JSON data: [{"item": "Stage", "rank": 8, ...}, {"item": "Branch", "items": [...]}]."""
  out = []
  for item in plan:
    if isinstance(item, Branch):
      out.append({"item": "Branch", "items": plan_record(item.items)})
    else:
      out.append({"item": type(item).__name__, **dataclasses.asdict(item)})
  return out


def plan_steps(plan: Sequence[PlanItem]) -> int:
  """Total training steps of a plan."""
  return sum(item.steps for item in plan if isinstance(item, Stage))


def baseline_tags(plan: Sequence[PlanItem]) -> tuple[str, ...]:
  """The Evaluate tags of the trunk after a Restart: baselines trained inside the run, which the
  closing table compares every other adapter with."""
  tags, restarted = [], False
  for item in plan:
    restarted = restarted or isinstance(item, Restart)
    if restarted and isinstance(item, Evaluate):
      tags.append(item.tag)
  return tuple(tags)


def eval_tags(plan: Sequence[PlanItem]) -> tuple[str, ...]:
  """The Evaluate tags of a plan in the order it runs them (those inside Branches included): the
  names its results and exported adapters get, for callers that label them without rebuilding
  the tag strings."""
  items = (sub for item in plan for sub in (item.items if isinstance(item, Branch) else (item,)))
  return tuple(item.tag for item in items if isinstance(item, Evaluate))


def direct(
  *, rank: int, steps: int, lr: float, warmup: int = 1000, extra_steps: int = 0, extra_warmup: int = 100
) -> Plan:
  """Direct LoRA at `rank` for `steps`; with extra_steps = M, the equal-budget baseline continues
  M more steps with a fresh optimizer and `extra_warmup` (paper §4.1, "Direct +M")."""
  plan = [Stage(rank=rank, steps=steps, lr=lr, warmup=warmup), Evaluate(tag=f"direct_r{rank}")]
  if extra_steps:
    validation.positive_int("extra_steps", extra_steps)
    plan += [
      Stage(rank=rank, steps=extra_steps, lr=lr, warmup=extra_warmup),
      Evaluate(tag=f"direct_r{rank}_plus{extra_steps}"),
    ]
  return validate_plan(plan)


def post_squeeze(
  *,
  r_src: int,
  steps: int,
  lr: float,
  targets: Sequence[int],
  warmup: int = 1000,
  method: str = "qr_core",
  direct_baselines: Sequence[int] = (),
  lr_for_rank: Callable[[int], float] | None = None,
) -> Plan:
  """Train once at r_src, then squeeze a copy to every target rank and evaluate each.

  With direct_baselines, the run then restarts (Restart) at each of those ranks and trains a fresh
  adapter for the same `steps` on the same batches (lr_for_rank(rank), default `lr`), evaluated as
  `direct_r<rank>`: the direct training that the squeezed adapters are compared with."""
  validation.positive_int("r_src", r_src)
  if not targets:
    raise UserInputError("targets must name at least one target rank, got ()")
  for t in targets:
    validation.positive_int("target rank", t)
    if t > r_src:
      raise UserInputError(f"target rank {t} exceeds r_src={r_src}; a squeeze only lowers the rank")
  plan = [Stage(rank=r_src, steps=steps, lr=lr, warmup=warmup), Evaluate(tag=f"r{r_src}")]
  for t in targets:
    plan.append(Branch(items=(Squeeze(rank=t, method=method), Evaluate(tag=f"r{r_src}_to_r{t}"))))
  for rank in direct_baselines:
    validation.positive_int("direct baseline rank", rank)
    rank_lr = lr if lr_for_rank is None else lr_for_rank(rank)
    plan += [
      Restart(rank=rank),
      Stage(rank=rank, steps=steps, lr=rank_lr, warmup=warmup),
      Evaluate(tag=f"direct_r{rank}"),
    ]
  return validate_plan(plan)


def cont_squeeze(
  *,
  r_src: int,
  r_tgt: int,
  steps: int,
  extra_steps: int,
  lr_src: float,
  lr_tgt: float,
  warmup: int = 1000,
  extra_warmup: int = 100,
  method: str = "qr_core",
) -> Plan:
  """Train at r_src for N steps, squeeze to r_tgt, train M more steps at r_tgt (fresh optimizer,
  `extra_warmup`, the r_tgt learning rate); evaluates after the squeeze and at the end."""
  validation.positive_int("r_src", r_src)
  validation.positive_int("r_tgt", r_tgt)
  validation.positive_int("extra_steps", extra_steps)
  if r_tgt > r_src:
    raise UserInputError(f"r_tgt={r_tgt} must not exceed r_src={r_src} for Cont-Squeeze")
  return validate_plan(
    [
      Stage(rank=r_src, steps=steps, lr=lr_src, warmup=warmup),
      Squeeze(rank=r_tgt, method=method),
      Evaluate(tag=f"r{r_src}_to_r{r_tgt}"),
      Stage(rank=r_tgt, steps=extra_steps, lr=lr_tgt, warmup=extra_warmup),
      Evaluate(tag=f"r{r_src}_to_r{r_tgt}_plus{extra_steps}"),
    ]
  )


def in_squeeze(
  *,
  ranks: Sequence[int],
  total_steps: int,
  lr_for_rank: Callable[[int], float],
  scheme: str = "proportional",
  min_steps: int = 200,
  warmup: int = 1000,
  stage_warmup: int = 100,
  method: str = "qr_core",
) -> Plan:
  """Anneal ranks[0] -> ... -> ranks[-1] within `total_steps` (paper §4.1 In-Squeeze).

  The first stage warms up over `warmup` steps; every later stage starts a fresh optimizer (the
  shapes changed) and warms up over `stage_warmup` steps, at the learning rate of its rank.
  """
  steps = stage_plan(total_steps, ranks, scheme=scheme, min_steps=min_steps)
  plan: list[PlanItem] = []
  for i, (rank, n) in enumerate(zip(ranks, steps)):
    if i:
      plan.append(Squeeze(rank=rank, method=method))
    plan.append(Stage(rank=rank, steps=n, lr=float(lr_for_rank(rank)), warmup=warmup if i == 0 else stage_warmup))
  plan.append(Evaluate(tag=f"in_{scheme}_r{ranks[0]}_to_r{ranks[-1]}"))
  return validate_plan(plan)


def lr_lookup(table: Mapping, default: float | None = None) -> Callable[[int], float]:
  """A rank -> learning-rate function over a table keyed by rank (int or str keys)."""

  def lr_for_rank(rank: int) -> float:
    for key in (rank, str(rank)):
      if key in table:
        return float(table[key])
    if default is None:
      raise UserInputError(f"no learning rate for rank {rank}; the table has ranks {sorted(map(int, table))}")
    return float(default)

  return lr_for_rank
