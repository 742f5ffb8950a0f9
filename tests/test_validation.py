"""lora_squeeze.validation: each check accepts exactly what it names and otherwise raises one line
`<name> must be <allowed>, got <value>` as UserInputError."""

import math
import re

import numpy as np
import pytest

from lora_squeeze import validation
from lora_squeeze.errors import UserInputError


@pytest.mark.parametrize("value", [1, 7, np.int32(3), np.int64(2**40)])
def test_positive_int_accepts_python_and_numpy_integers(value):
  assert validation.positive_int("rank", value) == value


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "1", None, np.bool_(True), np.float32(2)])
def test_positive_int_rejects_everything_else(value):
  with pytest.raises(UserInputError, match=r"^rank must be a positive integer, got " + re.escape(repr(value)) + "$"):
    validation.positive_int("rank", value)


def test_integer_names_its_minimum():
  assert validation.integer("warmup", 0, minimum=0) == 0
  assert validation.integer("offset", -5) == -5
  with pytest.raises(UserInputError, match=r"^warmup must be a non-negative integer, got -1$"):
    validation.integer("warmup", -1, minimum=0)
  with pytest.raises(UserInputError, match=r"^config.max_len must be an integer >= 16, got 8$"):
    validation.integer("config.max_len", 8, minimum=16)
  with pytest.raises(UserInputError, match=r"^offset must be an integer, got 0.5$"):
    validation.integer("offset", 0.5)


def test_positive_number_and_fraction():
  assert validation.positive_number("lr", 3) == 3 and validation.positive_number("lr", np.float32(0.5)) == 0.5
  for bad in (0.0, -1e-3, math.inf, math.nan, True, "0.1", None):
    with pytest.raises(UserInputError, match=r"^lr must be a finite number > 0, got "):
      validation.positive_number("lr", bad)
  with pytest.raises(UserInputError, match=r"^config.lr must be None or a finite number > 0, got -0.1$"):
    validation.positive_number("config.lr", -0.1, allowed="None or a finite number > 0")
  assert validation.fraction("tau", 1) == 1 and validation.fraction("tau", 1e-9) == 1e-9
  for bad in (0, 1.0001, -0.5, True, math.nan):
    with pytest.raises(UserInputError, match=r"^tau must be a number in \(0, 1\], got "):
      validation.fraction("tau", bad)


def test_one_of_and_ranks():
  assert validation.one_of("dtype", "float32", ("bfloat16", "float32")) == "float32"
  with pytest.raises(UserInputError, match=r"^dtype must be one of \('bfloat16', 'float32'\), got 'float16'$"):
    validation.one_of("dtype", "float16", ["bfloat16", "float32"])
  assert validation.ranks("targets", [8, 4, 8]) == (8, 4, 8)
  assert validation.ranks("ranks", (16, 8, 1), decreasing=True) == (16, 8, 1)
  with pytest.raises(UserInputError, match=r"^targets must be a non-empty tuple of positive integers, got \(\)$"):
    validation.ranks("targets", ())
  with pytest.raises(UserInputError, match=r"^targets must be a non-empty tuple of positive integers, got \(4, 0\)$"):
    validation.ranks("targets", (4, 0))
  with pytest.raises(UserInputError, match=r"^ranks must be strictly decreasing ranks, .*, got \(8, 8\)$"):
    validation.ranks("ranks", (8, 8), decreasing=True)


def test_the_error_is_a_value_error_for_existing_callers():
  # Code that caught ValueError before the validation module still catches it.
  assert issubclass(UserInputError, ValueError)
