"""Tasks (sources, prompt formats, metrics), readers and token batches for training and scoring."""

from lora_squeeze.data.readers import DatasetNotPreparedError
from lora_squeeze.data.registry import get_task, task_names
from lora_squeeze.data.tasks import Example, Task

__all__ = ["DatasetNotPreparedError", "Example", "Task", "get_task", "task_names"]
