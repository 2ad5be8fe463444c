"""The ``keras-dmr`` command line: ``train`` (resumable, optionally on a tf.distribute strategy),
``tune`` (Keras Tuner), ``paths`` (Fig. 3), ``convert`` (RM operation) and ``export`` (TF Serving,
ONNX).

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
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import keras

from keras_dmr import data
from keras_dmr.analysis import path_length_distribution, path_length_stats, plot_path_lengths
from keras_dmr.archives import CorruptArchiveError, check_keras_archive
from keras_dmr.arguments import int_at_least as _int_at_least
from keras_dmr.arguments import output_path
from keras_dmr.errors import UsageError
from keras_dmr.layers.blocks import BRANCH_KINDS
from keras_dmr.models import DMRNet, DMRNeXt, DVANet, ResNet
from keras_dmr.recipe import compile_with_recipe

PROG = "keras-dmr"
MODELS = {"dmrnet": DMRNet, "dvanet": DVANet, "resnet": ResNet, "dmrnext": DMRNeXt}
DISPLAY = {"dmrnet": "DMRNet", "dvanet": "DVANet", "resnet": "ResNet", "dmrnext": "DMRNeXt"}
# `train` defaults: small CIFAR-variant nets that train on the bundled digits in minutes on a CPU.
# ResNet-26 has 12 residual blocks, twice DMRNet-14's 6 merge-and-run blocks, as the paper pairs
# them (same number of branch layers); DMRNeXt-11 is the smallest DMRNeXt (9n + 2, n = 1).
TRAIN_DEPTHS = {"dmrnet": 14, "dvanet": 14, "resnet": 26, "dmrnext": 11}
# `paths` defaults: the networks of the paper's Fig. 3 (and DMRNeXt-29 of Table 5).
FIG3 = (("resnet", 38), ("dvanet", 20), ("dmrnet", 20))
PATHS_DEPTHS = {"dmrnet": 20, "dvanet": 20, "resnet": 38, "dmrnext": 29}
# Builder options, and the models that do not take them (the builders would ignore or reject them).
MODEL_OPTIONS = ("branches", "width", "branch", "mapping")
NOT_FOR = {"dvanet": ("mapping",), "resnet": ("branches", "mapping"), "dmrnext": MODEL_OPTIONS[1:]}
# Arguments that must match for `train` to resume a checkpoint (`--epochs` may grow).
RESUME_KEYS = (
    "model",
    "depth",
    *MODEL_OPTIONS,
    "dataset",
    "batch_size",
    "learning_rate",
    "seed",
)
STATE_MEMBER = "keras_dmr_state.json"  # the training state inside the .keras zip
STRATEGIES = ("none", "mirrored", "multiworker")  # keras_dmr.tuning.STRATEGIES (not imported)


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
        help="multiplier of the per-branch widths 16/32/64 (not for dmrnext; default 1)",
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

    Options a model does not take and the builders' ``ValueError`` become :class:`UsageError`.
    """
    options = {k: v for k, v in options.items() if v is not None}
    for name in options:
        if name in NOT_FOR.get(model, ()):
            raise UsageError(f"argument --{name}: does not apply to --model {model}")
    try:
        return MODELS[model](depth, classes=classes, compile=compile, **options)
    except ValueError as e:
        raise UsageError(f"--model {model}: {e}") from None


