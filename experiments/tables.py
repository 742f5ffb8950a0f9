"""The studies' text outputs: atomic text/JSON/CSV files, Markdown tables, and rows.json/rows.csv.

Every file goes through lora_squeeze.atomic, so a reader (or a study killed midway) never sees half
a table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from lora_squeeze import atomic

# Columns rows.json/rows.csv put first, in this order, when any row has them; the rest follow in
# first-seen order.
ROW_COLUMNS = (
  "study",
  "task",
  "rank",
  "r_src",
  "r_tgt",
  "method",
  "protocol",
  "lr",
  "seed",
  "tag",
  "metric",
  "score",
  "nll",
)


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` (its folder made when missing) so that readers never see half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_text(path, text)


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Indented, key-sorted JSON, written atomically."""
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
  """Rows (dicts) as CSV; columns default to the union of keys in first-seen order."""
  if columns is None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  atomic_write_text(path, buf.getvalue())


def markdown_table(
  header: Sequence[str],
  body: Sequence[Sequence[Any]],
  *,
  bold: set[tuple[int, int]] = frozenset(),
  float_format: str = "{:.1f}",
) -> str:
  """A GitHub Markdown table; cells (row, col) in `bold` are wrapped in ** (e.g. best per row)."""

  def fmt(i: int, j: int, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
      text = "–"
    elif isinstance(value, float):
      text = float_format.format(value)
    else:
      text = str(value)
    return f"**{text}**" if (i, j) in bold else text

  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(i, j, v) for j, v in enumerate(row)) + " |" for i, row in enumerate(body)]
  return "\n".join(lines) + "\n"


def write_rows(
  workdir: pathlib.Path,
  rows: Sequence[dict[str, Any]],
  unfinished: Sequence[str],
  *,
  log: Callable[[str], None],
) -> None:
  """rows.json and rows.csv (every score of the study) and a line naming unfinished cells."""
  columns = [c for c in ROW_COLUMNS if any(c in r for r in rows)]
  columns += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in columns]
  ordered = sorted(rows, key=lambda r: json.dumps([r.get(c) for c in columns], default=str))
  write_json(pathlib.Path(workdir) / "rows.json", ordered)
  write_csv(pathlib.Path(workdir) / "rows.csv", ordered, columns)
  if unfinished:
    log(
      f"[report] {len(unfinished)} cells unfinished, left out: {', '.join(unfinished[:5])}"
      f"{' ...' if len(unfinished) > 5 else ''}"
    )
