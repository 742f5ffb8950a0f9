"""Plans of the paper's protocols: stage_plan arithmetic, builders, and bad input."""

import fractions

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_squeeze import protocols
from lora_squeeze.errors import UserInputError
from lora_squeeze.protocols import Branch, Evaluate, Squeeze, Stage


@st.composite
def decreasing_ranks(draw):
  ranks = draw(st.lists(st.integers(1, 256), min_size=1, max_size=9, unique=True))
  return tuple(sorted(ranks, reverse=True))


@settings(max_examples=200, deadline=None)
@given(ranks=decreasing_ranks(), total=st.integers(1, 50_000))
def test_proportional_sums_exactly_and_rounds_each_share_to_a_neighbour(ranks, total):
  try:
    steps = protocols.stage_plan(total, ranks, scheme="proportional")
  except ValueError as e:
    assert "would get 0 steps" in str(e)
    # Only when some exact share is below one step.
    assert any(fractions.Fraction(total * r, sum(ranks)) < 1 for r in ranks)
    return
  assert sum(steps) == total
  for r, n in zip(ranks, steps):
    exact = fractions.Fraction(total * r, sum(ranks))
    assert exact - 1 < n < exact + 1


@settings(max_examples=200, deadline=None)
@given(ranks=decreasing_ranks(), total=st.integers(1, 50_000), min_steps=st.integers(1, 1000))
def test_min_steps_sums_exactly_respects_minimum_or_raises(ranks, total, min_steps):
  if min_steps * len(ranks) > total:
    with pytest.raises(ValueError, match="impossible plan"):
      protocols.stage_plan(total, ranks, scheme="min_steps", min_steps=min_steps)
    return
  steps = protocols.stage_plan(total, ranks, scheme="min_steps", min_steps=min_steps)
  assert sum(steps) == total
  assert min(steps) >= min_steps
  rest = total - min_steps * len(ranks)
  for r, n in zip(ranks, steps):
    exact = fractions.Fraction(rest * r, sum(ranks))
    assert exact - 1 < n - min_steps < exact + 1
  # A higher rank never gets fewer steps than a lower one.
  assert list(steps) == sorted(steps, reverse=True)


def test_paper_anneal_128_to_1():
  ranks = protocols.halving_ranks(128, 1)
  assert ranks == (128, 64, 32, 16, 8, 4, 2, 1)
  # 10_200 * r / 255 = 40 r exactly.
  assert protocols.stage_plan(10_200, ranks) == tuple(40 * r for r in ranks)
  steps = protocols.stage_plan(10_200, ranks, scheme="min_steps", min_steps=200)
  # 200 each, then 8600 * r / 255 = 33.73 r: the rank-1 stage's remainder .73 is among the largest.
  assert sum(steps) == 10_200 and steps[-1] == 200 + 34


def test_largest_remainder_tie_goes_to_the_higher_rank():
  # 4 * (3, 2, 1) / 6 = (2, 1.333, 0.667): floors (2, 1, 0), one step left for the largest remainder.
  assert protocols.stage_plan(4, (3, 2, 1)) == (2, 1, 1)
  # 3 * (2, 1) / 3 = (2, 1) exactly.
  assert protocols.stage_plan(3, (2, 1)) == (2, 1)


@pytest.mark.parametrize(
  "total, ranks, kwargs, message",
  [
    (0, (4, 2), {}, "total_steps must be a positive integer, got 0"),
    (-5, (4, 2), {}, "total_steps must be a positive integer, got -5"),
    (10, (4, 4), {}, r"ranks must strictly decrease, got \(4, 4\)"),
    (10, (2, 4), {}, r"ranks must strictly decrease, got \(2, 4\)"),
    (10, (4, 0), {}, r"ranks\[1\] must be a positive integer, got 0"),
    (10, (), {}, "at least one rank"),
    (10, (4, 2), {"scheme": "cosine"}, "scheme must be one of"),
    (3, (8, 4, 2, 1), {}, "the rank-2 stage would get 0 steps"),
    (100, (8, 4), {"scheme": "min_steps", "min_steps": 60}, r"2 stages x min_steps 60 = 120 > total_steps 100"),
    (100, (8, 4), {"scheme": "min_steps", "min_steps": 0}, "min_steps must be a positive integer"),
  ],
)
def test_stage_plan_bad_input(total, ranks, kwargs, message):
  with pytest.raises(ValueError, match=message):
    protocols.stage_plan(total, ranks, **kwargs)


