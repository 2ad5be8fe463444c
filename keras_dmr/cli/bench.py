"""``keras-dmr bench``: the arguments and the run of the suite in :mod:`keras_dmr.bench`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from keras_dmr.cli.common import _choices_list
from keras_dmr.utils.arguments import int_at_least as _int_at_least
from keras_dmr.utils.arguments import output_path
from keras_dmr.utils.files import write_json

HELP = "time every family: residual vs plain, TF vs ONNX"
DESCRIPTION = (
    "Measure inference throughput of every family, residual form against plain form, in "
    "TensorFlow (graph, and XLA), a SavedModel and ONNX Runtime, beside keras.applications' "
    "ResNet50 and MobileNetV2 at 224×224; the training step of the DMRNet paper's Table 2 pairs "
    "(split and grouped DMRNet, DVANet); training throughput of DMRNet-14, ResNet-26 and "
    "MobileNetV2 per Keras backend (TensorFlow, JAX: one worker process each) and dtype policy "
    "(float32, mixed_bfloat16); and a large float32 matrix product as the machine's peak. "
    "Candidates run interleaved (A B A B) so ratios are measured side by side. Defaults "
    "follow the RMNet paper (batch 128, 50 warm-up and 50 timed batches): an hour or more on a "
    "small CPU; --quick ends in about a minute. Writes benchmarks.json, benchmarks.md and its "
    "PNG charts to --output-dir and prints the Markdown."
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from keras_dmr.bench.deploy import FAMILY_IDS
    from keras_dmr.bench.engines import ENGINES
    from keras_dmr.bench.suite import SECTIONS

    positive, natural = _int_at_least(1), _int_at_least(0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny batches and stand-in models: checks the set-up in about a minute",
    )
    parser.add_argument(
        "--output-dir",
        type=output_path("dir"),
        default="runs/bench",
        metavar="DIR",
        help="where benchmarks.json/.md and the charts go (default: runs/bench)",
    )
    parser.add_argument(
        "--sections",
        type=_choices_list(SECTIONS),
        metavar="LIST",
        help=f"what to run, comma-separated among {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--deploy-families",
        type=_choices_list(tuple(FAMILY_IDS)),
        metavar="LIST",
        help="the deploy section's families, comma-separated among "
        f"{', '.join(FAMILY_IDS)} (default: all; --quick: resnet20)",
    )
    parser.add_argument(
        "--engines",
        type=_choices_list(ENGINES),
        metavar="LIST",
        help=f"inference engines among {', '.join(ENGINES)} (default: keras,xla,onnx; the "
        "RMNet-against-ResNet-34 group always adds saved_model)",
    )
    group = parser.add_argument_group("protocol (defaults: the RMNet paper's)")
    group.add_argument("--batch-size", type=positive, metavar="N", help="(default 128)")
    group.add_argument("--warmup", type=natural, metavar="N", help="warm-up batches (default 50)")
    group.add_argument(
        "--timed", type=positive, metavar="N", help="timed batches per candidate (default 50)"
    )
    group.add_argument(
        "--repeats",
        type=positive,
        metavar="N",
        help="interleaved rounds the timed batches are split into (default 5)",
    )
    group.add_argument(
        "--imagenet-batch-size",
        type=positive,
        metavar="N",
        help="224×224 peers (default: --batch-size)",
    )
    group.add_argument("--imagenet-warmup", type=natural, metavar="N", help="(default: --warmup)")
    group.add_argument("--imagenet-timed", type=positive, metavar="N", help="(default: --timed)")
    group.add_argument(
        "--train-batch-size",
        type=positive,
        metavar="N",
        help="training steps (default 64, the DMRNet paper's batch)",
    )
    group.add_argument("--train-warmup", type=natural, metavar="N", help="(default: --warmup)")
    group.add_argument("--train-timed", type=positive, metavar="N", help="(default: --timed)")
    group.add_argument(
        "--peak-size",
        type=positive,
        metavar="N",
        help="side of the square float32 matrix product timed as the peak (default 4096)",
    )
    group.add_argument("--seed", type=natural, default=0, help="random inputs (default 0)")


SETTING_ARGS = (
    "batch_size",
    "warmup",
    "timed",
    "repeats",
    "imagenet_batch_size",
    "imagenet_warmup",
    "imagenet_timed",
    "train_batch_size",
    "train_warmup",
    "train_timed",
    "peak_size",
    "engines",
    "sections",
    "deploy_families",
    "seed",
)


def settings_from_args(args: argparse.Namespace):
    """:class:`~keras_dmr.bench.suite.Settings` from parsed arguments (``ValueError`` if they
    do not fit together)."""
    from keras_dmr.bench.suite import Settings, quick_settings

    given = {name: getattr(args, name, None) for name in SETTING_ARGS}
    given = {k: v for k, v in given.items() if v is not None}
    if getattr(args, "quick", False):
        return quick_settings(**given)
    return Settings(**given)


def run_bench(args: argparse.Namespace, *, inference_groups=None, training_groups=None) -> int:
    """Run the benchmark, save as it goes, print the Markdown report; exit code 0.

    ``inference_groups``/``training_groups`` replace the default models (for tests)."""
    from keras_dmr.bench import report, suite

    try:
        settings = settings_from_args(args)
    except ValueError as err:
        from keras_dmr.errors import UsageError

        message = re.sub(r"`(\w+)`", lambda m: "--" + m.group(1).replace("_", "-"), str(err))
        raise UsageError(message) from None
    out = Path(args.output_dir)
    partial = out / "benchmarks.partial.json"

    def save(result):
        write_json(result, partial)

    result = suite.run(
        settings,
        inference_groups=inference_groups,
        training_groups=training_groups,
        on_progress=save,
    )
    paths = report.write_outputs(result, out)
    partial.unlink(missing_ok=True)
    print(report.markdown(result))
    print("wrote " + ", ".join(paths.values()))
    return 0
