"""Shared session fixtures. Fixtures that need the 238 MB real weights build them once per run
(the converted weights also persist on disk in $LORA_SQUEEZE_CACHE or ~/.cache/lora_squeeze)."""

import pytest


@pytest.fixture(scope="session")
def gemma3_270m_params():
  """Real Gemma 3 270M base params (float32, from the embedded GGUF)."""
  from lora_squeeze import model

  return model.load_base_params("gemma3_270m")


@pytest.fixture(scope="session")
def gemma3_tokenizer():
  """The Gemma 3 tokenizer rebuilt from the embedded GGUF."""
  from lora_squeeze.weights import tokenizer

  return tokenizer.load_tokenizer()
