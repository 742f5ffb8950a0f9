"""Token rows and batches: prompts in Gemma's chat format, training rows with a target mask,
scoring rows with option slots, and length buckets instead of padding everything to max_len.

Training batches are what lora_squeeze.train consumes: {'tokens': (B, T) int32 (0 = padding),
'target_mask': (B, T) bool} where target_mask[:, t] marks tokens[:, t] as a target predicted from
position t - 1; vision batches add 'images': (B, H, W, 3) uint8. T is the batch's bucket length.

Scoring batches (lora_squeeze.evaluate) carry option *slots*: slot k of a row asks for the
log-probability of token `slot_ids[k]` at the position after `slot_positions[k]`, counted towards
option `slot_options[k]` of example `row_example`. Options of one token each share one row (one
forward pass scores them all); longer options get a row each. A batch carries the slots of all its
rows in one flat list (positions into the flattened (B * T) tokens), padded to gather_size: the
unembedding then runs on about as many positions as there are slots, not on B times the longest
row's count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from gemma import gm

from lora_squeeze import validation
from lora_squeeze.data import images as images_lib
from lora_squeeze.data.tasks import Example
from lora_squeeze.errors import UserInputError

TEMPLATES = ("chat", "plain")
# Gemma 3 token ids, from the tokenizer's own table of special tokens.
_SPECIAL = gm.text.Gemma3Tokenizer.special_tokens
PAD, EOS, BOS = int(_SPECIAL.PAD), int(_SPECIAL.EOS), int(_SPECIAL.BOS)
START_OF_TURN, END_OF_TURN = int(_SPECIAL.START_OF_TURN), int(_SPECIAL.END_OF_TURN)
START_OF_IMAGE = int(_SPECIAL.IMAGE_PLACEHOLDER)  # <start_of_image>, expanded by the model
# Not a special token: "\n" in the Gemma 3 vocabulary (end_of_answer needs it without a tokenizer).
NEWLINE = 107
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTokens:
  """A prompt as head + context + body + tail ids; only the user text (context, body) is ever truncated."""

  head: tuple[int, ...]
  body: tuple[int, ...]
  tail: tuple[int, ...]
  context: tuple[int, ...] = ()

  def fit(self, budget: int) -> list[int]:
    """The prompt in at most `budget` tokens. Without a context the body loses tokens from its start
    (the end of a prompt holds the question and the options); with one, the context loses tokens
    from its end (a document's lead) and the body stays whole."""
    keep = budget - len(self.head) - len(self.tail)
    if self.context:
      if keep - len(self.body) < 1:
        raise ValueError(
          f"a budget of {budget} tokens leaves no room for the context (template and prompt: "
          f"{len(self.head) + len(self.tail) + len(self.body)})"
        )
      return [*self.head, *self.context[: keep - len(self.body)], *self.body, *self.tail]
    if keep < 1:
      raise ValueError(
        f"a budget of {budget} tokens leaves no room for the prompt text (template alone: "
        f"{len(self.head) + len(self.tail)})"
      )
    return [*self.head, *self.body[max(0, len(self.body) - keep) :], *self.tail]


def example_prompt(tokenizer, example: Example, *, template: str = "chat") -> PromptTokens:
  """encode_prompt of an example: its prompt, context and image placeholder."""
  return encode_prompt(
    tokenizer, example.prompt, template=template, image=example.image is not None, context=example.context
  )


def encode_prompt(
  tokenizer, prompt: str, *, template: str = "chat", image: bool = False, context: str = ""
) -> PromptTokens:
  """Ids of `prompt` in `template`, after `context` (if any); an image adds Gemma's
  <start_of_image> placeholder first.

  chat:  <bos><start_of_turn>user\\n[<start_of_image>]CONTEXT PROMPT<end_of_turn>\\n<start_of_turn>model\\n
         (instruction-tuned checkpoints, as in the paper)
  plain: <bos>[<start_of_image>]CONTEXT PROMPT\\n  (pretrained checkpoints, e.g. the embedded 270M)
  Special tokens are inserted as ids, never parsed from text.
  """
  if template not in TEMPLATES:
    raise ValueError(f"template {template!r} not in {TEMPLATES}")
  image_ids = (START_OF_IMAGE,) if image else ()
  body = tuple(tokenizer.encode(prompt))
  context_ids = tuple(tokenizer.encode(context)) if context else ()
  if template == "chat":
    head = (BOS, START_OF_TURN, *tokenizer.encode("user\n"), *image_ids)
    tail = (END_OF_TURN, *tokenizer.encode("\n"), START_OF_TURN, *tokenizer.encode("model\n"))
  else:
    head, tail = (BOS, *image_ids), tuple(tokenizer.encode("\n"))
  return PromptTokens(head=head, body=body, tail=tail, context=context_ids)


def end_of_answer(template: str) -> int:
  """The id that closes an answer: <end_of_turn> in chat; a newline in plain text, which a
  pretrained model (never trained on turns, rarely ending a document after one word) already
  predicts after a short answer, so training need not spend its first steps teaching a stop token."""
  return END_OF_TURN if template == "chat" else NEWLINE


def training_row(tokenizer, example: Example, *, max_len: int, template: str = "chat") -> tuple[np.ndarray, np.ndarray]:
  """(tokens (T,) int32, target_mask (T,) bool), T <= max_len: prompt, then target + end-of-answer."""
  target = [*tokenizer.encode(example.target), end_of_answer(template)]
  if len(target) >= max_len:
    raise ValueError(f"example {example.example_id}: target of {len(target)} tokens does not fit max_len={max_len}")
  prompt = example_prompt(tokenizer, example, template=template)
  tokens = [*prompt.fit(max_len - len(target)), *target]
  mask = np.zeros(len(tokens), bool)
  mask[-len(target) :] = True
  return np.asarray(tokens, np.int32), mask


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length."""
  for b in sorted(buckets):
    if b >= length:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def buckets_for(max_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
  """`buckets` below max_len, plus max_len itself."""
  return tuple(sorted({b for b in buckets if b < max_len} | {max_len}))


def concat_to(parts: Sequence[np.ndarray], length: int, value=0) -> np.ndarray:
  """`parts` concatenated into one int32 (length,) array, right-padded with `value`."""
  return pad_to([np.concatenate(parts).astype(np.int32)], length, value)[0]


def resize_image(image, size: int) -> np.ndarray:
  """(H, W, 3) uint8 or an images.ImageFile (decoded now) -> (size, size, 3) uint8 (bilinear), the
  vision encoder's input size. The batchers call it per batch, so only a batch's images are decoded."""
  return images_lib.as_pixels(image, size)


def pad_to(rows: Sequence[np.ndarray], length: int, value=0) -> np.ndarray:
  """Rows of unequal lengths -> (len(rows), length), right-padded with `value`."""
  out = np.full((len(rows), length), value, dtype=np.asarray(rows[0]).dtype)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


class TrainBatches(Sequence):
  """Random-access training batches: batches[i] is a pure function of (seed, i).

  Rows are grouped by bucket; every epoch each bucket is shuffled, cut into full batches (the
  remainder of a bucket is dropped) and the batches of all buckets are shuffled together, so an
  epoch has the same number of batches every time and step i needs nothing but i to resume.
  Its length is effectively infinite (epochs repeat).
  """

  def __init__(
    self,
    rows: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int,
    buckets: Sequence[int],
    seed: int,
    images: Sequence[np.ndarray | None] | None = None,
    image_size: int | None = None,
  ):
    validation.positive_int("batch_size", batch_size)
    self._rows, self._images, self._image_size = rows, images, image_size
    self._batch_size, self._seed = batch_size, seed
    lengths = np.array([len(tokens) for tokens, _ in rows])
    self._bucket_of_row = np.array([bucket_length(n, buckets) for n in lengths])
    self._buckets = sorted(set(self._bucket_of_row.tolist()))
    self.batches_per_epoch = sum(int(np.sum(self._bucket_of_row == b)) // batch_size for b in self._buckets)
    if self.batches_per_epoch == 0:
      raise ValueError(f"{len(rows)} training rows give no full batch of {batch_size} in any length bucket")

  def __len__(self) -> int:
    return np.iinfo(np.int64).max

  def epoch_plan(self, epoch: int) -> list[np.ndarray]:
    """Row indices of each batch of `epoch` (recomputed per call: a permutation costs ~1 ms)."""
    rng = np.random.default_rng([self._seed, epoch])
    batches = []
    for b in self._buckets:
      members = rng.permutation(np.flatnonzero(self._bucket_of_row == b))
      n = len(members) // self._batch_size
      batches.extend(members[: n * self._batch_size].reshape(n, self._batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(int(step), self.batches_per_epoch)
    members = self.epoch_plan(epoch)[index]
    length = int(self._bucket_of_row[members[0]])
    batch = {
      "tokens": pad_to([self._rows[i][0] for i in members], length),
      "target_mask": pad_to([self._rows[i][1] for i in members], length, False),
    }
    if self._images is not None:
      batch["images"] = np.stack([resize_image(self._images[i], self._image_size) for i in members])
    return batch


def train_batches(
  examples: Sequence[Example],
  tokenizer,
  *,
  batch_size: int,
  max_len: int,
  seed: int,
  template: str = "chat",
  buckets: Sequence[int] = DEFAULT_BUCKETS,
  image_size: int | None = None,
) -> grain.MapDataset:
  """Random-access bucketed training batches (ds[i] = batch of global step i) as a grain.MapDataset."""
  rows = [training_row(tokenizer, ex, max_len=max_len, template=template) for ex in examples]
  images = [ex.image for ex in examples] if image_size is not None else None
  return grain.MapDataset.source(
    TrainBatches(
      rows,
      batch_size=batch_size,
      buckets=buckets_for(max_len, buckets),
      seed=seed,
      images=images,
      image_size=image_size,
    )
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoringRow:
  """One forward pass worth of option slots for one example (see the module docstring)."""

  example: int
  tokens: np.ndarray  # (T,) int32
  slot_positions: np.ndarray  # (K,) int32: the position whose logits predict the slot's token
  slot_ids: np.ndarray  # (K,) int32
  slot_options: np.ndarray  # (K,) int32


def scoring_rows(tokenizer, example: Example, index: int, *, max_len: int, template: str = "chat") -> list[ScoringRow]:
  """The rows that score every option of `example` (sum of the option's token log-probs)."""
  if not example.options:
    raise ValueError(f"example {example.example_id}: no options to score (a generative task?)")
  options = [tokenizer.encode(o) for o in example.options]
  empty = [o for o, ids in zip(example.options, options) if not ids]
  if empty:
    raise ValueError(f"example {example.example_id}: options {empty} encode to no tokens")
  prompt = example_prompt(tokenizer, example, template=template)
  if all(len(ids) == 1 for ids in options):
    tokens = np.asarray(prompt.fit(max_len), np.int32)
    k = len(options)
    return [
      ScoringRow(
        example=index,
        tokens=tokens,
        slot_positions=np.full(k, len(tokens) - 1, np.int32),
        slot_ids=np.asarray([ids[0] for ids in options], np.int32),
        slot_options=np.arange(k, dtype=np.int32),
      )
    ]
  longest = max(len(ids) for ids in options)
  base = prompt.fit(max_len - longest)
  rows = []
  for j, ids in enumerate(options):
    tokens = np.asarray([*base, *ids], np.int32)
    rows.append(
      ScoringRow(
        example=index,
        tokens=tokens,
        slot_positions=np.arange(len(base) - 1, len(tokens) - 1, dtype=np.int32),
        slot_ids=np.asarray(ids, np.int32),
        slot_options=np.full(len(ids), j, np.int32),
      )
    )
  return rows


def target_row(tokenizer, example: Example, index: int, *, max_len: int, template: str = "chat") -> ScoringRow:
  """The row that scores `example`'s reference target under teacher forcing (metric token_nll):
  its training row (prompt, target, end-of-answer; training_row), one slot per target token, slot k
  asking for target token k given everything before it. All slots count towards option 0."""
  if not example.target.strip():
    raise UserInputError(f"example {example.example_id!r}: empty target; token_nll scores a non-empty reference")
  tokens, mask = training_row(tokenizer, example, max_len=max_len, template=template)
  positions = np.flatnonzero(mask)
  return ScoringRow(
    example=index,
    tokens=tokens,
    slot_positions=(positions - 1).astype(np.int32),
    slot_ids=tokens[positions],
    slot_options=np.zeros(len(positions), np.int32),
  )


def gather_size(n: int, *, minimum: int = 8) -> int:
  """A static size for a gather of `n` positions: the smallest of `minimum`, 2^k and 3 * 2^(k-1)
  (8, 12, 16, 24, 32, 48, ...) >= n, so a loop over batches compiles for a handful of sizes, not one
  per batch, and under a third of
  the gather is padding."""
  k = minimum
  while k < n:
    power = 1 << (k.bit_length() - 1)  # the largest power of two <= k
    k = 3 * power // 2 if k == power and power >= 2 else 2 * power
  return k


def scoring_batches(
  rows: Sequence[ScoringRow],
  *,
  batch_size: int,
  buckets: Sequence[int],
  images: Sequence[np.ndarray | None] | None = None,
  image_size: int | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
  """(row indices, batch) over `rows`, grouped by length bucket; the last batch of a bucket is
  padded with copies of its first row (their indices are not returned, their slots not gathered)
  so shapes stay static.

  batch: tokens (B, T); the slots of the batch's rows, flattened and padded to K = gather_size(their
  number): slot_positions (K,) into the flattened (B * T) positions, slot_ids (K,), slot_rows (K,)
  (the batch row, -1 = unused slot), slot_options (K,) (-1 = unused); images (B, S, S, 3) when
  `images` is given.
  """
  order = sorted(range(len(rows)), key=lambda i: (bucket_length(len(rows[i].tokens), buckets), i))
  groups: dict[int, list[int]] = {}
  for i in order:
    groups.setdefault(bucket_length(len(rows[i].tokens), buckets), []).append(i)
  for length, members in groups.items():
    for start in range(0, len(members), batch_size):
      chunk = members[start : start + batch_size]
      padded = chunk + [chunk[0]] * (batch_size - len(chunk))
      k = gather_size(sum(len(rows[i].slot_ids) for i in chunk))
      batch = {
        "tokens": pad_to([rows[i].tokens for i in padded], length),
        "slot_positions": concat_to([b * length + rows[i].slot_positions for b, i in enumerate(chunk)], k),
        "slot_ids": concat_to([rows[i].slot_ids for i in chunk], k),
        "slot_rows": concat_to([np.full(len(rows[i].slot_ids), b) for b, i in enumerate(chunk)], k, -1),
        "slot_options": concat_to([rows[i].slot_options for i in chunk], k, -1),
      }
      if images is not None:
        batch["images"] = np.stack([resize_image(images[rows[i].example], image_size) for i in padded])
      yield np.asarray(chunk), batch
