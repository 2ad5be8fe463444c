"""``keras-dmr convert``: a residual checkpoint rewritten as a plain network (the RM operation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from keras_dmr.cli.common import (
    describe_report,
    load_checkpoint,
)
from keras_dmr.errors import UsageError
from keras_dmr.utils.arguments import output_path
from keras_dmr.utils.files import atomic_output


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .keras model")
    parser.add_argument(
        "output", type=output_path("file"), metavar="OUT", help="the plain model (.keras)"
    )
    parser.add_argument(
        "--downsample",
        choices=("dirac", "prelu"),
        default="dirac",
        help="downsample blocks by Fig. 9b (dirac, default) or Fig. 9a (prelu)",
    )
    parser.add_argument(
        "--fuse-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fuse BN into the convolutions (default); --no-fuse-bn keeps a BatchNormalization "
        "after every conv, for fine-tuning (Appendix A.2)",
    )
    parser.add_argument(  # the former name of --no-fuse-bn
        "--keep-bn", dest="fuse_bn", action="store_false", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)"
    )


def run_convert(args: argparse.Namespace) -> int:
    from keras_dmr.convert import ConversionError, to_plain

    if args.output.suffix != ".keras":
        raise UsageError(f"argument OUT: must end in .keras; got {str(args.output)!r}")
    if args.output.exists() and not args.overwrite:
        raise UsageError(f"argument OUT: {args.output} exists; pass --overwrite to replace it")
    model = load_checkpoint(args.checkpoint)
    try:
        plain = to_plain(model, fuse_bn=args.fuse_bn, downsample=args.downsample)
    except ConversionError as e:
        raise UsageError(f"cannot convert {args.checkpoint}: {e}") from None
    with atomic_output(args.output, suffix=".keras") as tmp:
        plain.save(tmp)
    print(f"{model.name} → {plain.name}: {len(plain.layers)} layers, no residual connections")
    print(describe_report(plain.conversion_report))
    print(f"wrote {args.output}")
    return 0
