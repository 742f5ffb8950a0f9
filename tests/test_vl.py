"""Vision-language end to end on the tiny_vision Gemma 3: the digits task from scikit-learn's
bundled images, images decoded per batch, KV-cached decoding against the uncached reference, and
a Cont-Squeeze plan with images through the plan runner (loss, evaluation, resume, the frozen
vision encoder)."""

import dataclasses
import json

import jax
import numpy as np
import PIL.Image
import pytest

from configs import vl_digits
from lora_squeeze import decoding, evaluate, train
from lora_squeeze import model as model_lib
from lora_squeeze.data import batching, get_task
from lora_squeeze.data.images import ImageFile
from lora_squeeze.data.readers import DatasetNotPreparedError
from test_train import Crash, CrashAt  # a run killed mid-stage (tests/ is on sys.path under pytest)

# ---------------------------------------------------------------------------------------------
# The digits task.


def test_digits_split_is_deterministic_disjoint_and_is_scikit_learns_data():
  from sklearn.datasets import load_digits

  reference = load_digits()
  task = get_task("digits")
  train_split, eval_split = task.load("train"), task.load("eval")
  assert (len(train_split), len(eval_split)) == (1437, 360)
  train_ids = [int(ex.example_id) for ex in train_split]
  eval_ids = [int(ex.example_id) for ex in eval_split]
  assert eval_ids == list(range(0, 1797, 5)) and sorted(train_ids + eval_ids) == list(range(1797))
  for ex in (train_split[0], eval_split[7], train_split[1436]):
    i = int(ex.example_id)
    label = int(reference.target[i])
    assert (ex.options, ex.correct, ex.target) == (tuple("0123456789"), (label,), str(label))
    np.testing.assert_array_equal(ex.image[..., 0], np.rint(reference.images[i] * 255 / 16).astype(np.uint8))
    assert ex.image.shape == (8, 8, 3) and "<" not in ex.prompt
  gen = get_task("digits_gen").load("eval")[7]
  assert gen.answers == (eval_split[7].target,) and not gen.options
  np.testing.assert_array_equal(gen.image, eval_split[7].image)


# ---------------------------------------------------------------------------------------------
# Images decoded per batch.


def write_tallyqa(root, n):
  """TallyQA's layout (train.json with image paths); image i is filled with grey level 10 * i."""
  (root / "imgs").mkdir(parents=True)
  rows = []
  for i in range(n):
    PIL.Image.fromarray(np.full((12 + i, 16, 3), 10 * i, np.uint8)).save(root / "imgs" / f"{i}.png")
    rows.append({"question_id": i, "question": f"How many {i}?", "answer": i % 3, "image": f"imgs/{i}.png"})
  (root / "train.json").write_text(json.dumps(rows))


def test_image_file_reads_the_header_and_decodes_on_demand(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  PIL.Image.fromarray(pixels).save(tmp_path / "a.png")
  image = ImageFile(tmp_path / "a.png")
  assert image.shape == (5, 7, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(image), pixels)
  want = np.asarray(PIL.Image.fromarray(pixels).resize((4, 4), PIL.Image.BILINEAR))
  np.testing.assert_array_equal(batching.resize_image(image, 4), want)
  with pytest.raises(DatasetNotPreparedError, match="image not found: .*missing.png"):
    ImageFile(tmp_path / "missing.png")


def test_training_batches_decode_only_their_own_images(tmp_path, gemma3_tokenizer):
  write_tallyqa(tmp_path / "tallyqa", 6)
  split = get_task("tallyqa").load("train", data_dir=tmp_path)
  examples = [split[i] for i in range(6)]
  assert all(isinstance(ex.image, ImageFile) for ex in examples)
  ds = batching.train_batches(examples, gemma3_tokenizer, batch_size=2, max_len=64, seed=0, buckets=(64,), image_size=8)
  members = ds._source.epoch_plan(0)  # the TrainBatches under grain
  # Deleting the images of batches 1 and 2 after the examples exist: batch 0 never reads them.
  for i in (*members[1], *members[2]):
    (tmp_path / "tallyqa" / "imgs" / f"{i}.png").unlink()
  batch = ds[0]
  grey = batch["images"][:, 0, 0, 0]
  np.testing.assert_array_equal(grey, 10 * np.asarray(members[0]))
  with pytest.raises(FileNotFoundError):
    ds[1]


# ---------------------------------------------------------------------------------------------
# KV-cached decoding equals the uncached reference.


@pytest.mark.parametrize("name", ["tiny", "tiny_vision"])
def test_kv_cached_decoding_equals_uncached_token_for_token(name):
  text_only = name == "tiny"
  base = model_lib.init_base_params(name, key=jax.random.key(0), text_only=text_only)
  model = model_lib.make_model(name, lora_rank=2, text_only=text_only)
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(1))
  # A non-zero ΔW: b = 0 at init would leave the LoRA einsums out of the comparison.
  lora = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), lora)
  params = model_lib.merge_params(base, lora)
  rng = np.random.default_rng(0)
  image_token = [] if text_only else [batching.START_OF_IMAGE]
  # Lengths across two buckets and a partial batch; longer than tiny's sliding window of 8.
  prompts = [[batching.BOS, *image_token, *rng.integers(3, 1000, n).tolist()] for n in (3, 9, 17, 5, 30)]
  images = None if text_only else [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in prompts]
  kwargs = {
    "max_new_tokens": 10,
    "batch_size": 4,
    "buckets": (16, 32),
    "images": images,
    "image_size": None if text_only else 28,
  }
  reference = evaluate.greedy_decode(model, params, prompts, stop_ids=(batching.EOS,), kv_cache=False, **kwargs)
  assert all(len(r) == 10 for r in reference)
  assert decoding.cached_greedy_decode(model, params, prompts, stop_ids=(batching.EOS,), **kwargs) == reference
  # A stop token that one row emits mid-answer: both stop there, the other rows run on.
  stop = reference[2][3]
  stopped = evaluate.greedy_decode(model, params, prompts, stop_ids=(stop,), kv_cache=False, **kwargs)
  assert len(stopped[2]) == reference[2].index(stop)
  assert evaluate.greedy_decode(model, params, prompts, stop_ids=(stop,), **kwargs) == stopped


