"""What every benchmark's JSON ends with: the machine it ran on and when, written atomically enough
for a benchmark (the parent folder made, one write)."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from collections.abc import Mapping
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
  """Platform, CPU count and load average now, plus `extra` fields."""
  return {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_after": os.getloadavg(), **extra}


def write(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """`record` with the finishing time (UTC) as indented JSON at `path`; prints where."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
    json.dumps({**record, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n"
  )
  print(f"wrote {path}")
