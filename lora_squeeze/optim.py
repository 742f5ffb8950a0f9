"""The optimizer of the paper (§4.1): Adafactor, linear warmup, then a constant learning rate."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax


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
  """Adafactor's settings beyond the learning rate (the training config's `optim` keys).

  Hashable: the jitted train step takes it as a static argument.

  Attributes:
    multiply_by_parameter_scale: scale each update by max(RMS(param), 1e-3) (optax's default,
      True). LoRA's b starts at zero, so with it b moves at most lr * 1e-3 per entry for its first
      steps, while squeezed (√S-balanced) factors are above that floor and move much faster; False
      gives every factor steps of size lr (docs/training.md, the pilot in docs/results/pilot/).
    clipping_threshold: Adafactor's update clipping (optax default 1.0); None = no clipping.
  """

  multiply_by_parameter_scale: bool = True
  clipping_threshold: float | None = 1.0

  def __post_init__(self):
    if not isinstance(self.multiply_by_parameter_scale, bool):
      raise ValueError(f"multiply_by_parameter_scale must be true or false, got {self.multiply_by_parameter_scale!r}")
    c = self.clipping_threshold
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
      raise ValueError(f"clipping_threshold must be None or a number > 0, got {c!r}")


DEFAULT_OPTIONS = OptimizerOptions()


def make_optimizer(lr: float, warmup: int, options: OptimizerOptions = DEFAULT_OPTIONS) -> optax.GradientTransformation:
  """Adafactor (optax defaults: factored second moments, update clipping 1.0, parameter-scale
  relative steps, no momentum; `options` changes the last two) driven by `warmup_constant(lr, warmup)`.

  Its state is as float32 as the LoRA params it is initialised on (the trainer keeps those in
  float32 whatever the base dtype: with bf16 LoRA params the loss barely moved).
  """
  return optax.adafactor(
    learning_rate=warmup_constant(lr, warmup),
    multiply_by_parameter_scale=options.multiply_by_parameter_scale,
    clipping_threshold=options.clipping_threshold,
  )
