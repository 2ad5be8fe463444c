"""The ``keras-dmr`` command line, one module per subcommand: ``train`` (resumable, optionally on
a tf.distribute strategy), ``tune`` (Keras Tuner), ``paths`` (Fig. 3), ``convert`` (the RM
operation), ``export`` (TF Serving, ONNX, LiteRT), ``prune`` (network slimming), ``bench`` (the
benchmark suite) and ``demo`` (the main job).

Every subcommand is one :class:`Command` in :data:`COMMANDS`: a function that adds its arguments
and a function that runs it. Argument mistakes -- argparse's own and the ``ValueError``s of the
model builders alike -- end as ``keras-dmr: error: ...`` on stderr with exit code 2, never as a
traceback; any other exception is a bug and keeps its traceback.
"""

# ruff: noqa: E402  (TF reads TF_CPP_MIN_LOG_LEVEL at import: it is set before the imports)
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import sys
from collections.abc import Sequence

from keras_dmr.cli.common import PROG, Command, _Parser, load_checkpoint
from keras_dmr.cli.convert import add_convert_arguments, run_convert
from keras_dmr.cli.export import add_export_arguments, run_export
from keras_dmr.cli.paths import add_paths_arguments, run_paths
from keras_dmr.cli.train import add_train_arguments, run_train
from keras_dmr.cli.tune import add_tune_arguments, run_tune
from keras_dmr.data import DatasetUnavailableError, IDXError
from keras_dmr.errors import UsageError

__all__ = ["COMMANDS", "PROG", "Command", "load_checkpoint", "main", "make_parser"]

# --------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command(
        "train",
        help="train a network with the paper's recipe, resuming its checkpoint",
        description="Train a network with the DMRNet paper's recipe (SGD + Nesterov 0.9, lr 0.1 "
        "divided by 10 at 1/2, 3/4, 7/8 of the epochs, L2 1e-4), validating on the test split, "
        "and print its test accuracy. The checkpoint is rewritten atomically after every epoch; "
        "running the same command again resumes it (the optimizer state included) up to "
        "--epochs, or only evaluates it when it is complete. (A larger --epochs on resume spreads "
        "the schedule over the new total; epochs already done keep the rates they had.)",
        add_arguments=add_train_arguments,
        run=run_train,
    ),
    Command(
        "tune",
        help="search DMRNet/RMNet hyperparameters with Keras Tuner",
        description="Search the branches and depth/width rule of DMRNet (Sec. 5), or RepVGG's "
        "reserving ratio and RMNeXt's expansion and groups, with Keras Tuner's random, Bayesian "
        "or Hyperband search, training each trial with the paper's recipe and validating on the "
        "test split; print every trial and the best configuration and save the best model. "
        "--latency-budget scores each trial by accuracy under a latency budget of its converted "
        "plain model, timed on this machine. An existing project resumes its completed trials "
        "unless --overwrite; a distributed search (KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, "
        "KERASTUNER_ORACLE_PORT) runs this same command in the chief and in every worker.",
        add_arguments=add_tune_arguments,
        run=run_tune,
    ),
    Command(
        "paths",
        help="path-length distributions of networks (the paper's Fig. 3)",
        description="Print the mean ± std and a summary of the input-to-output path lengths of "
        "one network, or of Fig. 3's ResNet-38, DVANet-20 and DMRNet-20, and plot them. Models "
        "are built untrained; nothing is downloaded.",
        add_arguments=add_paths_arguments,
        run=run_paths,
    ),
    Command(
        "convert",
        help="rewrite a checkpoint as a plain Conv-ReLU model (RM)",
        description="Convert the model in CHECKPOINT (.keras) into a plain network with the same "
        "outputs (every residual block rewritten by the RM operation, BN folded), verify it on "
        "random batches, print parameters, multiply-accumulates and the maximum relative error, "
        "and save it to OUT atomically.",
        add_arguments=add_convert_arguments,
        run=run_convert,
    ),
    Command(
        "export",
        help="export the plain model for TF Serving or ONNX Runtime",
        description="Convert the model in CHECKPOINT to its plain form (verified) and export it: "
        "a SavedModel in TF Serving's layout BASE_DIR/NAME/<version>/ (a new version each time) "
        "or BASE_DIR/NAME.onnx. Input `images` (uint8 pixels, normalised inside the graph), "
        "outputs `logits`, `probabilities` and `classes`.",
        add_arguments=add_export_arguments,
        run=run_export,
    ),
]


