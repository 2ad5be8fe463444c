"""``keras-dmr export``: a checkpoint as a TF Serving SavedModel, an ONNX or a LiteRT file."""

from __future__ import annotations

import argparse
from pathlib import Path

from keras_dmr import data
from keras_dmr.cli.common import (
    _positive_int,
    describe_report,
    load_checkpoint,
)
from keras_dmr.errors import UsageError
from keras_dmr.training.checkpoints import read_state
from keras_dmr.utils.arguments import output_path

FORMATS = ("saved_model", "onnx", "litert", "openvino")
SUFFIXES = {"onnx": ".onnx", "litert": ".tflite", "openvino": ".xml"}
QUANT = ("int8", "float16")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .keras model")
    parser.add_argument("--name", required=True, help="model name: the folder under --base-dir")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="saved_model",
        help="saved_model (TF Serving layout NAME/<version>/, default), onnx (NAME.onnx), "
        "litert (NAME.tflite, builtin operators only) or openvino (OpenVINO IR: NAME.xml and "
        "NAME.bin)",
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
    from keras_dmr.export.onnx import CALIBRATION_METHODS, WEIGHT_TYPES

    group = parser.add_argument_group("quantization (onnx, litert and openvino)")
    group.add_argument(
        "--quantize",
        choices=QUANT,
        help="int8: post-training static quantization calibrated on --calibration-dataset "
        "(onnx: ONNX Runtime QDQ; litert: TFLite converter; openvino: NNCF); float16: "
        "float16 weights (litert)",
    )
    group.add_argument(
        "--calibration-dataset",
        choices=data.SUPPORTED,
        metavar="NAME",
        help="dataset whose training images calibrate int8 ranges (up to 512, unaugmented): "
        + ", ".join(data.SUPPORTED),
    )
    group.add_argument(
        "--data-dir", metavar="DIR", help="where --calibration-dataset is (as for train)"
    )
    group.add_argument(
        "--keep-float",
        nargs="+",
        metavar="LAYER",
        help="onnx int8: leave these layers of the plain model in float32 (the fix "
        "docs/quantization.md measures for layers that lose accuracy in int8)",
    )
    group.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        help="onnx int8: how ONNX Runtime sets activation ranges (default: MinMax)",
    )
    group.add_argument(
        "--weights",
        choices=tuple(WEIGHT_TYPES),
        help="onnx int8: weight encoding; int8 uses 7 bits (safe on CPUs without VNNI), uint8 "
        "all 8 (RepVGG-style fused kernels need it, see docs/quantization.md) (default: int8)",
    )
    group.add_argument(
        "--qat-epochs",
        type=_positive_int,
        metavar="N",
        help="int8: first fine-tune the plain model N epochs through fake-quantized weights and "
        "inputs (quantization-aware training) on --calibration-dataset's training split, as "
        "keras-dmr train feeds it; then quantize as without it (docs/quantization.md)",
    )
    group.add_argument(
        "--qat-learning-rate",
        type=float,
        metavar="LR",
        help="the QAT fine-tuning's initial learning rate, decayed by a cosine to zero "
        "(default: 0.001)",
    )
    group.add_argument(
        "--evaluate",
        action="store_true",
        help="measure the float32 and the quantized file's accuracy on the calibration "
        "dataset's test split and store both in the export's metadata",
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
    from keras_dmr.export.serving import is_classifier

    names = None
    if preprocessing in data.SUPPORTED and is_classifier(model):
        names = data.dataset_info(preprocessing).class_names
        if len(names) != model.outputs[0].shape[-1]:
            names = None
    quantization = _quantization_arguments(args)
    if args.qat_epochs:
        model = _quantization_aware(model, args)
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
            exporter = {"onnx": export.onnx, "litert": export.litert}.get(
                args.format, export.openvino
            )
            path = exporter(
                model,
                args.base_dir / f"{args.name}{SUFFIXES[args.format]}",
                preprocessing=preprocessing,
                class_names=names,
                **quantization,
            )
    except (export.ExportError, ConversionError) as e:
        raise UsageError(str(e)) from None
    kind = "float32" if preprocessing == "none" else f"uint8, normalised for {preprocessing}"
    print(f"exported {model.name} as {args.format} (input images: {kind}): {path}")
    meta = export.read_metadata(path)
    if meta["conversion"] is not None:
        print(describe_report(meta["conversion"]))
    if meta.get("qat"):
        q = meta["qat"]
        print(
            f"quantization-aware fine-tuning: {q['epochs']} epoch(s), {q['weight_bits']}-bit "
            f"weights, last training accuracy through fake quantization {q['accuracy']:.4f}"
        )
    if meta.get("head") == "features":
        print(
            "outputs (feature maps): "
            + ", ".join(f"{o['name']} {o['shape'][1:]}" for o in meta["output_specs"])
        )
    accuracy = (meta.get("quantization") or {}).get("accuracy") or meta.get("accuracy")
    if accuracy:
        print(
            f"accuracy on {accuracy['images']} test images: "
            + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items() if k in ("float32", *QUANT))
        )
    return 0


