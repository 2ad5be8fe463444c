"""Atomic writes: a file is complete or absent, never half-written (no heavy imports here)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_file(tmp: str | Path, path: str | Path) -> None:
    """``os.replace(tmp, path)`` giving ``tmp`` the permissions of a plainly created file
    (``mkstemp`` makes 0600 files)."""
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (hidden, ending in ``suffix``) to write to; when
    the block ends without an exception it replaces ``path`` with a plain file's permissions,
    otherwise it is removed. The parent directory is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically and flushed to disk."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` atomically (complete or absent)."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)


def save_figure(figure, path: str | Path, **kwargs) -> None:
    """``figure.savefig(path, **kwargs)`` atomically; the format follows ``path``'s suffix."""
    path = Path(path)
    with atomic_output(path, suffix=path.suffix) as tmp:
        figure.savefig(tmp, **kwargs)
