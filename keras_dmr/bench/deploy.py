"""Deployment forms of one model side by side: residual, plain and pruned plain, each as
exported files (SavedModel, ONNX Runtime, LiteRT, OpenVINO running the ONNX file and its own IR;
float32 and int8), timed against the residual
Keras model in one interleaved run, with accuracy when labelled images are given.

:func:`export_artifacts` writes the files and opens each in its own runtime;
:func:`measure` times them (throughput at one batch size, latency at batch 1, the Keras
baseline interleaved with them) and measures accuracy. The benchmark's ``deploy`` section and
``keras-dmr demo`` use both. Every exported file takes uint8 pixels (``preprocessing``), as
served; the Keras baseline takes the normalised float batch it was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from keras_dmr.analysis.flops import count_flops
from keras_dmr.bench.engines import available_engines
from keras_dmr.export import ExportError, litert, onnx, openvino, saved_model
from keras_dmr.export.litert import interpreter
from keras_dmr.export.onnx import onnx_session
from keras_dmr.export.serving import resolve_preprocessing
from keras_dmr.utils.timing import interleaved

DEPLOY_ENGINES = ("saved_model", "onnx", "litert", "openvino", "openvino_ir")
ENGINE_NAMES = {
    "keras": "Keras (TF graph)",
    "saved_model": "SavedModel",
    "onnx": "ONNX Runtime",
    "litert": "LiteRT",
    "openvino": "OpenVINO (ONNX)",
    "openvino_ir": "OpenVINO IR",
}
# The two OpenVINO rows: ``openvino`` compiles the ONNX file (ONNX Runtime's int8 QDQ graph for
# int8), ``openvino_ir`` the package's IR (:func:`keras_dmr.export.openvino`: converted from the
# package's ONNX graph, int8 by NNCF). The same runtime, two routes to its graph.
OPENVINO_ENGINES = ("openvino", "openvino_ir")
PRECISIONS = ("float32", "int8")
# OpenVINO only, on a CPU with native bfloat16 (AVX512-BF16, AMX): the float32 ONNX file or IR
# run with bfloat16 arithmetic. OpenVINO picks bfloat16 by itself on such a CPU; every other
# row here pins float32 arithmetic, so that "float32" means it.
BFLOAT16 = "bfloat16"
_OPENVINO_HINT = {"float32": "f32", "int8": "f32", BFLOAT16: "bf16"}


@dataclass
class Artifact:
    """One deployable form: what it is, where it is, and a call on uint8 images → logits."""

    form: str  # "residual", "plain", "pruned plain"
    engine: str  # "keras" or one of DEPLOY_ENGINES
    precision: str  # "float32" or "int8"
    params: int
    macs: int
    predict: Callable[[np.ndarray], np.ndarray] | None = field(repr=False)
    path: str | None = None
    error: str | None = None  # why the engine could not run the file (then ``predict`` is None)

    @property
    def label(self) -> str:
        return f"{self.form}, {ENGINE_NAMES[self.engine]}, {self.precision}"


def threads() -> int:
    """The cores this process may use: what each runtime is given."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def keras_artifact(model: keras.Model, form: str, preprocessing) -> Artifact:
    """The model in process (one TensorFlow graph), fed uint8 pixels normalised outside it:
    the baseline every ratio is taken against."""
    import tensorflow as tf

    norm = resolve_preprocessing(preprocessing)
    fn = tf.function(lambda x: model(x, training=False))

    def predict(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        if norm is not None:
            x = (x - norm[0]) / norm[1]
        return fn(tf.constant(x)).numpy()

    return Artifact(form, "keras", "float32", model.count_params(), count_flops(model), predict)


def bfloat16_supported() -> bool:
    """Whether OpenVINO is installed and this CPU computes in bfloat16 natively."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _open(engine: str, path: str, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    if engine in OPENVINO_ENGINES:  # the ONNX file or the IR, compiled for this CPU
        import openvino as ov

        config = {
            "INFERENCE_NUM_THREADS": threads(),
            "INFERENCE_PRECISION_HINT": _OPENVINO_HINT[precision],
        }
        compiled = ov.Core().compile_model(path, "CPU", config)
        request, logits = compiled.create_infer_request(), compiled.output("logits")
        return lambda images: request.infer({"images": images})[logits]
    if engine == "onnx":
        session = onnx_session(path, threads(), cpu_only=True)
        return lambda images: session.run(["logits"], {"images": images})[0]
    if engine == "litert":
        runner = interpreter(path, threads()).get_signature_runner("serving_default")
        return lambda images: runner(images=images)["logits"]
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]

    def predict(images: np.ndarray, _keep=loaded) -> np.ndarray:  # the signature needs `loaded`
        return serve(images=tf.constant(images))["logits"].numpy()

    return predict


def export_artifacts(
    forms: dict[str, keras.Model],
    workdir: str | Path,
    *,
    preprocessing,
    calibration: np.ndarray,
    engines: Sequence[str] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    log: Callable[[str], None] = print,
) -> list[Artifact]:
    """Export every ``forms`` model (form name → model, exported as it is: a residual model
    stays residual) with every one of ``engines`` (default: :func:`available_engines`) and
    ``precisions`` (int8: ONNX Runtime, OpenVINO and LiteRT, calibrated on ``calibration``,
    uint8 images; ``openvino`` runs the ONNX file, ONNX Runtime's int8 QDQ graph included,
    ``openvino_ir`` the IR, NNCF's int8 included; :data:`BFLOAT16`: OpenVINO only, where
    :func:`bfloat16_supported`, on the float32 file);
    returns them opened, in that order; an engine that cannot run its file, or an exporter
    that refuses the model, is an artifact with an ``error`` (see :func:`measure`)."""
    engines = available_engines(DEPLOY_ENGINES) if engines is None else tuple(engines)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    for form, model in forms.items():
        params, macs = model.count_params(), count_flops(model)
        stem = form.replace(" ", "_")
        for engine in engines:
            for precision in precisions:
                if precision == "int8" and engine == "saved_model":
                    continue  # TF Serving has no int8 path of its own here
                if precision == BFLOAT16 and engine not in OPENVINO_ENGINES:
                    continue
                log(f"  export {form}: {ENGINE_NAMES[engine]} {precision}")
                quant = {}
                if precision == "int8":
                    quant = {"quantize": "int8", "calibration": calibration}
                kw = dict(preprocessing=preprocessing, plain=False)
                artifact = Artifact(form, engine, precision, params, macs, None, None)
                try:
                    artifact.path = _export(engine, precision, model, workdir, stem, kw, quant)
                except ExportError as err:  # a refused file is a row, not the end of the run
                    why = " ".join(str(err).split())[:300]
                    artifact.error = f"the {ENGINE_NAMES[engine]} export refused it: {why}"
                    log(f"  {artifact.label}: not exported ({why})")
                    out.append(artifact)
                    continue
                out.append(_opened(artifact, calibration[:1], log))
    return out


def _export(engine, precision, model, workdir: Path, stem: str, kw: dict, quant: dict) -> str:
    """One file of :func:`export_artifacts`; the ONNX file serves ONNX Runtime and OpenVINO, the
    float32 file (ONNX or IR) the bfloat16 rows too."""
    file_precision = "float32" if precision == BFLOAT16 else precision
    if engine == "saved_model":
        return saved_model(model, workdir / f"{stem}_savedmodel", **kw)
    if engine in ("onnx", "openvino"):
        path = workdir / f"{stem}_{file_precision}.onnx"
        return str(path) if path.exists() else onnx(model, path, **kw, **quant)
    if engine == "openvino_ir":
        path = workdir / f"{stem}_{file_precision}.xml"
        return str(path) if path.exists() else openvino(model, path, **kw, **quant)
    return litert(model, workdir / f"{stem}_{precision}.tflite", **kw, **quant)


# What a runtime raises when it cannot prepare or run a file it loaded (LiteRT's XNNPACK
# delegate "failed to prepare", ONNX Runtime's Fail/InvalidGraph, TensorFlow's op errors).
_ENGINE_ERRORS = (RuntimeError, ValueError)


def _opened(artifact: Artifact, probe: np.ndarray, log: Callable[[str], None]) -> Artifact:
    """``artifact`` with its engine opened and tried on one image; an engine that cannot run
    the file leaves ``predict`` unset and says why in ``error`` (the file is still written)."""
    try:
        predict = _open(artifact.engine, artifact.path, artifact.precision)
        predict(probe)
    except _ENGINE_ERRORS as err:
        why = " ".join(str(err).split())[:200] or type(err).__name__
        artifact.error = f"{ENGINE_NAMES[artifact.engine]} could not run {artifact.path}: {why}"
        log(f"  {artifact.label}: could not run ({why})")
    else:
        artifact.predict = predict
    return artifact


def measure(
    artifacts: Sequence[Artifact],
    images: np.ndarray,
    *,
    labelled: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    warmup: int = 2,
    iters: int = 5,
    repeats: int = 5,
    latency_iters: int = 20,
) -> list[dict]:
    """One row per artifact: throughput on ``images`` (uint8, one batch) and latency at batch 1,
    all artifacts interleaved; ratios to the first artifact (the baseline); accuracy on
    ``labelled`` uint8 batches when given. An artifact its engine could not run
    (``error`` set) gets a row with the ``error`` and no figures."""
    if artifacts[0].error:
        raise ValueError(f"the baseline must run; {artifacts[0].error}")
    runs = [a for a in artifacts if a.error is None]
    batch = {a.label: (lambda a=a: a.predict(images)) for a in runs}
    single = images[:1]
    one = {a.label: (lambda a=a: a.predict(single)) for a in runs}
    through = interleaved(batch, warmup=warmup, iters=iters, repeats=repeats)
    latency = interleaved(one, warmup=warmup, iters=latency_iters, repeats=repeats)
    rows = []
    for a in artifacts:
        row = {
            "form": a.form,
            "engine": a.engine,
            "precision": a.precision,
            "params": a.params,
            "macs": a.macs,
        }
        if a.error:
            rows.append({**row, "error": a.error, "path": a.path})
            continue
        t = through[a.label]
        row = {
            **row,
            "images_per_s": len(images) / t["median_s"],
            "images_per_s_range": [len(images) / t["max_s"], len(images) / t["min_s"]],
            "latency_ms": 1000 * latency[a.label]["median_s"],
            "path": a.path,
        }
        if labelled is not None:
            correct = sum(int(np.sum(a.predict(x).argmax(-1) == y)) for x, y in labelled)
            row["accuracy"] = correct / sum(len(y) for _, y in labelled)
        rows.append(row)
    base = rows[0]
    for row in (r for r in rows if "error" not in r):
        row["ratio"] = row["images_per_s"] / base["images_per_s"]
        row["latency_ratio"] = row["latency_ms"] / base["latency_ms"]
    return rows


def find(rows: Sequence[dict], form: str, engine: str, precision: str) -> dict | None:
    """The row of ``form``, ``engine`` and ``precision`` that ran, or None."""
    return next(
        (
            r
            for r in rows
            if r["form"] == form
            and r["engine"] == engine
            and r["precision"] == precision
            and "error" not in r
        ),
        None,
    )


# ------------------------------------------------------------------------- the bench section
# label → (builder in keras_dmr.models, arguments): every family at its CIFAR size.
DEPLOY_FAMILIES = {
    "ResNet-20": ("ResNet", {"depth": 20}),
    "DMRNet-14": ("DMRNet", {"depth": 14}),
    "RM+RepVGG-21 (r=0.25)": ("RepVGG", {"depth": 21, "reserve_ratio": 0.25}),
    "MobileNetV2 → RMNetV1": ("MobileNetV2", {"variant": "cifar"}),
    "RMNeXt 26×3_32": ("RMNeXt", {"depth": 26, "expansion": 3, "channels_per_group": 32}),
}
# What `keras-dmr bench --deploy-families` calls each family.
FAMILY_IDS = {
    "resnet20": "ResNet-20",
    "dmrnet14": "DMRNet-14",
    "repvgg21": "RM+RepVGG-21 (r=0.25)",
    "mobilenetv2": "MobileNetV2 → RMNetV1",
    "rmnext26": "RMNeXt 26×3_32",
}
QUICK_FAMILIES = ("ResNet-20",)
PRUNE_RATIO = 0.5


def family_forms(label: str, seed: int = 0) -> tuple[dict[str, keras.Model], dict[str, str]]:
    """The residual model (random weights and BN statistics), its plain form and the plain form
    slimmed by :data:`PRUNE_RATIO` (BN fused), and why a form could not be made."""
    from keras_dmr import models, prune
    from keras_dmr.convert import randomize, to_plain

    builder, kwargs = DEPLOY_FAMILIES[label]
    residual = randomize(getattr(models, builder)(compile=False, **kwargs), seed)
    forms, missing = {"residual": residual, "plain": to_plain(residual)}, {}
    try:
        slimmed = prune.slim(to_plain(residual, fuse_bn=False), ratio=PRUNE_RATIO)
    except (ValueError, NotImplementedError) as err:  # a family slim does not handle
        missing["pruned plain"] = str(err).splitlines()[0][:200]
        return forms, missing
    report = slimmed.pruning_report
    if report["channels_after"] == report["channels_before"]:  # timing it again says nothing
        missing["pruned plain"] = NOTHING_PRUNED
    else:
        forms["pruned plain"] = prune.fuse_batchnorm(slimmed)
    return forms, missing


NOTHING_PRUNED = f"slim(ratio={PRUNE_RATIO}) dropped no channel: the plain rows are this form's"


def without_unpruned(group: dict) -> dict:
    """``group`` without "pruned plain" rows that are the plain form again (the same
    parameters and MACs: slim dropped no channel), which runs before :func:`family_forms`
    checked that recorded; :data:`NOTHING_PRUNED` says why instead."""
    plain = {(r["params"], r["macs"]) for r in group["rows"] if r["form"] == "plain"}
    pruned = [r for r in group["rows"] if r["form"] == "pruned plain"]
    if not pruned or any((r["params"], r["macs"]) not in plain for r in pruned):
        return group
    rows = [r for r in group["rows"] if r["form"] != "pruned plain"]
    return dict(group, rows=rows, missing={**group["missing"], "pruned plain": NOTHING_PRUNED})


def run_section(
    *,
    quick: bool = False,
    batch_size: int = 128,
    repeats: int = 5,
    families: Sequence[str] | None = None,
    log=print,
) -> list[dict]:
    """Every family (``families``: ids of :data:`FAMILY_IDS`; default all, ResNet-20 when
    ``quick``) × form × engine × precision, each family timed in one interleaved run against
    its residual Keras model (random weights: no accuracy)."""
    import tempfile

    from keras_dmr.data import load_digits_arrays

    calibration = load_digits_arrays("train")[0][:256]
    images = np.resize(load_digits_arrays("test")[0], (batch_size, 32, 32, 3))
    out = []
    if families is not None:
        labels = [FAMILY_IDS[f] for f in families]
    else:
        labels = QUICK_FAMILIES if quick else tuple(DEPLOY_FAMILIES)
    for label in labels:
        log(f"deploy: {label}")
        forms, missing = family_forms(label)
        with tempfile.TemporaryDirectory(prefix="keras_dmr_deploy_") as tmp:
            artifacts = [keras_artifact(forms["residual"], "residual", "digits")]
            artifacts += export_artifacts(
                forms, tmp, preprocessing="digits", calibration=calibration, log=log
            )
            rows = measure(
                artifacts,
                images,
                warmup=1 if quick else 3,
                iters=1 if quick else 5,
                repeats=2 if quick else repeats,
                latency_iters=2 if quick else 20,
            )
            profile_rows(rows, images)
        for row in rows:
            row.pop("path", None)
        out.append({"family": label, "batch_size": batch_size, "rows": rows, "missing": missing})
        keras.backend.clear_session()
    return out


def profile_rows(rows: list[dict], images: np.ndarray) -> None:
    """Add to every float32 and int8 row that ran in ONNX Runtime or OpenVINO its engine's own
    profile (:func:`keras_dmr.bench.kernels.profile_row`: time in convolutions and products,
    the share in int8 ones, the costliest kernels), and to LiteRT's rows its execution plan
    (:func:`keras_dmr.bench.kernels.litert_plan`), run apart from the timing: what says why
    an int8 file is or is not faster than its float32 one (:mod:`keras_dmr.bench.int8_gain`)."""
    from keras_dmr.bench import kernels

    for row in rows:
        if row["precision"] not in PRECISIONS or "error" in row:
            continue
        if row["engine"] == "litert":  # no kernel times: which products XNNPACK runs
            row.update(kernels.litert_plan(row["path"]))
        elif row["engine"] in kernels.KERNEL_PROFILE_ENGINES:
            profile = kernels.profile_row(row["engine"], row["path"], images, threads=threads())
            if row["precision"] != "int8":
                del profile["int8_kernel_share"]
            row.update(profile)


def table(groups: list[dict]) -> str:
    """The deploy section of docs/benchmarks.md: throughput and latency against the residual
    Keras float32 model of the same family, measured in the same run, and for int8 files the
    share of their engine's time spent in int8 kernels (:func:`profile_rows`)."""
    if not groups:
        return "_not measured in this run_ (`keras-dmr bench --sections deploy`)"
    lines = [
        "| family | form | engine | precision | params | MACs | images/s (batch "
        f"{groups[0]['batch_size']}) | × residual Keras | latency batch 1 (ms) | int8 kernels |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for g in map(without_unpruned, groups):
        for r in g["rows"]:
            if "error" in r:
                lines.append(
                    f"| {g['family']} | {r['form']} | {ENGINE_NAMES[r['engine']]} | "
                    f"{r['precision']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | "
                    f"could not run: {_cell(r['error'])} | – | – | – |"
                )
                continue
            share = r.get("int8_kernel_share")
            lines.append(
                f"| {g['family']} | {r['form']} | {ENGINE_NAMES[r['engine']]} | {r['precision']} "
                f"| {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | {r['images_per_s']:,.0f} "
                f"| {r['ratio']:.2f}× | {r['latency_ms']:.2f} | "
                + ("–" if share is None else f"{100 * share:.0f}%")
                + " |"
            )
        for form, why in g["missing"].items():
            lines.append(
                f"| {g['family']} | {form} | – | – | – | – | not made: {_cell(why)} | – | – | – |"
            )
    return "\n".join(lines)


def _cell(text: str) -> str:
    """``text`` safe in one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
