"""Optimizer state across a squeeze: the change of basis, exact and approximate projections against
numpy references, the runner's 'project' mode (resume included) and the unknown-state fallback."""

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_squeeze import errors
from lora_squeeze import opt_state_projection as osp
from lora_squeeze import optim
from lora_squeeze import protocols
from lora_squeeze import train
from lora_squeeze.protocols import Evaluate, Squeeze, Stage
from test_train import Crash, CrashAt  # a run killed mid-stage (tests/ is on sys.path under pytest)

PATH = "layer_0/attn/_LoRAEinsum_0/lora"


def module_tree(a, b):
  return {
    "layer_0": {
      "attn": {"_LoRAEinsum_0": {"lora": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}}
    }
  }


def leaves(tree):
  return tree["layer_0"]["attn"]["_LoRAEinsum_0"]["lora"]


def delta_w(tree, stack_axes=0):
  a, b = leaves(tree)["a"], leaves(tree)["b"]
  a = np.asarray(a, np.float64).reshape(*a.shape[:stack_axes], -1, a.shape[-1])
  b = np.asarray(b, np.float64).reshape(*b.shape[: stack_axes + 1], -1)
  return a @ b


def loss_fn(target, stack_axes):
  """½‖a b − T‖² over the module: a loss of ΔW alone, so its gradients are the LoRA covectors."""

  def loss(tree):
    a, b = leaves(tree)["a"], leaves(tree)["b"]
    a = a.reshape(*a.shape[:stack_axes], -1, a.shape[-1])
    b = b.reshape(*b.shape[: stack_axes + 1], -1)
    return 0.5 * jnp.sum(jnp.square(jnp.matmul(a, b, precision="highest") - target))

  return loss


def run_steps(optimizer, state, params, loss, steps):
  for _ in range(steps):
    updates, state = optimizer.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def balanced_signed_permuted(rng, in_dims, out_dims, rank, stack=()):
  """Factors U√S Π D, D Πᵀ √S Vᵀ of a random rank-`rank` ΔW: a squeeze to the same rank undoes Π, D."""
  m, n = int(np.prod(in_dims)), int(np.prod(out_dims))
  a_all, b_all = [], []
  for _ in range(int(np.prod(stack))):
    u, _ = np.linalg.qr(rng.normal(size=(m, rank)))
    v, _ = np.linalg.qr(rng.normal(size=(n, rank)))
    s = np.sort(rng.uniform(0.5, 3.0, rank))[::-1]
    perm = np.eye(rank)[rng.permutation(rank)] * rng.choice([-1.0, 1.0], rank)
    a_all.append((u * np.sqrt(s)) @ perm)
    b_all.append(perm.T @ (np.sqrt(s)[:, None] * v.T))
  a = np.reshape(a_all, (*stack, *in_dims, rank))
  b = np.reshape(b_all, (*stack, rank, *out_dims))
  return module_tree(a, b)


