"""argparse types shared by the ``keras-dmr`` subcommands (no heavy imports here)."""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``, or a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}")
        return value

    return parse


def directory_problem(directory: Path) -> str | None:
    """Why files cannot be written under ``directory`` (checking the nearest existing parent when
    it does not exist yet), or None when they can.

    Writability is probed by creating (and removing) an empty file there: permission bits say
    nothing to root, and pseudo-filesystems (``/proc``, ``/sys``) or read-only mounts refuse
    files whatever ``os.access`` answers.
    """
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} exists and is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".keras-dmr-probe-", dir=existing)
    except OSError as err:
        return f"cannot create files in {existing} ({err.strerror or type(err).__name__})"
    os.close(fd)
    os.unlink(probe)
    return None


def output_path(kind: str) -> Callable[[str], Path]:
    """An argparse ``type`` for a path the command will write: a ``"file"`` (not an existing
    directory, its folder writable) or a ``"dir"`` (writable or creatable); checked before any
    work starts."""
    if kind not in ("file", "dir"):
        raise ValueError(f"`kind` must be 'file' or 'dir'; got {kind!r}")

    def parse(text: str) -> Path:
        path = Path(text)
        if kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
        problem = directory_problem(path.parent if kind == "file" else path)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return path

    parse.output_kind = kind  # lets the tests find every output path argument
    return parse


def renamed_keyword(kwargs: dict, old: str, new: str, value, where: str):
    """``value`` of the keyword ``new``, or of its deprecated spelling ``old`` when ``kwargs``
    (the function's ``**kwargs``) has it, with a ``DeprecationWarning``; any other key in
    ``kwargs`` is a ``TypeError`` as Python would raise."""
    if old in kwargs:
        warnings.warn(
            f"{where}: `{old}` is deprecated, use `{new}` (same meaning)",
            DeprecationWarning,
            stacklevel=3,
        )
        value = kwargs.pop(old)
    if kwargs:
        raise TypeError(f"{where}() got an unexpected keyword argument {sorted(kwargs)[0]!r}")
    return value