def test_halving_ranks():
  assert protocols.halving_ranks(16, 16) == (16,)
  assert protocols.halving_ranks(96, 10) == (96, 48, 24, 12, 10)
  with pytest.raises(ValueError, match="r_tgt=32 must not exceed r_src=16 for In-Squeeze"):
    protocols.halving_ranks(16, 32)


def test_direct_plan_with_equal_budget_continuation():
  plan = protocols.direct(rank=8, steps=100, lr=0.01, extra_steps=20)
  assert plan == (
    Stage(rank=8, steps=100, lr=0.01, warmup=1000),
    Evaluate(tag="direct_r8"),
    Stage(rank=8, steps=20, lr=0.01, warmup=100),
    Evaluate(tag="direct_r8_plus20"),
  )
  assert protocols.plan_steps(plan) == 120


def test_post_squeeze_branches_per_target():
  plan = protocols.post_squeeze(r_src=16, steps=50, lr=0.003, targets=(8, 2), method="rsvd")
  assert plan[0] == Stage(rank=16, steps=50, lr=0.003, warmup=1000)
  assert plan[1] == Evaluate(tag="r16")
  assert plan[2:] == (
    Branch(items=(Squeeze(rank=8, method="rsvd"), Evaluate(tag="r16_to_r8"))),
    Branch(items=(Squeeze(rank=2, method="rsvd"), Evaluate(tag="r16_to_r2"))),
  )
  with pytest.raises(ValueError, match="target rank 32 exceeds r_src=16"):
    protocols.post_squeeze(r_src=16, steps=50, lr=0.003, targets=(32,))


def test_cont_squeeze_plan():
  plan = protocols.cont_squeeze(r_src=128, r_tgt=1, steps=10_000, extra_steps=200, lr_src=0.01, lr_tgt=0.1)
  assert plan == (
    Stage(rank=128, steps=10_000, lr=0.01, warmup=1000),
    Squeeze(rank=1, method="qr_core"),
    Evaluate(tag="r128_to_r1"),
    Stage(rank=1, steps=200, lr=0.1, warmup=100),
    Evaluate(tag="r128_to_r1_plus200"),
  )
  with pytest.raises(ValueError, match="extra_steps must be a positive integer, got 0"):
    protocols.cont_squeeze(r_src=8, r_tgt=2, steps=10, extra_steps=0, lr_src=0.1, lr_tgt=0.1)
  with pytest.raises(ValueError, match="r_tgt=16 must not exceed r_src=8"):
    protocols.cont_squeeze(r_src=8, r_tgt=16, steps=10, extra_steps=5, lr_src=0.1, lr_tgt=0.1)


def test_in_squeeze_plan_uses_per_rank_lr_and_total_budget():
  lrs = protocols.lr_lookup({"8": 0.01, 4: 0.03, 2: 0.1})
  plan = protocols.in_squeeze(ranks=(8, 4, 2), total_steps=140, lr_for_rank=lrs, warmup=10, stage_warmup=5)
  assert plan == (
    Stage(rank=8, steps=80, lr=0.01, warmup=10),
    Squeeze(rank=4, method="qr_core"),
    Stage(rank=4, steps=40, lr=0.03, warmup=5),
    Squeeze(rank=2, method="qr_core"),
    Stage(rank=2, steps=20, lr=0.1, warmup=5),
    Evaluate(tag="in_proportional_r8_to_r2"),
  )
  assert protocols.plan_steps(plan) == 140
  with pytest.raises(ValueError, match=r"no learning rate for rank 16; the table has ranks \[2, 4, 8\]"):
    lrs(16)


