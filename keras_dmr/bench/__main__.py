"""``python -m keras_dmr.bench [options]``: the same run as ``keras-dmr bench``."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from keras_dmr.bench.command import DESCRIPTION, add_bench_arguments, run_bench
    from keras_dmr.errors import UsageError

    parser = argparse.ArgumentParser(prog="python -m keras_dmr.bench", description=DESCRIPTION)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except UsageError as err:
        parser.error(str(err))  # exits 2


if __name__ == "__main__":
    sys.exit(main())
