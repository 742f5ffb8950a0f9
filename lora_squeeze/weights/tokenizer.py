"""The Gemma 3 tokenizer: a user's `tokenizer.model`, or a SentencePiece model rebuilt from the GGUF.

The GGUF carries the vocabulary (262,144 pieces), their scores (BPE merge priority) and token
types, but no SentencePiece proto. We rebuild one with Gemma's settings: BPE, byte fallback,
digits split one by one, identity normalizer, no dummy prefix, whitespace kept as is and escaped to
'▁'. llama.cpp marks `<start_of_turn>`, `<end_of_turn>` and the `<unusedN>` tokens as CONTROL;
SentencePiece never matches CONTROL pieces in text, so we store them as USER_DEFINED (one id from
their text, as gemma's chat formatting needs) and keep only `<pad>`, `<eos>`, `<bos>` as CONTROL.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from gemma import gm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from lora_squeeze.weights import cache as cache_lib
from lora_squeeze.weights import gguf as gguf_lib

_Piece = sp_pb2.ModelProto.SentencePiece
# llama.cpp token types share SentencePiece's numbering (1 normal ... 6 byte).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
TOKENIZER_FILE = "gemma3_from_gguf.model"


def build_sentencepiece_proto(
  pieces: Sequence[str],
  scores: Sequence[float],
  token_types: Sequence[int],
  *,
  pad_id: int,
  eos_id: int,
  bos_id: int,
  unk_id: int,
) -> sp_pb2.ModelProto:
  """A Gemma-style BPE SentencePiece ModelProto from a vocabulary.

  Args:
    pieces: the V piece strings (whitespace already escaped as '▁', bytes as '<0xNN>').
    scores: V merge scores (higher merges first).
    token_types: V llama.cpp/SentencePiece type codes.
    pad_id, eos_id, bos_id, unk_id: ids of the special pieces.
  """
  if not len(pieces) == len(scores) == len(token_types):
    raise ValueError(f"vocabulary lengths differ: {len(pieces)} pieces, {len(scores)} scores, {len(token_types)} types")
  proto = sp_pb2.ModelProto()
  keep_control = {pad_id, eos_id, bos_id}
  for i, (piece, score, kind) in enumerate(zip(pieces, scores, token_types)):
    if i == unk_id:
      kind = _UNKNOWN
    elif kind == _CONTROL and i not in keep_control:
      kind = _USER_DEFINED
    elif kind not in (_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE):
      raise ValueError(f"token {i} ({piece!r}) has unknown type {kind}")
    proto.pieces.append(_Piece(piece=piece, score=float(score), type=kind))
  trainer = proto.trainer_spec
  trainer.model_type = sp_pb2.TrainerSpec.BPE
  trainer.vocab_size = len(pieces)
  trainer.byte_fallback = True
  trainer.split_digits = True
  trainer.allow_whitespace_only_pieces = True
  trainer.split_by_whitespace = False
  trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
  trainer.unk_piece, trainer.bos_piece = pieces[unk_id], pieces[bos_id]
  trainer.eos_piece, trainer.pad_piece = pieces[eos_id], pieces[pad_id]
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = False
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto


def proto_from_gguf(path: os.PathLike | str) -> sp_pb2.ModelProto:
  """The SentencePiece proto rebuilt from a GGUF file's tokenizer metadata."""
  reader = gguf_lib.read_gguf(path)
  model = gguf_lib.gguf_field(reader, "tokenizer.ggml.model")
  if model != "llama":
    raise ValueError(f"GGUF tokenizer model is {model!r}; only SentencePiece ('llama') is supported")
  return build_sentencepiece_proto(
    gguf_lib.gguf_field(reader, "tokenizer.ggml.tokens"),
    gguf_lib.gguf_field(reader, "tokenizer.ggml.scores"),
    gguf_lib.gguf_field(reader, "tokenizer.ggml.token_type"),
    pad_id=int(gguf_lib.gguf_field(reader, "tokenizer.ggml.padding_token_id")),
    eos_id=int(gguf_lib.gguf_field(reader, "tokenizer.ggml.eos_token_id")),
    bos_id=int(gguf_lib.gguf_field(reader, "tokenizer.ggml.bos_token_id")),
    unk_id=int(gguf_lib.gguf_field(reader, "tokenizer.ggml.unknown_token_id")),
  )


def embedded_tokenizer_path(cache_dir: os.PathLike | str | None = None) -> pathlib.Path:
  """Path of the SentencePiece model rebuilt from the embedded GGUF (built once, then cached)."""
  root = cache_lib.cache_root(cache_dir)
  target = root / TOKENIZER_FILE
  if not target.exists():
    proto = proto_from_gguf(gguf_lib.assemble_gguf(root))
    cache_lib.write_bytes_atomic(target, proto.SerializeToString())
  return target


def load_tokenizer(
  path: os.PathLike | str | None = None, *, cache_dir: os.PathLike | str | None = None
) -> gm.text.Gemma3Tokenizer:
  """gemma's Gemma3Tokenizer over a local SentencePiece file.

  Args:
    path: a user's `tokenizer.model`; None -> the model rebuilt from the embedded GGUF.
    cache_dir: where the rebuilt model is cached (default $LORA_SQUEEZE_CACHE or
      ~/.cache/lora_squeeze).
  """
  if path is None:
    path = embedded_tokenizer_path(cache_dir)
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
  return gm.text.Gemma3Tokenizer(path=os.fspath(path))
