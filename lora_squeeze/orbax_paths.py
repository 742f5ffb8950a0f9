"""The one place that turns a user's path into the path every Orbax read and write gets.

Orbax (0.11) handles relative paths inconsistently: a PyTree checkpoint saved under a relative
path restores, but `metadata()` of it returns None ("'NoneType' object has no attribute 'tree'"),
so an adapter given as `run/adapters/r4` could not be opened. Every Orbax call in the package
(adapters/orbax_io.py, checkpoint.py, weights/cache.py) passes its path through `orbax_path`.
The path is made absolute without resolving symlinks or `..` (the kernel resolves those as it
would for the user's own path); messages keep showing the path the user gave.
"""

from __future__ import annotations

import os
import pathlib


def orbax_path(path: str | os.PathLike) -> pathlib.Path:
  """`path` as Orbax needs it: absolute (against the current folder), `~` expanded."""
  return pathlib.Path(os.fspath(path)).expanduser().absolute()
