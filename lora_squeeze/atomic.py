"""The project's one helper for atomic outputs: a file or folder appears complete at its path or not at all.

    with atomic.atomic_output(dst, force=False) as target:   # target: a path to create (file or folder)
        write(target)
    atomic.write_text(path, text)                             # small files (JSON records, logs)

How (the guarantees, in order of what can go wrong):
- The output is written to `target` inside a fresh hidden folder beside dst, `.<name>.tmp-<pid>-XXXX`
  (same file system, so the final rename is atomic). The folder holds a small owner record
  (`.owner.json`: pid, host, process start time, dst name).
- Errors, SIGINT (KeyboardInterrupt) and SIGTERM (the signal of `timeout`, schedulers and `kill`) remove
  the temporary folder; SIGTERM then ends the process as SIGTERM does (exit status 143).
- SIGKILL cannot be caught: the next `atomic_output`/`check_output` over the same dst removes the
  temporary folders of dead runs (owner record: same host, pid no longer running or reused). A folder
  of a live run, or of a run on another host, is never touched.
- Replacing (force): a file is replaced by one `os.replace` (atomic). A folder takes two renames: the
  old dst is parked inside the temporary folder (`.replaced`), then the new one is renamed to dst;
  SIGINT/SIGTERM are blocked between the two. Should a SIGKILL (or power loss) land between them, dst is
  missing for that instant and the next run over dst *rolls back*: it renames the parked old output to
  dst before anything else. The commit point is the second rename: a run that did not get there leaves
  the old output, a run that did leaves the new one.

The environment variable LORA_SQUEEZE_PAUSE_AT=<point> (`writing`, `written`, `swap`) makes the process
print `paused at <point>` on stderr and sleep there: the tests kill it with real signals at that point.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

from lora_squeeze.errors import UserInputError

PAUSE_ENV = "LORA_SQUEEZE_PAUSE_AT"
OWNER_FILE = ".owner.json"
PARKED = ".replaced"
_TMP_INFIX = ".tmp-"
# Longest name part kept in a temporary folder's name: with ".", ".tmp-", the pid and mkdtemp's 8
# random characters it stays far below the 255 bytes a file name may have.
_NAME_BYTES_IN_TMP = 120
# A temporary folder without an owner record (killed within microseconds of its creation) is
# removed only once it is this old.
_ORPHAN_SECONDS = 3600


class _Terminated(BaseException):
  """SIGTERM arrived inside atomic_output (a BaseException, so no `except Exception` swallows it)."""


def pause_point(point: str) -> None:
  """Test hook: sleeps at `point` when LORA_SQUEEZE_PAUSE_AT names it (see the module docstring)."""
  if os.environ.get(PAUSE_ENV) == point:
    print(f"paused at {point} (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(600)


def check_output_name(dst: str | os.PathLike, *, error: type[UserInputError] = UserInputError) -> pathlib.Path:
  """dst as a Path, when its last component can name a new file or folder."""
  path = pathlib.Path(dst)
  if path.name in ("", ".", ".."):
    raise error(
      f"output {os.fspath(dst)!r} does not name a file or folder of its own (it ends in "
      f"{path.name or '/'!r}); give the new output's name, e.g. {os.fspath(path)!r}/squeezed"
    )
  limit = _name_max(path.parent)
  size = len(os.fsencode(path.name))
  if size > limit:
    raise error(
      f"output name {path.name[:40]!r}... is {size} bytes; the file system allows names of at most {limit} bytes"
    )
  return path


def check_output(dst: str | os.PathLike, *, force: bool, error: type[UserInputError] = UserInputError) -> pathlib.Path:
  """Checks, before any compute, that dst can be written: a proper name, an existing writable folder,
  and dst absent unless force. Restores or removes what killed runs left over dst first."""
  path = check_output_name(dst, error=error)
  parent = path.parent
  if not parent.resolve().is_dir():
    raise error(f"the folder of the output {os.fspath(dst)} does not exist: {parent}")
  recover(path)
  if (path.exists() or path.is_symlink()) and not force:
    raise error(f"output {os.fspath(dst)} already exists; pass --force (force=True) to replace it")
  _probe_writable(parent, f"the folder of the output {os.fspath(dst)}", error=error)
  return path


def check_writable_folder(
  folder: str | os.PathLike, *, what: str, error: type[UserInputError] = UserInputError
) -> pathlib.Path:
  """Checks that `folder` is (or can be created as) a folder this process can write in."""
  path = pathlib.Path(folder)
  if path.exists() and not path.is_dir():
    raise error(f"{what} {os.fspath(folder)} is a file, not a folder; give a folder path")
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise error(f"{what} {os.fspath(folder)} cannot be created: {existing} is a file, not a folder")
  _probe_writable(existing, f"{what} {os.fspath(folder)}", error=error)
  return path


def _probe_writable(folder: pathlib.Path, what: str, *, error: type[UserInputError]) -> None:
  # Mode bits are not enough (root ignores them; immutable folders, read-only mounts and ACLs do
  # not show in them): try it.
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".lora-squeeze-probe-", dir=folder))
  except OSError as e:
    raise error(f"cannot write in {folder} ({what}): {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_output(
  dst: str | os.PathLike,
  *,
  force: bool = False,
  mode_like: str | os.PathLike | None = None,
  error: type[UserInputError] = UserInputError,
) -> Iterator[pathlib.Path]:
  """Yields a path to write (a file or a folder) that becomes dst when the block succeeds.

  Args:
    dst: the final path; its folder must exist. See the module docstring for the guarantees.
    force: replace an existing dst (only once the new output is complete).
    mode_like: a source file or folder: no output file or folder gets permission bits the source's
      files (or folders) lack, so a private (0600) input never gives a world-readable output.
    error: the UserInputError subclass raised for a bad dst.
  """
  path = check_output(dst, force=force, error=error)
  with _signals_end_the_block():
    tmp_dir = _make_tmp(path)
    target = tmp_dir / (path.name if path.name not in (OWNER_FILE, PARKED) else "out")
    try:
      pause_point("writing")
      yield target
      if not (target.exists() or target.is_symlink()):
        raise RuntimeError(f"nothing was written for {dst} at {target}")
      if mode_like is not None:
        restrict_modes(target, like=mode_like)
      pause_point("written")
      _move_into_place(target, path, tmp_dir, force=force, error=error)
    finally:
      _discard(tmp_dir, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes (or replaces) a small text file atomically: readers see the old or the new text."""
  with atomic_output(path, force=True) as target:
    target.write_text(text)


