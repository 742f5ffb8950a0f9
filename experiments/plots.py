"""The studies' figures (matplotlib, headless): an annotated diverging heatmap, line plots and
interval (forest) plots of paired comparisons."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Drivers run headless (CI, servers); must precede the pyplot import.
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lora_squeeze import atomic  # noqa: E402


def save_figure(fig: plt.Figure, path: pathlib.Path) -> None:
  """Saves a PNG atomically (lora_squeeze.atomic) and closes the figure."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    with atomic.atomic_output(path, force=True) as target:
      fig.savefig(target, format="png", dpi=120, bbox_inches="tight")
  finally:
    plt.close(fig)


def plot_heatmap(
  values: np.ndarray,
  *,
  row_labels: Sequence[Any],
  col_labels: Sequence[Any],
  path: pathlib.Path,
  title: str,
  xlabel: str,
  ylabel: str,
  cbar_label: str,
  fmt: str = "{:+.1f}",
  notes: np.ndarray | None = None,
  bold: np.ndarray | None = None,
) -> None:
  """An annotated diverging heatmap, red = positive, blue = negative, white = 0; NaN cells left blank.

  values: (len(row_labels), len(col_labels)); rows are drawn top to bottom in the given order.
  notes: strings of the same shape, a second line under each value (e.g. its 95 % interval; ""
  for none); bold: booleans of the same shape, values drawn bold (e.g. the interval excludes 0).
  """
  values = np.asarray(values, dtype=float)
  if values.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f"heatmap values have shape {values.shape}, labels need {(len(row_labels), len(col_labels))}")
  for name, extra in (("notes", notes), ("bold", bold)):
    if extra is not None and np.shape(extra) != values.shape:
      raise ValueError(f"heatmap {name} have shape {np.shape(extra)}, the values {values.shape}")
  finite = values[np.isfinite(values)]
  limit = float(np.max(np.abs(finite))) if finite.size else 1.0
  limit = limit if limit > 0 else 1.0
  width, height = (1.3, 0.75) if notes is not None else (0.8, 0.6)
  fig, ax = plt.subplots(figsize=(1.6 + width * len(col_labels), 1.0 + height * len(row_labels)))
  image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", norm=mcolors.Normalize(-limit, limit), aspect="auto")
  ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
  ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      if np.isfinite(values[i, j]):
        strong = abs(values[i, j]) > 0.6 * limit  # white text on the dark ends of the colormap
        text = fmt.format(values[i, j]) + (f"\n{notes[i][j]}" if notes is not None and notes[i][j] else "")
        weight = "bold" if bold is not None and bold[i][j] else "normal"
        ax.text(
          j,
          i,
          text,
          ha="center",
          va="center",
          fontsize=7 if notes is not None else 8,
          fontweight=weight,
          color="white" if strong else "black",
        )
  fig.colorbar(image, ax=ax, label=cbar_label)
  save_figure(fig, path)


def plot_intervals(
  rows: Sequence[tuple[str, Mapping[str, Any]]],
  *,
  path: pathlib.Path,
  title: str,
  xlabel: Mapping[str, str],
  scale: Mapping[str, float] | None = None,
) -> None:
  """One panel per metric of `xlabel` (in its order), one line per (label, {metric: Comparison}):
  the mean difference and its interval (low, high) times scale[metric]; blue where the interval
  excludes zero, grey where it does not; rows top to bottom in the given order."""
  metrics = [m for m in xlabel if any(m in c for _, c in rows)]
  if not metrics:
    raise ValueError(f"no comparison has any of the metrics {list(xlabel)}")
  scale = scale or {}
  fig, axes = plt.subplots(
    1, len(metrics), figsize=(4.5 * len(metrics) + 3, 0.4 * len(rows) + 1.5), squeeze=False, sharey=True
  )
  for ax, metric in zip(axes[0], metrics):
    k = scale.get(metric, 1.0)
    for y, (_, comps) in enumerate(rows):
      c = comps.get(metric)
      if c is None:
        continue
      color = "tab:blue" if c.excludes_zero else "tab:gray"
      ax.errorbar(
        k * c.mean, y, xerr=[[k * (c.mean - c.low)], [k * (c.high - c.mean)]], fmt="o", color=color, capsize=3
      )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(xlabel[metric])
    ax.grid(axis="x", alpha=0.3)
  axes[0][0].set_yticks(range(len(rows)), [label for label, _ in rows])
  axes[0][0].invert_yaxis()
  fig.suptitle(title)
  save_figure(fig, path)


def plot_lines(
  series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  *,
  path: pathlib.Path,
  title: str,
  xlabel: str,
  ylabel: str,
  x_scale: str = "log2",
) -> None:
  """One line with markers per series name -> (xs, ys); x_scale "log2" (ranks, ticks at the data)
  or "log10" (learning rates, ticks at the data when there are at most 12)."""
  if x_scale not in ("log2", "log10"):
    raise ValueError(f"x_scale must be 'log2' or 'log10', got {x_scale!r}")
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for name, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", markersize=3 if len(xs) > 12 else 6, label=name)
  ticks = sorted({x for xs, _ in series.values() for x in xs})
  if x_scale == "log10":
    ax.set_xscale("log")
    if 0 < len(ticks) <= 12:  # a sweep grid: label its values, not matplotlib's crowded minor ticks
      ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  else:
    ax.set_xscale("log", base=2)
    powers = [t for t in ticks if t > 0 and math.log2(t).is_integer()]
    ticks = powers if len(ticks) > 12 and powers else ticks  # dense curves: label the powers of two
    ax.set_xticks(ticks, [str(int(t)) if float(t).is_integer() else str(t) for t in ticks])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save_figure(fig, path)
