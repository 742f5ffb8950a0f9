"""The one duration format of every progress line: the trainer's ETA (train/progress.py), the
studies' grid ETA (experiments/grid.py) and the squeeze command's per-module ETA.

A module of its own at the bottom of the layering, so that the squeeze command prints it without
importing the trainer (lora_squeeze.train loads the model, optimizer and checkpoint stack).
"""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
  """62 -> '1m02s', 3725 -> '1h02m05s', NaN -> '?'."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def eta(elapsed: float, done: float, total: float) -> float:
  """Seconds left at the rate so far: `done` of `total` units took `elapsed` seconds (NaN before any)."""
  return elapsed / done * (total - done) if done > 0 else math.nan
