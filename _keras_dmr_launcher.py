"""The ``keras-dmr`` console script: quiets TensorFlow's C++ start-up logging, then runs
:func:`keras_dmr.cli.main`.

It lives outside the package because it must act before ``import keras_dmr`` imports Keras and
TensorFlow: TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` once, when its library loads, and absl
writes some lines ("All log messages before absl::InitializeLog() ...", "Could not find cuda
drivers ...", "failed call to cuInit ...") to file descriptor 2 whatever that level is. Unless
``--verbose`` is given, the level is set to 2 (warnings and errors from Python stay) and a
thread forwards everything written to descriptor 2 except those start-up lines, so a user sees
the package's own progress and real errors only. Child processes inherit both.
"""

from __future__ import annotations

import os
import re
import sys
import threading

STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|failed call to cuInit"
    r"|cuda_(platform|executor|diagnostics)\.cc|cpu_feature_guard\.cc|rebuild TensorFlow with"
    r"|single_machine\.cc|Unable to register cu(DNN|FFT|BLAS) factory|computation placer"
    r"|oneDNN custom operations are on|TF_ENABLE_ONEDNN_OPTS=0"
)


def is_startup_noise(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's start-up messages that the quiet mode drops."""
    return bool(STARTUP_NOISE.search(line))


def _filter_stderr() -> tuple[threading.Thread, int]:
    """Route descriptor 2 through a pipe; a thread copies all but start-up noise to the real
    stderr. Returns the thread and the saved descriptor (for :func:`_restore`)."""
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not is_startup_noise(line.decode("utf-8", "replace")):
                        os.write(real, line + b"\n")
            if pending and not is_startup_noise(pending.decode("utf-8", "replace")):
                os.write(real, pending)

    thread = threading.Thread(target=forward, name="keras-dmr-stderr", daemon=True)
    thread.start()
    return thread, real


def _restore(thread: threading.Thread, real: int) -> None:
    sys.stderr.flush()
    os.dup2(real, 2)  # closes the pipe's last write end in this process: the thread drains
    thread.join(timeout=5)
    os.close(real)


def main() -> int:
    verbose = "--verbose" in sys.argv[1:]
    if verbose:
        from keras_dmr.cli import main as cli_main

        return cli_main()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    thread, real = _filter_stderr()
    try:
        from keras_dmr.cli import main as cli_main

        return cli_main()
    finally:
        _restore(thread, real)


if __name__ == "__main__":
    sys.exit(main())
