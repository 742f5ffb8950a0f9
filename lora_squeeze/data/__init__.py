"""Tasks (sources, prompt formats, metrics), readers and token batches for training and scoring."""

from lora_squeeze.data.readers import DatasetNotPreparedError
from lora_squeeze.data.tasks import Example, Task, get_task, task_names

__all__ = ["DatasetNotPreparedError", "Example", "Task", "get_task", "task_names"]