# --------------------------------------------------------------------------------------------
# The change of basis.


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
  r_src=st.integers(2, 8),
  r_tgt=st.integers(1, 8),
  stack=st.sampled_from([(), (2,)]),
  seed=st.integers(0, 2**16),
  spread=st.floats(0.0, 4.0),
)
def test_basis_reproduces_the_squeezed_factors(r_src, r_tgt, stack, seed, spread):
  r_tgt = min(r_tgt, r_src)
  rng = np.random.default_rng(seed)
  # Column scales over `spread` decades: ill-conditioned factors as after training.
  scales = 10.0 ** -np.linspace(0, spread, r_src)
  a = rng.normal(size=(*stack, 6, 5, r_src)) * scales
  b = rng.normal(size=(*stack, r_src, 3, 7))
  tree = module_tree(a, b)
  new, _, bases = osp.squeeze_with_basis(tree, r_tgt, stack_axes=len(stack))
  p, q = np.asarray(bases[PATH].p, np.float64), np.asarray(bases[PATH].q, np.float64)
  assert p.shape == (*stack, r_src, r_tgt) and q.shape == (*stack, r_tgt, r_src)
  a_mat = np.asarray(leaves(tree)["a"], np.float64).reshape(*stack, 30, r_src)
  b_mat = np.asarray(leaves(tree)["b"], np.float64).reshape(*stack, r_src, 21)
  a_t = np.asarray(leaves(new)["a"], np.float64).reshape(*stack, 30, r_tgt)
  b_t = np.asarray(leaves(new)["b"], np.float64).reshape(*stack, r_tgt, 21)
  np.testing.assert_allclose(a_mat @ p, a_t, atol=1e-4 * np.abs(a_t).max())
  np.testing.assert_allclose(q @ b_mat, b_t, atol=1e-4 * np.abs(b_t).max())
  if r_tgt == r_src and spread < 2:  # full rank, well conditioned: a change of basis, P Q = I
    np.testing.assert_allclose(p @ q, np.broadcast_to(np.eye(r_src), p.shape[:-2] + (r_src, r_src)), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Exactness: a squeeze that only reorders and flips rank components changes nothing.


OPTIMIZERS = {
  "adam": lambda: optax.adam(0.05),
  "adamw": lambda: optax.adamw(0.05, weight_decay=0.1),
  "adafactor": lambda: optax.adafactor(optax.constant_schedule(0.05)),  # leaves too small: dense v
  "adafactor_factored": lambda: optax.adafactor(0.05, min_dim_size_to_factor=4),
  "adafactor_momentum": lambda: optax.adafactor(0.05, min_dim_size_to_factor=4, momentum=0.9),
  "sgd_momentum": lambda: optax.sgd(0.01, momentum=0.9),
  # The trainer's own optimizers (config optim.name), warmup 0: the schedule restarts at a squeeze.
  "trainer_adafactor": lambda: optim.make_optimizer(0.05, 0),
  "trainer_adamw": lambda: optim.make_optimizer(0.05, 0, optim.OptimizerOptions(name="adamw", weight_decay=0.1)),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("stack", [(), (2,)])
def test_same_rank_signed_permutation_keeps_the_trajectory(name, stack):
  rng = np.random.default_rng(0)
  in_dims, out_dims, rank = (5, 3), (6, 7), 8
  target = rng.normal(size=(*stack, 15, 42))
  loss = loss_fn(jnp.asarray(target, jnp.float32), len(stack))
  optimizer = OPTIMIZERS[name]()
  warm = module_tree(rng.normal(size=(*stack, *in_dims, rank)) * 0.3, rng.normal(size=(*stack, rank, *out_dims)) * 0.3)
  _, state = run_steps(optimizer, optimizer.init(warm), warm, loss, 3)  # a state with history
  params = balanced_signed_permuted(rng, in_dims, out_dims, rank, stack)
  new_params, _, bases = osp.squeeze_with_basis(params, rank, stack_axes=len(stack))
  p = np.abs(np.asarray(bases[PATH].p))
  np.testing.assert_allclose(np.sort(p, axis=-1)[..., -1], 1.0, atol=1e-5)  # a signed permutation
  assert not np.allclose(np.asarray(leaves(new_params)["a"]), np.asarray(leaves(params)["a"]))
  new_state = osp.project_opt_state(state, optimizer, params, new_params, stack_axes=len(stack), bases=bases)
  np.testing.assert_allclose(delta_w(new_params, len(stack)), delta_w(params, len(stack)), atol=1e-5)
  for steps in (1, 3):
    want, _ = run_steps(optimizer, state, params, loss, steps)
    got, _ = run_steps(optimizer, new_state, new_params, loss, steps)
    np.testing.assert_allclose(delta_w(got, len(stack)), delta_w(want, len(stack)), atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# A general change of basis: what is exact (first moments) and what is not (second moments).


def test_adam_first_moment_is_exact_and_second_moment_misses_exactly_the_cross_terms():
  rng = np.random.default_rng(1)
  r, m, n, steps, b1, b2 = 4, 9, 11, 5, 0.9, 0.999
  params = module_tree(rng.normal(size=(m, r)), rng.normal(size=(r, n)))
  new_params, _, bases = osp.squeeze_with_basis(params, r)  # trained-like factors: a full rebalancing
  p, q = np.asarray(bases[PATH].p, np.float64), np.asarray(bases[PATH].q, np.float64)
  assert np.abs(q - np.diag(np.diag(q))).max() > 0.1  # really mixes the rank components
  optimizer = optax.adam(0.1, b1=b1, b2=b2)
  state = optimizer.init(params)
  history = [(rng.normal(size=(m, r)), rng.normal(size=(r, n))) for _ in range(steps)]
  for g_a, g_b in history:
    _, state = optimizer.update(module_tree(g_a, g_b), state, params)
  new = osp.project_opt_state(state, optimizer, params, new_params, bases=bases)[0]
  weights = [(1 - b1) * b1 ** (steps - 1 - t) for t in range(steps)]
  weights2 = [(1 - b2) * b2 ** (steps - 1 - t) for t in range(steps)]
  # The EMA of the gradients in the new coordinates (g_a Qᵀ, Pᵀ g_b): exactly the projected mu.
  mu_a = sum(w * g_a @ q.T for w, (g_a, _) in zip(weights, history))
  mu_b = sum(w * p.T @ g_b for w, (_, g_b) in zip(weights, history))
  np.testing.assert_allclose(leaves(new.mu)["a"], mu_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(leaves(new.mu)["b"], mu_b, rtol=1e-5, atol=1e-6)
  # nu: the diagonal approximation ν (Q∘Q)ᵀ ...
  nu_a = sum(w * np.square(g_a) for w, (g_a, _) in zip(weights2, history))
  np.testing.assert_allclose(leaves(new.nu)["a"], nu_a @ np.square(q).T, rtol=1e-5)
  nu_b = sum(w * np.square(g_b) for w, (_, g_b) in zip(weights2, history))
  np.testing.assert_allclose(leaves(new.nu)["b"], np.square(p).T @ nu_b, rtol=1e-5)
  # ... which differs from the EMA of the squared new-coordinate gradients by the cross terms.
  true_a = sum(w * np.square(g_a @ q.T) for w, (g_a, _) in zip(weights2, history))
  off_diagonal = 1.0 - np.eye(r)
  cross_a = sum(
    w * np.einsum("ik,il,jk,jl,kl->ij", g_a, g_a, q, q, off_diagonal) for w, (g_a, _) in zip(weights2, history)
  )
  np.testing.assert_allclose(true_a - np.asarray(leaves(new.nu)["a"], np.float64), cross_a, rtol=1e-4, atol=1e-6)
  assert np.abs(cross_a).max() > 1e-3  # a real approximation here, not a vacuous identity
  assert int(new.count) == steps  # bias correction continues


def _np_adafactor_step(g, v_row, v_col, v, param, count, lr, *, factored_axes):
  """optax.adafactor's update (default clipping 1, parameter scale, decay 0.8) in float64 numpy."""
  decay = 1.0 - (count + 1.0) ** -0.8
  g2 = np.square(g) + 1e-30
  if factored_axes is None:
    v = decay * v + (1 - decay) * g2
    u = g / np.sqrt(v)
  else:
    d1, d0 = factored_axes
    v_row = decay * v_row + (1 - decay) * g2.mean(axis=d0)
    v_col = decay * v_col + (1 - decay) * g2.mean(axis=d1)
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row = v_row / v_row.mean(axis=reduced_d1, keepdims=True)
    u = g / np.sqrt(np.expand_dims(row, d0)) / np.sqrt(np.expand_dims(v_col, d1))
  u = u / max(1.0, np.sqrt(np.mean(np.square(u))))
  return -lr * u * max(np.sqrt(np.mean(np.square(param))), 1e-3)


def test_projected_adafactor_step_matches_numpy_reference():
  rng = np.random.default_rng(2)
  lr, r_src, r_tgt = 0.05, 8, 3
  # min_dim_size_to_factor=4: a (5, 3, 8) factors over (5, r): the rank axis is factored, and
  # after the squeeze a (5, 3, 3) is dense; b (8, 6, 7) factors over (r, 7) and b_t (3, 6, 7) over
  # (6, 7): the rank axis leaves the factorization.
  optimizer = optax.adafactor(optax.constant_schedule(lr), min_dim_size_to_factor=4)
  params = module_tree(rng.normal(size=(5, 3, r_src)), rng.normal(size=(r_src, 6, 7)))
  state = optimizer.init(params)
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    _, state = optimizer.update(grads, state, params)
  new_params, _, bases = osp.squeeze_with_basis(params, r_tgt)
  new_state = osp.project_opt_state(state, optimizer, params, new_params, bases=bases)
  g_new = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), new_params)
  updates, _ = optimizer.update(g_new, new_state, new_params)
  assert int(new_state[0].count) == 4 and int(new_state[2].count) == 0  # moments continue, lr schedule restarts

  p, q = np.asarray(bases[PATH].p, np.float64), np.asarray(bases[PATH].q, np.float64)
  f64 = lambda tree, side: np.asarray(leaves(tree)[side], np.float64)  # noqa: E731
  fs = state[0]
  # a (5, 3, 8): d1 = 0, d0 = 2. v̂[i,j,k] = v_row[i,j] / mean_i v_row[i,j] * v_col[j,k].
  v_row, v_col = f64(fs.v_row, "a"), f64(fs.v_col, "a")
  dense_a = (v_row / v_row.mean(axis=0, keepdims=True))[:, :, None] * v_col[None, :, :]
  dense_a = np.einsum("ijk,lk->ijl", dense_a, np.square(q))
  want_a = _np_adafactor_step(f64(g_new, "a"), None, None, dense_a, f64(new_params, "a"), 4, lr, factored_axes=None)
  # b (8, 6, 7): d1 = 2, d0 = 0. v̂[k,j,i] = v_row[j,i] / mean_i v_row[j,i] * v_col[k,j].
  v_row, v_col = f64(fs.v_row, "b"), f64(fs.v_col, "b")
  dense_b = v_col[:, :, None] * (v_row / v_row.mean(axis=1, keepdims=True))[None]
  dense_b = np.einsum("kl,kji->lji", np.square(p), dense_b)
  # b_t (3, 6, 7): d1 = 1, d0 = 2.
  want_b = _np_adafactor_step(
    f64(g_new, "b"), dense_b.mean(axis=2), dense_b.mean(axis=1), None, f64(new_params, "b"), 4, lr, factored_axes=(1, 2)
  )
  np.testing.assert_allclose(leaves(updates)["a"], want_a, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(leaves(updates)["b"], want_b, rtol=2e-4, atol=1e-7)
  # b's new v_row (3, 6) (the mean over the last axis) is the projection of the old statistic that
  # kept the rank axis, v_col (8, 6): exact, not only a projection of the rank-1 reconstruction.
  np.testing.assert_allclose(leaves(new_state[0].v_row)["b"], np.square(p).T @ v_col, rtol=1e-5)


def test_adam_projected_step_matches_numpy_reference():
  rng = np.random.default_rng(3)
  b1, b2, eps, lr = 0.9, 0.99, 1e-8, 0.01
  optimizer = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  params = module_tree(rng.normal(size=(4, 6, 8)), rng.normal(size=(8, 10)))
  state = optimizer.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    _, state = optimizer.update(grads, state, params)
  new_params, _, bases = osp.squeeze_with_basis(params, 5)
  new_state = osp.project_opt_state(state, optimizer, params, new_params, bases=bases)
  g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), new_params)
  updates, _ = optimizer.update(g, new_state, new_params)
  p, q = np.asarray(bases[PATH].p, np.float64), np.asarray(bases[PATH].q, np.float64)
  old = state[0]
  mu_a = np.asarray(leaves(old.mu)["a"], np.float64).reshape(24, 8) @ q.T
  nu_a = np.asarray(leaves(old.nu)["a"], np.float64).reshape(24, 8) @ np.square(q).T
  mu_b = p.T @ np.asarray(leaves(old.mu)["b"], np.float64)
  nu_b = np.square(p).T @ np.asarray(leaves(old.nu)["b"], np.float64)
  for side, mu, nu, shape in (("a", mu_a, nu_a, (4, 6, 5)), ("b", mu_b, nu_b, (5, 10))):
    gg = np.asarray(leaves(g)[side], np.float64).reshape(mu.shape)
    mu, nu = b1 * mu + (1 - b1) * gg, b2 * nu + (1 - b2) * gg**2
    want = -lr * (mu / (1 - b1**4)) / (np.sqrt(nu / (1 - b2**4)) + eps)
    np.testing.assert_allclose(leaves(updates)[side], want.reshape(shape), rtol=2e-4, atol=1e-7)


def test_unknown_optimizer_warns_and_resets():
  rng = np.random.default_rng(4)
  params = module_tree(rng.normal(size=(6, 4)), rng.normal(size=(4, 5)))
  new_params, _, _ = osp.squeeze_with_basis(params, 2)
  optimizer = optax.lion(0.01)
  state = optimizer.init(params)
  _, state = optimizer.update(jax.tree.map(jnp.ones_like, params), state, params)
  with pytest.warns(osp.UnknownOptimizerStateWarning, match="ScaleByLionState"):
    got = osp.project_opt_state(state, optimizer, params, new_params)
  fresh = optimizer.init(new_params)
  assert jax.tree.structure(got) == jax.tree.structure(fresh)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(x, y)
  # A state of another optimizer than the next stage's: also a fresh state, with a warning.
  with pytest.warns(osp.UnknownOptimizerStateWarning, match="structure differs"):
    osp.project_opt_state(optax.adam(0.1).init(params), optax.adafactor(0.1), params, new_params)


# --------------------------------------------------------------------------------------------
# Plans and configs.


def test_carried_at_and_projected_warmup_follow_the_squeezes():
  cont = protocols.cont_squeeze(
    r_src=8, r_tgt=2, steps=10, extra_steps=5, lr_src=0.1, lr_tgt=0.1, warmup=4, extra_warmup=3
  )
  assert [osp.carried_at(cont, i) for i in range(len(cont) + 1)] == [False, True, True, True, False, False]
  assert [p.warmup for p in osp.with_projected_warmup(cont, 0) if isinstance(p, Stage)] == [4, 0]
  anneal = protocols.in_squeeze(ranks=(8, 4, 2), total_steps=30, lr_for_rank=lambda r: 0.1, warmup=5, stage_warmup=2)
  assert [p.warmup for p in osp.with_projected_warmup(anneal, 1) if isinstance(p, Stage)] == [5, 1, 1]
  # Nothing is carried where no training follows a squeeze, or across a stage boundary without one.
  post = protocols.post_squeeze(r_src=8, steps=10, lr=0.1, targets=(4, 2), warmup=4)
  direct = protocols.direct(rank=4, steps=10, lr=0.1, warmup=4, extra_steps=5, extra_warmup=3)
  tail = protocols.validate_plan([Stage(rank=4, steps=2, lr=0.1, warmup=1), Squeeze(rank=2), Evaluate(tag="x")])
  for plan in (post, direct, tail):
    assert not any(osp.carried_at(plan, i) for i in range(len(plan) + 1))
    assert osp.with_projected_warmup(plan, 0) == plan
  with pytest.raises(errors.UserInputError, match=r"warmup_after_projection must be a non-negative integer, got -1"):
    osp.with_projected_warmup(cont, -1)
  with pytest.raises(
    errors.UserInputError, match=r"optimizer_state_at_squeeze must be one of \('reset', 'project'\), got 'keep'"
  ):
    osp.check_mode("keep")


def test_config_keys_default_to_reset_and_project_changes_only_the_warmups():
  from lora_squeeze import config_lib as common

  config = common.base_config("cont_squeeze")
  config.update(
    model="tiny", task="boolq", r_src=8, r_tgt=2, steps=10, extra_steps=5, extra_warmup=3, lr=0.1, lr_tgt=None
  )
  assert config.optimizer_state_at_squeeze == "reset" and config.warmup_after_projection == 0
  reset_plan = common.make_plan(config)
  config.optimizer_state_at_squeeze, config.warmup_after_projection = "project", 2
  project_plan = common.make_plan(config)
  assert [p.warmup for p in project_plan if isinstance(p, Stage)] == [config.warmup, 2]
  assert [dataclasses.replace(p, warmup=0) if isinstance(p, Stage) else p for p in project_plan] == [
    dataclasses.replace(p, warmup=0) if isinstance(p, Stage) else p for p in reset_plan
  ]
  config.optimizer_state_at_squeeze = "carry"
  with pytest.raises(
    ValueError, match=r"config.optimizer_state_at_squeeze must be one of \('reset', 'project'\), got 'carry'"
  ):
    common.validate(config)


# --------------------------------------------------------------------------------------------
# The runner: 'project' through a real plan, resumed across the projected squeeze.


def copy_batches(seed):
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(32):
    x = rng.integers(4, 24, 5)
    mask = np.zeros(12, bool)
    mask[7:] = True
    examples.append({"tokens": np.concatenate([[2], x, [3], x]).astype(np.int32), "target_mask": mask})
  return train.batch_dataset(examples, batch_size=4, seed=1)


@pytest.fixture(scope="module")
def tiny_base():
  from lora_squeeze import model as model_lib

  return model_lib.init_base_params("tiny", key=jax.random.key(0))


def runner_setup(workdir, base, mode, *, batches=None, lines=None):
  from lora_squeeze import model as model_lib

  return train.RunSetup(
    model_for_rank=lambda r: model_lib.make_model("tiny", lora_rank=r),
    base_params=base,
    batches=batches if batches is not None else copy_batches(0),
    workdir=workdir,
    key=jax.random.key(7),
    max_targets=5,
    run_config={"test": "projection", "mode": mode},
    checkpoint_every=2,
    log_every=100,
    optimizer_state_at_squeeze=mode,
    printer=(lines.append if lines is not None else lambda line: None),
  )


def test_runner_projects_across_the_squeeze_and_resumes_bit_identically(tiny_base, tmp_path):
  plan = protocols.validate_plan(
    (
      Stage(rank=4, steps=3, lr=0.5, warmup=2),
      Squeeze(rank=2),
      Stage(rank=2, steps=3, lr=0.5, warmup=2),
      Evaluate(tag="final"),
    )
  )
  project_plan = osp.with_projected_warmup(plan, 0)
  reset = train.execute_plan(plan, runner_setup(tmp_path / "reset", tiny_base, "reset"))
  straight = train.execute_plan(project_plan, runner_setup(tmp_path / "a", tiny_base, "project"))
  # The carried state changes training after the squeeze (and only after it).
  read = lambda d: [
    r
    for r in map(__import__("json").loads, (d / train.METRICS_FILE).read_text().splitlines())  # noqa: E731
    if r["event"] == "train"
  ]
  a, r = read(tmp_path / "a"), read(tmp_path / "reset")
  assert [x["loss"] for x in a[:3]] == [x["loss"] for x in r[:3]]
  assert a[3]["lr"] == 0.5 and r[3]["lr"] == 0.25  # no warmup after the projection; 'reset' warms up
  assert not np.allclose(
    np.asarray(jax.tree.leaves(straight["lora"])[0]), np.asarray(jax.tree.leaves(reset["lora"])[0])
  )
  # Crashes mid first stage (batch 2), right after the squeeze (batch 3: the newest checkpoint is the
  # projected state at the plan boundary) and mid second stage (batch 5).
  lines = []
  for crash_step in (2, 3, 5):
    with pytest.raises(Crash):
      train.execute_plan(
        project_plan,
        runner_setup(tmp_path / "b", tiny_base, "project", lines=lines, batches=CrashAt(copy_batches(0), crash_step)),
      )
  resumed = train.execute_plan(project_plan, runner_setup(tmp_path / "b", tiny_base, "project", lines=lines))
  assert any("global step 3, rank 2" in line for line in lines if line.startswith("resumed from checkpoint"))
  for got, want in zip(jax.tree.leaves(resumed["lora"]), jax.tree.leaves(straight["lora"])):
    np.testing.assert_array_equal(got, want)
  assert [(x["step"], x["loss"]) for x in read(tmp_path / "b")] == [(x["step"], x["loss"]) for x in a]


def test_experiment_driver_pairs_arms_per_seed(tmp_path):
  import json

  from experiments import opt_state_projection as driver

  driver.main(
    [
      "--setting",
      "lowrank",
      "--seeds",
      "2",
      "--ranks",
      "4",
      "2",
      "--steps",
      "12",
      "--warmup",
      "2",
      "--stage_warmup",
      "3",
      "--extra_steps",
      "4",
      "--min_steps",
      "3",
      "--dim",
      "8",
      "--protocols",
      "cont_squeeze",
      "--modes",
      "reset",
      "project",
      "reset_no_warmup",
      "--out",
      str(tmp_path),
    ]
  )
  result = json.loads((tmp_path / "results.json").read_text())
  runs = {(r["mode"], r["seed"]): r for r in result["runs"]}
  assert len(runs) == 6 and all(len(r["loss_curve"]) == 12 for r in runs.values())
  # Same seed, same data and init: the arms agree until the squeeze (step 8) and differ after it.
  for seed in (0, 1):
    assert runs["reset", seed]["loss_curve"][:8] == runs["project", seed]["loss_curve"][:8]
    assert runs["reset", seed]["loss_curve"][8:] != runs["project", seed]["loss_curve"][8:]
  summary = result["summary"]["cont_squeeze"]["eval_loss"]["project"]
  diffs = [runs["project", s]["eval_loss"] - runs["reset", s]["eval_loss"] for s in (0, 1)]
  assert summary["minus_reset"]["mean"] == pytest.approx(np.mean(diffs))
  assert summary["minus_reset"]["ci95"][0] <= summary["minus_reset"]["mean"] <= summary["minus_reset"]["ci95"][1]
  assert (tmp_path / "summary.png").stat().st_size > 0
