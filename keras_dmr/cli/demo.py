"""``keras-dmr demo``: the main job end to end, on the bundled digits by default.

Train a network (resumable checkpoint under ``runs/``), rewrite it as a plain network
(verified), export it (SavedModel, ONNX, LiteRT; float32 and int8) and measure every form side
by side against the residual model as trained: one table with accuracy, parameters, MACs,
images/s and the ratio to that baseline, the shipped artifact, and the deployment targets met or
missed.

Three families (``--family``), chosen by measurement (README, ``docs/benchmarks.md``):

* ``mobilenetv2`` (default): the RMNet paper's CIFAR MobileNetV2 at width 0.5, whose plain form
  is MobileNetV1 — RM removes the shortcut and fuses each projection with the next expansion, so
  the plain model has about a quarter of the residual model's MACs before any pruning. It wins
  without pruning, so the demo does not prune it.
* ``resnet20`` and ``dmrnet14``: a ResNet-20 or DMRNet-14 trained for network slimming (the
  extra BN on the residual path, sparsity on the BN scales), its plain form pruned over the whole
  graph to a MACs budget in steps with fine-tuning between them
  (:func:`keras_dmr.prune.prune_to_budget`): a plain ResNet alone is slower than the residual
  one (its blocks carry their input through reserved channels: 1.9× the MACs, 2.8× for
  DMRNet-14), so it can only win by pruning below the residual model's MACs.

The shipped artifact is the fastest exported file of the plain (or pruned plain) model whose
accuracy is within :data:`TARGET_ACCURACY_POINTS` of the baseline on the test split (the fastest
one when none is), in int8, float32 or — OpenVINO on a CPU with native bfloat16 — bfloat16: on
a small network a runtime's float kernels can beat its int8 ones, and int8 can cost more
accuracy than the target allows. It must beat the residual model given the same engine and that
engine's fastest precision for it. Choosing on the test split makes the
shipped accuracy slightly optimistic; the table shows every candidate.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_dmr.utils.files import write_json

BATCH_SIZE = 64
# At most this many training images by default: all of digits (1,437), a sixth of
# Fashion-MNIST, so that the demo stays minutes long on two cores.
TRAIN_IMAGES = 10_000
# Sparsity training's strength as the total it may shrink a BN scale, Σ over training steps of
# learning rate × factor (proximal BNSparsity): the factor is derived from it for the run's
# steps and schedule, so a longer run (more images, more epochs) is not pruned to nothing.
SPARSITY_BUDGET = 0.95
# The pruned plain model's MACs as a fraction of the residual model's (each family's
# Family.prune_macs, chosen by measurement: README), reached in PRUNE_STEPS cuts with
# FINETUNE_EPOCHS of fine-tuning after each.
PRUNE_STEPS = 3
FINETUNE_EPOCHS = 4
FINETUNE_LEARNING_RATE = 0.005
# Every pruned layer keeps a multiple of this many filters: the int8 and float kernels of ONNX
# Runtime, LiteRT and OpenVINO run such widths faster than the odd ones a free ranking leaves.
ROUND_TO = 8
# Targets of the shipped artifact (issue 17): against the residual Keras model as trained, and
# against the residual model under the same engine; accuracy loss in points.
TARGET_SPEEDUP = 5.0
TARGET_SAME_ENGINE = 1.2
TARGET_ACCURACY_POINTS = 0.5
MEASURED_ENGINES = ("onnx", "litert", "openvino", "openvino_ir")
TIMING_REPEATS = 5


@dataclass(frozen=True)
class Family:
    """A network the demo can ship: how ``keras-dmr train`` builds it, and whether its plain
    form is pruned (after sparsity training) before it ships, to ``prune_macs`` of the residual
    model's MACs."""

    label: str  # the residual network, as the README names it
    plain_label: str  # its plain form
    model: str  # a `keras-dmr train --model`
    depth: int | None
    options: dict  # builder options, as `keras-dmr train` names them
    checkpoint: str  # runs/<checkpoint>_<dataset>.keras
    shipped_name: str  # savedmodels/<shipped_name>_<dataset>/<version>/
    prune: bool
    prune_macs: float | None = None


