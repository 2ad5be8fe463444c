"""Native (C++) output kept off the console: TensorFlow's converters print their MLIR passes and
quantizer settings (``fully_quantize: 0, inference_type: 6, …``) straight to file descriptor 2,
where Python's ``sys.stderr`` redirection cannot reach (no heavy imports here)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def native_output_to_log(what: str) -> Iterator[Path]:
    """Send everything written to file descriptors 1 and 2 inside the block to a log file.

    Yields the log's path, for the block's error messages to name: the log is kept when the
    block raises and removed when it succeeds. ``what`` names the work in the log's file name.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd, log = tempfile.mkstemp(prefix=f"keras-dmr-{what}-", suffix=".log")
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            yield Path(log)
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    except BaseException:  # keep the log: it holds the native side's account of the failure
        raise
    else:
        Path(log).unlink(missing_ok=True)
    finally:
        for descriptor in (*saved, fd):
            os.close(descriptor)
