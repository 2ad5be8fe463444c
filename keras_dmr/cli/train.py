"""``keras-dmr train``: the paper's recipe, resumable checkpoints, tf.distribute."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import keras

from keras_dmr import data
from keras_dmr.cli.common import (
    RESUME_KEYS,
    TRAIN_DEPTHS,
    TRAIN_MODELS,
    _add_model_arguments,
    _make_strategy,
    _model_options,
    _natural,
    _positive_float,
    _positive_int,
    build_model,
)
from keras_dmr.errors import UsageError
from keras_dmr.recipe import compile_with_recipe, with_recipe_callbacks
from keras_dmr.training.checkpoints import EpochCheckpoint, read_state
from keras_dmr.training.distribute import STRATEGIES
from keras_dmr.utils.arguments import output_path

# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=tuple(TRAIN_MODELS),
        default="dmrnet",
        help="network (default: dmrnet; mobilenetv2: the RMNet paper's CIFAR MobileNetV2, whose "
        "plain form is MobileNetV1)",
    )
    _add_model_arguments(
        parser,
        depth_help="layers on the longest path: 6n+2 for basic branches, 9n+2 for bottleneck "
        "and dmrnext (default: "
        + ", ".join(f"{m} {d}" for m, d in TRAIN_DEPTHS.items() if d)
        + "; mobilenetv2 has one depth)",
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
    group.add_argument(
        "--train-images",
        type=_positive_int,
        metavar="N",
        help="train on the first N images of the training split, in stored order (the same "
        "subset every epoch; default: all of them); the test split stays whole",
    )
    group.add_argument("--seed", type=_natural, default=0, help="random seed (default: 0)")
    group.add_argument(
        "--sparsity",
        type=_positive_float,
        metavar="FACTOR",
        help="train for network slimming: the extra BN on the residual path (skip_bn) and an L1 "
        "penalty FACTOR on the BN scales (proximal BNSparsity; 0.1 suits a few digits epochs, "
        "the paper used 1e-4..1e-3 over 200 CIFAR epochs); prune the result with "
        "`keras-dmr prune`",
    )
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


def train_command(argv: list[str]) -> int:
    """``keras-dmr train ARGV`` in this process (the demo's training step), without going
    through the top-level parser; usage errors raise :class:`UsageError` to the caller's."""
    parser = argparse.ArgumentParser(prog="keras-dmr train")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


def run_train(args: argparse.Namespace) -> int:
    depth = args.depth or TRAIN_DEPTHS[args.model]
    output = args.output or Path("runs") / f"{args.model}{depth or ''}_{args.dataset}.keras"
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
    if args.sparsity is not None:
        from keras_dmr.prune import BNSparsity

        callbacks.insert(0, BNSparsity(args.sparsity))
    # The recipe's schedule: a builder's model adds it in `fit`; a functional copy made for
    # slimming (`with_skip_bn`), fresh or resumed, needs it given.
    callbacks = with_recipe_callbacks(model, callbacks)
    if args.strategy == "multiworker":
        from keras_dmr.training.distribute import AverageBatchNormStatistics

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
            take=args.train_images,
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
        if args.sparsity is not None:
            from keras_dmr.prune import with_skip_bn

            model = with_skip_bn(model)
        if args.learning_rate is not None:
            compile_with_recipe(model, learning_rate=args.learning_rate)
        state, completed = {"args": config, "completed_epochs": 0, "history": []}, 0
    return model, state, completed
