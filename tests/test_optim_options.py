"""The optimizer options (lora_squeeze.optim.OptimizerOptions: Adafactor's settings, AdamW) and the
adapter-size record."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import adapter_size, optim


@pytest.mark.parametrize("scale", [True, False])
def test_first_update_of_a_zero_factor(scale):
  """With parameter scaling a zero-initialised b moves at most lr * 1e-3 per entry; without it, ~lr."""
  lr = 0.01
  params = {"a": jnp.ones((8, 4)) * 0.05, "b": jnp.zeros((4, 16))}
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape), params)
  tx = optim.make_optimizer(lr, 0, optim.OptimizerOptions(multiply_by_parameter_scale=scale))
  updates, _ = tx.update(grads, tx.init(params), params)
  biggest = float(jnp.max(jnp.abs(updates["b"])))
  if scale:
    assert biggest <= lr * 1e-3 * (1 + 1e-5)
  else:
    assert 0.3 * lr < biggest <= lr * (1 + 1e-5)  # update clipping at RMS 1 bounds it by ~lr


def test_default_options_are_optax_defaults():
  params = {"w": jnp.full((3, 5), 0.2)}
  grads = {"w": jnp.arange(15.0).reshape(3, 5)}
  import optax

  ours = optim.make_optimizer(0.01, 0)
  ref = optax.adafactor(learning_rate=0.01)
  np.testing.assert_allclose(
    ours.update(grads, ours.init(params), params)[0]["w"],
    ref.update(grads, ref.init(params), params)[0]["w"],
    rtol=1e-6,
  )


def test_adamw_steps_match_a_numpy_adamw_under_the_warmup():
  """optim.name = adamw: bias-corrected Adam moments with b1/b2/eps, decoupled weight decay, and
  the trainer's warmup schedule, against float64 numpy over a few steps."""
  lr, warmup, b1, b2, eps, wd = 0.05, 3, 0.8, 0.95, 1e-3, 0.2
  options = optim.OptimizerOptions(name="adamw", b1=b1, b2=b2, eps=eps, weight_decay=wd)
  tx = optim.make_optimizer(lr, warmup, options)
  rng = np.random.default_rng(0)
  param = rng.normal(size=(4, 5))
  params, state = {"w": jnp.asarray(param, jnp.float32)}, None
  state = tx.init(params)
  mu, nu = np.zeros_like(param), np.zeros_like(param)
  for t in range(5):
    g = rng.normal(size=param.shape)
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = {"w": params["w"] + updates["w"]}
    mu, nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g * g
    adam = (mu / (1 - b1 ** (t + 1))) / (np.sqrt(nu / (1 - b2 ** (t + 1))) + eps)
    param = param - lr * min(1.0, (t + 1) / warmup) * (adam + wd * param)
    np.testing.assert_allclose(params["w"], param, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"multiply_by_parameter_scale": "yes"}, "multiply_by_parameter_scale must be true or false, got 'yes'"),
    ({"clipping_threshold": 0.0}, "clipping_threshold must be None or a number > 0, got 0.0"),
    ({"name": "sgd"}, r"^optim.name must be one of \('adafactor', 'adamw'\), got 'sgd'$"),
    ({"name": "adamw", "b1": 1.0}, r"^optim.b1 must be a number in \[0, 1\), got 1.0$"),
    ({"b2": -0.1}, r"^optim.b2 must be a number in \[0, 1\), got -0.1$"),
    ({"eps": 0.0}, r"^optim.eps must be a finite number > 0, got 0.0$"),
    ({"weight_decay": float("nan")}, r"^optim.weight_decay must be a finite number >= 0, got nan$"),
  ],
)
def test_bad_options_fail(kwargs, match):
  with pytest.raises(ValueError, match=match):  # UserInputError (a ValueError) for the new keys
    optim.OptimizerOptions(**kwargs)


def test_run_identity_records_only_the_chosen_optimizers_keys(tmp_path):
  """A run started before optim.name and AdamW's keys existed resumes (same identity, the real
  workdir guard); AdamW's keys tell Adafactor runs apart only once name = adamw."""
  from lora_squeeze import checkpoint, config_lib, protocols, train

  config = config_lib.base_config("direct")
  plan = protocols.direct(rank=2, steps=3, lr=0.01, warmup=1)
  before = config_lib.base_config("direct")
  for key in ("name", "b1", "b2", "eps", "weight_decay"):
    del before.optim[key]
  checkpoint.claim_workdir(tmp_path, train.run_identity(before, plan))
  assert checkpoint.claim_workdir(tmp_path, train.run_identity(config, plan))  # True: the same run, resumed
  assert train.run_identity(config, plan)["config"]["optim"] == {
    "multiply_by_parameter_scale": True,
    "clipping_threshold": 1.0,
  }
  other = config_lib.base_config("direct")
  other.optim.b1 = 0.5  # not read by Adafactor
  assert train.run_identity(other, plan) == train.run_identity(config, plan)
  other.optim.name = "adamw"
  assert train.run_identity(other, plan)["config"]["optim"] == {
    "name": "adamw",
    "b1": 0.5,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 1e-4,
  }
  with pytest.raises(checkpoint.WorkdirConflictError, match=r"config differs at config.optim"):
    checkpoint.claim_workdir(tmp_path, train.run_identity(other, plan))


def test_adapter_size_matches_the_dense_product():
  rng = np.random.default_rng(0)
  tree = {
    "layer_0": {"q": {"lora": {"a": rng.normal(size=(6, 3)), "b": rng.normal(size=(3, 2, 4))}}},
    "layer_1": {"o": {"lora": {"a": rng.normal(size=(2, 4, 3)), "b": rng.normal(size=(3, 6))}}},
  }
  dense = [
    m["a"].reshape(-1, 3) @ m["b"].reshape(3, -1) for m in (tree["layer_0"]["q"]["lora"], tree["layer_1"]["o"]["lora"])
  ]
  size = adapter_size.adapter_size(tree)
  assert size["delta_w_fro"] == pytest.approx(np.sqrt(sum(np.sum(d * d) for d in dense)))
  bs = np.concatenate([tree["layer_0"]["q"]["lora"]["b"].ravel(), tree["layer_1"]["o"]["lora"]["b"].ravel()])
  assert size["b_rms"] == pytest.approx(np.sqrt(np.mean(bs**2))) and size["modules"] == 2
  zero = {"x": {"lora": {"a": np.ones((4, 2)), "b": np.zeros((2, 4))}}}
  assert adapter_size.adapter_size(zero)["delta_w_fro"] == 0.0
  with pytest.raises(ValueError, match="no LoRA modules"):
    adapter_size.adapter_size({"w": np.ones(3)})
