"""What the subcommands share: the parser and :class:`Command`, argument types, the model
registry of ``--model`` and loading a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import keras

from keras_dmr.errors import UsageError
from keras_dmr.layers.blocks import BRANCH_KINDS
from keras_dmr.models import DMRNet, DMRNeXt, DVANet, MobileNetV2, ResNet
from keras_dmr.utils.archives import CorruptArchiveError, check_keras_archive
from keras_dmr.utils.arguments import int_at_least as _int_at_least

PROG = "keras-dmr"


def _mobilenet_v2(depth: int | None, *, classes: int, compile: bool, width=None, **options):
    """The RMNet paper's CIFAR MobileNetV2 (plain form: MobileNetV1); ``--width`` is its
    ``alpha``. It has one depth, so ``depth`` must be None."""
    if depth is not None:
        raise ValueError(f"`depth`: mobilenetv2 has a fixed depth; omit it (got {depth})")
    if options:
        raise ValueError(f"`{next(iter(options))}` does not apply to mobilenetv2 (only width)")
    alpha = 1.0 if width is None else width
    return MobileNetV2(variant="cifar", alpha=alpha, classes=classes, compile=compile)


MODELS = {"dmrnet": DMRNet, "dvanet": DVANet, "resnet": ResNet, "dmrnext": DMRNeXt}
# What `train` builds: the networks of the papers, and the CIFAR MobileNetV2 that RM turns into
# MobileNetV1 (`paths` and `tune` stay with the merge-and-run family and its ResNet peers).
TRAIN_MODELS = {**MODELS, "mobilenetv2": _mobilenet_v2}
DISPLAY = {"dmrnet": "DMRNet", "dvanet": "DVANet", "resnet": "ResNet", "dmrnext": "DMRNeXt"}
# `train` defaults: small CIFAR-variant nets that train on the bundled digits in minutes on a CPU.
# ResNet-26 has 12 residual blocks, twice DMRNet-14's 6 merge-and-run blocks, as the paper pairs
# them (same number of branch layers); DMRNeXt-11 is the smallest DMRNeXt (9n + 2, n = 1).
TRAIN_DEPTHS = {"dmrnet": 14, "dvanet": 14, "resnet": 26, "dmrnext": 11, "mobilenetv2": None}
# `paths` defaults: the networks of the paper's Fig. 3 (and DMRNeXt-29 of Table 5).
FIG3 = (("resnet", 38), ("dvanet", 20), ("dmrnet", 20))
PATHS_DEPTHS = {"dmrnet": 20, "dvanet": 20, "resnet": 38, "dmrnext": 29}
# Builder options (a builder that does not take one says so: none is silently ignored).
MODEL_OPTIONS = ("branches", "width", "branch", "mapping")
# Arguments that must match for `train` to resume a checkpoint (`--epochs` may grow).
RESUME_KEYS = (
    "model",
    "depth",
    *MODEL_OPTIONS,
    "dataset",
    "batch_size",
    "learning_rate",
    "seed",
    "sparsity",
    "train_images",
)


class _Parser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of exiting, so ``main`` returns 2 to its caller."""

    def error(self, message: str):
        raise UsageError(message, self.format_usage())


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares it, ``run(args)`` returns the exit code."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------------
# Argument helpers shared by the subcommands
# --------------------------------------------------------------------------------------------


_positive_int = _int_at_least(1)
_natural = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text!r}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser, *, depth_help: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--depth", type=_positive_int, help=depth_help)
    group.add_argument(
        "--branches",
        type=_positive_int,
        metavar="K",
        help="parallel branches per block (dmrnet, dvanet, dmrnext; builder default 2)",
    )
    group.add_argument(
        "--width",
        type=_positive_float,
        help="multiplier of the per-branch widths 16/32/64 (not for dmrnext; mobilenetv2: its "
        "alpha; default 1)",
    )
    group.add_argument(
        "--branch",
        choices=BRANCH_KINDS,
        help="branch kind (default basic; bottleneck: depth 9n+2; resnext is dmrnext's own)",
    )
    group.add_argument(
        "--mapping",
        choices=("merge_and_run", "identity"),
        help="dmrnet only: merge_and_run (default) or identity (K separate ResNets, Table 7)",
    )


def build_model(
    model: str, depth: int, *, classes: int = 10, compile: bool = True, **options
) -> keras.Model:
    """Build a ``--model`` with the options given (``None``: the builder's default).

    The builders' ``ValueError`` (an option the model does not take included) becomes
    :class:`UsageError`.
    """
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return TRAIN_MODELS[model](depth, classes=classes, compile=compile, **options)
    except ValueError as e:
        named = [n for n in ("depth", *options) if f"`{n}`" in str(e) or f"'{n}'" in str(e)]
        where = f"argument --{named[0]}" if named else f"--model {model}"
        raise UsageError(f"{where}: {e}") from None


def _model_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in MODEL_OPTIONS}


def load_checkpoint(path: Path) -> keras.Model:
    """A model from a ``.keras`` file (safe mode: any Keras model, keras_dmr's or not), or a
    :class:`UsageError`."""
    if path.suffix != ".keras":
        raise UsageError(f"argument CHECKPOINT: must be a .keras file; got {str(path)!r}")
    if not path.is_file():
        raise UsageError(f"argument CHECKPOINT: {path} is not a file")
    try:
        check_keras_archive(path)
    except CorruptArchiveError as err:
        raise UsageError(f"argument CHECKPOINT: {err}") from None
    try:
        with warnings.catch_warnings():  # the optimizer is not needed (compile=False)
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # any unreadable or foreign file
        raise UsageError(f"cannot load {path}: {e}") from None
    return model


def describe_report(report: dict) -> str:
    def count(before, after, unit=""):
        if before is None:
            return "unknown (input size not fixed)"
        return f"{before:,}{unit} → {after:,}{unit} ({after / before:.2f}×)"

    error = report["max_relative_error"]
    lines = [
        f"parameters:      {count(report['params_before'], report['params_after'])}",
        f"MACs per image:  {count(report['flops_before'], report['flops_after'])}",
        "max rel. error:  "
        + ("not verified" if error is None else f"{error:.2e} (tolerance {report['tolerance']:g})"),
    ]
    blocks = report.get("blocks", [])
    if blocks:
        lines.append(f"residual blocks: {len(blocks)}")
        for b in blocks:
            if b["kind"] == "residual":
                branch = ", ".join(b["branch"]) or "(linear)"
                lines.append(f"  {b['node']}: branch {branch}; shortcut {b['shortcut']}")
            else:
                lines.append(f"  {b['node']}: {b['kind']} (rewrites itself)")
    if report.get("passed_through"):
        lines.append("passed through:  " + ", ".join(report["passed_through"]))
    return "\n".join(lines)


def _make_strategy(name: str, batch_size: int | None = None):
    """The ``--strategy`` for this backend; ``None`` for ``none`` (TensorFlow's strategies are
    imported only when named)."""
    from keras_dmr.training.parallel import make_strategy

    return make_strategy(name, batch_size=batch_size)


def _choices_list(valid):
    """An argparse type: a comma-separated list of names among ``valid``."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in valid]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"a comma-separated list of {', '.join(valid)}; got {text!r}"
            )
        return values

    return parse
