"""The squeeze inside a run: an adapter sharded over the mesh, squeezed in one compiled call.

Between two stages the adapter lives on the mesh, its factors split over the fsdp axis
(sharding.param_spec), possibly across processes. ``squeeze_on_mesh`` squeezes it where it lies:
one ``jax.jit`` with declared ``in_shardings`` (sharding.param_shardings of the adapter) and
``out_shardings`` (the same rule for the squeezed adapter, i.e. what the next stage's train step
is compiled for), calling the public functions of ``lora_squeeze.squeeze`` on every module.
No factor is gathered on one device or host; only the singular values (n_modules × r_src) and
the finiteness flags come back to the host, for the report and the NaN check.
``compile_on_mesh`` compiles the same program without running it (the runner's precompiler).

How the factors stay split (qr_core, in both precisions):

* qr_core sees a module as a (m, r_src) @ b (r_src, n), but gemma stores a as (*in_dims, r_src)
  and b as (r_src, *out_dims), with the split dimension often not the first one (e.g. head_dim of
  a (heads, head_dim, r)). Merging the dimensions as they are would interleave the shards, and
  XLA would have to move data to make contiguous row blocks. Nothing qr_core computes depends on
  the order of a's rows or b's columns (aᵀa, a·X; b bᵀ, Y·b; an R with non-negative diagonal),
  so the split dimension is moved to the front before merging: the matrix is split into
  contiguous blocks, and a_t = a·X comes out split like a. The inverse permutation restores the
  gemma layout.
* float64 (the default on CPU and GPU): each device forms its part of the Gram matrix, one
  all-reduce of r_src × r_src sums them.
* float32 (the default on TPU, which has no float64): a TSQR (``_tsqr_root``). Each device takes
  the Householder R of its row block, the p blocks (r_src × r_src each) are all-gathered and
  factored again; that R is the factor's, as the unsharded Householder QR would give it.
* The r_src × r_src algebra (Cholesky or the second QR, the SVD of the core) runs replicated on
  every device.
* Modules of equal shape are stacked into one batch (one compiled qr_core per shape, not per
  module), grouped and keyed as ``lora_tree.squeeze_tree`` does, so that the randomized methods
  draw the same random numbers and every method gives the same factors as the unsharded squeeze.

Where factors do get gathered: only qr_core is built to keep them split. "svd" and "rsvd" form
ΔW; for rsvd_factored XLA all-gathers its (m, r_tgt + k_o) sketches and some whole factors (read
from its optimized HLO); all on the devices, never on a host. A factor split along its rank axis
(r_src its largest dimension) is squeezed as XLA partitions it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_squeeze import lora_tree
from lora_squeeze import sharding as sharding_lib
from lora_squeeze import squeeze, squeeze_qr_core

_REPLICATED = PartitionSpec()


def _split_axis(spec: PartitionSpec) -> int | None:
  """The axis of a factor split over the fsdp axis by sharding.param_spec (None: replicated)."""
  for axis, name in enumerate(spec):
    if name == sharding_lib.FSDP_AXIS:
      return axis
  return None


def _to_front(ndim: int, axis: int | None, first: int) -> tuple[int, ...]:
  """The permutation of `ndim` axes that moves `axis` to position `first` (identity without one)."""
  order = list(range(ndim))
  if axis is not None and axis >= first:
    order.insert(first, order.pop(axis))
  return tuple(order)


def _layout(modules: Mapping[str, Mapping[str, Any]], rank: int, shardings: Mapping[str, Any], *, permute: bool):
  """The static description of a squeeze: groups of modules that share one batched call.

  Groups are keyed and ordered like lora_tree.squeeze_tree's (matrix shapes and dtypes, in the
  modules' natural order), so group g gets the same PRNG key there and here. Per module: path,
  gemma shapes, and the permutations that bring the split dimension to the front (identities
  unless `permute`).
  """
  groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
  for path, module in modules.items():
    a, b = module["a"], module["b"]
    in_dims, r_src, out_dims = tuple(a.shape[:-1]), int(a.shape[-1]), tuple(b.shape[1:])
    m, n = math.prod(in_dims), math.prod(out_dims)
    signature = ((m, r_src), (r_src, n), str(jnp.dtype(a.dtype)), str(jnp.dtype(b.dtype)))
    split_a = _split_axis(shardings[path]["a"].spec)
    split_b = _split_axis(shardings[path]["b"].spec)
    rows = permute and split_a is not None and split_a < a.ndim - 1  # an in-dim of a is split, not its rank
    cols = permute and split_b is not None and split_b > 0  # an out-dim of b is split
    perm_a = _to_front(a.ndim, split_a if rows else None, 0)
    perm_b = _to_front(b.ndim, split_b if cols else None, 1)
    groups.setdefault(signature, []).append((path, in_dims, out_dims, perm_a, perm_b, rows, cols))
  layout = []
  for members in groups.values():
    # The stacked matrices are declared split when every member's factor is (the usual case: equal
    # shapes get equal shardings); otherwise XLA chooses.
    rows, cols = all(m[5] for m in members), all(m[6] for m in members)
    layout.append((rank, rows, cols, tuple(m[:5] for m in members)))
  return tuple(layout)


def _split_matrices(x: jax.Array, mesh: Mesh, axis: int, split: bool) -> jax.Array:
  """x (g, p, q) declared split over the fsdp axis along `axis` (its rows or columns) when `split`."""
  if not split:
    return x
  spec = [None, None, None]
  spec[axis] = sharding_lib.FSDP_AXIS
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _tsqr_root(x: jax.Array, side: str, mesh: Mesh) -> jax.Array:
  """R (g, r, r) float32 of factors split over the fsdp axis (a (g, m, r) by rows, b (g, r, n) by
  columns), with no factor gathered: a TSQR (communication-avoiding QR).

  Device i holds the row block X_i (m/p × r) of X = a (or bᵀ) and takes its Householder QR,
  X_i = Q_i R_i. Stacking the p blocks R_i (r × r each, all-gathered: p·r × r) and factoring them
  again, [R_1; …; R_p] = Q₂ R, gives X = diag(Q_1, …, Q_p) Q₂ R with orthonormal columns in front
  of R: R is X's R factor, and X's Q restricted to device i is Q_i Q₂[i·r:(i+1)·r]. Alg. 2 never
  forms Q (a_t = a·(R_Bᵀ V_r S_r^{-½}) is a local product on each row block), so only R is kept.
  Both Householder steps are backward stable, and both R's have non-negative diagonals
  (squeeze_qr_core.positive_diagonal): R equals the unsharded path's to float32 rounding.
  """
  split = (
    PartitionSpec(None, sharding_lib.FSDP_AXIS, None)
    if side == "a"
    else PartitionSpec(None, None, sharding_lib.FSDP_AXIS)
  )

  def tsqr(block):
    with jax.default_matmul_precision("highest"):
      local = squeeze_qr_core.qr_root_f32(block, side)  # (g, r, r)
      stacked = jax.lax.all_gather(local, sharding_lib.FSDP_AXIS, axis=1, tiled=True, to="invarying")  # (g, p·r, r)
      return squeeze_qr_core.qr_root_f32(stacked, "a")

  return jax.shard_map(tsqr, mesh=mesh, in_specs=split, out_specs=_REPLICATED)(x)


def _root_f32(x: jax.Array, side: str, *, mesh: Mesh, split: Mapping[str, bool]) -> jax.Array:
  """The float32 path's R of a stacked factor: a TSQR where it is split over the devices,
  otherwise the Householder QR of the whole (replicated) factor."""
  return _tsqr_root(x, side, mesh) if split[side] else squeeze_qr_core.qr_root_f32(x, side)


def _squeeze_groups(factors, keys, *, layout, method, precision, mesh):
  """The compiled body: every group squeezed with lora_squeeze.squeeze's public functions.

  factors: per group, per module, (a, b) in the gemma layout. keys: per group, a PRNG key (or
  None for the deterministic methods). Returns per group the squeezed (a_t, b_t) per module
  (gemma layout), the singular values (len(group), r_src) and the finiteness flags (len(group),).
  """
  out = []
  for group, (r_tgt, rows, cols, members), key in zip(factors, layout, keys):
    a = jnp.stack([jnp.transpose(a, m[3]).reshape(-1, a.shape[-1]) for (a, _), m in zip(group, members)])
    b = jnp.stack([jnp.transpose(b, m[4]).reshape(b.shape[0], -1) for (_, b), m in zip(group, members)])
    a, b = _split_matrices(a, mesh, 1, rows), _split_matrices(b, mesh, 2, cols)
    finite = jnp.all(jnp.isfinite(a), axis=(1, 2)), jnp.all(jnp.isfinite(b), axis=(1, 2))
    if method == "qr_core":
      root_f32 = functools.partial(_root_f32, mesh=mesh, split={"a": rows, "b": cols})
      a_t, b_t, s, _ = squeeze_qr_core.qr_core_batched(
        a, b, None, rank=r_tgt, core="svd", oversample=0, power_iters=0, precision=precision, root_f32=root_f32
      )
    else:
      a_t, b_t, _ = squeeze.squeeze_factors(a, b, r_tgt, method=method, key=key, precision=precision)
      s = squeeze.singular_values(a, b, precision=precision)
    modules = []
    for i, (_, in_dims, out_dims, perm_a, perm_b) in enumerate(members):
      shape_a = tuple(in_dims[p] for p in perm_a[:-1]) + (r_tgt,)
      shape_b = (r_tgt,) + tuple(out_dims[p - 1] for p in perm_b[1:])
      modules.append(
        (
          jnp.transpose(a_t[i].reshape(shape_a), np.argsort(perm_a)),
          jnp.transpose(b_t[i].reshape(shape_b), np.argsort(perm_b)),
        )
      )
    out.append((tuple(modules), s, finite))
  return tuple(out)


@functools.lru_cache(maxsize=32)
def _compiled(layout, method: str, precision: str, mesh: Mesh, in_shardings, out_shardings, key_impl):
  """The jitted squeeze of one layout (cached: the next squeeze of the same shapes reuses it)."""

  def sharded_squeeze(factors, key_data):  # the name of the compiled program (in XLA dumps)
    keys = tuple(jax.random.wrap_key_data(k, impl=key_impl) if key_impl else k for k in key_data)
    keys = keys or (None,) * len(layout)
    return _squeeze_groups(factors, keys, layout=layout, method=method, precision=precision, mesh=mesh)

  return jax.jit(sharded_squeeze, in_shardings=in_shardings, out_shardings=out_shardings)


def _key_impl(key: jax.Array):
  """The PRNG impl of a typed key (None for a raw uint32 key)."""
  return jax.random.key_impl(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else None


def _split_key_data(key: jax.Array, n_groups: int) -> jax.Array:
  """One key per group, as lora_tree.squeeze_tree splits them, as raw key data."""
  keys = jax.random.split(key, n_groups)
  return jax.random.key_data(keys) if _key_impl(key) is not None else keys


def _prepare(lora, rank, *, mesh, method, key, precision, min_shard_size):
  """Checks the arguments; returns (modules, layout, jitted function, its factor shardings,
  whether it takes keys, replicated sharding)."""
  if method not in squeeze.METHODS:
    raise ValueError(f"method must be one of {squeeze.METHODS}, got {method!r}")
  rank = squeeze.check_rank(rank)
  precision = squeeze.resolve_precision(precision)
  keyed = method in ("rsvd", "rsvd_factored")
  if keyed and key is None:
    raise ValueError(f"method {method!r} is randomized and needs a PRNG key, got key=None")
  modules = lora_tree.find_lora_modules(lora)
  for path, module in modules.items():
    a, b = module["a"], module["b"]
    try:
      squeeze.validate_factors(
        jax.ShapeDtypeStruct((math.prod(a.shape[:-1]), a.shape[-1]), a.dtype),
        jax.ShapeDtypeStruct((b.shape[0], math.prod(b.shape[1:])), b.dtype),
      )
    except ValueError as err:
      raise ValueError(f"{path}: {err}") from err
  shardings = {
    path: sharding_lib.param_shardings(dict(module), mesh, min_size=min_shard_size) for path, module in modules.items()
  }
  # Only qr_core is blind to the order of rows and columns: its R factors (Cholesky in float64,
  # Householder or TSQR with a non-negative diagonal in float32) are the same for any order. The
  # randomized methods would draw their sketch against permuted columns; "svd" gathers anyway.
  permute = method == "qr_core"
  layout = _layout(modules, rank, shardings, permute=permute)
  fsdp = mesh.shape[sharding_lib.FSDP_AXIS]
  replicated = NamedSharding(mesh, _REPLICATED)
  in_shardings, out_shardings = [], []
  for r_tgt, _, _, members in layout:
    in_shardings.append(tuple((shardings[m[0]]["a"], shardings[m[0]]["b"]) for m in members))
    squeezed = []
    for _, in_dims, out_dims, _, _ in members:
      spec_a = sharding_lib.param_spec((*in_dims, r_tgt), fsdp, min_size=min_shard_size)
      spec_b = sharding_lib.param_spec((r_tgt, *out_dims), fsdp, min_size=min_shard_size)
      squeezed.append((NamedSharding(mesh, spec_a), NamedSharding(mesh, spec_b)))
    out_shardings.append((tuple(squeezed), replicated, (replicated, replicated)))
  in_shardings = tuple(in_shardings)
  key_shardings = (replicated,) * len(layout) if keyed else ()
  impl = _key_impl(key) if keyed else None
  fn = _compiled(layout, method, precision, mesh, (in_shardings, key_shardings), tuple(out_shardings), impl)
  return modules, layout, fn, in_shardings, keyed, replicated


def _factors(modules, layout):
  return tuple(tuple((modules[m[0]]["a"], modules[m[0]]["b"]) for m in members) for *_, members in layout)


def squeeze_on_mesh(
  lora: Any,
  rank: int,
  *,
  mesh: Mesh,
  method: str = "qr_core",
  key: jax.Array | None = None,
  precision: str = "auto",
  min_shard_size: int = 1 << 16,
):
  """Squeezes every LoRA module of an adapter on the mesh (see the module docstring).

  The result equals ``lora_tree.squeeze_tree(lora, rank, method=method, key=key,
  precision=precision)`` (to float rounding: sharded sums add in another order), with every
  factor placed by ``sharding.param_shardings(..., min_size=min_shard_size)``, as the train
  step expects. A collective in a multi-process job: every process calls it with the same
  arguments.

  Args:
    lora: the adapter (nested mappings of {'a': (*in_dims, r_src), 'b': (r_src, *out_dims)}),
      placed on `mesh` or not (it is put there first).
    rank: the target rank of every module (int ≥ 1).
    mesh: the run's (data, fsdp) mesh.
    method, key, precision: as in lora_tree.squeeze_tree.
    min_shard_size: sharding.param_shardings' threshold (the run's min_shard_size).

  Returns:
    (squeezed adapter on the mesh, lora_tree.SqueezeReport).

  Raises:
    ValueError: a bad rank, method, precision, missing key, or a module with non-finite values.
  """
  modules, layout, fn, in_shardings, keyed, replicated = _prepare(
    lora, rank, mesh=mesh, method=method, key=key, precision=precision, min_shard_size=min_shard_size
  )
  # A no-op for factors already placed so; host factors are cut per process (sharding.place).
  factors = sharding_lib.place(_factors(modules, layout), in_shardings)
  key_data = ()
  if keyed:
    # Split on the host and placed replicated: every process holds the same keys, wherever `key` is.
    data = np.asarray(jax.device_get(_split_key_data(key, len(layout))))
    key_data = tuple(sharding_lib.place(d, replicated) for d in data)
  # OpenBLAS (XLA:CPU's LAPACK) on one thread: its spinning workers made the r × r
  # decompositions ~5x slower on shared cores (see lora_squeeze.squeeze).
  with jax.enable_x64(True), threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    results = jax.block_until_ready(fn(factors, key_data))
  return _assemble(lora, modules, layout, results, method)


def compile_on_mesh(
  lora: Any,
  rank: int,
  *,
  mesh: Mesh,
  method: str = "qr_core",
  key: jax.Array | None = None,
  precision: str = "auto",
  min_shard_size: int = 1 << 16,
) -> jax.stages.Compiled:
  """Compiles what ``squeeze_on_mesh`` with these arguments runs, without running it.

  For the runner's precompiler (a background thread while a stage trains): it starts no
  computation and so no collective, which another thread could interleave with the train
  step's in a different order on different processes. `lora` may hold jax.ShapeDtypeStructs.
  Returns the compiled program (``.as_text()``: XLA's optimized HLO, with its collectives).
  """
  modules, layout, fn, in_shardings, keyed, replicated = _prepare(
    lora, rank, mesh=mesh, method=method, key=key, precision=precision, min_shard_size=min_shard_size
  )
  factors = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _factors(modules, layout), in_shardings
  )
  key_data = ()
  if keyed:
    data = jax.eval_shape(functools.partial(_split_key_data, n_groups=len(layout)), key)
    key_data = tuple(jax.ShapeDtypeStruct(data.shape[1:], data.dtype, sharding=replicated) for _ in layout)
  with jax.enable_x64(True):
    return fn.lower(factors, key_data).compile()


def _assemble(lora, modules, layout, results, method):
  """The squeezed adapter (lora with its modules replaced) and the SqueezeReport; ValueError naming
  the first module whose factors hold NaN or Inf."""
  new_modules, reports = {}, {}
  kept_total, energy_total = 0.0, 0.0
  for (r_tgt, _, _, members), (squeezed, s, (finite_a, finite_b)) in zip(layout, results):
    # Small replicated arrays: every process reads its own copy.
    s, finite_a, finite_b = np.asarray(s), np.asarray(finite_a), np.asarray(finite_b)
    for i, member in enumerate(members):
      path = member[0]
      for operand, finite in (("a", finite_a), ("b", finite_b)):
        if not finite[i]:
          raise ValueError(f"{path}: {operand} contains non-finite values (NaN or Inf)")
      new_modules[path] = {"a": squeezed[i][0], "b": squeezed[i][1]}
      energy = np.square(s[i].astype(np.float64))
      kept, total = float(energy[:r_tgt].sum()), float(energy.sum())
      kept_total, energy_total = kept_total + kept, energy_total + total
      reports[path] = lora_tree.ModuleReport(
        path=path,
        r_src=int(modules[path]["a"].shape[-1]),
        r_tgt=r_tgt,
        singular_values=s[i],
        retention=kept / total if total > 0 else 1.0,
      )
  report = lora_tree.SqueezeReport(
    modules=tuple(reports[path] for path in modules),
    overall_retention=kept_total / energy_total if energy_total > 0 else 1.0,
    method=method,
  )
  return _replace(lora, new_modules, ()), report


def _replace(node: Any, new_modules: Mapping[str, Any], prefix: tuple[str, ...]) -> Any:
  """A copy of `node` with the LoRA modules at the paths of `new_modules` replaced."""
  if not isinstance(node, Mapping):
    return node
  path = "/".join(prefix)
  if path in new_modules:
    return type(node)(new_modules[path])
  return type(node)({name: _replace(child, new_modules, (*prefix, str(name))) for name, child in node.items()})
