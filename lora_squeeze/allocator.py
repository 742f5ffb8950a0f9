"""Huge pages for XLA's large host temporaries: `lora-squeeze` restarts itself once with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` when the variable is unset.

glibc serves every block above its mmap threshold with a fresh mmap and unmaps it on free, so each
CPU train step of the 270M faults its large temporaries (the gathered logits, hundreds of MB) in
again 4 KiB at a time; with the tunable glibc asks for transparent huge pages there: 1.13x faster
steps, the same losses bit for bit (benchmarks/malloc_bench.py, docs/training.md). glibc reads
tunables once, when the process starts, hence the restart (os.execv: same PID, same arguments,
before JAX or anything else is imported). It happens only with glibc >= 2.35 (which has the
tunable) and when GLIBC_TUNABLES is unset: a value of yours is never touched. Set
LORA_SQUEEZE_MALLOC=default to keep glibc's defaults.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "LORA_SQUEEZE_MALLOC"


def wanted(environ=os.environ) -> bool:
  """Whether this process should restart with the tunable (see the module docstring)."""
  if "GLIBC_TUNABLES" in environ:
    return False
  choice = environ.get(OPT_OUT, "huge_pages")
  if choice not in ("huge_pages", "default"):
    raise SystemExit(f"{OPT_OUT}={choice!r} is not one of 'huge_pages' (the default) or 'default'")
  if choice == "default":
    return False
  libc, version = platform.libc_ver()
  if libc != "glibc":
    return False
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:  # a version string we cannot read: leave glibc alone
    return False
  return (major, minor) >= (2, 35)


def restart_with_huge_pages() -> None:
  """Replaces this process by the same command line with GLIBC_TUNABLES set, when wanted()."""
  if not wanted():
    return
  os.environ["GLIBC_TUNABLES"] = TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
