"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every output that a person or a later run reads (tables, plots, metrics cut
back on resume, caches, state dicts) is written to a temporary name in the
same folder and renamed over the target when complete; a failure (a full
disk, an interrupt) removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path`; when the block ends without an error it is
    renamed to `path` (made readable by `mode`: mkstemp's 0600 would hide results from
    colleagues), else removed. The parent folder is created."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir() -> pathlib.Path:
    """Where caches live: $XDG_CACHE_HOME/minigpt_jax (default ~/.cache/minigpt_jax)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "minigpt_jax"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
