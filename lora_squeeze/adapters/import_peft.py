"""`import_peft`: a PEFT LoRA adapter for Hugging Face Gemma 3 -> one of ours (Orbax adapter folder).

Per Hugging Face module, a = Aᵀ and b = scale·Bᵀ (PEFT's alpha/r or alpha/√r folded into b only, so
`a` is bit-exact and export(import(x)) gives back A, and B·scale). K and V adapters of ranks r_k, r_v
become one kv module of rank r_k + r_v,

    a = [A_kᵀ | A_vᵀ]: (D, r_k + r_v),   b[:r_k, 0] = s_k B_kᵀ,  b[r_k:, 1] = s_v B_vᵀ, zero elsewhere,

so that ΔW_k and ΔW_v are unchanged (likewise gate/up -> gating). A part that is not adapted is a
zero block. `rank` squeezes every module back to one rank (QR core), as a training run needs.

`fit_initial_adapter` turns such an adapter into the starting point of a training run at that
run's rank: equal rank as is, a smaller one padded with the run's fresh `a` columns and zero `b`
rows (ΔW unchanged, and the new columns train as in a fresh LoRA), a larger one squeezed down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_squeeze import squeeze
from lora_squeeze.adapters import atomic, hf_gemma3, orbax_io, peft_io, safetensors_io
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.modules import as_float32


def _check_config(adapter: peft_io.PeftAdapter) -> None:
  config = adapter.config
  if config.get("bias", "none") != "none":
    raise AdapterError(
      f"{adapter.path}: bias={config['bias']!r} trains base biases; Gemma 3 has none to map (allowed: 'none')"
    )
  if config.get("modules_to_save"):
    raise AdapterError(
      f"{adapter.path}: modules_to_save={config['modules_to_save']!r}: fully trained modules "
      "have no LoRA form; allowed: none"
    )
  factor_keys = {k for m in adapter.lora.values() for k in (m.key_a, m.key_b)}
  for key in adapter.header.tensors:
    if key not in factor_keys:
      raise AdapterError(f"{adapter.weights_path}: tensor {key!r} is not a LoRA factor of a module we can map")


def _infer_model(shapes: Mapping[tuple[int, str], tuple[int, int]], *, where: Any) -> str:
  from lora_squeeze import model as model_lib

  for name in model_lib.MODEL_NAMES:
    d = hf_gemma3.dims(name)
    if all(layer < d.num_layers and d.hf_shape(hf) == shape for (layer, hf), shape in shapes.items()):
      return name
  (layer, hf), shape = next(iter(shapes.items()))
  raise AdapterError(
    f"{where}: module layer {layer} {hf} has (d_out, d_in) = {shape}, which matches no Gemma 3 size; "
    f"pass --model to see which module differs"
  )


def import_peft(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  *,
  model: str | None = None,
  rank: int | None = None,
) -> dict[str, Any]:
  """Converts the PEFT folder `src` into our adapter folder `dst` (which must not exist); returns
  its metadata ({"model", "targets", "ranks", ...})."""
  if rank is not None:
    squeeze.check_rank(rank)
  atomic.check_distinct(src, dst)
  atomic.check_writable(dst, force=False)
  adapter = peft_io.open_peft(src)
  _check_config(adapter)
  where = adapter.path
  located = {}
  for name, m in adapter.lora.items():
    if m.key_a.endswith(".lora_embedding_A"):
      raise AdapterError(f"{where}: module {name!r} is an embedding LoRA; only the decoder projections map")
    layer, kind, part, hf_class = hf_gemma3.parse_hf_name(name, where=where)
    located[(layer, part.hf_name)] = (name, kind, part, hf_class)
  shapes = {k: (adapter.lora[v[0]].info.d_out, adapter.lora[v[0]].info.d_in) for k, v in located.items()}
  if model is None:
    model = _infer_model(shapes, where=where)
  dims = hf_gemma3.dims(model)
  for (layer, hf), shape in shapes.items():
    if layer >= dims.num_layers or dims.hf_shape(hf) != shape:
      raise AdapterError(
        f"{where}: module {located[(layer, hf)][0]!r} has (d_out, d_in) = {shape}, but {model} "
        f"(layers 0..{dims.num_layers - 1}) expects {dims.hf_shape(hf)}"
      )
  groups: dict[tuple[int, hf_gemma3.Kind], dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
  for (layer, _), (name, kind, part, _) in located.items():
    m = adapter.lora[name]
    a_raw, b_raw = safetensors_io.read_tensors(adapter.weights_path, (m.key_a, m.key_b))
    a = as_float32(a_raw, path=adapter.weights_path, tensor=m.key_a).T
    b = as_float32(b_raw, path=adapter.weights_path, tensor=m.key_b).T * np.float32(m.scale)
    groups.setdefault((layer, kind), {})[part.slot] = (a, b)
  tree: dict[str, Any] = {}
  for (layer, kind), parts in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1].path)):
    a, b = _fuse(kind, parts)
    if rank is not None:
      a, b, _ = squeeze.qr_core(a, b, rank)
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    shape_a, shape_b = dims.stored_shapes(kind, a.shape[1])
    node = tree
    for key in hf_gemma3.our_name(layer, kind).split("/"):
      node = node.setdefault(key, {})
    node["a"], node["b"] = a.reshape(shape_a), b.reshape(shape_b)
  targets = [k.target for k in hf_gemma3.KINDS if any(kind is k for _, kind in groups)]
  metadata = {
    "model": model,
    "targets": targets,
    "imported_from": os.fspath(src),
    "peft_base_model": adapter.config.get("base_model_name_or_path"),
    "squeezed_to": rank,
  }
  orbax_io.save_adapter(dst, tree, metadata)
  return orbax_io.open_orbax(dst).metadata_with_ranks()


def _fuse(
  kind: hf_gemma3.Kind, parts: Mapping[int | None, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
  """(a: (d_in, r), b: (r, d_out)) of one of our modules from its Hugging Face parts."""
  if None in parts:
    return parts[None]
  d_part = next(iter(parts.values()))[1].shape[1]
  slots = [p.slot for p in kind.parts if p.slot in parts]
  a = np.concatenate([parts[s][0] for s in slots], axis=1)
  b = np.zeros((a.shape[1], 2, d_part), np.float32)
  start = 0
  for s in slots:
    r = parts[s][0].shape[1]
    b[start : start + r, s] = parts[s][1]
    start += r
  return a, b.reshape(a.shape[1], -1)


def fit_initial_adapter(initial: Mapping[str, Any], fresh: Mapping[str, Any], *, where: Any) -> dict[str, Any]:
  """The `initial` LoRA tree at the ranks and modules of `fresh` (a new run's init), see module docstring."""
  flat_init, flat_fresh = orbax_io._flatten(initial), orbax_io._flatten(fresh)
  extra = sorted(k for k in flat_init if k not in flat_fresh)
  if extra:
    raise AdapterError(
      f"{where}: initial adapter module {extra[0].rsplit('/', 1)[0]!r} is not among the run's "
      "LoRA targets (config.lora_targets)"
    )
  out = dict(flat_fresh)
  for key in flat_fresh:
    if not key.endswith("/a") or key not in flat_init:
      continue
    stem = key[:-2]
    a0, b0 = np.asarray(flat_init[stem + "/a"], np.float32), np.asarray(flat_init[stem + "/b"], np.float32)
    fa, fb = np.asarray(flat_fresh[stem + "/a"]), np.asarray(flat_fresh[stem + "/b"])
    if a0.shape[:-1] != fa.shape[:-1] or b0.shape[1:] != fb.shape[1:]:
      raise AdapterError(
        f"{where}: module {stem!r} has shapes {a0.shape}, {b0.shape} but the run's model needs "
        f"(*, r) {fa.shape[:-1]}, (r, *) {fb.shape[1:]}: an adapter for another model size"
      )
    r0, r = a0.shape[-1], fa.shape[-1]
    a2, b2 = a0.reshape(-1, r0), b0.reshape(r0, -1)
    if r0 > r:
      a2, b2, _ = squeeze.qr_core(a2, b2, r)
    elif r0 < r:
      a2 = np.concatenate([a2, fa.reshape(-1, r)[:, r0:]], axis=1)
      b2 = np.concatenate([b2, np.zeros((r - r0, b2.shape[1]), np.float32)], axis=0)
    out[stem + "/a"] = np.asarray(a2, np.float32).reshape(fa.shape)
    out[stem + "/b"] = np.asarray(b2, np.float32).reshape(fb.shape)
  return orbax_io._unflatten(out)