def test_scored_vl_evaluation_sees_the_image():
  base = model_lib.init_base_params("tiny_vision", key=jax.random.key(0), text_only=False)
  model = model_lib.make_model("tiny_vision", text_only=False)
  from lora_squeeze.weights import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.load_tokenizer()
  examples = [get_task("digits").load("eval")[i] for i in range(2)]
  blank = [dataclasses.replace(ex, image=np.zeros_like(ex.image)) for ex in examples]
  kwargs = {"max_len": 64, "batch_size": 2, "template": "plain", "buckets": (64,), "image_size": 28}
  scores = evaluate.score_options(model, base, tokenizer, examples, **kwargs)
  again = evaluate.score_options(model, base, tokenizer, examples, **kwargs)
  other = evaluate.score_options(model, base, tokenizer, blank, **kwargs)
  np.testing.assert_array_equal(np.stack(scores), np.stack(again))
  assert np.abs(np.stack(scores) - np.stack(other)).max() > 1e-4


# ---------------------------------------------------------------------------------------------
# A VL Cont-Squeeze plan through the runner.


def digits_config(task="digits_gen"):
  # 8 steps at rank 4, squeeze to 2, 4 more: scored by greedy answers (KV cache) with images.
  return vl_digits.get_config(f"task={task},steps=8,extra_steps=4,eval.examples=8,checkpoint_every=3,log_every=4")


def test_vl_cont_squeeze_runs_end_to_end_resumes_bit_identically_and_leaves_the_vision_tower(tmp_path):
  config = digits_config()
  from lora_squeeze import config_lib as common

  common.validate(config)
  plan = common.make_plan(config)
  lines = []
  setup = train.setup_from_config(config, workdir=tmp_path / "a", plan=plan, printer=lines.append)
  straight = train.execute_plan(plan, setup)
  records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if r.get("event") == "train"]
  assert len(losses) == 12
  # Rank 4 learns the answers to the digit images (on the random tiny model, from ln(262k) = 12.48:
  # 12.42 over steps 1-3, 12.34 over steps 6-8).
  assert np.mean(losses[5:8]) < np.mean(losses[:3]) - 0.05, losses
  results = json.loads((tmp_path / "a" / "results.json").read_text())
  assert set(results["evals"]) == {"r4_to_r2", "r4_to_r2_plus4"}
  assert all(0 <= row["metrics"]["exact_match"] <= 1 for row in results["evals"].values())

  # LoRA lives on the text decoder only; folding it in leaves every vision parameter as it was.
  lora = straight["lora"]
  assert model_lib.lora_leaf_paths(lora) and all(p.startswith("layer_") for p in model_lib.lora_leaf_paths(lora))
  folded = model_lib.fold_lora(setup.base_params, lora)
  for got, want in zip(jax.tree.leaves(folded["vision_encoder"]), jax.tree.leaves(setup.base_params["vision_encoder"])):
    np.testing.assert_array_equal(got, want)
  assert not np.array_equal(
    folded["layer_0"]["attn"]["q_einsum"]["w"], setup.base_params["layer_0"]["attn"]["q_einsum"]["w"]
  )

  # Killed at step 5 (mid first stage, checkpoint at 3) and at step 10 (after the squeeze, checkpoint at 9).
  for crash_step in (5, 10):
    crashing = train.setup_from_config(config, workdir=tmp_path / "b", plan=plan, printer=lines.append)
    with pytest.raises(Crash):
      train.execute_plan(plan, dataclasses.replace(crashing, batches=CrashAt(crashing.batches, crash_step)))
  resumed = train.execute_plan(
    plan, train.setup_from_config(config, workdir=tmp_path / "b", plan=plan, printer=lines.append)
  )
  assert any(line.startswith("resumed from checkpoint") and "global step 9, rank 2" in line for line in lines)
  for got, want in zip(jax.tree.leaves(resumed["lora"]), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(got, want)
  resumed_records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r["loss"] for r in resumed_records if r.get("event") == "train"] == losses

  def metrics(workdir):
    return {t: r["metrics"] for t, r in json.loads((workdir / "results.json").read_text())["evals"].items()}

  assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