@pytest.mark.parametrize(
  "plan, message",
  [
    ((), "a plan must start with a Stage"),
    ((Squeeze(rank=2),), "a plan must start with a Stage"),
    ((Evaluate(tag="zero_shot"),), r"a plan must start with a Stage .* got None first"),
    (
      (Evaluate(tag="zero_shot"), Squeeze(rank=2), Stage(rank=2, steps=3, lr=0.1, warmup=0)),
      r"must start with a Stage .* got Squeeze\(rank=2",
    ),
    ((Evaluate(tag="x"), Stage(rank=4, steps=3, lr=0.1, warmup=0), Evaluate(tag="x")), "used twice"),
    (
      (Stage(rank=4, steps=3, lr=0.1, warmup=0), Evaluate(tag="x"), Evaluate(tag="x")),
      r"plan\[2\]: Evaluate.tag 'x' is used twice",
    ),
    ((Stage(rank=4, steps=3, lr=0.1, warmup=0), "Squeeze(rank=2)"), r"plan\[1\]: unknown plan item 'Squeeze"),
  ],
)
def test_validate_plan_bad_input(plan, message):
  with pytest.raises(UserInputError, match=message):
    protocols.validate_plan(plan)


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: Stage(rank=4, steps=0, lr=0.1, warmup=0), r"^Stage.steps must be a positive integer, got 0$"),
    (lambda: Stage(rank=4, steps=-3, lr=0.1, warmup=0), r"^Stage.steps must be a positive integer, got -3$"),
    (lambda: Stage(rank=True, steps=3, lr=0.1, warmup=0), r"^Stage.rank must be a positive integer, got True$"),
    (lambda: Stage(rank=4, steps=3, lr=0.0, warmup=0), r"^Stage.lr must be a finite number > 0, got 0.0$"),
    (lambda: Stage(rank=4, steps=3, lr=float("nan"), warmup=0), r"^Stage.lr must be a finite number > 0, got nan$"),
    (lambda: Stage(rank=4, steps=3, lr=0.1, warmup=-1), r"^Stage.warmup must be a non-negative integer, got -1$"),
    (lambda: Squeeze(rank=0), r"^Squeeze.rank must be a positive integer, got 0$"),
    (lambda: Squeeze(rank=2, method="pca"), r"^Squeeze.method must be one of \('qr_core', .*\), got 'pca'$"),
    (lambda: Evaluate(tag="a/b"), r"^Evaluate.tag must be a file-name-safe string .*, got 'a/b'$"),
    (lambda: Evaluate(tag=""), r"^Evaluate.tag must be a file-name-safe string"),
    (
      lambda: Branch(items=(Squeeze(rank=1), Stage(rank=4, steps=3, lr=0.1, warmup=0))),
      r"^Branch.items\[1\] must be a Squeeze or an Evaluate \(a Branch holds only those\), got Stage\(rank=4",
    ),
  ],
)
def test_plan_items_check_their_fields_when_made(make, message):
  with pytest.raises(UserInputError, match=message):
    make()


def test_plan_items_are_frozen_keyword_only_and_branch_items_a_tuple():
  branch = Branch(items=[Squeeze(rank=2), Evaluate(tag="t")])
  assert branch.items == (Squeeze(rank=2), Evaluate(tag="t"))
  with pytest.raises(TypeError):
    Stage(4, 3, 0.1, 0)
  with pytest.raises(AttributeError):
    branch.items = ()


def test_evaluate_before_the_first_stage_is_allowed():
  plan = (Evaluate(tag="zero_shot"), Stage(rank=4, steps=3, lr=0.1, warmup=0), Squeeze(rank=2))
  assert protocols.validate_plan(plan) == plan
  assert protocols.plan_steps(plan) == 3


def test_validate_plan_tracks_the_rank():
  stage = lambda r: Stage(rank=r, steps=3, lr=0.1, warmup=0)  # noqa: E731
  protocols.validate_plan((stage(4), Squeeze(rank=2), stage(2), Branch(items=(Squeeze(rank=1),))))
  with pytest.raises(ValueError, match=r"plan\[1\]: Stage at rank 2 follows an adapter of rank 4; insert a Squeeze"):
    protocols.validate_plan((stage(4), stage(2)))
  with pytest.raises(ValueError, match=r"plan\[1\]: Squeeze to rank 8 above the adapter's rank 4"):
    protocols.validate_plan((stage(4), Squeeze(rank=8)))
  with pytest.raises(ValueError, match=r"plan\[2\].items\[1\]: Squeeze to rank 2 above the adapter's rank 1"):
    protocols.validate_plan((stage(4), Evaluate(tag="a"), Branch(items=(Squeeze(rank=1), Squeeze(rank=2)))))


def test_eval_tags_in_run_order_with_branches():
  plan = protocols.post_squeeze(r_src=8, steps=10, lr=1e-3, targets=[4, 2], warmup=1)
  assert protocols.eval_tags(plan) == ("r8", "r8_to_r4", "r8_to_r2")
  plan = protocols.cont_squeeze(r_src=8, r_tgt=2, steps=10, extra_steps=5, lr_src=1e-3, lr_tgt=2e-3, warmup=1)
  assert protocols.eval_tags(plan) == ("r8_to_r2", "r8_to_r2_plus5")
  assert protocols.eval_tags(protocols.direct(rank=4, steps=10, lr=1e-3, warmup=1)) == ("direct_r4",)
  assert protocols.eval_tags([Stage(rank=2, steps=1, lr=1e-3, warmup=0)]) == ()