def _model_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in MODEL_OPTIONS}


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", choices=tuple(MODELS), default="dmrnet", help="network (default: dmrnet)"
    )
    _add_model_arguments(
        parser,
        depth_help="layers on the longest path: 6n+2 for basic branches, 9n+2 for bottleneck "
        "and dmrnext (default: " + ", ".join(f"{m} {d}" for m, d in TRAIN_DEPTHS.items()) + ")",
    )
    group = parser.add_argument_group("training")
    group.add_argument(
        "--dataset",
        choices=data.SUPPORTED,
        default="digits",
        help="digits is bundled (no download); the others come from TFDS (default: digits)",
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help="TFDS data directory of cifar10/cifar100/svhn_cropped (default: TFDS' own)",
    )
    group.add_argument(
        "--epochs",
        type=_positive_int,
        default=10,
        metavar="N",
        help="total epochs; the learning rate drops 10x at 1/2, 3/4 and 7/8 of them "
        "(default: 10, enough for digits; CIFAR needs hundreds)",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="(default: 64)"
    )
    group.add_argument(
        "--learning-rate",
        type=_positive_float,
        metavar="LR",
        help="initial learning rate instead of the recipe's 0.1 (same schedule)",
    )
    group.add_argument("--seed", type=_natural, default=0, help="random seed (default: 0)")
    group.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="none",
        help="tf.distribute strategy: mirrored (all local GPUs) or multiworker (the cluster of "
        "TF_CONFIG; start every worker with its own TF_CONFIG and --output); --batch-size is the "
        "global batch, split over all replicas (default: none)",
    )
    group = parser.add_argument_group("checkpointing")
    group.add_argument(
        "--output",
        type=output_path("file"),
        metavar="PATH",
        help="checkpoint, rewritten after every epoch, with its state in PATH.state.json "
        "(default: runs/<model><depth>_<dataset>.keras)",
    )
    group.add_argument(
        "--fresh",
        action="store_true",
        help="start from scratch, overwriting PATH, instead of resuming it",
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """``os.replace`` with the permissions of a plainly created file (mkstemp's are 0600)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _json_dump(obj, path: Path) -> None:
    """Write JSON atomically: a temporary file in the same folder, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: keras.Model, path: Path, state: dict) -> None:
    """Save ``model`` (optimizer included) to ``path`` atomically, ``state`` inside the zip.

    The state travels in the ``.keras`` archive itself (Keras ignores extra members) so that the
    weights and the epoch count can never disagree; ``<path>.state.json`` is a readable copy.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".keras", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(STATE_MEMBER, json.dumps(state, indent=2))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _json_dump(state, _state_path(path))


def _state_path(output: Path) -> Path:
    return output.with_name(output.name + ".state.json")


def read_state(output: Path) -> dict | None:
    """The training state of checkpoint ``output``; ``None`` when there is no checkpoint.

    A checkpoint that is not an intact ``.keras`` archive is never resumed nor overwritten
    silently: it is a :class:`UsageError` that says ``--fresh`` starts over."""
    if not output.exists():
        return None
    try:
        check_keras_archive(output)
    except CorruptArchiveError as err:
        raise UsageError(
            f"cannot resume: {err}. It was left as it is; pass --fresh to start over "
            "(overwriting it) or --output to write elsewhere"
        ) from None
    try:
        with zipfile.ZipFile(output) as zf:
            return json.loads(zf.read(STATE_MEMBER))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError):
        pass
    try:  # a checkpoint saved by other means, with only the sidecar
        return json.loads(_state_path(output).read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(
            f"{output} exists but holds no keras-dmr training state; pass --fresh to overwrite "
            "it or --output to write elsewhere"
        ) from None


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: append the epoch's metrics to ``state`` and save the checkpoint."""

    def __init__(self, path: Path, state: dict):
        super().__init__()
        self.path, self.state = path, state
        self._start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        record["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        record["seconds"] = round(time.monotonic() - self._start, 2)
        self.state["history"].append(record)
        self.state["completed_epochs"] = epoch + 1
        save_checkpoint(self.model, self.path, self.state)


def run_train(args: argparse.Namespace) -> int:
    depth = args.depth or TRAIN_DEPTHS[args.model]
    output = args.output or Path("runs") / f"{args.model}{depth}_{args.dataset}.keras"
    if output.suffix != ".keras":
        raise UsageError(f"argument --output: must end in .keras; got {str(output)!r}")
    config = {**{k: getattr(args, k) for k in RESUME_KEYS}, "depth": depth}
    info = data.dataset_info(args.dataset)
    keras.utils.set_random_seed(args.seed)

    strategy = _make_strategy(args.strategy)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    state = None if args.fresh else read_state(output)
    with scope:  # variables, optimizer and compile under the strategy
        model, state, completed = _train_model(args, output, config, info, state)
    state["args"] = {**config, "epochs": args.epochs}
    callbacks = [EpochCheckpoint(output, state)]
    if args.strategy == "multiworker":
        from keras_dmr.tuning.distribute import AverageBatchNormStatistics

        callbacks.insert(0, AverageBatchNormStatistics(strategy))

    test = data.load(args.dataset, "test", batch_size=args.batch_size, data_dir=args.data_dir)
    if completed < args.epochs:
        if completed:
            print(f"Resuming {output} after epoch {completed} of {args.epochs}", flush=True)
        else:
            print(
                f"Training {model.name} ({model.count_params():,} parameters) on {args.dataset} "
                f"for {args.epochs} epoch{'s' if args.epochs > 1 else ''}; checkpoint: {output}",
                flush=True,
            )
        if strategy is not None:
            print(
                f"Strategy {args.strategy}: {strategy.num_replicas_in_sync} replica(s), global "
                f"batch {args.batch_size}",
                flush=True,
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        for stale in output.parent.glob(f".{output.name}.*"):  # temporaries of a killed save
            stale.unlink(missing_ok=True)
        # A resumed run reshuffles from a different seed than epoch 0 did, not from the same.
        train = data.load(
            args.dataset,
            "train",
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            seed=args.seed + completed,
        )
        model.fit(
            train,
            validation_data=test,
            initial_epoch=completed,
            epochs=args.epochs,
            shuffle=False,  # the pipeline shuffles; Keras would warn that it cannot
            verbose=1 if sys.stdout.isatty() else 2,
            callbacks=callbacks,
        )
    else:
        print(f"{output} is already trained for {completed} epochs; evaluating it", flush=True)
    result = model.evaluate(test, verbose=0, return_dict=True)
    print(f"test accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f})")
    return 0


def _make_strategy(name: str):
    """The ``--strategy``; ``None`` for ``none`` (keras_dmr.tuning is imported only if needed)."""
    if name == "none":
        return None
    from keras_dmr.tuning.distribute import make_strategy

    return make_strategy(name)


def _train_model(args, output: Path, config: dict, info, state: dict | None):
    """``(model, state, completed epochs)``: the checkpoint resumed, or a new compiled model."""
    if state is not None:
        stored = state.get("args", {})
        differ = [k for k in RESUME_KEYS if stored.get(k) != config[k]]
        if differ:
            was = ", ".join(
                f"--{k.replace('_', '-')} {'(default)' if stored.get(k) is None else stored[k]}"
                for k in differ
            )
            raise UsageError(
                f"{output} was trained with {was}; pass the same arguments to resume it, "
                "--fresh to overwrite it, or --output to write elsewhere"
            )
        try:
            model = keras.saving.load_model(output)
        except Exception as e:  # not ours to diagnose: any unreadable file
            raise UsageError(f"cannot load {output} ({e}); pass --fresh to overwrite it") from None
        completed = int(state["completed_epochs"])
    else:
        model = build_model(
            args.model,
            config["depth"],
            classes=info.num_classes,
            compile=True,
            **_model_options(args),
        )
        if args.learning_rate is not None:
            compile_with_recipe(model, learning_rate=args.learning_rate)
        state, completed = {"args": config, "completed_epochs": 0, "history": []}, 0
    return model, state, completed


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------


def add_paths_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        help="one network to analyse (default: Fig. 3's ResNet-38, DVANet-20 and DMRNet-20)",
    )
    _add_model_arguments(
        parser,
        depth_help="with --model: layers on the longest path (default: "
        + ", ".join(f"{m} {d}" for m, d in PATHS_DEPTHS.items())
        + ")",
    )
    parser.add_argument(
        "--output",
        type=output_path("file"),
        default="paths.png",
        metavar="PATH",
        help="plot file (default: paths.png)",
    )


def describe_distribution(distribution: dict[int, float]) -> str:
    """One line: mean ± std, range, most common length and the central 90% of paths."""
    mean, std = path_length_stats(distribution)
    lengths = sorted(distribution)
    mode = max(lengths, key=distribution.__getitem__)
    cumulative, low, high = 0.0, None, lengths[-1]
    for n in lengths:
        cumulative += distribution[n]
        if low is None and cumulative >= 0.05:
            low = n
        if cumulative >= 0.95:
            high = n
            break
    return (
        f"mean {mean:.2f} ± {std:.2f}  lengths {lengths[0]}-{lengths[-1]}, "
        f"mode {mode} ({distribution[mode]:.1%} of paths), 90% within {low}-{high}"
    )


def run_paths(args: argparse.Namespace) -> int:
    options = _model_options(args)
    if args.model is None:
        given = [f"--{k}" for k, v in {"depth": args.depth, **options}.items() if v is not None]
        if given:
            raise UsageError(f"argument {given[0]}: needs --model")
        specs = [(model, depth, {}) for model, depth in FIG3]
    else:
        specs = [(args.model, args.depth or PATHS_DEPTHS[args.model], options)]
    models = {}
    for model, depth, opts in specs:
        net = build_model(model, depth, compile=False, **opts)
        k = opts.get("branches")
        models[f"{DISPLAY[model]}-{depth}" + (f" (K={k})" if k else "")] = net
    width = max(len(label) for label in models)
    for label, net in models.items():
        print(f"{label:<{width}}  {describe_distribution(path_length_distribution(net))}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot_path_lengths(models, str(args.output))
    print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------------------------
# convert and export
# --------------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> keras.Model:
    """A keras_dmr model from a ``.keras`` file (safe mode), or a :class:`UsageError`."""
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
    from keras_dmr.export.serving import is_plain

    ours = any(
        type(layer).__module__.startswith("keras_dmr")
        for layer in model._flatten_layers(include_self=True, recursive=True)
    )
    if not ours and not is_plain(model):  # a plain model (one we converted) is plain Keras
        raise UsageError(
            f"{path} is not a keras_dmr model (none of its layers is keras_dmr's) nor a plain "
            "one; its residual connections are not keras_dmr blocks"
        )
    return model


def describe_report(report: dict) -> str:
    def count(before, after, unit=""):
        if before is None:
            return "unknown (input size not fixed)"
        return f"{before:,}{unit} → {after:,}{unit} ({after / before:.2f}×)"

    error = report["max_relative_error"]
    return "\n".join(
        [
            f"parameters:      {count(report['params_before'], report['params_after'])}",
            f"MACs per image:  {count(report['flops_before'], report['flops_after'])}",
            "max rel. error:  "
            + (
                "not verified"
                if error is None
                else f"{error:.2e} (tolerance {report['tolerance']:g})"
            ),
        ]
    )


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
        "--keep-bn",
        action="store_true",
        help="keep a BatchNormalization after every conv, for fine-tuning (Appendix A.2)",
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
        plain = to_plain(model, fuse_bn=not args.keep_bn, downsample=args.downsample)
    except ConversionError as e:
        raise UsageError(f"cannot convert {args.checkpoint}: {e}") from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{args.output.name}.", suffix=".keras", dir=args.output.parent
    )
    os.close(fd)
    try:
        plain.save(tmp)
        _publish(tmp, args.output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"{model.name} → {plain.name}: {len(plain.layers)} layers, no residual connections")
    print(describe_report(plain.conversion_report))
    print(f"wrote {args.output}")
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .keras model")
    parser.add_argument("--name", required=True, help="model name: the folder under --base-dir")
    parser.add_argument(
        "--format",
        choices=("saved_model", "onnx"),
        default="saved_model",
        help="saved_model (TF Serving layout NAME/<version>/, default) or onnx (NAME.onnx)",
    )
    parser.add_argument(
        "--base-dir", type=output_path("dir"), default="savedmodels", help="(default: savedmodels)"
    )
    parser.add_argument(
        "--preprocessing",
        help="dataset whose mean/std the model was trained with, so the export takes uint8 "
        "pixels (default: the dataset recorded in a keras-dmr train checkpoint), or 'none' "
        "for float32 input fed as is",
    )
    parser.add_argument(
        "--version", type=_positive_int, help="saved_model version (default: the next one)"
    )


def run_export(args: argparse.Namespace) -> int:
    from keras_dmr import export
    from keras_dmr.convert import ConversionError

    if not args.name or not all(c.isalnum() or c in "-_." for c in args.name):
        raise UsageError(
            f"argument --name: letters, digits, '-', '_' and '.' only; got {args.name!r}"
        )
    model = load_checkpoint(args.checkpoint)
    preprocessing = args.preprocessing
    if preprocessing is None:
        try:
            state = read_state(args.checkpoint)
        except UsageError:
            state = None
        preprocessing = (state or {}).get("args", {}).get("dataset")
        if preprocessing is None:
            raise UsageError(
                f"argument --preprocessing: {args.checkpoint} records no training dataset; give "
                "the dataset its inputs were normalised with, or 'none'"
            )
    names = None
    if preprocessing in data.SUPPORTED:
        names = data.dataset_info(preprocessing).class_names
        if len(names) != model.outputs[0].shape[-1]:
            names = None
    try:
        if args.format == "saved_model":
            path = export.saved_model(
                model,
                args.base_dir / args.name,
                preprocessing=preprocessing,
                version=args.version,
                class_names=names,
            )
        else:
            if args.version is not None:
                raise UsageError("argument --version: only for --format saved_model")
            path = export.onnx(
                model,
                args.base_dir / f"{args.name}.onnx",
                preprocessing=preprocessing,
                class_names=names,
            )
    except (export.ExportError, ConversionError) as e:
        raise UsageError(str(e)) from None
    kind = "float32" if preprocessing == "none" else f"uint8, normalised for {preprocessing}"
    print(f"exported {model.name} as {args.format} (input images: {kind}): {path}")
    conversion = export.read_metadata(path)["conversion"]
    if conversion is not None:
        print(describe_report(conversion))
    return 0


# --------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------

TUNE_FAMILIES = ("dmrnet", "rmnet")
TUNERS = ("random", "bayesian", "hyperband")  # keras_dmr.tuning.TUNERS (imported only to tune)


def _block_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 4 or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"must be 4 comma-separated integers >= 1; got {text!r}")
    return counts


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--family",
        choices=TUNE_FAMILIES,
        default="dmrnet",
        help="dmrnet (HyperDMRNet) or rmnet (HyperRMNet: RepVGG or RMNeXt) (default: dmrnet)",
    )
    parser.add_argument("--tuner", choices=TUNERS, default="random", help="(default: random)")
    parser.add_argument(
        "--max-trials",
        type=_positive_int,
        default=10,
        metavar="N",
        help="trials in all (hyperband: a cap on its brackets' trials) (default: 10)",
    )
    group = parser.add_argument_group("search space (each option given is fixed, not searched)")
    group.add_argument(
        "--rule",
        choices=("same_params_depth", "same_width"),
        default="same_params_depth",
        help="dmrnet: the Sec. 5 depth/width rule for K (default: same_params_depth)",
    )
    group.add_argument("--branches", type=int, choices=(1, 2, 4, 8), help="dmrnet: fix K")
    group.add_argument(
        "--mapping", choices=("merge_and_run", "identity"), help="dmrnet: fix the mapping"
    )
    group.add_argument(
        "--rmnet-family",
        choices=("repvgg", "rmnext"),
        default="repvgg",
        help="rmnet: RepVGG with a reserving ratio or RMNeXt (default: repvgg)",
    )
    group.add_argument(
        "--reserve-ratios",
        choices=("paper", "continuous"),
        default="paper",
        help="repvgg: the paper's {0, 0.25, 0.5, 0.75} or [0, 1) (default: paper)",
    )
    group.add_argument("--learning-rate", type=_positive_float, metavar="LR", help="fix it")
    group.add_argument("--weight-decay", type=_positive_float, metavar="WD", help="fix it")
    group.add_argument(
        "--scale",
        type=_positive_float,
        default=1.0,
        help="width multiplier (e.g. 0.25 for tiny networks) (default: 1, the paper)",
    )
    group.add_argument(
        "--depth",
        type=_positive_int,
        help="dmrnet: replaces the rule's depth for every K (6n+2); rmnet: fixes the depth",
    )
    group.add_argument(
        "--blocks-per-stage",
        type=_block_counts,
        metavar="A,B,C,D",
        help="rmnet: blocks per stage instead of a depth (repvgg: even numbers)",
    )
    group = parser.add_argument_group("objective")
    group.add_argument(
        "--latency-budget",
        type=_positive_float,
        metavar="MS",
        help="score val_accuracy under this latency of the converted plain model, timed here "
        "(default: plain val_accuracy)",
    )
    group.add_argument(
        "--latency-batch-size",
        type=_positive_int,
        default=1,
        metavar="N",
        help="images per timed batch (default: 1)",
    )
    group = parser.add_argument_group("training")
    group.add_argument(
        "--dataset", choices=data.SUPPORTED, default="digits", help="(default: digits)"
    )
    group.add_argument("--data-dir", metavar="DIR", help="TFDS data directory")
    group.add_argument(
        "--epochs",
        type=_positive_int,
        default=10,
        metavar="E",
        help="epochs per trial (hyperband: the most a trial trains) (default: 10)",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="(default: 64)"
    )
    group.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        metavar="N",
        help="train on N batches per epoch (default: the whole split)",
    )
    group.add_argument(
        "--validation-steps",
        type=_positive_int,
        metavar="N",
        help="validate on N batches of the test split (default: all of it)",
    )
    group.add_argument("--seed", type=_natural, default=0, help="random seed (default: 0)")
    group.add_argument(
        "--strategy",
        choices=("none", "mirrored"),
        default="none",
        help="run every trial on this tf.distribute strategy (default: none)",
    )
    group = parser.add_argument_group("output")
    group.add_argument(
        "--directory",
        type=output_path("dir"),
        default="runs/tune",
        metavar="DIR",
        help="Keras Tuner's directory; shared by a distributed search (default: runs/tune)",
    )
    group.add_argument(
        "--project-name",
        metavar="NAME",
        help="project under DIR; an existing one resumes (default: <family>_<tuner>_<dataset>)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="start the project over instead of resuming it"
    )
    group.add_argument(
        "--output",
        type=output_path("file"),
        metavar="PATH",
        help="the best model (.keras), its summary in PATH.json (default: DIR/NAME/best.keras)",
    )


