"""Quantization study: int8 accuracy of the residual and the plain form of each family.

``python -m tools.quantization_study`` trains each family of :data:`MODELS` on Fashion-MNIST
(protocol :data:`PROTOCOL`; the checkpoint is kept under ``runs/quantization_study/``), rewrites
it with ``to_plain``, exports both forms to int8 with ONNX Runtime (QDQ, per-channel weights)
and LiteRT, each calibrated on the same training images, and measures the float32 and the int8
file's accuracy on the test images with the runtime itself (the exporters' ``evaluation``).
Where a plain form loses more than :data:`SENSITIVE_POINTS` points in ONNX Runtime, it finds
which layers cost it (quantize everything but one layer, for each layer) and measures the
fixes: the worst layers kept in float32, and the Percentile and Entropy calibrations.
Every family is written to ``docs/data/quantization.json`` as soon as it is measured (a rerun
skips it); ``--table-only`` regenerates ``docs/quantization.md`` and its plot from the JSON;
``--quick`` is a smoke run that leaves ``docs/`` alone.

What it cannot say: the per-layer search is ONNX Runtime's only (LiteRT's converter has no
per-node float fallback in its public API); calibration uses one set of 256 images; every model
is short-trained (see the protocol), so the figures are for these weights, not converged ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

PROTOCOL = {
    "dataset": "fashion_mnist",
    "train_examples": 1500,
    "epochs": 4,
    "batch_size": 64,
    "learning_rate": 0.1,
    "seed": 0,
    "test_examples": 2000,
    "calibration_images": 256,
    "sensitivity_images": 500,
}
# What a trained checkpoint depends on (the rest of the protocol only changes the measuring).
TRAINING_KEYS = ("dataset", "train_examples", "epochs", "batch_size", "learning_rate", "seed")
QUICK = {
    **PROTOCOL,
    "train_examples": 128,
    "epochs": 1,
    "test_examples": 256,
    "calibration_images": 64,
    "sensitivity_images": 128,
}
# label → (builder in keras_dmr.models, keyword arguments): the families of issue 17 at the
# sizes of the deploy benchmark.
MODELS: dict[str, tuple[str, dict]] = {
    "ResNet-20": ("ResNet", {"depth": 20}),
    "DMRNet-14": ("DMRNet", {"depth": 14}),
    "RepVGG-21 (r=0)": ("RepVGG", {"depth": 21, "reserve_ratio": 0.0}),
    "RM+RepVGG-21 (r=0.25)": ("RepVGG", {"depth": 21, "reserve_ratio": 0.25}),
    "MobileNetV2 → RMNetV1": ("MobileNetV2", {"variant": "cifar"}),
    "RMNeXt 26×3_32": ("RMNeXt", {"depth": 26, "expansion": 3, "channels_per_group": 32}),
}
QUICK_MODELS = ("ResNet-20",)
ENGINES = ("onnx", "litert")
ENGINE_NAMES = {"onnx": "ONNX Runtime", "litert": "LiteRT"}
FORMS = ("residual", "plain")
SENSITIVE_POINTS = 0.5  # a plain form losing more than this in int8 gets the per-layer search
KEEP_FLOAT = (1, 2, 3)  # the fixes tried: this many of the worst layers kept in float32
RESULTS = Path("docs/data/quantization.json")
CHECKPOINTS = Path("runs/quantization_study")


def _log(message: str) -> None:
    print(message, flush=True)


def protocol_key(protocol: dict) -> str:
    return ",".join(f"{k}={protocol[k]}" for k in sorted(protocol))


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def _data(protocol: dict):
    """Calibration images (uint8, the first training images), the labelled test batches
    (uint8, the first ``test_examples`` test images), the selection batches of the per-layer
    search (the next ``sensitivity_images``: layers are picked on images the fixes are not
    measured on) and the normalised training pipeline."""
    from keras_dmr import data

    name = protocol["dataset"]
    calibration = [
        np.asarray(x, np.uint8)
        for x, _ in data.load(
            name,
            "train",
            batch_size=256,
            normalize=False,
            augment=False,
            shuffle=False,
            take=protocol["calibration_images"],
        )
    ]
    n_test = protocol["test_examples"]
    pairs = list(
        data.load(
            name,
            "test",
            batch_size=500,
            normalize=False,
            take=n_test + protocol["sensitivity_images"],
        )
    )
    images = np.concatenate([np.asarray(x, np.uint8) for x, _ in pairs])
    labels = np.concatenate([np.asarray(y) for _, y in pairs])

    def batches(lo: int, hi: int) -> list:
        return [
            (images[i : min(i + 500, hi)], labels[i : min(i + 500, hi)]) for i in range(lo, hi, 500)
        ]

    train = data.load(
        name,
        "train",
        batch_size=protocol["batch_size"],
        seed=protocol["seed"],
        take=protocol["train_examples"],
    )
    return np.concatenate(calibration), batches(0, n_test), batches(n_test, len(labels)), train


def trained(label: str, protocol: dict, train, checkpoints: Path, spec=None):
    """The family trained with the recipe on ``protocol`` (reloaded when its checkpoint exists);
    ``spec``: its ``(builder, arguments)`` when ``label`` is not one of :data:`MODELS`."""
    import keras

    from keras_dmr import models
    from keras_dmr.recipe import StepDecay, compile_with_recipe

    path = checkpoints / f"{_slug(label)}.keras"
    stamp = path.with_suffix(".protocol.json")
    training = {k: protocol[k] for k in TRAINING_KEYS}
    if path.exists() and stamp.exists():
        stored = json.loads(stamp.read_text())
        if {k: stored.get(k) for k in TRAINING_KEYS} == training:
            return keras.saving.load_model(path, safe_mode=True), stored.get("train_seconds")
    builder, kwargs = spec or MODELS[label]
    keras.utils.set_random_seed(protocol["seed"])
    model = getattr(models, builder)(compile=False, **kwargs)
    compile_with_recipe(model, learning_rate=protocol["learning_rate"])
    progress = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: _log(
            f"    epoch {epoch + 1}/{protocol['epochs']}: loss {logs['loss']:.4f}, "
            f"accuracy {logs['accuracy']:.4f} ({time.monotonic() - start:.0f} s)"
        )
    )
    start = time.monotonic()
    model.fit(
        train,
        epochs=protocol["epochs"],
        shuffle=False,
        verbose=0,
        callbacks=[StepDecay(), progress],
    )
    seconds = time.monotonic() - start
    checkpoints.mkdir(parents=True, exist_ok=True)
    model.save(path)
    stamp.write_text(json.dumps({**training, "train_seconds": seconds}))
    return model, seconds


def _export(engine: str, model, path: Path, protocol: dict, calibration, test) -> dict:
    """Export ``model`` as it is to int8 and read back the accuracies the runtime measured."""
    from keras_dmr import export
    from keras_dmr.export.readers import read_metadata

    exporter = {"onnx": export.onnx, "litert": export.litert, "openvino": export.openvino}[engine]
    start = time.monotonic()
    exporter(
        model,
        path,
        preprocessing=protocol["dataset"],
        plain=False,
        quantize="int8",
        calibration=calibration,
        evaluation=test,
    )
    accuracy = read_metadata(path)["quantization"]["accuracy"]
    return {
        "float32": accuracy["float32"],
        "int8": accuracy["int8"],
        "drop_points": 100 * (accuracy["float32"] - accuracy["int8"]),
        "top1_agreement": accuracy["top1_agreement"],
        "images": accuracy["images"],
        "seconds": round(time.monotonic() - start, 1),
    }


def sensitivity(plain, protocol: dict, calibration, test, selection, workdir: Path) -> dict:
    """ONNX Runtime: the accuracy with every weighted layer but one quantized, for each layer
    (on the ``selection`` images), then the fixes on the test images."""
    import onnx as onnx_lib

    from keras_dmr import export
    from keras_dmr.export.calibration import accuracy_record
    from keras_dmr.export.onnx import node_layer, quantizable_nodes, quantize_int8, session_predict

    path = workdir / "plain_float.onnx"
    export.onnx(plain, path, preprocessing=protocol["dataset"], plain=False)
    proto = onnx_lib.load(str(path))
    subset, count = selection, sum(len(y) for _, y in selection)

    def accuracy(batches, **quant) -> float:
        quantized = quantize_int8(proto, calibration, **quant)
        return accuracy_record(session_predict(quantized.SerializeToString()), batches)[0]

    all_int8 = accuracy(subset)
    float32 = accuracy_record(session_predict(proto.SerializeToString()), subset)[0]
    layers = []
    names = [node_layer(n) for n in quantizable_nodes(proto)]
    names = [n for n in dict.fromkeys(names) if n is not None]  # each layer once, graph order
    for n, layer in enumerate(names, 1):
        _log(f"    sensitivity {n}/{len(names)}: {layer}")
        layers.append({"layer": layer, "accuracy": accuracy(subset, keep_float=[layer])})
    layers.sort(key=lambda r: -r["accuracy"])
    return {
        "images": count,
        "float32": float32,
        "int8": all_int8,
        "layers": layers,
        "fixes": fixes(proto, calibration, test, [r["layer"] for r in layers]),
    }


def fixes(proto, calibration, test, worst: list[str]) -> list[dict]:
    """The fixes measured on the test images: the ``worst`` layers kept in float32 (1, 2, 3 of
    them), the Percentile and Entropy calibrations, and full 8-bit uint8 weights (U8U8)."""
    from keras_dmr.export.calibration import accuracy_record
    from keras_dmr.export.onnx import quantize_int8, session_predict

    def accuracy(**quant) -> float:
        quantized = quantize_int8(proto, calibration, **quant)
        return accuracy_record(session_predict(quantized.SerializeToString()), test)[0]

    out = []
    for k in KEEP_FLOAT:
        keep = worst[:k]
        out.append(
            {
                "fix": f"{k} worst layer{'s' if k > 1 else ''} in float32",
                "keep_float": keep,
                "accuracy": accuracy(keep_float=keep),
            }
        )
    for method in ("Percentile", "Entropy"):
        out.append(
            {
                "fix": f"{method} calibration",
                "calibration_method": method,
                "accuracy": accuracy(calibration_method=method),
            }
        )
    out.append(
        {
            "fix": "uint8 weights, full 8-bit range (weights='uint8')",
            "weights": "uint8",
            "accuracy": accuracy(weights="uint8"),
        }
    )
    return out


def refix(results: dict, protocol: dict, checkpoints: Path) -> dict:
    """Measure the fixes again for every record with a per-layer search (after a fix is added
    here), from the stored checkpoints and the stored ranking; nothing is retrained."""
    import onnx as onnx_lib

    from keras_dmr import export
    from keras_dmr.convert import to_plain

    calibration, test, _, train = _data(protocol)
    for record in select(results, protocol):
        if "sensitivity" not in record:
            continue
        _log(f"fixes again: {record['model']}")
        plain = to_plain(trained(record["model"], protocol, train, checkpoints)[0])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "plain_float.onnx"
            export.onnx(plain, path, preprocessing=protocol["dataset"], plain=False)
            proto = onnx_lib.load(str(path))
        worst = [r["layer"] for r in record["sensitivity"]["layers"]]
        record["sensitivity"]["fixes"] = fixes(proto, calibration, test, worst)
    return results


def measure(label: str, protocol: dict, checkpoints: Path) -> dict:
    from keras_dmr.analysis.flops import count_flops
    from keras_dmr.convert import to_plain
    from keras_dmr.utils.timing import load_average, machine_description

    calibration, test, selection, train = _data(protocol)
    model, train_seconds = trained(label, protocol, train, checkpoints)
    plain = to_plain(model)
    record = {
        "model": label,
        "builder": MODELS[label][0],
        "kwargs": MODELS[label][1],
        "protocol": protocol,
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "params": {"residual": model.count_params(), "plain": plain.count_params()},
        "macs": {"residual": count_flops(model), "plain": count_flops(plain)},
        "conversion_error": plain.conversion_report["max_relative_error"],
        "machine": machine_description(),
        "load_average": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="keras_dmr_quant_") as tmp:
        for form, m in (("residual", model), ("plain", plain)):
            for engine in ENGINES:
                suffix = ".onnx" if engine == "onnx" else ".tflite"
                result = _export(
                    engine, m, Path(tmp) / f"{form}{suffix}", protocol, calibration, test
                )
                record.setdefault(form, {})[engine] = result
                _log(
                    f"    {form}, {ENGINE_NAMES[engine]}: float32 {result['float32']:.4f}, "
                    f"int8 {result['int8']:.4f} ({-result['drop_points']:+.2f} points)"
                )
        if record["plain"]["onnx"]["drop_points"] > SENSITIVE_POINTS:
            record["sensitivity"] = sensitivity(
                plain, protocol, calibration, test, selection, Path(tmp)
            )
    return record


def run_all(labels, protocol: dict, path: Path, checkpoints: Path) -> dict:
    from keras_dmr.utils.files import write_json

    results = json.loads(path.read_text()) if path.exists() else {}
    key = protocol_key(protocol)
    todo = [label for label in labels if f"{label}|{key}" not in results]
    _log(f"{len(todo)} of {len(labels)} families to measure → {path}")
    for n, label in enumerate(todo, 1):
        _log(f"[{n}/{len(todo)}] {label}")
        record = measure(label, protocol, checkpoints)
        results = json.loads(path.read_text()) if path.exists() else {}
        results[f"{label}|{key}"] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(results, path)
    return results


def select(results: dict, protocol: dict) -> list[dict]:
    key = protocol_key(protocol)
    return [results[f"{label}|{key}"] for label in MODELS if f"{label}|{key}" in results]


def table(records: list[dict]) -> str:
    """int8 against float32 accuracy of both forms of every family, both runtimes."""
    if not records:
        return "_not measured yet_ (`python -m tools.quantization_study`)"
    lines = [
        "| family | form | params | MACs | float32 | ONNX Runtime int8 | LiteRT int8 "
        "| top-1 agreement (ORT / LiteRT) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    measured = {r["model"]: r for r in records}
    for label in MODELS:
        if label not in measured:
            lines.append(f"| {label} | – | – | – | – | not measured yet | – | – |")
            continue
        r = measured[label]
        for form in FORMS:
            o, t = r[form]["onnx"], r[form]["litert"]
            flag = " ⚠" if form == "plain" and o["drop_points"] > SENSITIVE_POINTS else ""
            lines.append(
                f"| {r['model']} | {form} | {r['params'][form] / 1e6:.2f}M | "
                f"{r['macs'][form] / 1e6:.0f}M | {100 * o['float32']:.2f}% | "
                f"{100 * o['int8']:.2f}% ({-o['drop_points']:+.2f}){flag} | "
                f"{100 * t['int8']:.2f}% ({-t['drop_points']:+.2f}) | "
                f"{100 * o['top1_agreement']:.1f}% / {100 * t['top1_agreement']:.1f}% |"
            )
    return "\n".join(lines)


def verdict(records: list[dict]) -> str:
    """Which plain forms lose more than residual ones, in points, from the records."""
    if not records:
        return ""
    parts = []
    for engine in ENGINES:
        gaps = [
            (r["model"], r["plain"][engine]["drop_points"] - r["residual"][engine]["drop_points"])
            for r in records
        ]
        worse = [f"{m} ({g:+.2f})" for m, g in gaps if g > SENSITIVE_POINTS]
        parts.append(
            f"{ENGINE_NAMES[engine]}: the plain form loses more than {SENSITIVE_POINTS:g} "
            f"points beyond its residual model's int8 loss in "
            + (", ".join(worse) if worse else "no family")
            + f"; largest extra loss {max(g for _, g in gaps):+.2f} points."
        )
    return " ".join(parts)


def sensitivity_table(records: list[dict]) -> str:
    chosen = [r for r in records if "sensitivity" in r]
    if not chosen:
        return (
            f"No plain form lost more than {SENSITIVE_POINTS:g} points in ONNX Runtime int8: "
            "no per-layer search was needed."
        )
    lines = []
    for r in chosen:
        s = r["sensitivity"]
        lines += [
            f"**{r['model']}, plain, ONNX Runtime** (float32 {100 * s['float32']:.2f}%, all "
            f"int8 {100 * s['int8']:.2f}% on {s['images']:,} test images outside the measured "
            "ones). Layers whose float32 fallback recovers most:",
            "",
            "| layer kept in float32 | accuracy, all else int8 |",
            "|---|---:|",
        ]
        lines += [f"| `{x['layer']}` | {100 * x['accuracy']:.2f}% |" for x in s["layers"][:5]]
        lines += [
            "",
            f"Fixes on all {r['plain']['onnx']['images']:,} test images (float32 "
            f"{100 * r['plain']['onnx']['float32']:.2f}%, plain int8 "
            f"{100 * r['plain']['onnx']['int8']:.2f}%):",
            "",
            "| fix | int8 accuracy |",
            "|---|---:|",
        ]
        lines += [
            f"| {f['fix']}"
            + (f" (`{'`, `'.join(f['keep_float'])}`)" if "keep_float" in f else "")
            + f" | {100 * f['accuracy']:.2f}% |"
            for f in s["fixes"]
        ]
        lines.append("")
    return "\n".join(lines).rstrip()


def protocol_text(records: list[dict], protocol: dict) -> str:
    if not records:
        return ""
    machine = records[0]["machine"]
    trained = [r["train_seconds"] for r in records if r["train_seconds"]]
    return (
        f"Protocol: {protocol['dataset']}, the first {protocol['train_examples']:,} training "
        f"images, {protocol['epochs']} epoch{'s' if protocol['epochs'] > 1 else ''} of the "
        f"paper's recipe (batch "
        f"{protocol['batch_size']}, learning rate {protocol['learning_rate']}, seed "
        f"{protocol['seed']}); int8 calibrated on the first {protocol['calibration_images']} "
        f"training images; accuracy on the first {protocol['test_examples']:,} test images, "
        f"measured by each runtime on the exported file. Machine: {machine['cpu']} "
        f"({machine['usable_cores']} usable cores)"
        + (
            f"; training took {min(trained) / 60:.0f}–{max(trained) / 60:.0f} min per family."
            if trained
            else "."
        )
    )


def sections(results: dict, protocol: dict) -> dict[str, str]:
    records = select(results, protocol)
    return {
        "quantization-results": "\n\n".join(
            p for p in (table(records), verdict(records), protocol_text(records, protocol)) if p
        ),
        "quantization-sensitivity": sensitivity_table(records),
    }


def plot(records: list[dict], path: Path) -> None:
    """int8 accuracy loss of both forms per family, one panel per runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    y = np.arange(len(records))
    for ax, engine in zip(axes, ENGINES, strict=True):
        for offset, form in ((-0.2, "residual"), (0.2, "plain")):
            ax.barh(y + offset, [r[form][engine]["drop_points"] for r in records], 0.4, label=form)
        ax.axvline(SENSITIVE_POINTS, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{ENGINE_NAMES[engine]} int8")
        ax.set_xlabel("accuracy lost to int8 (points)")
    axes[0].set_yticks(y, [r["model"] for r in records])
    axes[0].invert_yaxis()
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(results: dict, protocol: dict, docs: Path) -> None:
    from tools.fmnist_study import write_sections

    write_sections(docs / "quantization.md", sections(results, protocol))
    records = select(results, protocol)
    if records:
        plot(records, docs / "quantization.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (128 images, 1 epoch, ResNet-20 only); leaves docs/ alone",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="regenerate the tables and plot from the JSON"
    )
    parser.add_argument("--docs", type=Path, help="docs folder (default: docs; --quick: a copy)")
    parser.add_argument(
        "--refix",
        action="store_true",
        help="measure the fixes again for the families with a per-layer search (no training)",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        help=f"where trained models are kept (default: {CHECKPOINTS}/default, or /quick)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=tuple(MODELS),
        metavar="LABEL",
        help="only these families (default: all)",
    )
    args = parser.parse_args(argv)
    from tools.fmnist_study import quick_docs

    protocol = QUICK if args.quick else PROTOCOL
    docs = args.docs or (quick_docs(("quantization.md",)) if args.quick else Path("docs"))
    path = docs / "data" / RESULTS.name
    labels = args.models or list(QUICK_MODELS if args.quick else MODELS)
    checkpoints = args.checkpoints or CHECKPOINTS / ("quick" if args.quick else "default")
    if args.table_only or args.refix:
        results = json.loads(path.read_text())
        if args.refix:
            from keras_dmr.utils.files import write_json

            write_json(refix(results, protocol, checkpoints), path)
    else:
        results = run_all(labels, protocol, path, checkpoints)
    write_docs(results, protocol, docs)
    _log(f"regenerated {docs / 'quantization.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
