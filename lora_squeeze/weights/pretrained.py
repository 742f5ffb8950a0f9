"""Real base weights: the embedded 270M (GGUF, converted once and cached) and official Orbax checkpoints."""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

from gemma import gm

from lora_squeeze.weights import cache as cache_lib
from lora_squeeze.weights import gguf as gguf_lib

# Bump when the GGUF → gemma mapping changes, so that old caches are not reused.
GGUF_CACHE_ENTRY = "gemma3_270m_q4_k_m_v1"


def embedded_270m_params(cache_dir: os.PathLike | str | None = None) -> dict[str, Any]:
  """float32 numpy params of Gemma 3 270M from the embedded GGUF, converted once and cached.

  A missing, partial or corrupt cache entry is rebuilt from the GGUF (with a warning when an
  entry existed but failed verification).
  """
  root = cache_lib.cache_root(cache_dir)

  def convert() -> dict[str, Any]:
    start = time.perf_counter()
    params = gguf_lib.convert_gguf(gguf_lib.assemble_gguf(root))
    logging.info("converted the Gemma 3 270M GGUF in %.1f s", time.perf_counter() - start)
    return params

  return cache_lib.load_or_build(root / GGUF_CACHE_ENTRY, convert)


def load_orbax_params(path: os.PathLike | str, *, text_only: bool) -> Any:
  """Params of an official gemma Orbax checkpoint via gm.ckpts.load_params.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
  return gm.ckpts.load_params(os.fspath(path.resolve()), text_only=text_only)