def _tune_hypermodel(args: argparse.Namespace, info, objective):
    from keras_dmr.tuning import HyperDMRNet, HyperRMNet

    common = dict(
        input_shape=info.image_shape,
        classes=info.num_classes,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        scale=args.scale,
        latency_objective=objective,
    )
    if args.family == "dmrnet":
        for name in ("blocks_per_stage",):
            if getattr(args, name) is not None:
                raise UsageError(f"argument --{name.replace('_', '-')}: only for --family rmnet")
        kind, build = (
            "dmrnet",
            lambda: HyperDMRNet(
                rule=args.rule,
                branches=args.branches,
                mapping=args.mapping,
                depth=args.depth,
                **common,
            ),
        )
    else:
        for name in ("branches", "mapping"):
            if getattr(args, name) is not None:
                raise UsageError(f"argument --{name}: only for --family dmrnet")
        kind, build = (
            args.rmnet_family,
            lambda: HyperRMNet(
                family=args.rmnet_family,
                depth=args.depth,
                reserve_ratios=args.reserve_ratios,
                blocks_per_stage=args.blocks_per_stage,
                **common,
            ),
        )
    try:
        return kind, build()
    except ValueError as e:
        raise UsageError(f"--family {args.family}: {e}") from None


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_tune(args: argparse.Namespace) -> int:
    from keras_dmr import tuning

    role = tuning.tuner_role()
    info = data.dataset_info(args.dataset)
    keras.utils.set_random_seed(args.seed)
    objective = None
    if args.latency_budget is not None:
        objective = tuning.plain_latency_objective(
            args.latency_budget, batch_size=args.latency_batch_size
        )
    kind, hypermodel = _tune_hypermodel(args, info, objective)
    name = args.project_name or f"{args.family}_{args.tuner}_{args.dataset}"
    output = args.output or args.directory / name / "best.keras"
    if output.suffix != ".keras":
        raise UsageError(f"argument --output: must end in .keras; got {str(output)!r}")
    if args.overwrite and role != "single":
        raise UsageError(
            "argument --overwrite: not in a distributed search (it would delete "
            "the project that the other tuners share)"
        )
    tuner = tuning.make_tuner(
        hypermodel,
        args.tuner,
        max_trials=args.max_trials,
        max_epochs=args.epochs,
        seed=args.seed,
        directory=str(args.directory),
        project_name=name,
        overwrite=args.overwrite,
        distribution_strategy=_make_strategy(args.strategy),
    )
    if role != "worker":
        done = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
        print(
            f"Tuning {kind} with {args.tuner} search on {args.dataset}: objective "
            f"{tuner.oracle.objective.name}"
            + (f" (plain-model latency budget {args.latency_budget:g} ms)" if objective else "")
            + f"; project {args.directory / name}"
            + (f", resuming after {len(done)} completed trial(s)" if done else ""),
            flush=True,
        )
    # Full batches only: TF 2.21's oneDNN kernels crash the process (not a Python error) on the
    # weight gradient of a 1×1 stride-2 convolution with few channels (8 -> 16: the rule's K = 8
    # branches) when the batch size is odd, as digits' last batch of 29 is.
    train = data.load(
        args.dataset,
        "train",
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        seed=args.seed,
        drop_remainder=True,
    )
    test = data.load(args.dataset, "test", batch_size=args.batch_size, data_dir=args.data_dir)
    if args.steps_per_epoch:
        train = train.take(args.steps_per_epoch)
    if args.validation_steps:
        test = test.take(args.validation_steps)
    verbose = 1 if sys.stdout.isatty() else 2
    if role == "chief":  # serves the oracle until the workers have run every trial
        tuning.serve_oracle(tuner, verbose=verbose)
    else:
        tuner.search(train, validation_data=test, epochs=args.epochs, verbose=verbose)
    if role == "worker":
        print(f"tuner {tuner.tuner_id}: no trials left", flush=True)
        return 0

    trials = sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id)
    print(f"\n{len(trials)} trial(s):")
    for trial in trials:
        extra = ""
        if trial.metrics.exists("plain_latency_ms"):
            extra = f"  plain {trial.metrics.get_last_value('plain_latency_ms'):.3g} ms"
        score = "-" if trial.score is None else f"{trial.score:.4f}"
        values = ", ".join(
            f"{k}={_format(v)}"
            for k, v in trial.hyperparameters.values.items()
            if not k.startswith("tuner/")
        )
        print(f"  {trial.trial_id}  {trial.status:<9}  {score}{extra}  {values}")
    try:
        summary = tuning.best_summary(tuner)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"\nbest trial {summary['trial_id']}: {summary['objective']} = {summary['score']:.4f}")
    for key, value in summary["hyperparameters"].items():
        print(f"  {key} = {_format(value)}")
    metrics = summary["metrics"]
    if "plain_latency_ms" in metrics:
        print(
            f"  plain model: {metrics['plain_latency_ms']:.3g} ms per batch of "
            f"{args.latency_batch_size} (budget {metrics['latency_budget_ms']:g} ms), "
            f"{int(metrics['plain_params']):,} parameters"
        )
    try:
        with warnings.catch_warnings():  # the trial's optimizer state is not wanted here
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = tuner.load_model(tuning.best_trial(tuner))
    except OSError as e:  # a distributed search whose tuners wrote elsewhere
        print(f"{PROG}: error: cannot load the best trial's weights: {e}", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".keras", dir=output.parent)
    os.close(fd)
    try:
        model.save(tmp)
        _publish(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    summary = {**summary, "family": kind, "dataset": args.dataset, "model": str(output)}
    if objective is not None:
        from keras_dmr.bench.timing import machine_description

        summary["machine"] = machine_description()
    _json_dump(summary, output.with_name(output.name + ".json"))
    print(f"wrote {output} ({model.name}, {model.count_params():,} parameters)")
    return 0


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
    from keras_dmr.bench.command import DESCRIPTION as BENCH_DESCRIPTION
    from keras_dmr.bench.command import HELP as BENCH_HELP
    from keras_dmr.bench.command import add_bench_arguments, run_bench
    from keras_dmr.convert.pruning import (
        PRUNE_DESCRIPTION,
        PRUNE_HELP,
        add_prune_arguments,
        run_prune,
    )
    from keras_dmr.demo import add_demo_arguments, run_demo

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
            help="the main job: train, convert, export, time, summarise",
            description="Train DMRNet-14 and ResNet-20 (resuming checkpoints under --runs), "
            "rewrite the ResNet as a plain Conv-ReLU network (verified), export it as a "
            "SavedModel (a new version every run) and as ONNX under --base-dir, time residual "
            "against plain (Keras, SavedModel, ONNX Runtime) and print a summary table.",
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
    try:
        args = make_parser().parse_args(argv)
        return args.run(args)
    except UsageError as e:
        if e.usage:
            sys.stderr.write(e.usage)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
