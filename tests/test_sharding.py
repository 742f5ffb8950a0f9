"""Mesh and shardings: a step on an 8-device (2 data x 4 fsdp) CPU mesh equals the 1-device step."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec

from lora_squeeze import sharding
from lora_squeeze.errors import UserInputError


def test_multiprocess_env():
  assert not sharding.multiprocess_env({})
  assert not sharding.multiprocess_env({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
  assert sharding.multiprocess_env({"SLURM_NTASKS": "4"})
  assert sharding.multiprocess_env({"OMPI_COMM_WORLD_SIZE": "2"})
  assert sharding.multiprocess_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert sharding.multiprocess_env({"TPU_WORKER_HOSTNAMES": "w0,w1"})


def test_single_process_does_not_initialize_distributed(monkeypatch):
  for name in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
  ):
    monkeypatch.delenv(name, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  assert sharding.maybe_initialize_distributed(enabled=False) is False


def test_param_spec_shards_the_largest_divisible_axis():
  assert sharding.param_spec((262_144, 640), 4, min_size=1) == PartitionSpec("fsdp")
  assert sharding.param_spec((4, 640, 256), 4, min_size=1) == PartitionSpec(None, "fsdp")
  assert sharding.param_spec((3, 5), 4, min_size=1) == PartitionSpec()  # nothing divisible
  assert sharding.param_spec((640, 16), 4, min_size=1 << 16) == PartitionSpec()  # small: replicated
  assert sharding.param_spec((640, 640), 1, min_size=1) == PartitionSpec()  # no fsdp axis


def test_make_mesh_bad_sizes():
  n = len(jax.devices())
  assert sharding.make_mesh().shape == {"data": n, "fsdp": 1}
  with pytest.raises(UserInputError, match=rf"mesh data=3 x fsdp=1 = 3 devices, but the job has {n} devices"):
    sharding.make_mesh(data=3)
  with pytest.raises(UserInputError, match="mesh fsdp size must be a positive integer, got 0"):
    sharding.make_mesh(fsdp=0)


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, "tests")
    from lora_squeeze import model as model_lib, optim, sharding, train
    from test_train import copy_examples, STAGE_LR, STAGE_WARMUP

    assert len(jax.devices()) == 8, jax.devices()
    base = model_lib.init_base_params("tiny", key=jax.random.key(0))
    model = model_lib.make_model("tiny", lora_rank=4)
    lora = model_lib.init_lora_params(model, base, key=jax.random.key(1))
    examples = copy_examples(8, 3)
    batch = {k: np.stack([e[k] for e in examples]) for k in ("tokens", "target_mask")}
    step = train.make_train_step(model, lr=STAGE_LR, warmup=STAGE_WARMUP, max_targets=8)

    def run(mesh, min_size):
      b = sharding.shard_params(base, mesh, min_size=min_size)
      # A copy: on one device device_put may alias `lora`, and the step donates its state.
      state = train.init_train_state(sharding.shard_params(jax.tree.map(jnp.copy, lora), mesh, min_size=min_size),
                                     optim.make_optimizer(STAGE_LR, STAGE_WARMUP), mesh)
      losses = []
      for _ in range(3):
        state, metrics = step(state, b, sharding.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
      return losses, state, b

    one, state1, _ = run(sharding.make_mesh(devices=jax.devices()[:1]), 1 << 16)
    many, state8, b8 = run(sharding.make_mesh(data=2, fsdp=4), 64)
    embed = b8["embedder"]["input_embedding"].sharding
    diffs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(state1.lora), jax.tree.leaves(state8.lora))]
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(state1.lora))
    lora_sharded = any(len(x.sharding.device_set) == 8 and "fsdp" in str(x.sharding.spec)
                       for x in jax.tree.leaves(state8.lora))
    try:
      sharding.shard_batch({"tokens": np.zeros((6, 4))}, sharding.make_mesh())
      not_divisible = ""
    except ValueError as e:
      not_divisible = str(e)
    print(json.dumps({"compilations": train._train_step._cache_size(), "not_divisible": not_divisible, "one": one, "many": many, "max_diff": max(diffs), "scale": scale,
                      "embed_spec": str(embed.spec), "embed_devices": len(embed.device_set),
                      "lora_sharded": lora_sharded}))
""")


def test_sharded_step_equals_single_device_step():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["embed_devices"] == 8 and "fsdp" in result["embed_spec"]
  assert result["lora_sharded"]
  assert result["compilations"] == 2  # one per mesh: the state's shardings are stable across steps
  assert result["not_divisible"] == "batch size 6 (tokens) is not divisible by the 8 devices of the mesh"
  assert result["one"][-1] < result["one"][0]
  for a, b in zip(result["one"], result["many"]):
    assert a == pytest.approx(b, rel=1e-5)
  assert result["max_diff"] <= 1e-4 * result["scale"], result