FAMILIES = {
    "mobilenetv2": Family(
        "MobileNetV2 (CIFAR, width 0.5)",
        "RMNetV1 (MobileNetV1, width 0.5)",
        "mobilenetv2",
        None,
        {"width": 0.5},
        "mobilenetv2_w0.5",
        "rmnetv1_w0.5",
        prune=False,
    ),
    "resnet20": Family(
        "ResNet-20",
        "ResNet-20 plain, slimmed",
        "resnet",
        20,
        {},
        "resnet20_slim",
        "resnet20_pruned",
        prune=True,
        prune_macs=0.5,
    ),
    "dmrnet14": Family(
        "DMRNet-14",
        "DMRNet-14 plain, pruned",
        "dmrnet",
        14,
        {},
        "dmrnet14_slim",
        "dmrnet14_pruned",
        prune=True,
        prune_macs=0.75,
    ),
}
DEFAULT_FAMILY = "mobilenetv2"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from keras_dmr import data
    from keras_dmr.cli.common import _choices_list, _natural, _positive_int
    from keras_dmr.utils.arguments import output_path

    parser.add_argument(
        "--family",
        choices=tuple(FAMILIES),
        default=DEFAULT_FAMILY,
        help="mobilenetv2: the CIFAR MobileNetV2 (width 0.5) whose plain form is MobileNetV1, "
        "shipped unpruned; resnet20, dmrnet14: trained for slimming, the plain form pruned to "
        f"--prune-macs (default: {DEFAULT_FAMILY}, chosen by measurement: see the README)",
    )
    parser.add_argument(
        "--dataset",
        choices=data.SUPPORTED,
        default="digits",
        help="digits is bundled (no download); fashion_mnist installs with apt "
        "(dataset-fashion-mnist); the others come from TFDS (default: digits)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="where the dataset is (as for train)")
    parser.add_argument(
        "--epochs", type=_positive_int, default=8, metavar="N", help="training epochs (default 8)"
    )
    parser.add_argument(
        "--train-images",
        type=_positive_int,
        metavar="N",
        help=f"train on the first N training images (default: at most {TRAIN_IMAGES:,}: all of "
        "digits, a sixth of Fashion-MNIST); the test split stays whole",
    )
    parser.add_argument(
        "--prune-macs",
        type=_fraction,
        metavar="F",
        help="resnet20, dmrnet14: prune the plain model until its MACs are F times the residual "
        "model's (default: "
        + ", ".join(f"{n} {f.prune_macs:g}" for n, f in FAMILIES.items() if f.prune)
        + ")",
    )
    parser.add_argument(
        "--prune-steps",
        type=_positive_int,
        default=PRUNE_STEPS,
        metavar="N",
        help=f"resnet20, dmrnet14: reach --prune-macs in N cuts (default {PRUNE_STEPS})",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=_natural,
        default=FINETUNE_EPOCHS,
        metavar="N",
        help="resnet20, dmrnet14: fine-tuning epochs after each cut, learning rate "
        f"{FINETUNE_LEARNING_RATE:g} (default {FINETUNE_EPOCHS})",
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
    parser.add_argument(
        "--engines",
        type=_choices_list(MEASURED_ENGINES),
        metavar="LIST",
        help="the engines whose files are exported and measured, comma-separated among "
        f"{', '.join(MEASURED_ENGINES)} (default: those installed)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=TIMING_REPEATS,
        metavar="N",
        help=f"interleaved timing repeats whose median is reported (default {TIMING_REPEATS})",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1]; got {text!r}")
    return value


def _uint8_batches(dataset: str, data_dir, split: str, batch_size: int, **kw) -> list:
    from keras_dmr import data

    pipeline = data.load(
        dataset, split, batch_size=batch_size, normalize=False, data_dir=data_dir, **kw
    )
    return [(np.asarray(x, np.uint8), np.asarray(y)) for x, y in pipeline]


def _prune(residual, args, train) -> tuple:
    """The plain model (BN kept, verified) pruned over its whole graph to ``--prune-macs`` of
    the residual model's MACs in ``--prune-steps`` cuts, fine-tuned after each, BN fused."""
    from keras_dmr import prune
    from keras_dmr.analysis import count_flops
    from keras_dmr.convert import to_plain

    plain = to_plain(residual, fuse_bn=False)
    fraction = min(1.0, args.prune_macs * count_flops(residual) / count_flops(plain))
    print(
        f"pruning the plain model to {args.prune_macs:g}× the residual model's MACs "
        f"({fraction:.1%} of its own) in {args.prune_steps} cut(s), {args.finetune_epochs} "
        f"fine-tuning epoch(s) at learning rate {FINETUNE_LEARNING_RATE:g} after each, every "
        f"layer a multiple of {ROUND_TO} filters",
        flush=True,
    )
    pruned = prune.prune_to_budget(
        plain,
        train,
        macs=fraction,
        steps=args.prune_steps,
        epochs=args.finetune_epochs,
        learning_rate=FINETUNE_LEARNING_RATE,
        round_to=ROUND_TO,
        log=lambda line: print(line, flush=True),
    )
    report = pruned.pruning_report
    return plain, prune.fuse_batchnorm(pruned), report


def run_demo(args: argparse.Namespace) -> int:
    from keras_dmr.errors import UsageError

    family = FAMILIES[args.family]
    changed = args.prune_macs is not None or (args.prune_steps, args.finetune_epochs) != (
        PRUNE_STEPS,
        FINETUNE_EPOCHS,
    )
    if not family.prune and changed:
        pruned = ", ".join(name for name, f in FAMILIES.items() if f.prune)
        raise UsageError(
            f"--prune-macs, --prune-steps and --finetune-epochs apply to --family {pruned} "
            f"only; --family {args.family} ships its plain form unpruned"
        )
    if args.engines:
        from keras_dmr.bench.engines import available_engines

        installed = available_engines(MEASURED_ENGINES)
        missing = [e for e in args.engines if e not in installed]
        if missing:
            raise UsageError(
                f"argument --engines: {', '.join(missing)} cannot run here (not installed); "
                f"installed: {', '.join(installed) or 'none'}"
            )
    if family.prune and args.prune_macs is None:
        args.prune_macs = family.prune_macs
    residual, run, factor = _train_residual(family, args)
    forms, plain, pruning = _plain_forms(residual, family, args, run)
    rows, calibration, machine, load = _measure_forms(forms, args)
    print("\n== summary")
    print(summary(rows, machine, load))

    print("\n== exports of the shipped model", flush=True)
    shipped_model = list(forms.values())[-1]
    shipped = _export_shipped(shipped_model, shipped_row(rows), family, args, calibration)
    for kind, path in shipped.items():
        print(f"{kind:<20} {path}")
    record = args.runs / record_name(args.dataset, args.family)
    write_json(
        {
            "dataset": args.dataset,
            "family": args.family,
            "model": family.label,
            "plain_model": family.plain_label,
            "train_images": run.train_images or data_size(args.dataset),
            "epochs": args.epochs,
            "sparsity_factor": factor,
            "prune_macs": args.prune_macs if family.prune else None,
            "prune_steps": args.prune_steps if family.prune else None,
            "finetune_epochs": args.finetune_epochs if family.prune else None,
            "pruning": pruning,
            "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows],
            "targets": targets(rows),
            "machine": machine,
            "load_average": load,
        },
        record,
    )
    print(f"\nthe table's figures: {record}")
    print(
        f"\nmax relative error of the plain model (verified): "
        f"{plain.conversion_report['max_relative_error']:.2e}"
    )
    print("shipped: " + ", ".join(str(p) for p in shipped.values()))
    return 0


def data_size(dataset: str) -> int:
    """Images in ``dataset``'s training split."""
    from keras_dmr import data

    return data.dataset_info(dataset).train_examples


def _train_residual(family: Family, args: argparse.Namespace) -> tuple:
    """Step 1: the residual network trained (or its checkpoint resumed) by the training
    library, with sparsity training when the family is slimmed; ``(model, run, factor)``."""
    import keras

    from keras_dmr import data
    from keras_dmr.cli.common import RESUME_KEYS
    from keras_dmr.cli.train import new_model
    from keras_dmr.prune import sparsity_factor
    from keras_dmr.training.run import TrainingRun, train

    available = data_size(args.dataset)
    train_images = min(args.train_images or TRAIN_IMAGES, available)
    factor = (
        sparsity_factor(SPARSITY_BUDGET, train_images, args.epochs, BATCH_SIZE)
        if family.prune
        else None
    )
    if factor is not None:
        factor = float(f"{factor:.4g}")  # what the checkpoint records, as `train --sparsity`
    subset = train_images if train_images < available else None
    settings = dict.fromkeys(RESUME_KEYS)
    settings.update(family.options)
    settings.update(
        model=family.model,
        depth=family.depth,
        dataset=args.dataset,
        batch_size=BATCH_SIZE,
        seed=0,
        sparsity=factor,
        train_images=subset,
    )
    run = TrainingRun(
        args.runs / f"{family.checkpoint}_{args.dataset}.keras",
        args.dataset,
        args.epochs,
        batch_size=BATCH_SIZE,
        data_dir=args.data_dir,
        train_images=subset,
        settings=settings,
    )
    how = (
        f"trained for slimming: sparsity factor {factor:.4g} (shrinks a BN scale by at most "
        f"{SPARSITY_BUDGET:g} over the run)"
        if factor is not None
        else "its plain form ships unpruned"
    )
    print(
        f"\n== {family.label} on {args.dataset} ({train_images:,} of {available:,} training "
        f"images), {how}",
        flush=True,
    )
    callbacks = []
    if factor is not None:
        from keras_dmr.prune import BNSparsity

        callbacks.append(BNSparsity(factor))
    keras.utils.set_random_seed(0)
    classes = data.dataset_info(args.dataset).num_classes
    residual, result = train(
        run,
        lambda: new_model(
            family.model,
            family.depth,
            classes=classes,
            sparsity=factor is not None,
            **family.options,
        ),
        fresh=args.fresh,
        callbacks=callbacks,
        log=lambda line: print(line, flush=True),
    )
    print(f"test accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f})")
    return residual, run, factor


def _plain_forms(residual, family: Family, args: argparse.Namespace, run) -> tuple:
    """Step 2: the RM conversion (and slimming); ``(forms, plain, pruning report)``, the
    forms in table order, the shipped one last."""
    from keras_dmr import data
    from keras_dmr.cli import common as cli
    from keras_dmr.convert import to_plain

    pruning = None
    if family.prune:
        print("\n== RM: the plain Conv-ReLU form, then pruning to a MACs budget", flush=True)
        train = data.load(
            args.dataset,
            "train",
            batch_size=BATCH_SIZE,
            data_dir=args.data_dir,
            drop_remainder=True,
            take=run.train_images,
        )
        plain, shipped_model, pruning = _prune(residual, args, train)
        forms = {"residual": residual, "plain": plain, "pruned plain": shipped_model}
    else:
        print(f"\n== RM: {family.plain_label}", flush=True)
        plain = to_plain(residual)
        forms = {"residual": residual, "plain": plain}
    print(cli.describe_report(plain.conversion_report))
    return forms, plain, pruning


def _measure_forms(forms: dict, args: argparse.Namespace) -> tuple:
    """Step 3: the residual and the shipped form exported to every engine and precision and
    measured side by side with the Keras models; ``(rows, calibration, machine, load)``."""
    from keras_dmr.bench import deploy
    from keras_dmr.bench.engines import available_engines
    from keras_dmr.utils.timing import load_average, machine_description

    print(
        "\n== every form exported and measured side by side (batch 128, interleaved; accuracy "
        "on the test split)",
        flush=True,
    )
    calibration = np.concatenate(
        [x for x, _ in _uint8_batches(args.dataset, args.data_dir, "train", 64, take=512)]
    )
    labelled = _uint8_batches(args.dataset, args.data_dir, "test", 128)
    images = np.concatenate([x for x, _ in labelled])[:128]
    engines = available_engines(args.engines or MEASURED_ENGINES)
    precisions = deploy.PRECISIONS + ((deploy.BFLOAT16,) if deploy.bfloat16_supported() else ())
    shipped_form = list(forms)[-1]
    with tempfile.TemporaryDirectory(prefix="keras_dmr_demo_") as tmp:
        exported = deploy.export_artifacts(
            {"residual": forms["residual"], shipped_form: forms[shipped_form]},
            tmp,
            preprocessing=args.dataset,
            calibration=calibration,
            engines=engines,
            precisions=precisions,
            log=lambda m: None,
        )
        in_process = {
            form: deploy.keras_artifact(model, form, args.dataset) for form, model in forms.items()
        }
        # The baseline first (every ratio is to it), then each form's rows together.
        artifacts = [
            row
            for form in forms
            for row in [in_process[form], *(a for a in exported if a.form == form)]
        ]
        rows = deploy.measure(artifacts, images, labelled=labelled, repeats=args.repeats)
    return rows, calibration, machine_description(), load_average()


def _export_shipped(model, row: dict | None, family: Family, args, calibration) -> dict:
    """The shipped model as a SavedModel (TF Serving), ONNX and LiteRT files in int8, and the
    shipped file itself when it is not one of those (an OpenVINO IR, or a float32 file:
    OpenVINO's bfloat16 runs the float32 ONNX file or IR)."""
    from keras_dmr import export

    name = f"{family.shipped_name}_{args.dataset}"
    shipped = {
        "SavedModel": export.saved_model(model, args.base_dir / name, preprocessing=args.dataset)
    }
    version = Path(shipped["SavedModel"]).name
    files = [("ONNX", "int8"), ("LiteRT", "int8")]
    if row is not None:
        precision = "int8" if row["precision"] == "int8" else "float32"
        kind = {"litert": "LiteRT", "openvino_ir": "OpenVINO IR"}.get(row["engine"], "ONNX")
        if (kind, precision) not in files:
            files.append((kind, precision))
    writers = {
        "ONNX": (export.onnx, "onnx"),
        "LiteRT": (export.litert, "tflite"),
        "OpenVINO IR": (export.openvino, "xml"),
    }
    for kind, precision in files:
        writer, suffix = writers[kind]
        kw = dict(preprocessing=args.dataset)
        if precision == "int8":
            kw.update(quantize="int8", calibration=calibration)
        shipped[f"{kind} {precision}"] = writer(
            model, args.base_dir / f"{name}_v{version}_{precision}.{suffix}", **kw
        )
    return shipped


def record_name(dataset: str, family: str) -> str:
    """Where under ``--runs`` the demo writes its figures: ``demo_<dataset>.json`` for the
    default family, ``demo_<dataset>_<family>.json`` for another."""
    return f"demo_{dataset}.json" if family == DEFAULT_FAMILY else f"demo_{dataset}_{family}.json"


def targets(rows: list[dict]) -> list[dict]:
    """The issue's three targets for the shipped artifact (:func:`shipped_row`), each
    ``{"target", "met", "value"}``, from :func:`keras_dmr.bench.deploy.measure` rows whose first
    row is the baseline."""
    from keras_dmr.bench.deploy import ENGINE_NAMES

    base, shipped = rows[0], shipped_row(rows)
    names = (
        f"shipped ≥ {TARGET_SPEEDUP:g}× the baseline's throughput",
        f"shipped ≥ {TARGET_SAME_ENGINE:g}× the residual model under the same engine "
        "(its fastest precision)",
        f"accuracy loss ≤ {TARGET_ACCURACY_POINTS:g} points",
    )
    if shipped is None:
        why = f"no {shipped_form(rows)} file ran"
        return [{"target": name, "met": False, "value": why} for name in names]
    engine = shipped["engine"]
    residual = [r for r in _ran(rows) if r["form"] == "residual" and r["engine"] == engine]
    loss = _loss(base, shipped)
    checks = [(shipped["ratio"] >= TARGET_SPEEDUP, f"{shipped['ratio']:.2f}×")]
    if not residual:
        checks.append((False, f"the residual model did not run in {ENGINE_NAMES[engine]}"))
    else:
        best = max(residual, key=lambda r: r["images_per_s"])
        same = shipped["images_per_s"] / best["images_per_s"]
        where = f"{ENGINE_NAMES[engine]}, residual {best['precision']}"
        checks.append((same >= TARGET_SAME_ENGINE, f"{same:.2f}× ({where})"))
    checks.append((loss <= TARGET_ACCURACY_POINTS, f"{loss:+.2f} points"))
    return [
        {"target": name, "met": met, "value": value}
        for name, (met, value) in zip(names, checks, strict=True)
    ]


def _ran(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def _loss(base: dict, row: dict) -> float:
    """Accuracy points ``row`` loses against ``base``."""
    return 100 * (base["accuracy"] - row["accuracy"])


def shipped_form(rows: list[dict]) -> str:
    """The form the demo ships: the pruned plain model when there is one, else the plain one."""
    return "pruned plain" if any(r["form"] == "pruned plain" for r in rows) else "plain"


def shipped_row(rows: list[dict]) -> dict | None:
    """The artifact the demo ships: of the exported files of :func:`shipped_form` that ran, the
    fastest within :data:`TARGET_ACCURACY_POINTS` of the baseline (``rows[0]``), or the fastest
    when none is; None when none ran."""
    form = shipped_form(rows)
    ran = [r for r in _ran(rows) if r["form"] == form and r["engine"] != "keras"]
    close = [r for r in ran if _loss(rows[0], r) <= TARGET_ACCURACY_POINTS]
    return max(close or ran, key=lambda r: r["images_per_s"], default=None)


def summary(rows: list[dict], machine: dict, load: list[float] | None) -> str:
    """The demo's table and its targets, from :func:`keras_dmr.bench.deploy.measure` rows."""
    from keras_dmr.bench.deploy import ENGINE_NAMES

    base, shipped = rows[0], shipped_row(rows)
    header = f"| {'form':<48} | accuracy | {'params':>9} | {'MACs':>11} | images/s | vs baseline |"
    lines = [header, "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        label = f"{r['form']}, {ENGINE_NAMES[r['engine']]} {r['precision']}"
        if r is base:
            label += " (baseline)"
        elif r is shipped:
            label += " (shipped)"
        if "error" in r:
            lines.append(f"| {label:<48} | could not run: {r['error']}")
            continue
        lines.append(
            f"| {label:<48} | {r['accuracy']:8.4f} | {r['params']:>9,} | {r['macs']:>11,} | "
            f"{r['images_per_s']:8.0f} | {r['ratio']:10.2f}× |"
        )
    lines.append("")
    lines.append(
        f"shipped: the fastest {shipped_form(rows)} file within {TARGET_ACCURACY_POINTS:g} "
        "points of the baseline's accuracy (the fastest file when none is)"
    )
    for check in targets(rows):
        met = "met   " if check["met"] else "MISSED"
        lines.append(f"{met} {check['target']}: {check['value']}")
    lines.append(
        f"\nmeasured on {machine['cpu']} ({machine['usable_cores']} usable cores); medians of "
        "interleaved repeats" + (f"; load average {load[0]:.1f}" if load else "")
    )
    return "\n".join(lines)
