"""``keras-dmr demo``: the main job end to end on the bundled digits (or a TFDS dataset).

Train a DMRNet and a ResNet (resumable checkpoints under ``runs/``), rewrite the ResNet as a plain
network and verify it, export the plain model as a SavedModel (a new version each run) and as
ONNX beside it, time residual against plain, and print one summary table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEMO_MODELS = (("dmrnet", 14), ("resnet", 20))


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from keras_dmr import data
    from keras_dmr.cli.common import _positive_int
    from keras_dmr.utils.arguments import output_path

    parser.add_argument(
        "--dataset",
        choices=data.SUPPORTED,
        default="digits",
        help="digits is bundled (no download); the others come from TFDS (default: digits)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data directory")
    parser.add_argument(
        "--epochs", type=_positive_int, default=8, metavar="N", help="epochs per model (default 8)"
    )
    parser.add_argument(
        "--runs", type=output_path("dir"), default="runs", help="checkpoint folder (default: runs)"
    )
    parser.add_argument(
        "--base-dir",
        type=output_path("dir"),
        default="savedmodels",
        help="export folder (default: savedmodels)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="retrain from scratch instead of resuming"
    )


def _throughput(candidates: dict, batch: np.ndarray) -> dict[str, float]:
    """Images/s per candidate: median of 3 interleaved repeats of 10 calls (after 3 warm-up)."""
    from keras_dmr.utils.timing import interleaved

    times = interleaved(candidates, warmup=3, iters=10, repeats=3)
    return {name: len(batch) / t["median_s"] for name, t in times.items()}


def run_demo(args: argparse.Namespace) -> int:
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    from keras_dmr import data, export
    from keras_dmr.analysis import count_flops
    from keras_dmr.cli import common as cli
    from keras_dmr.cli import main as keras_dmr_command
    from keras_dmr.convert import to_plain

    checkpoints = {}
    for model_name, depth in DEMO_MODELS:
        path = args.runs / f"{model_name}{depth}_{args.dataset}.keras"
        argv = ["train", "--model", model_name, "--depth", str(depth), "--dataset", args.dataset]
        argv += ["--epochs", str(args.epochs), "--output", str(path)]
        argv += ["--data-dir", args.data_dir] if args.data_dir else []
        argv += ["--fresh"] if args.fresh else []
        print(f"\n== {model_name}-{depth} on {args.dataset}", flush=True)
        if keras_dmr_command(argv) != 0:
            return 2
        checkpoints[model_name] = path

    test = data.load(args.dataset, "test", batch_size=128, data_dir=args.data_dir)
    model = cli.load_checkpoint(checkpoints["resnet"])
    print("\n== RM: rewriting the ResNet as a plain Conv-ReLU network", flush=True)
    plain = to_plain(model)
    report = plain.conversion_report
    print(cli.describe_report(report))

    accuracies = {}
    for label, m in (
        ("dmrnet", cli.load_checkpoint(checkpoints["dmrnet"])),
        ("resnet", model),
        ("plain", plain),
    ):
        m.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
        )
        accuracies[label] = m.evaluate(test, verbose=0, return_dict=True)["accuracy"]

    print("\n== export", flush=True)
    name = f"resnet20_{args.dataset}"
    saved = export.saved_model(model, args.base_dir / name, preprocessing=args.dataset)
    version = Path(saved).name
    onnx_path = export.onnx(
        model, args.base_dir / f"{name}_v{version}.onnx", preprocessing=args.dataset
    )
    print(f"SavedModel: {saved}\nONNX:       {onnx_path}")

    print("\n== speed: batch 128, residual and plain timed alternately", flush=True)
    images = next(iter(data.load(args.dataset, "test", batch_size=128, normalize=False)))[0]
    pixels = np.asarray(images, np.uint8)
    normalized = next(iter(test))[0]
    serve = tf.saved_model.load(saved).signatures["serving_default"]
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    residual_fn = tf.function(lambda x: model(x, training=False))
    plain_fn = tf.function(lambda x: plain(x, training=False))
    speed = _throughput(
        {
            "resnet (Keras)": lambda: residual_fn(normalized).numpy(),
            "plain (Keras)": lambda: plain_fn(normalized).numpy(),
            "plain (SavedModel)": lambda: serve(images=tf.constant(pixels))["logits"].numpy(),
            "plain (ONNX Runtime)": lambda: session.run(["logits"], {"images": pixels}),
        },
        pixels,
    )
    flops = {"resnet": report["flops_before"], "plain": report["flops_after"]}
    params = {"resnet": report["params_before"], "plain": report["params_after"]}
    dmrnet = cli.load_checkpoint(checkpoints["dmrnet"])
    print("\n== summary")
    header = f"| {'model':<22} | accuracy | {'params':>9} | {'MACs':>12} | images/s |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    lines = [
        (
            "dmrnet-14 (Keras)",
            accuracies["dmrnet"],
            dmrnet.count_params(),
            count_flops(dmrnet),
            None,
        ),
        (
            "resnet-20 (Keras)",
            accuracies["resnet"],
            params["resnet"],
            flops["resnet"],
            speed["resnet (Keras)"],
        ),
        (
            "plain (Keras)",
            accuracies["plain"],
            params["plain"],
            flops["plain"],
            speed["plain (Keras)"],
        ),
        ("plain (SavedModel)", None, params["plain"], flops["plain"], speed["plain (SavedModel)"]),
        (
            "plain (ONNX Runtime)",
            None,
            params["plain"],
            flops["plain"],
            speed["plain (ONNX Runtime)"],
        ),
    ]
    for label, acc, n, macs, ips in lines:
        acc_s = f"{acc:8.4f}" if acc is not None else f"{'':8}"
        ips_s = f"{ips:8.0f}" if ips is not None else f"{'':8}"
        print(f"| {label:<22} | {acc_s} | {n:>9,} | {macs:>12,} | {ips_s} |")
    print(f"\nmax relative error of the plain model (verified): {report['max_relative_error']:.2e}")
    print(f"exports: {saved}, {onnx_path}")
    return 0
