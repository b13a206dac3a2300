"""Atomic file writes: a crash or kill leaves either the old or the new content of a file, never half."""

from __future__ import annotations

import os
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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text))