def write_json(path: str | os.PathLike, value: Any) -> None:
  """`write_text` of value as indented, key-sorted JSON."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


# -- the temporary folder and its owner ----------------------------------------------------------


def _tmp_prefix(path: pathlib.Path) -> str:
  name = os.fsencode(path.name)[:_NAME_BYTES_IN_TMP].decode(errors="ignore")
  return f".{name}{_TMP_INFIX}"


def _make_tmp(path: pathlib.Path) -> pathlib.Path:
  tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(path)}{os.getpid()}-", dir=path.parent))
  owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()), "dst": path.name}
  (tmp_dir / OWNER_FILE).write_text(json.dumps(owner))
  return tmp_dir


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` (clock ticks since boot), to tell a reused pid apart."""
  try:
    stat_line = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return stat_line.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _owner_alive(owner: dict[str, Any]) -> bool:
  if owner.get("host") != socket.gethostname():
    return True  # another host's run: nothing here can tell, so it is kept
  pid = owner.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  start = _process_start(pid)
  return owner.get("start") is None or start is None or start == owner["start"]


def recover(path: str | os.PathLike) -> list[pathlib.Path]:
  """Cleans what killed runs left over `path`: puts back an output parked by an interrupted
  replacement (when `path` is missing) and removes their temporary folders. Returns those removed."""
  path = pathlib.Path(path)
  prefix = _tmp_prefix(path)
  try:
    candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
  except OSError:
    return []
  removed = []
  for tmp_dir in sorted(candidates):
    try:
      owner = json.loads((tmp_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
      owner = None
    if owner is None:
      if time.time() - tmp_dir.stat().st_mtime < _ORPHAN_SECONDS:
        continue
    elif owner.get("dst") != path.name or _owner_alive(owner):
      continue
    parked = tmp_dir / PARKED
    if parked.exists() and not (path.exists() or path.is_symlink()):
      os.rename(parked, path)
      logging.warning(
        "restored %s from an interrupted replacement (process %s was killed mid-swap)",
        path,
        owner.get("pid") if owner else "?",
      )
    shutil.rmtree(tmp_dir, ignore_errors=True)
    logging.warning("removed %s, left behind by a killed run", tmp_dir)
    removed.append(tmp_dir)
  return removed


def _discard(tmp_dir: pathlib.Path, dst: pathlib.Path) -> None:
  parked = tmp_dir / PARKED
  if parked.exists() and not (dst.exists() or dst.is_symlink()):
    os.rename(parked, dst)  # the swap did not complete: the old output goes back
  shutil.rmtree(tmp_dir, ignore_errors=True)


def _move_into_place(
  target: pathlib.Path, dst: pathlib.Path, tmp_dir: pathlib.Path, *, force: bool, error: type[UserInputError]
) -> None:
  if not dst.exists() and not dst.is_symlink():
    os.rename(target, dst)
    return
  if not force:  # dst appeared while we were writing
    raise error(f"output {dst} already exists; pass --force (force=True) to replace it")
  if target.is_file() and dst.is_file():
    os.replace(target, dst)
    return
  # A folder cannot be swapped in one portable rename: park the old one in tmp_dir, then move the
  # new one in. SIGINT/SIGTERM wait until both are done; after a SIGKILL the next run rolls back.
  with _signals_blocked():
    os.rename(dst, tmp_dir / PARKED)
    pause_point("swap")
    os.rename(target, dst)


# -- signals --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  blocked = {signal.SIGINT, signal.SIGTERM}
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _signals_end_the_block() -> Iterator[None]:
  """Inside: SIGTERM raises _Terminated (so `finally` blocks clean up); after the cleanup the process
  ends by SIGTERM as it would have. SIGINT already raises KeyboardInterrupt. Main thread only; a
  SIGTERM handler the program installed itself is left alone."""
  if (
    threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
  ):
    yield
    return

  def on_term(signum, frame):
    del signum, frame
    raise _Terminated()

  signal.signal(signal.SIGTERM, on_term)
  try:
    yield
  except _Terminated:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)
    raise
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- permissions ----------------------------------------------------------------------------------


def restrict_modes(target: pathlib.Path, *, like: str | os.PathLike) -> None:
  """Clears on every file (folder) under target the permission bits no file (folder) of `like` has."""
  file_mask, dir_mask = _mode_masks(pathlib.Path(like))
  for root, dirs, files in os.walk(target):
    for name in files:
      _chmod_within(pathlib.Path(root) / name, file_mask)
    for name in dirs:
      _chmod_within(pathlib.Path(root) / name, dir_mask)
  _chmod_within(target, dir_mask if target.is_dir() else file_mask)


def _mode_masks(like: pathlib.Path) -> tuple[int, int]:
  mode = stat.S_IMODE(like.stat().st_mode)
  if not like.is_dir():
    return mode, 0o7777
  file_mask, dir_mask = 0, mode
  for root, dirs, files in os.walk(like):
    for name in files:
      file_mask |= stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
    for name in dirs:
      dir_mask |= stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
  return file_mask or 0o7777, dir_mask


def _chmod_within(path: pathlib.Path, mask: int) -> None:
  if path.is_symlink():
    return
  mode = stat.S_IMODE(path.stat().st_mode)
  if mode & ~mask:
    os.chmod(path, mode & mask)


def _name_max(folder: pathlib.Path) -> int:
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  try:
    return os.pathconf(folder, "PC_NAME_MAX")
  except (OSError, ValueError):
    return 255
