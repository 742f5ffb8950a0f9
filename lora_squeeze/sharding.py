"""Device mesh, shardings and multi-host start-up: one code path for 1 CPU, n GPUs or a TPU slice.

The mesh has two axes:
  "data": data parallelism; the batch is split over it.
  "fsdp": fully-sharded data parallelism; the batch is split over it too, and every large
          parameter (base weights, and LoRA/optimizer leaves when large) is split along its
          largest dimension that the axis size divides. XLA inserts the all-gathers.
With fsdp = 1 every parameter is replicated and the mesh is plain data parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_squeeze import multihost
from lora_squeeze import validation
from lora_squeeze.errors import UserInputError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

multiprocess_env = multihost.multiprocess_env


def maybe_initialize_distributed(
  *,
  enabled: bool | None = None,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  timeout_s: int = 300,
) -> bool:
  """Calls jax.distributed.initialize when configured (enabled=True, or any argument given) or,
  with enabled=None, when the environment says multi-process; must run before any other JAX call.
  Returns whether it ran.

  Arguments left None come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else
  are auto-detected by JAX (TPU pods, SLURM, Open MPI). See lora_squeeze.multihost.initialize:
  bad values and unreachable coordinators are a UserInputError within `timeout_s`.
  """
  return multihost.initialize(
    enabled=enabled,
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    timeout_s=timeout_s,
  )


def make_mesh(*, data: int = -1, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all devices of all processes).

  Args:
      data: size of the data axis; -1 = all devices not used by fsdp.
      fsdp: size of the fsdp axis.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  validation.positive_int("mesh fsdp size", fsdp)
  if data != -1 and not (validation.is_integer(data) and data >= 1):
    validation.fail("mesh data size", data, "a positive integer or -1")
  where = f"{n} devices" + (f" of {jax.process_count()} processes" if jax.process_count() > 1 else "")
  if data == -1:
    if n % fsdp:
      raise UserInputError(f"mesh fsdp={fsdp} does not divide the {where}; allowed: a divisor of {n}")
    data = n // fsdp
  if data * fsdp != n:
    raise UserInputError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but the job has {where}")
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def param_spec(shape: tuple[int, ...], fsdp: int, *, min_size: int) -> PartitionSpec:
  """FSDP spec: the largest dimension divisible by `fsdp` goes on the fsdp axis.

  Leaves smaller than `min_size` scalars (norm scales, small LoRA factors) stay replicated: their
  all-gather would cost more than the memory it saves.
  """
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return PartitionSpec()
  axis = max(candidates, key=lambda i: (shape[i], -i))
  # Trailing None axes are left out: that is how XLA reports output shardings, so a parameter
  # updated by a jitted step keeps an equal sharding (and the step its compilation).
  return PartitionSpec(*([None] * axis), FSDP_AXIS)


def param_shardings(tree: Any, mesh: Mesh, *, min_size: int = 1 << 16) -> Any:
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs), see `param_spec`."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size=min_size)), tree)


def shard_params(tree: Any, mesh: Mesh, *, min_size: int = 1 << 16) -> Any:
  """Places a parameter tree on the mesh (see `param_spec`); see `place` for multi-process jobs."""
  return place(tree, param_shardings(tree, mesh, min_size=min_size))


def place(tree: Any, shardings: Any) -> Any:
  """`tree` (an array or a pytree of them) on `shardings` (a sharding or a matching tree), where
  every process holds the same whole value of each leaf (weights it loaded, a state it computed
  from the same key) or the leaf is already a global array.

  One process: `jax.device_put`, batched over the tree. In a multi-process job, `jax.device_put`
  of a process-local value onto a sharding spanning all processes first checks that the value is
  equal on every process by all-gathering it whole (`multihost_utils.assert_equal`): for the base
  weights that is every process receiving a copy of the model from every other one, and one
  compiled all-gather per shape. Here each process instead cuts its devices' slices out of its own
  copy (`jax.make_array_from_callback`): no collective.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  return jax.tree.map(_place_leaf, tree, shardings)


def _place_leaf(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """One leaf of `place` in a multi-process job."""
  if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
    return jax.device_put(x, sharding)  # a global array is resharded; typed keys have no host form
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global batch (every process computes the same one) -> arrays split over the mesh.

  Each process contributes its contiguous block of rows; the batch size must be divisible by
  the number of devices.
  """
  sharding = batch_sharding(mesh)
  n_devices = mesh.devices.size
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.shape[0] % n_devices:
      raise ValueError(f"batch size {value.shape[0]} ({name}) is not divisible by the {n_devices} devices of the mesh")
    rows = value.shape[0] // jax.process_count()
    local = value[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    out[name] = jax.make_array_from_process_local_data(sharding, local, value.shape)
  return out
