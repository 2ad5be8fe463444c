"""``keras-dmr prune``: parse, call :mod:`keras_dmr.prune`, print."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import keras

from keras_dmr.layers import RESIDUAL_BLOCKS
from keras_dmr.prune import (
    CRITERIA,
    accuracy,
    describe,
    format_table,
    fuse_batchnorm,
    prune_channels,
    slim,
    slim_residual,
    throughput,
)
from keras_dmr.utils.arguments import int_at_least as _count_arg
from keras_dmr.utils.arguments import output_path
from keras_dmr.utils.files import atomic_output

# ---------------------------------------------------------------------------------- CLI
PRUNE_HELP = "prune a checkpoint by network slimming (Sec. 4.2)"
PRUNE_DESCRIPTION = (
    "Convert the model in CHECKPOINT (.keras) to its plain form with BN kept, drop the channels "
    "whose BN scale is below --threshold (or the lowest --ratio of them, or the least important "
    "until --macs of the multiply-accumulates are left), fine-tune for --finetune-epochs, print "
    "parameters, MACs, accuracy and measured throughput before and after, and save the pruned "
    "model atomically. --residual prunes the model as it is instead (channels tied by a shortcut "
    "go together): the baseline of Fig. 7, and the way to prune a CNN that has no plain form. "
    "--macs, --criterion l2 and --round-to prune by channel groups over the whole graph "
    "(keras_dmr.prune.prune_channels), which takes any functional CNN; --threshold and --ratio "
    "with the bn criterion use network slimming of the plain chain (keras_dmr.prune.slim). "
    "Train with keras_dmr.prune.BNSparsity (and skip_bn) first for channels worth dropping."
)


def _threshold_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0; got {text!r}")
    return value


def _ratio_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1); got {text!r}")
    return value


def _macs_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be the fraction of MACs to keep, a number in (0, 1]; got {text!r}"
        )
    return value


def _lr_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text!r}")
    return value


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``keras-dmr prune``."""
    from keras_dmr import data

    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .keras model")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--threshold",
        type=_threshold_arg,
        metavar="T",
        help="drop channels whose BN scale is below T (the paper: 5e-4 to 5e-3)",
    )
    how.add_argument(
        "--ratio", type=_ratio_arg, metavar="R", help="drop the lowest fraction R of channels"
    )
    how.add_argument(
        "--macs",
        type=_macs_arg,
        metavar="M",
        help="drop the least important channel groups until at most the fraction M of the "
        "multiply-accumulates is left (0.4: 40%%)",
    )
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="bn",
        help="channel importance: bn (BN scale, after sparsity training; default) or l2 "
        "(filter norm, no sparsity training needed)",
    )
    parser.add_argument(
        "--round-to",
        type=_count_arg(1),
        default=1,
        metavar="N",
        help="every layer keeps a multiple of N filters (8 or 16 run faster in int8 engines; "
        "graph pruning, as --macs; default 1)",
    )
    parser.add_argument(
        "--residual",
        action="store_true",
        help="prune the model as it is (the residual baseline, or a CNN without a plain form) "
        "instead of its plain form",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=_count_arg(0),
        default=2,
        metavar="N",
        help="fine-tuning epochs after pruning (default: 2)",
    )
    parser.add_argument(
        "--learning-rate",
        type=_lr_arg,
        default=0.01,
        metavar="LR",
        help="fine-tuning learning rate, recipe schedule (default: 0.01)",
    )
    parser.add_argument(
        "--batch-size", type=_count_arg(1), default=64, metavar="N", help="(default: 64)"
    )
    parser.add_argument(
        "--dataset",
        choices=data.SUPPORTED,
        default="digits",
        help="data for fine-tuning and accuracy (default: digits, bundled)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data directory")
    parser.add_argument(
        "--downsample",
        choices=("dirac", "prelu"),
        default="dirac",
        help="RM of downsampling blocks (default: dirac)",
    )
    parser.add_argument(
        "--fuse-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="save with BN fused into the convolutions (deployment; default: kept, to fine-tune)",
    )
    parser.add_argument(  # the former name
        "--fold-bn", dest="fuse_bn", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--output",
        type=output_path("file"),
        metavar="PATH",
        help="pruned model (default: CHECKPOINT's name with _pruned)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def run_prune(args: argparse.Namespace) -> int:
    """``keras-dmr prune``: returns the exit code; bad arguments raise ``UsageError``."""
    from keras_dmr import data
    from keras_dmr.cli.common import load_checkpoint
    from keras_dmr.convert import ConversionError, to_plain
    from keras_dmr.errors import UsageError
    from keras_dmr.recipe import StepDecay, compile_with_recipe

    output = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}_pruned.keras")
    if output.suffix != ".keras":
        raise UsageError(f"argument --output: must end in .keras; got {str(output)!r}")
    if output.exists() and not args.overwrite:
        raise UsageError(f"argument --output: {output} exists; pass --overwrite to replace it")
    model = load_checkpoint(args.checkpoint)
    info = data.dataset_info(args.dataset)
    if model.outputs[0].shape[-1] != info.num_classes:
        raise UsageError(
            f"argument --dataset: {args.dataset} has {info.num_classes} classes, the model "
            f"{model.outputs[0].shape[-1]} outputs"
        )
    over_graph = args.macs is not None or args.criterion != "bn" or args.round_to != 1
    try:
        source = (
            model if args.residual else to_plain(model, fuse_bn=False, downsample=args.downsample)
        )
        if over_graph:
            how = {"threshold": args.threshold, "ratio": args.ratio, "macs": args.macs}
            pruned = prune_channels(source, criterion=args.criterion, round_to=args.round_to, **how)
        elif args.residual:
            if not any(isinstance(layer, RESIDUAL_BLOCKS) for layer in model.layers):
                raise UsageError(
                    f"argument --residual: {args.checkpoint} holds none of this package's "
                    "residual blocks; --macs or --criterion l2 prune any graph as it is"
                )
            pruned = slim_residual(model, threshold=args.threshold, ratio=args.ratio)
        else:
            pruned = slim(source, threshold=args.threshold, ratio=args.ratio)
    except (ConversionError, ValueError) as e:
        hint = "" if args.residual else " (--residual prunes the model as it is)"
        raise UsageError(f"cannot prune {args.checkpoint}: {e}{hint}") from None
    report = pruned.pruning_report
    test = data.load(args.dataset, "test", batch_size=args.batch_size, data_dir=args.data_dir)
    print(_summary(model.name, report), flush=True)
    pruned_accuracy = accuracy(pruned, test)
    if args.finetune_epochs:
        # Whole batches: TensorFlow 2.21's oneDNN CPU kernels can crash training a pruned
        # functional ResNet on a short last batch.
        train = data.load(
            args.dataset,
            "train",
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            drop_remainder=True,
        )
        last = model.layers[-1]
        linear = getattr(last, "activation", None) in (None, keras.activations.linear)
        compile_with_recipe(pruned, learning_rate=args.learning_rate, from_logits=linear)
        n = args.finetune_epochs
        print(f"fine-tuning for {n} epoch{'s' if n > 1 else ''}", flush=True)
        pruned.fit(
            train,
            validation_data=test,
            epochs=args.finetune_epochs,
            shuffle=False,
            verbose=1 if sys.stdout.isatty() else 2,
            callbacks=[StepDecay()],
        )
    final = fuse_batchnorm(pruned) if args.fuse_bn else pruned
    models = {f"{model.name} (checkpoint)": model}
    if source is not model:  # the plain form before pruning, in the form saved
        models["plain, before pruning"] = fuse_batchnorm(source) if args.fuse_bn else source
    models["pruned" + (" (fine-tuned)" if args.finetune_epochs else "")] = final
    speed = throughput(models, batch_size=args.batch_size)
    rows = describe(models, data=test, speed=speed)
    print(format_table(rows))
    print(f"accuracy right after pruning, before fine-tuning: {pruned_accuracy:.4f}")
    with atomic_output(output, suffix=".keras") as tmp:
        final.save(tmp)
    print(f"wrote {output}")
    return 0


def _summary(name: str, report: dict) -> str:
    """One line of what was dropped (slimming's and graph pruning's reports differ)."""
    kept = f"{name}: kept {report['channels_after']:,} of {report['channels_before']:,} channels"
    if "macs_after" in report:
        how = {"macs": "MACs budget", "ratio": "ratio", "threshold": "threshold"}
        given = next(k for k in ("macs_target", "ratio", "threshold") if report[k] is not None)
        value = report[given]
        return (
            f"{kept} ({report['criterion']} importance, {how[given.removesuffix('_target')]} "
            f"{value:.3g}); MACs {report['macs_after']:,} of {report['macs_before']:,} "
            f"({report['macs_after'] / report['macs_before']:.1%})"
        )
    return (
        f"{kept} (BN scale threshold {report['threshold']:.3g}); "
        f"{report['pruned_params_ratio']:.1%} of the parameters pruned"
    )


def prune_command():
    """The ``Command`` entry of ``keras-dmr prune`` for :data:`keras_dmr.cli.COMMANDS`."""
    from keras_dmr.cli.common import Command

    return Command(
        "prune",
        help=PRUNE_HELP,
        description=PRUNE_DESCRIPTION,
        add_arguments=add_prune_arguments,
        run=run_prune,
    )
