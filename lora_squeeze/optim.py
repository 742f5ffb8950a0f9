"""The optimizer of the paper (§4.1): Adafactor, linear warmup, then a constant learning rate; or
AdamW (config `optim.name`) under the same schedule."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import optax

from lora_squeeze import validation

# config `optim.name`: Adafactor is the paper's (and the default); AdamW is optax.adamw.
NAMES = ("adafactor", "adamw")
# The `optim` keys each optimizer reads (besides `name`).
KEYS = {
  "adafactor": ("multiply_by_parameter_scale", "clipping_threshold"),
  "adamw": ("b1", "b2", "eps", "weight_decay"),
}


def warmup_constant(lr: float, warmup: int) -> optax.Schedule:
  """lr(t) = lr * min(1, (t + 1) / warmup) for optimizer step t = 0, 1, ...; lr for warmup = 0.

  The ramp reaches `lr` at step warmup - 1 and stays there (no decay). Counting from t + 1
  rather than t keeps the very first update non-zero (optax.warmup_constant_schedule starts at 0,
  which wastes a step, and with Cont-Squeeze's short 100-step warmups every step counts).
  optax.linear_schedule(init_value=lr / warmup, end_value=lr, transition_steps=warmup - 1) is the
  same line but not the same float32 values (it interpolates; 41 of 49 lr x warmup pairs differed,
  by up to 7e-5 relative), so this stays hand-written to keep runs bit-identical.
  """
  if not lr > 0:
    raise ValueError(f"learning rate must be > 0, got {lr!r}")
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")

  def schedule(count):
    if warmup == 0:
      return jnp.asarray(lr, jnp.float32)
    return lr * jnp.minimum(1.0, (count + 1.0) / warmup).astype(jnp.float32)

  return schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerOptions:
  """The optimizer and its settings beyond the learning rate (the training config's `optim` keys).

  Hashable: the jitted train step takes it as a static argument. Each optimizer reads only its
  own keys (AdamW ignores the Adafactor ones and vice versa), so switching `name` in a config that
  sets the other optimizer's keys needs no other change.

  Attributes:
    name: "adafactor" (the paper's, default) or "adamw" (optax.adamw).
    multiply_by_parameter_scale: Adafactor: scale each update by max(RMS(param), 1e-3) (optax's
      default, True). LoRA's b starts at zero, so with it b moves at most lr * 1e-3 per entry for its
      first steps, while squeezed (√S-balanced) factors are above that floor and move much faster;
      False gives every factor steps of size lr (docs/training.md, the pilot in docs/results/pilot/).
    clipping_threshold: Adafactor's update clipping (optax default 1.0); None = no clipping.
    b1, b2, eps, weight_decay: AdamW's first/second-moment decays, denominator epsilon and
      decoupled weight decay (update -= lr * weight_decay * param); optax.adamw's defaults
      (0.9, 0.999, 1e-8, 1e-4).
  """

  name: str = "adafactor"
  multiply_by_parameter_scale: bool = True
  clipping_threshold: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4

  def __post_init__(self):
    validation.one_of("optim.name", self.name, NAMES)
    if not isinstance(self.multiply_by_parameter_scale, bool):
      raise ValueError(f"multiply_by_parameter_scale must be true or false, got {self.multiply_by_parameter_scale!r}")
    c = self.clipping_threshold
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
      raise ValueError(f"clipping_threshold must be None or a number > 0, got {c!r}")
    check_adamw_settings(b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)


def check_adamw_settings(*, b1, b2, eps, weight_decay, prefix: str = "optim.") -> None:
  """UserInputError naming the first bad AdamW setting (`prefix` + key): b1, b2 in [0, 1), eps > 0,
  weight_decay >= 0, all finite real numbers."""
  for key, value in (("b1", b1), ("b2", b2)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
      validation.fail(f"{prefix}{key}", value, "a number in [0, 1)")
  validation.positive_number(f"{prefix}eps", eps)
  if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not 0 <= weight_decay < math.inf:
    validation.fail(f"{prefix}weight_decay", weight_decay, "a finite number >= 0")


DEFAULT_OPTIONS = OptimizerOptions()


def identity_keys(optim_config: Mapping[str, Any]) -> dict[str, Any]:
  """The `optim` keys that can change a run: the chosen optimizer's own, plus `name` unless it is
  Adafactor (the default). What a run's identity records (train.run_identity), so that a run started
  before `name` and AdamW's keys existed is the same run, and AdamW's settings never make two
  Adafactor runs different (nor Adafactor's two AdamW runs)."""
  name = optim_config.get("name", DEFAULT_OPTIONS.name)
  known = {"name", *(k for keys in KEYS.values() for k in keys)}
  out = {k: v for k, v in optim_config.items() if k in KEYS.get(name, ()) or k not in known}
  if name != DEFAULT_OPTIONS.name:
    out["name"] = name
  return out


def make_optimizer(lr: float, warmup: int, options: OptimizerOptions = DEFAULT_OPTIONS) -> optax.GradientTransformation:
  """`options.name`'s optimizer driven by `warmup_constant(lr, warmup)`.

  adafactor: optax defaults (factored second moments, update clipping 1.0, parameter-scale
  relative steps, no momentum; `options` changes the last two). adamw: optax.adamw with
  `options`' b1, b2, eps and weight_decay (decoupled, on every LoRA factor).

  Its state is as float32 as the LoRA params it is initialised on (the trainer keeps those in
  float32 whatever the base dtype: with bf16 LoRA params the loss barely moved).
  """
  if options.name == "adamw":
    return optax.adamw(
      learning_rate=warmup_constant(lr, warmup),
      b1=options.b1,
      b2=options.b2,
      eps=options.eps,
      weight_decay=options.weight_decay,
    )
  return optax.adafactor(
    learning_rate=warmup_constant(lr, warmup),
    multiply_by_parameter_scale=options.multiply_by_parameter_scale,
    clipping_threshold=options.clipping_threshold,
  )