def _quantization_aware(model, args: argparse.Namespace):
    """The checkpoint's plain form fine-tuned through fake quantization (``--qat-epochs``)."""
    from keras_dmr.convert import ConversionError, to_plain
    from keras_dmr.export.serving import is_plain
    from keras_dmr.training import qat

    if not is_plain(model):
        try:
            model = to_plain(model)
        except ConversionError as e:
            raise UsageError(f"argument --qat-epochs: {e}") from None
        print(describe_report(model.conversion_report))
    train = data.load(args.calibration_dataset, "train", batch_size=64, data_dir=args.data_dir)
    try:
        return qat.fine_tune(
            model,
            train,
            epochs=args.qat_epochs,
            engine={"litert": "litert", "openvino": "openvino"}.get(args.format, "onnx"),
            learning_rate=args.qat_learning_rate or qat.LEARNING_RATE,
            verbose=2,
        )
    except ValueError as e:
        raise UsageError(f"argument --qat-epochs: {e}") from None


def _quantization_arguments(args: argparse.Namespace) -> dict:
    """The exporter's quantize/calibration/evaluation keywords, the flags checked together."""
    if args.format == "saved_model":
        for flag, value in (
            ("--quantize", args.quantize),
            ("--calibration-dataset", args.calibration_dataset),
            ("--evaluate", args.evaluate),
        ):
            if value:
                raise UsageError(f"argument {flag}: only for --format onnx, litert or openvino")
    onnx_int8 = args.format == "onnx" and args.quantize == "int8"
    for flag, value in (
        ("--keep-float", args.keep_float),
        ("--calibration-method", args.calibration_method),
        ("--weights", args.weights),
    ):
        if value and not onnx_int8:
            raise UsageError(f"argument {flag}: only for --format onnx --quantize int8")
    for flag, value in (
        ("--qat-epochs", args.qat_epochs),
        ("--qat-learning-rate", args.qat_learning_rate),
    ):
        if value is not None and args.quantize != "int8":
            raise UsageError(f"argument {flag}: only with --quantize int8")
    if args.qat_learning_rate is not None and not args.qat_epochs:
        raise UsageError("argument --qat-learning-rate: only with --qat-epochs N")
    if args.qat_learning_rate is not None and not args.qat_learning_rate > 0:
        raise UsageError(
            f"argument --qat-learning-rate: must be positive; got {args.qat_learning_rate}"
        )
    if args.format == "saved_model":
        return {}
    if args.quantize == "float16" and args.format != "litert":
        raise UsageError(
            f"argument --quantize: float16 is for --format litert; {args.format} takes int8"
        )
    if args.quantize == "int8" and args.calibration_dataset is None:
        raise UsageError("argument --quantize int8: needs --calibration-dataset NAME")
    if args.calibration_dataset and args.quantize != "int8" and not args.evaluate:
        raise UsageError("argument --calibration-dataset: only used with --quantize int8")
    if args.evaluate and args.calibration_dataset is None:
        raise UsageError("argument --evaluate: needs --calibration-dataset NAME (its test split)")
    out: dict = {"quantize": args.quantize}
    if args.keep_float:
        out["keep_float"] = args.keep_float
    if args.calibration_method:
        out["calibration_method"] = args.calibration_method
    if args.weights:
        out["weights"] = args.weights
    name, where = args.calibration_dataset, args.data_dir
    if args.quantize == "int8":
        out["calibration"] = data.load(
            name, "train", batch_size=64, augment=False, normalize=False, data_dir=where, take=512
        )
    if args.evaluate:
        out["evaluation"] = data.load(name, "test", batch_size=256, normalize=False, data_dir=where)
    return out
