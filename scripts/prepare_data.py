"""Prepares a task's TFDS data as ArrayRecord under --data_dir (what training and evaluation read).

    python scripts/prepare_data.py siqa --data_dir=~/tensorflow_datasets --manual_dir=~/downloads/socialiqa
    python scripts/prepare_data.py mmlu --data_dir=~/tensorflow_datasets --manual_dir=~/downloads/mmlu
    python scripts/prepare_data.py anli_r2 --data_dir=~/tensorflow_datasets   # downloads: needs internet

The argument is a task name (lora_squeeze.data.task_names()) with a "tfds" source. SIQA and MMLU
are our own builders over the public files in --manual_dir; the others are TFDS catalog builders,
which download their sources (equivalent to `tfds build NAME --file_format=array_record`).
"""

from pathlib import Path

from absl import app, flags

from lora_squeeze.data import readers
from lora_squeeze.data.registry import get_task, task_names

_DATA_DIR = flags.DEFINE_string("data_dir", str(readers.default_data_dir()), "where prepared datasets go")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "folder with the downloaded public files (SIQA, MMLU)")


def main(argv):
  names = [n for n in task_names("text") if "tfds" in get_task(n).sources]
  if len(argv) != 2 or argv[1] not in names:
    raise app.UsageError(f"usage: prepare_data.py TASK --data_dir=DIR [--manual_dir=DIR]; TASK in {names}")
  source = get_task(argv[1]).source("tfds")
  if source.builder_module is not None and _MANUAL_DIR.value is None:
    raise app.UsageError(f"{argv[1]} reads the public files from --manual_dir (see {source.builder_module})")
  manual = None if _MANUAL_DIR.value is None else Path(_MANUAL_DIR.value).expanduser()
  path = readers.prepare_tfds(
    source.tfds_name, data_dir=Path(_DATA_DIR.value).expanduser(), manual_dir=manual, module=source.builder_module
  )
  print(f"prepared {source.tfds_name} in {path}")


if __name__ == "__main__":
  app.run(main)
