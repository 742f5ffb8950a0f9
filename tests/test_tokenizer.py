"""SentencePiece rebuilt from a GGUF vocabulary: a synthetic vocabulary (fast) and the real one (slow)."""

import pytest
import sentencepiece as spm

from lora_squeeze.weights import tokenizer as T

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
VARIED_TEXTS = [
  "The capital of France is Paris.",
  "In 2026, 1,234.56 units cost $78.90 (about 12% more than in 1999).",
  "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية.",
  "Emoji 🙂🚀 and symbols ∑∫√ ≤ ≥ → ✓",
  "  leading spaces, tabs\tand\nnew lines\n\n  with   runs of   spaces  ",
  "def f(x):\n    return x ** 2  # code",
]


def _synthetic_vocab():
  pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
  types = [CONTROL, CONTROL, CONTROL, CONTROL, CONTROL]  # as llama.cpp marks them
  pieces += [f"<0x{b:02X}>" for b in range(256)]
  types += [BYTE] * 256
  normal = ["▁", "a", "b", "1", "2", "ab", "▁ab", "12", "▁a"]
  pieces += normal
  types += [NORMAL] * len(normal)
  scores = [0.0] * (len(pieces) - len(normal)) + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0]
  return pieces, scores, types


@pytest.fixture(scope="module")
def synthetic_sp():
  pieces, scores, types = _synthetic_vocab()
  proto = T.build_sentencepiece_proto(pieces, scores, types, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(proto.SerializeToString())
  return sp, pieces


def test_synthetic_bpe_merges_and_keeps_spaces(synthetic_sp):
  sp, pieces = synthetic_sp
  ids = sp.EncodeAsIds("ab ab")
  assert [pieces[i] for i in ids] == ["ab", "▁ab"]  # no dummy prefix: the first word has no '▁'
  assert sp.DecodeIds(ids) == "ab ab"


def test_synthetic_byte_fallback_round_trips(synthetic_sp):
  sp, pieces = synthetic_sp
  ids = sp.EncodeAsIds("aé")
  assert [pieces[i] for i in ids] == ["a", "<0xC3>", "<0xA9>"]
  assert sp.DecodeIds(ids) == "aé"


def test_synthetic_turn_marker_is_one_id_but_bos_is_not_parsed(synthetic_sp):
  sp, _ = synthetic_sp
  assert sp.EncodeAsIds("<start_of_turn>") == [4]
  assert 2 not in sp.EncodeAsIds("<bos>")  # control pieces never come from text
  assert sp.unk_id() == 3 and sp.bos_id() == 2 and sp.eos_id() == 1 and sp.pad_id() == 0


def test_build_rejects_inconsistent_vocabulary():
  pieces, scores, types = _synthetic_vocab()
  with pytest.raises(ValueError, match=r"vocabulary lengths differ: 270 pieces, 269 scores, 270 types"):
    T.build_sentencepiece_proto(pieces, scores[:-1], types, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
  bad = list(types)
  bad[-1] = 9
  with pytest.raises(ValueError, match=r"token 269 \('▁a'\) has unknown type 9"):
    T.build_sentencepiece_proto(pieces, scores, bad, pad_id=0, eos_id=1, bos_id=2, unk_id=3)


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tokenizer file '.*tokenizer.model' does not exist"):
    T.load_tokenizer(tmp_path / "tokenizer.model")


@pytest.mark.slow
def test_real_tokenizer_known_ids(gemma3_tokenizer):
  assert gemma3_tokenizer.encode("The capital of France is") == [818, 5279, 529, 7001, 563]
  assert gemma3_tokenizer.encode("<start_of_turn>") == [105]
  assert gemma3_tokenizer.encode("<end_of_turn>") == [106]
  # Gemma's vocabulary was trained with split digits: no multi-digit piece exists to merge into.
  assert len(gemma3_tokenizer.encode("2026")) == 4


@pytest.mark.slow
@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_real_tokenizer_round_trips(gemma3_tokenizer, text):
  assert gemma3_tokenizer.decode(gemma3_tokenizer.encode(text)) == text


@pytest.mark.slow
def test_user_tokenizer_file_is_accepted(gemma3_tokenizer, tmp_path):
  user_file = tmp_path / "tokenizer.model"
  user_file.write_bytes(T.embedded_tokenizer_path().read_bytes())
  user = T.load_tokenizer(user_file)
  assert user.encode(VARIED_TEXTS[1]) == gemma3_tokenizer.encode(VARIED_TEXTS[1])