def _register_late_commands() -> None:
    """Commands whose code lives beside what it drives (they import this module)."""
    from keras_dmr.cli.bench import DESCRIPTION as BENCH_DESCRIPTION
    from keras_dmr.cli.bench import HELP as BENCH_HELP
    from keras_dmr.cli.bench import add_bench_arguments, run_bench
    from keras_dmr.cli.demo import add_demo_arguments, run_demo
    from keras_dmr.cli.prune import (
        PRUNE_DESCRIPTION,
        PRUNE_HELP,
        add_prune_arguments,
        run_prune,
    )

    COMMANDS.append(
        Command(
            "prune",
            help=PRUNE_HELP,
            description=PRUNE_DESCRIPTION,
            add_arguments=add_prune_arguments,
            run=run_prune,
        )
    )
    COMMANDS.append(
        Command(
            "demo",
            help="the main job: train, convert, quantize, export, time, summarise",
            description="Train a residual network (MobileNetV2 by default; resuming its "
            "checkpoint under --runs), rewrite it as a plain Conv-ReLU network (verified; "
            "--family resnet20 also slims it), export both forms to every engine in float32 "
            "and int8 (SavedModel, ONNX Runtime, LiteRT, OpenVINO when installed), time them "
            "side by side against the residual Keras model, ship the fastest plain file within "
            "0.5 accuracy points under --base-dir and print one table with the targets met or "
            "missed.",
            add_arguments=add_demo_arguments,
            run=run_demo,
        )
    )
    COMMANDS.append(
        Command(
            "bench",
            help=BENCH_HELP,
            description=BENCH_DESCRIPTION,
            add_arguments=add_bench_arguments,
            run=run_bench,
        )
    )


_register_late_commands()


# What a command may import that `keras-dmr[jax]` does not install, and the extra that does.
OPTIONAL_MODULES = {
    "tensorflow": "TensorFlow",
    "tensorflow_datasets": "TensorFlow Datasets",
    "tf2onnx": "tf2onnx",
    "onnxruntime": "ONNX Runtime",
    "ai_edge_litert": "LiteRT",
    "keras_tuner": "Keras Tuner",
    "openvino": "OpenVINO",
    "matplotlib": "matplotlib",
}
COMMAND_EXTRAS = {"export": "export", "tune": "tune", "bench": "all", "demo": "all"}


def make_parser() -> argparse.ArgumentParser:
    """The ``keras-dmr`` parser, one subparser per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog=PROG,
        description="Merge-and-run networks (DMRNet) for Keras 3: train multi-branch, "
        "deploy plain.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow's C++ start-up logging (CUDA probing, CPU features), which is "
        "hidden by default; give it before COMMAND",
    )
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``keras-dmr`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    ``--help`` still raises ``SystemExit(0)`` as argparse does.
    """
    args = None
    try:
        args = make_parser().parse_args(argv)
        return args.run(args)
    except UsageError as e:
        if e.usage:
            sys.stderr.write(e.usage)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (DatasetUnavailableError, IDXError) as e:  # data that is missing or damaged
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency (train runs on JAX alone)
        root = (e.name or "").split(".")[0]
        if args is None or root not in OPTIONAL_MODULES:
            raise
        extra = COMMAND_EXTRAS.get(args.command, "all")
        print(
            f"{PROG}: error: {args.command} needs {OPTIONAL_MODULES[root]}, which is not "
            f'installed here (pip install "keras-dmr[{extra}]")',
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
