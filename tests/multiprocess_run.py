"""One process of the multi-process test run (tests/test_multiprocess.py), or the single-process
reference when imported: the tiny Gemma 3 on the copy task, a plan with a squeeze and
evaluations, every LoRA leaf split over an fsdp axis that spans all processes of the job.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
        python tests/multiprocess_run.py WORKDIR [SECONDS_PER_BATCH [FSDP]] [--quick]

--quick runs a 2-step stage, a squeeze and an evaluation (the cluster auto-detection tests) and
nothing else. Otherwise, after the plan, every process squeezes the final adapter once more on
the mesh and prints one line "sharded squeeze check: {json}" comparing it with the unsharded
squeeze of its gathered copy, and one line "placement check: {json}" (see placement_check).
"""

import json
import pathlib
import sys
import time

STEPS_1, STEPS_2 = 6, 4


class SlowBatches:
  """Batches that take a while to load, so that a test can kill the run mid-stage."""

  def __init__(self, inner, seconds: float):
    self.inner, self.seconds = inner, seconds

  def __getitem__(self, i):
    time.sleep(self.seconds)
    return self.inner[i]


def plan(quick: bool = False):
  from lora_squeeze.protocols import Evaluate, Squeeze, Stage

  if quick:
    return (Stage(rank=4, steps=2, lr=0.5, warmup=1), Squeeze(rank=2), Evaluate(tag="r4_to_r2"))
  return (
    Stage(rank=4, steps=STEPS_1, lr=0.5, warmup=2),
    Evaluate(tag="r4"),
    Squeeze(rank=2),
    Evaluate(tag="r4_to_r2"),
    Stage(rank=2, steps=STEPS_2, lr=0.5, warmup=2),
    Evaluate(tag="r4_to_r2_plus4"),
  )


def run(workdir, *, seconds_per_batch: float = 0.0, printer=print, fsdp: int | None = None, quick: bool = False):
  """Executes plan(quick) into `workdir` on a (data=1, fsdp=all devices) mesh; returns
  (execute_plan's result, the mesh)."""
  import jax
  import numpy as np

  from lora_squeeze import model as model_lib
  from lora_squeeze import sharding, train
  from test_train import MAX_TARGETS, copy_examples

  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  model_for_rank = lambda r: model_lib.make_model("tiny", lora_rank=r)
  mesh = sharding.make_mesh(data=-1 if fsdp else 1, fsdp=fsdp or jax.device_count())
  held_out = sharding.shard_batch(
    {k: np.stack([e[k] for e in copy_examples(8, 1)]) for k in ("tokens", "target_mask")}, mesh
  )

  # Jitted: in a multi-process job every eager op is a compiled program and a collective.
  loss_fn = jax.jit(train.loss_fn, static_argnames=("model", "max_targets"))

  def evaluate(rank, lora):
    loss, _ = loss_fn(lora, base, held_out, model=model_for_rank(rank), max_targets=MAX_TARGETS)
    return {"target_prob": float(np.exp(-float(loss))), "loss": float(loss)}

  batches = train.batch_dataset(copy_examples(32, 0), batch_size=4, seed=1)
  setup = train.RunSetup(
    model_for_rank=model_for_rank,
    base_params=base,
    batches=SlowBatches(batches, seconds_per_batch) if seconds_per_batch else batches,
    workdir=pathlib.Path(workdir),
    key=jax.random.key(7),
    max_targets=MAX_TARGETS,
    evaluate=evaluate,
    run_config={"test": "multiprocess"},
    adapter_metadata={"model": "tiny"},
    mesh=mesh,
    checkpoint_every=2,
    log_every=3,
    printer=printer,
    min_shard_size=1,
  )  # min_shard_size=1: every LoRA leaf is split
  return train.execute_plan(plan(quick), setup), mesh


def sharded_squeeze_check(lora, mesh) -> dict:
  """squeeze_on_mesh of `lora` (split over all processes) against lora_tree.squeeze_tree of its
  gathered copy, per precision (float64: Gram all-reduces; float32, the TPU path: a TSQR): the
  largest difference, whether the output shardings are the declared ones, and how many output
  factors are split across processes."""
  import jax
  import numpy as np

  from lora_squeeze import lora_tree, multihost, sharded_squeeze, sharding

  host = multihost.gather_to_host(lora)
  checks = {}
  for precision in ("float64", "float32"):
    got, report = sharded_squeeze.squeeze_on_mesh(lora, 1, mesh=mesh, precision=precision, min_shard_size=1)
    want, want_report = lora_tree.squeeze_tree(host, 1, precision=precision)
    leaves, declared = jax.tree.leaves(got), jax.tree.leaves(sharding.param_shardings(got, mesh, min_size=1))
    checks[precision] = {
      "max_diff": max(
        float(np.max(np.abs(x - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(multihost.gather_to_host(got)), jax.tree.leaves(want))
      ),
      "retention": [report.overall_retention, want_report.overall_retention],
      "as_declared": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, declared)),
      "split_across_processes": sum(
        not x.sharding.is_fully_replicated and len({d.process_index for d in x.sharding.device_set}) > 1 for x in leaves
      ),
      "leaves": len(leaves),
    }
  return {"process": [jax.process_index(), jax.process_count()], "precisions": checks}


def placement_check(mesh) -> list:
  """sharding.place of a value that differs between processes (each fills its copy with its
  process index), split over the fsdp axis: each process's devices must hold slices of that
  process's own copy, without the cross-process equality check (an all-gather of the whole value)
  that jax.device_put makes, and which would fail here. Returns the gathered global array."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from lora_squeeze import multihost, sharding

  n = mesh.shape[sharding.FSDP_AXIS]
  local = np.full((2 * n, 3), jax.process_index(), np.float32)
  placed = sharding.place(local, NamedSharding(mesh, PartitionSpec(sharding.FSDP_AXIS)))
  return multihost.gather_to_host(placed).tolist()


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  from lora_squeeze import sharding
  from lora_squeeze.errors import UserInputError

  args = [a for a in sys.argv[1:] if a != "--quick"]
  try:
    sharding.maybe_initialize_distributed(timeout_s=60)
    result, mesh = run(
      args[0],
      seconds_per_batch=float(args[1]) if len(args) > 1 else 0.0,
      fsdp=int(args[2]) if len(args) > 2 else None,
      printer=lambda line: print(line, flush=True),
      quick="--quick" in sys.argv,
    )
    if "--quick" not in sys.argv:
      print(f"sharded squeeze check: {json.dumps(sharded_squeeze_check(result['lora'], mesh))}", flush=True)
      print(f"placement check: {json.dumps(placement_check(mesh))}", flush=True)
  except UserInputError as e:
    sys.exit(f"multiprocess_run: {e}")
