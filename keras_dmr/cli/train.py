"""``keras-dmr train``: the paper's recipe, resumable checkpoints, tf.distribute."""

from __future__ import annotations

import argparse
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
from keras_dmr.recipe import compile_with_recipe
from keras_dmr.training.parallel import STRATEGIES
from keras_dmr.training.run import TrainingRun, train
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
        help="training on several devices: under TensorFlow, mirrored (all local GPUs) or "
        "multiworker (the cluster of TF_CONFIG; start every worker with its own TF_CONFIG and "
        "--output); under JAX, data-parallel (keras.distribution over every local device). "
        "--batch-size is the global batch, split over all replicas (default: none)",
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


def run_train(args: argparse.Namespace) -> int:
    depth = args.depth or TRAIN_DEPTHS[args.model]
    output = args.output or Path("runs") / f"{args.model}{depth or ''}_{args.dataset}.keras"
    if output.suffix != ".keras":
        raise UsageError(f"argument --output: must end in .keras; got {str(output)!r}")
    run = TrainingRun(
        output,
        args.dataset,
        args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        train_images=args.train_images,
        settings={**{k: getattr(args, k) for k in RESUME_KEYS}, "depth": depth},
    )
    data.dataset_info(args.dataset)  # an unknown or unavailable dataset fails before building
    keras.utils.set_random_seed(args.seed)
    strategy = _make_strategy(args.strategy, args.batch_size)
    callbacks = []
    if args.strategy == "multiworker":
        from keras_dmr.training.distribute import AverageBatchNormStatistics

        callbacks.append(AverageBatchNormStatistics(strategy))
    if args.sparsity is not None:
        from keras_dmr.prune import BNSparsity

        callbacks.append(BNSparsity(args.sparsity))
    if strategy is not None:
        print(
            f"Strategy {args.strategy}: {strategy.num_replicas_in_sync} replica(s), global "
            f"batch {args.batch_size}",
            flush=True,
        )
    if args.strategy == "data-parallel":  # Keras' global distribution covers build and fit
        strategy = None
    _, result = train(
        run,
        lambda: new_model(
            args.model,
            depth,
            classes=data.dataset_info(args.dataset).num_classes,
            sparsity=args.sparsity is not None,
            learning_rate=args.learning_rate,
            **_model_options(args),
        ),
        fresh=args.fresh,
        callbacks=callbacks,
        strategy=strategy,
        log=lambda line: print(line, flush=True),
    )
    print(f"test accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f})")
    return 0


def new_model(
    model: str,
    depth: int | None,
    *,
    classes: int,
    sparsity: bool = False,
    learning_rate: float | None = None,
    **options,
) -> keras.Model:
    """A compiled ``--model`` to train: with the extra BN on the residual path for sparsity
    training (``prune.with_skip_bn``), at ``learning_rate`` instead of the recipe's 0.1.

    Args:
        model: a name of :data:`TRAIN_MODELS`.
        depth: its depth (None: the model's only one).
        classes: output classes.
        sparsity: prepare it for network slimming.
        learning_rate: initial learning rate (None: the recipe's).
        **options: the builder's options (None: its default).

    Returns:
        The compiled model.
    """
    built = build_model(model, depth, classes=classes, compile=True, **options)
    if sparsity:
        from keras_dmr.prune import with_skip_bn

        built = with_skip_bn(built)
    if learning_rate is not None:
        compile_with_recipe(built, learning_rate=learning_rate)
    return built
