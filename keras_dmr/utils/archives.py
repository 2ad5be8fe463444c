"""Integrity of ``.keras`` archives before Keras reads them (no heavy imports here).

Keras reports a truncated or corrupt ``.keras`` zip as "File not found ... Please ensure the file
is an accessible .keras zip file", which sends a user looking for a missing file. Reading the
zip's central directory and checking every member's CRC first gives the true reason.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

from keras_dmr.errors import CorruptArchiveError


def check_keras_archive(path: str | Path) -> None:
    """Raise :class:`CorruptArchiveError` naming ``path`` unless it is an intact zip archive
    holding a Keras model (``config.json``); every member's CRC is checked."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise CorruptArchiveError(
            f"{path} is corrupt or truncated: it is not a complete .keras (zip) archive ({err})"
        ) from None
    if bad is not None:
        raise CorruptArchiveError(
            f"{path} is corrupt: member {bad!r} of the .keras archive fails its CRC check"
        )
    if "config.json" not in names:
        raise CorruptArchiveError(
            f"{path} is a zip archive but not a .keras model (no config.json)"
        )
