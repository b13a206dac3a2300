"""Atomic writes: a crash or kill leaves either the old or the new content of a file, never half, and a
folder written with ``atomic_folder`` is either there whole or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import typing
from pathlib import Path


def atomic_write(path: str | Path, write: typing.Callable[[typing.IO], object], binary: bool = False) -> None:
    """Create ``path`` through ``write(file)``: a temporary file in the same folder, fsynced, renamed over
    ``path``, then the folder fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text))


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> typing.Iterator[Path]:
    """Yield a new temporary folder beside ``path`` to write into; when the block ends, its files are
    fsynced and it is renamed to ``path`` (which must not exist or be an empty folder). If the block raises
    (or the process is killed), ``path`` is left as it was and the temporary folder is removed (a kill
    leaves a hidden ``.NAME.*.tmp`` folder beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: the folder keeps the user's umask, as a folder made by hand would
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
