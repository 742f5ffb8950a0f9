"""The checks of user input that configs, plans and tools share.

Each check returns the value it accepted and otherwise raises lora_squeeze.errors.UserInputError
with one line, `<name> must be <what is allowed>, got <value>`:

    validation.integer("config.batch_size", 0, minimum=1)
    # UserInputError: config.batch_size must be a positive integer, got 0

Integers are Python or NumPy integers but never booleans (True is an int to Python, not a rank).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable
from typing import Any, NoReturn

from lora_squeeze.errors import UserInputError


def fail(name: str, value: Any, allowed: str) -> NoReturn:
  """Raises the one-line UserInputError naming `name`, what is `allowed` and the bad `value`."""
  raise UserInputError(f"{name} must be {allowed}, got {value!r}")


def is_integer(value: Any) -> bool:
  """An int or NumPy integer, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
  """`value` when it is an integer (>= minimum when given)."""
  if not is_integer(value) or (minimum is not None and value < minimum):
    if minimum is None:
      fail(name, value, "an integer")
    fail(name, value, {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}"))
  return value


def positive_int(name: str, value: Any) -> int:
  """`value` when it is an integer >= 1."""
  return integer(name, value, minimum=1)


def positive_number(name: str, value: Any, *, allowed: str = "a finite number > 0") -> float:
  """`value` when it is a finite real number > 0 (not a bool); `allowed` words the error."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
    fail(name, value, allowed)
  return value


def fraction(name: str, value: Any) -> float:
  """`value` when it is a real number in (0, 1] (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
    fail(name, value, "a number in (0, 1]")
  return value


def one_of(name: str, value: Any, allowed: Collection[Any]) -> Any:
  """`value` when it is one of `allowed`."""
  if value not in allowed:
    fail(name, value, f"one of {tuple(allowed)}")
  return value


def ranks(name: str, values: Iterable[Any], *, decreasing: bool = False) -> tuple[int, ...]:
  """`values` as a tuple when it is a non-empty sequence of positive integers (strictly decreasing
  when `decreasing`)."""
  values = tuple(values)
  if not values or not all(is_integer(r) and r > 0 for r in values):
    fail(name, values, "a non-empty tuple of positive integers")
  if decreasing and any(a <= b for a, b in zip(values, values[1:])):
    fail(name, values, "strictly decreasing ranks, e.g. (128, 64, 32)")
  return values
