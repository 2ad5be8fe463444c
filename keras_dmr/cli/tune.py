"""``keras-dmr tune``: Keras Tuner searches over branches, widths and reserving ratios."""

from __future__ import annotations

import argparse
import sys
import warnings

import keras

from keras_dmr import data
from keras_dmr.cli.common import (
    PROG,
    _make_strategy,
    _natural,
    _positive_float,
    _positive_int,
)
from keras_dmr.errors import UsageError
from keras_dmr.utils.arguments import output_path
from keras_dmr.utils.files import atomic_output, write_json

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
    with atomic_output(output, suffix=".keras") as tmp:
        model.save(tmp)
    summary = {**summary, "family": kind, "dataset": args.dataset, "model": str(output)}
    if objective is not None:
        from keras_dmr.utils.timing import machine_description

        summary["machine"] = machine_description()
    write_json(summary, output.with_name(output.name + ".json"))
    print(f"wrote {output} ({model.name}, {model.count_params():,} parameters)")
    return 0
