"""Never destroy data: output paths are checked against the input, written beside the target
under a temporary name and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from lora_squeeze.adapters.errors import AdapterError


def check_distinct(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Raises AdapterError when dst is src, lies inside src, or contains src (symlinks resolved)."""
    src_path = pathlib.Path(src).resolve()
    dst_path = pathlib.Path(dst).resolve()
    if src_path == dst_path:
        raise AdapterError(f"output {dst} is the input {src}; choose a new path (the source is never overwritten)")
    if src_path in dst_path.parents:
        raise AdapterError(f"output {dst} lies inside the input {src}; choose a path outside it")
    if dst_path in src_path.parents:
        raise AdapterError(f"input {src} lies inside the output {dst}; choose a path that does not contain it")


def check_writable(dst: str | os.PathLike, *, force: bool) -> pathlib.Path:
    """Checks that dst can be created: its folder exists, and dst does not (unless force)."""
    dst_path = pathlib.Path(dst)
    if not dst_path.parent.resolve().is_dir():
        raise AdapterError(f"the folder of the output {dst} does not exist: {dst_path.parent}")
    if dst_path.exists() and not force:
        raise AdapterError(f"output {dst} already exists; pass --force (force=True) to replace it")
    return dst_path


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, force: bool = False) -> Iterator[pathlib.Path]:
    """Yields a path to write (a file or a folder) that becomes dst when the block succeeds.

    The path lies in a fresh hidden folder beside dst (same file system, so the final rename is
    atomic for a file, and a pair of renames for a folder). On any error the temporary folder is
    removed and dst is untouched. With force, an existing dst is replaced only after the new
    output is complete.
    """
    dst_path = check_writable(dst, force=force)
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.tmp-", dir=dst_path.parent))
    try:
        target = tmp_dir / dst_path.name
        yield target
        if not target.exists():
            raise AdapterError(f"nothing was written for {dst}")
        _move_into_place(target, dst_path, tmp_dir, force=force)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _move_into_place(target: pathlib.Path, dst: pathlib.Path, tmp_dir: pathlib.Path, *, force: bool) -> None:
    if not dst.exists() and not dst.is_symlink():
        os.rename(target, dst)
        return
    if not force:  # dst appeared while we were writing
        raise AdapterError(f"output {dst} already exists; pass --force (force=True) to replace it")
    if target.is_file() and dst.is_file():
        os.replace(target, dst)
        return
    # A folder cannot be swapped in one rename: park the old one in tmp_dir (removed afterwards),
    # and put it back if the second rename fails.
    parked = tmp_dir / ".replaced"
    os.rename(dst, parked)
    try:
        os.rename(target, dst)
    except OSError:
        os.rename(parked, dst)
        raise
