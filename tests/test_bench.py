"""Plumbing of keras_dmr.bench: settings, arguments, the record structure, targets, the report.

Nothing here checks a speed: runs use tiny models and one or two batches, and the assertions are
about what is recorded and how it is derived, never about which candidate is faster.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_dmr
from keras_dmr.bench import report, suite, zoo
from keras_dmr.bench import targets as bench_targets
from keras_dmr.bench.engines import ENGINES, available_engines, runner
from keras_dmr.cli import bench as command

TINY_ARGS = [
    "--batch-size",
    "2",
    "--warmup",
    "0",
    "--timed",
    "2",
    "--repeats",
    "2",
    "--train-batch-size",
    "2",
    "--peak-size",
    "64",
]


def parse(argv):
    parser = argparse.ArgumentParser()
    command.add_bench_arguments(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ settings
def test_default_settings_are_the_papers_protocol():
    s = suite.Settings()
    assert (s.batch_size, s.warmup, s.timed, s.repeats) == (128, 50, 50, 5)
    assert s.protocol("families") == {"batch_size": 128, "warmup": 50, "iters": 10, "repeats": 5}
    # ImageNet and training values fall back to the main ones unless given.
    assert s.protocol("peers") == s.protocol("families")
    assert s.protocol("training")["batch_size"] == 64
    s = suite.Settings(imagenet_batch_size=16, imagenet_warmup=0, imagenet_timed=10, repeats=2)
    assert s.protocol("peers") == {"batch_size": 16, "warmup": 0, "iters": 5, "repeats": 2}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(warmup=-1), "warmup"),
        (dict(timed=3, repeats=5), "timed"),
        (dict(imagenet_timed=2, repeats=3), "imagenet_timed"),
        (dict(engines=("keras", "tflite")), "engines"),
        (dict(engines=("keras", "keras")), "engines"),
        (dict(sections=()), "sections"),
        (dict(peak_size=True), "peak_size"),
        (dict(deploy_families=("resnet20", "vgg16")), "deploy_families"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        suite.Settings(**kwargs)


def test_quick_settings_are_small_and_overridable():
    s = command.settings_from_args(parse(["--quick", "--batch-size", "4"]))
    assert s.quick and s.batch_size == 4 and s.protocol("peers")["batch_size"] == 2
    assert s.warmup + s.timed < 10 and s.peak_size <= 1024
    s = command.settings_from_args(parse(["--engines", "onnx,keras", "--sections", "training"]))
    assert s.engines == ("onnx", "keras") and s.sections == ("training",) and not s.quick
    s = command.settings_from_args(parse(["--sections", "deploy", "--deploy-families", "rmnext26"]))
    assert s.deploy_families == ("rmnext26",) and s.sections == ("deploy",)
    assert command.settings_from_args(parse([])).deploy_families is None  # all of them


def test_bad_arguments_are_usage_errors(tmp_path):
    from keras_dmr.cli import UsageError

    with pytest.raises(SystemExit):  # argparse rejects the value itself
        parse(["--engines", "keras,tflite"])
    with pytest.raises(SystemExit):
        parse(["--warmup", "-1"])
    with pytest.raises(SystemExit):
        parse(["--deploy-families", "resnet20,vgg16"])
    args = parse(["--timed", "2", "--repeats", "5", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(UsageError, match="--timed must be >= --repeats"):
        command.run_bench(args)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="`engine` must be one of"):
        runner("tflite", keras_dmr.ResNet(8, compile=False), 1, ".")
    assert ENGINES == ("keras", "xla", "saved_model", "onnx")


# ------------------------------------------------------------------------------ analysis
def test_activation_bytes_counts_what_the_graph_writes():
    inputs = keras.Input((4, 4, 3))
    conv = keras.layers.Conv2D(5, 3, padding="same", use_bias=False)(inputs)
    assert suite.activation_bytes(keras.Model(inputs, conv)) == 4 * 4 * 5 * 4
    relu = keras.layers.ReLU()(conv)
    assert suite.activation_bytes(keras.Model(inputs, relu)) == 2 * 4 * 4 * 5 * 4


def test_dense_detection():
    resnet = keras_dmr.ResNet(8, compile=False)
    assert suite.is_dense(resnet) and suite.is_dense(keras_dmr.to_plain(resnet))
    grouped = keras_dmr.DMRNet(8, implementation="grouped", compile=False)
    assert not suite.is_dense(grouped)
    inputs = keras.Input((8, 8, 4))
    depthwise = keras.Model(inputs, keras.layers.DepthwiseConv2D(3)(inputs))
    assert not suite.is_dense(depthwise)


def test_cifar_resnet34_is_the_rmnet_papers_baseline():
    model = zoo.cifar_resnet34()
    assert model.count_params() == 21_299_146  # RMNet paper Table 3: 21.2M
    assert keras_dmr.analysis.count_flops(model) == 1_159_402_496  # 1.16 GFLOPs
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)


def test_zoo_has_every_family_and_the_table2_pairs():
    groups = zoo.inference_groups()
    labels = {spec.label for g in groups for spec in g.models}
    for label in (
        "ResNet-98",
        "DMRNet-50",
        "DVANet-50",
        "RepVGG-21",
        "RM+RepVGG-21 (r=0.25)",
        "RMNet 26×3_32",
        "CIFAR ResNet-34",
        "MobileNetV2 (CIFAR, f=8)",
        "keras.applications.ResNet50",
        "keras.applications.MobileNetV2",
        "ResNet-50 (keras_dmr)",
    ):
        assert label in labels
    assert {g.section for g in groups} == {"families", "peers"}
    (training,) = zoo.training_groups()
    pairs = set(training.pairs)
    for d, r in zoo.TABLE2_PAIRS:
        assert (f"DMRNet-{d}", f"ResNet-{r}") in pairs
    assert ("DMRNet-50 grouped", "DMRNet-50") in pairs and ("DVANet-50", "ResNet-98") in pairs


# ------------------------------------------------------------------------------- targets
def _record(label, engine, images_per_s, *, form="residual", dense=True, model=None):
    return {
        "label": label,
        "model": model or label.removesuffix(" plain").removesuffix(" deploy"),
        "engine": engine,
        "form": form,
        "dense": dense,
        "images_per_s": images_per_s,
        "peak_fraction": images_per_s / 1000,
    }


def test_targets_from_a_synthetic_result():
    families = [
        _record("RepVGG-21", "keras", 100.0),
        _record("RepVGG-21 deploy", "keras", 250.0, form="plain"),
        _record("RepVGG-21", "onnx", 100.0),
        _record("RepVGG-21 deploy", "onnx", 150.0, form="plain"),
        _record("RMNet 26×3_32 plain", "keras", 300.0, form="plain", dense=False),
        _record("CIFAR ResNet-34", "keras", 100.0),
        _record("RMNet 26×3_32 plain", "saved_model", 310.0, form="plain", dense=False),
        _record("CIFAR ResNet-34", "saved_model", 125.0),
    ]
    result = {
        "inference": [{"batch_size": 128, "section": "families", "results": families}],
        "training": [
            {
                "pairs": [
                    {
                        "model": "DMRNet-14",
                        "baseline": "ResNet-26",
                        "train_step_ratio": 0.5,
                        "inference_time_ratio": 1.2,
                    },
                    {
                        "model": "DVANet-50",
                        "baseline": "ResNet-98",
                        "train_step_ratio": 0.1,
                        "inference_time_ratio": 0.1,
                    },
                ]
            }
        ],
    }
    targets = {
        t["target"].split(":")[0].split(" (")[0]: t for t in bench_targets.evaluate_targets(result)
    }
    repvgg = {v["what"]: v for v in targets["RepVGG-21"]["values"]}
    assert repvgg["keras"]["value"] == pytest.approx(2.5) and repvgg["keras"]["met"]
    assert repvgg["onnx"]["value"] == pytest.approx(1.5) and not repvgg["onnx"]["met"]
    rmnet = {
        v["what"]: v
        for v in targets["RMNet 26×3_32 plain against CIFAR ResNet-34, exported"]["values"]
    }
    assert rmnet["keras"]["met"] and rmnet["saved_model"]["value"] == pytest.approx(2.48)
    in_process = {v["what"]: v for v in targets["In-process Keras model"]["values"]}
    assert in_process["RMNet 26×3_32 plain"]["met"]  # 300 against 310: within 10%
    assert not in_process["CIFAR ResNet-34"]["met"]  # 100 against 125
    train = targets["DMRNet training step against its Table 2 ResNet"]["values"]
    assert [(v["what"], v["met"]) for v in train] == [("DMRNet-14 / ResNet-26", True)]
    infer = targets["DMRNet inference against its Table 2 ResNet"]["values"]
    assert [(v["what"], v["met"]) for v in infer] == [("DMRNet-14 / ResNet-26", False)]
    dense = targets["Plain dense-conv models at batch 128"]["values"]
    assert [(v["what"], v["met"]) for v in dense] == [("RepVGG-21 deploy (keras)", False)]
    assert "RMNetV1 against MobileNetV2" not in targets  # not measured: no row


# ------------------------------------------------------------------------- end to end (tiny)
@pytest.mark.slow
def test_run_bench_records_every_candidate_and_writes_the_report(tmp_path, capsys):
    families = [
        zoo.InferenceGroup(
            "tiny ResNet",
            "families",
            (
                zoo.ModelSpec(
                    "ResNet-8",
                    lambda: keras_dmr.ResNet(8, compile=False),
                    accuracy=90.0,
                    accuracy_dataset="CIFAR-10",
                    accuracy_source="made up for the test",
                ),
            ),
            extra_engines=("onnx",),
        )
    ]
    training = [
        zoo.TrainingGroup(
            "tiny pair",
            (
                zoo.ModelSpec("DMRNet-8", lambda: keras_dmr.DMRNet(8)),
                zoo.ModelSpec("ResNet-14", lambda: keras_dmr.ResNet(14)),
            ),
            (("DMRNet-8", "ResNet-14"),),
        )
    ]
    out = tmp_path / "bench"
    args = parse([*TINY_ARGS, "--engines", "keras", "--output-dir", str(out)])
    args.sections = ("families", "peers", "training", "conversion")  # deploy: its own test
    assert command.run_bench(args, inference_groups=families, training_groups=training) == 0
    printed = capsys.readouterr().out
    assert "## Targets" in printed and "| ResNet-8 plain |" in printed

    data = json.loads((out / "benchmarks.json").read_text())
    assert not (out / "benchmarks.partial.json").exists()
    assert data["machine"]["cores"] >= 1 and data["machine"]["tensorflow"]
    assert data["machine"]["device"] in ("/CPU:0", "/GPU:0")
    assert data["peak"]["size"] == 64 and data["peak"]["gflops"] > 0
    assert data["settings"]["engines"] == ["keras"] and data["flops_per_mac"] == 2

    (group,) = data["inference"]
    assert (group["batch_size"], group["iters"], group["repeats"]) == (2, 1, 2)
    before, after = group["peak"]["before"]["gflops"], group["peak"]["after"]["gflops"]
    assert group["peak"]["gflops"] == pytest.approx((before + after) / 2)
    assert data["peak_end"]["size"] == 64
    found = {(r["label"], r["engine"]): r for r in group["results"]}
    assert set(found) == {
        (label, engine) for label in ("ResNet-8", "ResNet-8 plain") for engine in ("keras", "onnx")
    }
    for r in found.values():
        assert "error" not in r, r.get("error")
        assert len(r["samples_s"]) == 2
        # The median of two rounds is their mean; images/s = batch / median seconds per batch.
        assert r["images_per_s"] == pytest.approx(2 / (sum(r["samples_s"]) / 2))
        lo, hi = r["images_per_s_spread"]
        assert lo <= r["images_per_s"] <= hi
        assert r["gflops"] == pytest.approx(2 * r["macs"] * r["images_per_s"] / 1e9)
        # The share of the peak uses the products timed just before and after this group.
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / group["peak"]["gflops"])
    plain = found[("ResNet-8 plain", "keras")]
    assert (
        plain["max_relative_error"] <= 1e-4 and plain["macs"] > found[("ResNet-8", "keras")]["macs"]
    )

    (train,) = data["training"]
    (pair,) = train["pairs"]
    r = train["results"]
    assert pair["train_step_ratio"] == pytest.approx(
        r["DMRNet-8"]["train_step_ms"] / r["ResNet-14"]["train_step_ms"]
    )
    assert len(pair["train_ratio_per_round"]) == 2

    speed = {t["target"].split(" (")[0].split(" against")[0]: t for t in data["targets"]}
    assert "DMRNet training step" in speed and "DMRNet inference" in speed
    for name in ("benchmarks.md", "benchmarks_speedup.png", "benchmarks_accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "benchmarks_speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_failing_engine_is_recorded_not_fatal(tmp_path, monkeypatch):
    real = suite.runner

    def runner_without_onnx(engine, *args, **kwargs):
        if engine == "onnx":
            raise RuntimeError("no ONNX today\nsecond line")
        return real(engine, *args, **kwargs)

    monkeypatch.setattr(suite, "runner", runner_without_onnx)
    spec = zoo.ModelSpec("ResNet-8", lambda: keras_dmr.ResNet(8, compile=False), ("residual",))
    result = suite.run_inference_group(
        zoo.InferenceGroup("g", "families", (spec,)),
        protocol={"batch_size": 1, "warmup": 0, "iters": 1, "repeats": 1},
        engines=["keras", "onnx"],
        peak_gflops=None,
        workdir=tmp_path,
    )
    runs = {r["engine"]: r for r in result["results"]}
    keras_run, onnx_run = runs["keras"], runs["onnx"]
    assert "images_per_s" in keras_run and "peak_fraction" not in keras_run  # no peak given
    assert onnx_run["error"] == "RuntimeError: no ONNX today" and "images_per_s" not in onnx_run
    assert "failed" in report.throughput_table([result])


# -------------------------------------------------------------------------------- report
def test_report_regenerates_the_marked_sections(tmp_path):
    data = {
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "tensorflow": "x",
            "keras": "y",
            "python": "z",
            "device": "/CPU:0",
        },
        "settings": {"quick": False},
        "peak": {
            "size": 64,
            "gflops": 100.0,
            "tensorflow_gflops": 100.0,
            "framework": "tensorflow",
        },
        "inference": [
            {
                "name": "fam",
                "section": "families",
                "batch_size": 128,
                "warmup": 1,
                "iters": 1,
                "repeats": 1,
                "results": [
                    {
                        **_record(label, "keras", speed, form=form),
                        "params": 10,
                        "macs": macs,
                        "activation_mb": 1.0,
                        "images_per_s_spread": [speed, speed],
                        "gflops": 1.0,
                        "accuracy": 95.0,
                    }
                    for label, form, speed, macs in (
                        ("Net", "residual", 100.0, 1000),
                        ("Net plain", "plain", 150.0, 2000),
                    )
                ],
            }
        ],
        "training": [],
        "targets": [],
        "deploy": [
            {
                "family": "Net",
                "batch_size": 128,
                "missing": {"pruned plain": "slim does not handle it"},
                "rows": [
                    _deploy_row("residual", "keras", "float32", 100.0),
                    _deploy_row("plain", "onnx", "int8", 250.0),
                    {**_deploy_row("plain", "litert", "int8", 0), "error": "LiteRT could not"},
                ],
            }
        ],
    }
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    doc = tmp_path / "benchmarks.md"
    markers = "\n".join(
        f"<!-- BEGIN bench-{name} -->\nold\n<!-- END bench-{name} -->"
        for name in dict.fromkeys(report.SECTIONS + tuple(report.PER_MACHINE))
    )
    doc.write_text("# Benchmarks\n\nhand-written\n\n" + markers + "\n")
    report.main([str(path), "--docs", str(tmp_path)])
    text = doc.read_text()
    assert "hand-written" in text and "\nold\n" not in text
    assert "| Net | 2.00× | 1.00× | 1.50× |" in text  # MACs ratio, activation ratio, speed-up
    assert "Test CPU, 2 cores" in text
    for name in report.CHARTS.values():
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "| Net | plain | ONNX Runtime | int8 | 0.00M | 0.0M | 250 | 2.50× |" in text
    assert (
        "| Net | plain | LiteRT | int8 | 0.00M | 0.0M | could not run: LiteRT could not |" in text
    )
    assert "| Net | pruned plain | – | – | – | – | not made: slim does not handle it |" in text


def test_each_machines_deploy_run_gets_its_int8_table_rows_and_chart(tmp_path):
    """`benchmarks_deploy_*.json` of two machines: each under its CPU, never mixed."""
    (tmp_path / "data").mkdir()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "".join(
            f"<!-- BEGIN bench-{name} -->\nold\n<!-- END bench-{name} -->\n"
            for name in report.PER_MACHINE
        )
    )
    for stem, cpu, int8_speed in (("one", "CPU one", 260.0), ("two", "CPU two", 110.0)):
        rows = [
            _deploy_row("residual", "keras", "float32", 100.0),
            _deploy_row("plain", "onnx", "float32", 200.0),
            _deploy_row("plain", "onnx", "int8", int8_speed),
        ]
        data = {
            "started_utc": "2026-12-07T16:00:00Z",
            "machine": {"cpu": cpu, "cores": 2, "cpu_flags": ["avx2", "avx512_vnni"][: len(stem)]},
            "deploy": [{"family": "Net", "batch_size": 128, "missing": {}, "rows": rows}],
        }
        (tmp_path / "data" / f"benchmarks_deploy_{stem}.json").write_text(json.dumps(data))
    read = report.regenerate_per_machine(tmp_path)
    assert [Path(p).name for p in read] == [
        "benchmarks_deploy_one.json",
        "benchmarks_deploy_two.json",
    ]
    text = doc.read_text()
    one, two = text.index("**CPU one**"), text.index("**CPU two**")
    assert one < text.index("| Net | ONNX Runtime | 200 | 260 | 1.30× |") < two
    assert two < text.index("| Net | ONNX Runtime | 200 | 110 | 0.55× |")
    assert text.count("| Net | plain | ONNX Runtime | int8 |") == 2
    for stem in ("one", "two"):
        assert f"(benchmarks_deploy_{stem}.png)" in text
        assert (tmp_path / f"benchmarks_deploy_{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert "_not measured_" in text  # the train section: no run of it here


def _deploy_row(form: str, engine: str, precision: str, speed: float) -> dict:
    row = {"form": form, "engine": engine, "precision": precision, "params": 10, "macs": 1000}
    if speed:
        row.update(images_per_s=speed, ratio=speed / 100, latency_ms=1.0, latency_ratio=1.0)
    return row


# ------------------------------------------------------------------------------- JAX backend
@pytest.mark.slow
def test_deploy_section_times_every_form_engine_and_precision(tmp_path, capsys):
    """``keras-dmr bench --quick --sections deploy``: ResNet-20 residual, plain and pruned
    plain through SavedModel, ONNX Runtime, LiteRT and OpenVINO (the ONNX file and the IR),
    float32 and int8, against its Keras model; the table lands in the report."""
    from keras_dmr.bench import deploy

    for engine in deploy.OPENVINO_ENGINES:  # the bench extra has both
        assert engine in available_engines(deploy.DEPLOY_ENGINES)
    out = tmp_path / "bench"
    args = parse(["--quick", "--sections", "deploy", "--output-dir", str(out)])
    assert command.run_bench(args) == 0
    data = json.loads((out / "benchmarks.json").read_text())
    (group,) = data["deploy"]
    forms = {(r["form"], r["engine"], r["precision"]) for r in group["rows"]}
    expected = {("residual", "keras", "float32")} | {
        (form, engine, precision)
        for form in ("residual", "plain", "pruned plain")
        for engine in available_engines(deploy.DEPLOY_ENGINES)
        for precision in ("float32", "int8")
        if not (engine == "saved_model" and precision == "int8")
    }
    assert forms == expected and group["missing"] == {}
    base = group["rows"][0]
    assert base["ratio"] == 1.0 and base["engine"] == "keras"
    for r in group["rows"]:
        assert r["images_per_s"] > 0 and r["latency_ms"] > 0
        assert r["ratio"] == pytest.approx(r["images_per_s"] / base["images_per_s"])
    pruned = [r for r in group["rows"] if r["form"] == "pruned plain"]
    plain = [r for r in group["rows"] if r["form"] == "plain"]
    assert pruned[0]["macs"] < plain[0]["macs"]
    for r in group["rows"]:  # each file ONNX Runtime or OpenVINO ran is profiled
        profiled = r["engine"] in ("onnx", *deploy.OPENVINO_ENGINES)
        assert ("product_seconds" in r) == profiled, r
        assert ("int8_kernel_share" in r) == (profiled and r["precision"] == "int8"), r
        if profiled:
            assert 0 < r["product_seconds"] <= r["profiled_seconds"] and len(r["top_kernels"]) == 4
        if "int8_kernel_share" in r:
            assert 0 < r["int8_kernel_share"] <= 1
        if r["engine"] == "litert":  # its execution plan instead of kernel times
            assert 0 < r["xnnpack_products"] <= r["products"], r
    printed = capsys.readouterr().out
    assert "| ResNet-20 | pruned plain | LiteRT | int8 |" in printed
    assert "| ResNet-20 | pruned plain | OpenVINO IR | int8 |" in printed
    # Does int8 pay: every engine's plain pair, the cause named where it falls short.
    from keras_dmr.bench import int8_gain

    gains = int8_gain.gains(data["deploy"])
    assert {g["engine"] for g in gains} == set(int8_gain.INT8_ENGINES) & set(
        available_engines(deploy.DEPLOY_ENGINES)
    )
    for g in gains:
        assert g["meets"] == (g["gain"] >= int8_gain.TARGET) and bool(g["cause"]) != g["meets"]
        if g["engine"] != "litert":
            assert g["product_gain"] > 0
    assert "## Does int8 pay?" in printed and int8_gain.table(data["deploy"]) in printed


JAX_SCRIPT = """
import json, sys
sys.modules["tensorflow"] = None  # as on a machine without TensorFlow: importing it fails
import keras_dmr
from keras_dmr.bench import suite, zoo

groups = [zoo.InferenceGroup("tiny", "families", (
    zoo.ModelSpec("DMRNet-8", lambda: keras_dmr.DMRNet(8, compile=False)),))]
training = [zoo.TrainingGroup("pair", (
    zoo.ModelSpec("DMRNet-8", lambda: keras_dmr.DMRNet(8)),
    zoo.ModelSpec("ResNet-14", lambda: keras_dmr.ResNet(14))), (("DMRNet-8", "ResNet-14"),))]
settings = suite.Settings(batch_size=2, warmup=0, timed=2, repeats=2, train_batch_size=2,
    peak_size=64, engines=("keras", "onnx"), sections=("families", "training"))
result = suite.run(settings, inference_groups=groups, training_groups=training)
print(json.dumps(result))
"""


@pytest.mark.slow
def test_the_benchmark_runs_on_the_jax_backend(tmp_path):
    """What a GPU machine without TensorFlow runs: models, conversion and timing on JAX, with
    TensorFlow made unimportable."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["machine"]["backend"] == "jax" and data["machine"]["jax"]
    assert data["machine"]["device"] == "cpu:0" and data["peak"]["jax_gflops"] > 0
    assert data["engines_unavailable"] == ["onnx"]  # exports need TensorFlow
    (group,) = data["inference"]
    assert group["backend"] == "jax"
    found = {(r["label"], r["engine"]): r for r in group["results"]}
    assert set(found) == {("DMRNet-8", "keras"), ("DMRNet-8 plain", "keras")}
    for r in found.values():
        assert r["images_per_s"] > 0 and r["activation_mb"] is None
    assert found[("DMRNet-8 plain", "keras")]["max_relative_error"] <= 1e-4
    (pair,) = data["training"][0]["pairs"]
    assert pair["train_step_ratio"] > 0
    assert "JAX (XLA)" in report.markdown(data)


# ------------------------------------------------------------------------- docs/benchmarks.md
DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_docs_benchmarks_are_generated_from_the_recorded_runs(tmp_path):
    """docs/benchmarks.md holds exactly what its JSON files say (run the report to refresh)."""
    (tmp_path / "data").mkdir()
    shutil.copy(DOCS / "benchmarks.md", tmp_path / "benchmarks.md")
    for name in ("benchmarks_cpu.json", "benchmarks_gpu.json"):
        shutil.copy(DOCS / "data" / name, tmp_path / "data" / name)
    trains = sorted((DOCS / "data").glob("benchmarks_train_*.json"))
    deploys = sorted((DOCS / "data").glob("benchmarks_deploy_*.json"))
    for path in trains + deploys:
        shutil.copy(path, tmp_path / "data" / path.name)
    report.main([str(tmp_path / "data" / "benchmarks_cpu.json"), "--docs", str(tmp_path)])
    assert (tmp_path / "benchmarks.md").read_text() == (DOCS / "benchmarks.md").read_text(), (
        "run `python -m keras_dmr.bench.report`"
    )
    cpu = json.loads((DOCS / "data" / "benchmarks_cpu.json").read_text())
    gpu = json.loads((DOCS / "data" / "benchmarks_gpu.json").read_text())
    assert cpu["machine"]["backend"] == "tensorflow" and not cpu["settings"]["quick"]
    assert gpu["machine"]["gpu_details"] and gpu["machine"]["backend"] == "jax"
    assert trains, "docs/data holds at least one training-throughput run"
    for path in trains:
        train = json.loads(path.read_text())
        assert not train["settings"]["quick"] and train["train"]["results"]
        assert train["machine"]["cpu"] in (DOCS / "benchmarks.md").read_text()
    for chart in ("speedup", "accuracy"):
        assert (DOCS / f"benchmarks_{chart}.png").is_file()
        assert (DOCS / f"benchmarks_gpu_{chart}.png").is_file()
    for path in deploys:  # every deploy run of another machine, with its chart
        run = json.loads(path.read_text())
        assert not run["settings"]["quick"] and run["deploy"]
        assert run["machine"]["cpu"] in (DOCS / "benchmarks.md").read_text()
        chart = path.with_suffix(".png").name
        assert f"({chart})" in (DOCS / "benchmarks.md").read_text()
        assert (DOCS / chart).is_file()


def test_merge_joins_runs_of_one_machine_and_refuses_two():
    gpu = json.loads((DOCS / "data" / "benchmarks_gpu.json").read_text())
    first = dict(gpu, training=[], parts=None)
    second = dict(gpu, inference=[])
    merged = bench_targets.merge([first, second])
    assert merged["inference"] == gpu["inference"] and merged["training"] == gpu["training"]
    assert len(merged["parts"]) == 2
    assert [t["target"] for t in merged["targets"]] == [t["target"] for t in gpu["targets"]]
    other = dict(second, machine=dict(second["machine"], cpu="Another CPU"))
    with pytest.raises(ValueError, match="cpu"):
        bench_targets.merge([first, other])
    with pytest.raises(ValueError, match="parts"):
        bench_targets.merge([])


def test_merge_replaces_a_deploy_family_measured_again():
    gpu = json.loads((DOCS / "data" / "benchmarks_gpu.json").read_text())
    old = [{"family": "ResNet-20", "rows": ["old"]}, {"family": "DMRNet-14", "rows": ["kept"]}]
    new = [{"family": "ResNet-20", "rows": ["new"]}, {"family": "RMNeXt", "rows": ["added"]}]
    merged = bench_targets.merge([dict(gpu, deploy=old), dict(gpu, deploy=new)])
    assert [(g["family"], g["rows"]) for g in merged["deploy"]] == [
        ("DMRNet-14", ["kept"]),
        ("ResNet-20", ["new"]),
        ("RMNeXt", ["added"]),
    ]


def test_conversion_rows_render_and_meet_or_miss_the_target():
    from keras_dmr.bench import conversion

    row = {
        "source": conversion.TARGET["source"],
        "seconds": 8.0,
        "peak_gb": 3.5,
        "rss_before_gb": 1.0,
        "max_relative_error": 2e-6,
        "params_before": 25_636_712,
        "params_after": 94_996_456,
    }
    table = conversion.table([row, {"source": "other", "error": "boom"}])
    assert "| 8.0 | 3.50 | 1.00 | 25.6M | 95.0M | max rel. error 2.0e-06 |" in table
    assert "| other | to_plain + verify | failed |" in table
    target = conversion.target([row])
    assert [v["met"] for v in target["values"]] == [True, False]  # fast enough, too much memory
    assert conversion.target([]) is None and "not measured" in conversion.table([])
    rendered = report.targets_table({"conversion": [row]})  # evaluated from the rows
    assert "time: 8.0 s; peak memory: 3.5 GB ✗" in rendered and "partly (1/2)" in rendered


def test_pruning_row_renders_and_meets_or_misses_its_target():
    from keras_dmr.bench import conversion

    row = {
        "source": conversion.PRUNE_TARGET["source"],
        "operation": conversion.PRUNE_OPERATION,
        "seconds": 11.0,
        "peak_gb": 2.3,
        "rss_before_gb": 1.9,
        "params_before": 95_143_336,
        "params_after": 65_817_321,
        "macs_fraction": 0.49995,
    }
    assert "| 11.0 | 2.30 | 1.90 | 95.1M | 65.8M | MACs kept 50.0% |" in conversion.table([row])
    target = conversion.pruning_target([row])
    assert [v["met"] for v in target["values"]] == [False, True]  # too slow, memory within
    assert conversion.target([row]) is None  # not the conversion's row
    failed = {"source": row["source"], "operation": row["operation"], "error": "boom"}
    assert conversion.pruning_target([failed]) is None
    rendered = report.targets_table({"conversion": [row]})
    assert "Graph pruning of ResNet-50" in rendered and "time: 11.0 s ✗" in rendered


def test_deploy_reports_a_file_its_engine_cannot_run_instead_of_failing(tmp_path):
    """An engine that cannot open or run an exported file (here LiteRT given a corrupt
    flatbuffer) leaves a row that says why; the others are still timed, ratios to the baseline."""
    from keras_dmr.bench import deploy

    model = keras_dmr.ResNet(depth=8, compile=False)
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer" * 8)
    logged = []
    failed = deploy._opened(
        deploy.Artifact("pruned plain", "litert", "int8", 1, 1, None, str(broken)),
        np.zeros((1, 32, 32, 3), np.uint8),
        logged.append,
    )
    assert failed.predict is None and "LiteRT could not run" in failed.error
    assert str(broken) in failed.error and "could not run" in logged[0]
    base = deploy.keras_artifact(model, "residual", "digits")
    images = np.zeros((4, 32, 32, 3), np.uint8)
    rows = deploy.measure([base, failed], images, warmup=0, iters=1, repeats=1, latency_iters=1)
    assert rows[0]["ratio"] == 1.0 and "images_per_s" not in rows[1]
    assert rows[1]["error"] == failed.error
    assert deploy.find(rows, "pruned plain", "litert", "int8") is None
    text = deploy.table([{"family": "ResNet-8", "batch_size": 4, "rows": rows, "missing": {}}])
    assert "| ResNet-8 | pruned plain | LiteRT | int8 |" in text and "could not run: LiteRT" in text
    with pytest.raises(ValueError, match="the baseline must run"):
        deploy.measure([failed, base], images)


def test_deploy_reports_a_file_its_exporter_refused_and_goes_on(tmp_path, monkeypatch):
    """An exporter that refuses a model (here the OpenVINO IR's float32 check failing) leaves a
    row that says why; the other engines' files are still written and opened."""
    from keras_dmr.bench import deploy
    from keras_dmr.export import ExportError

    def refuse(*args, **kwargs):
        raise ExportError("the OpenVINO IR's output 'logits' differs from the Keras model")

    monkeypatch.setattr(deploy, "openvino", refuse)
    model = keras_dmr.ResNet(depth=8, compile=False)
    logged = []
    artifacts = deploy.export_artifacts(
        {"residual": model},
        tmp_path,
        preprocessing="digits",
        calibration=np.zeros((4, 32, 32, 3), np.uint8),
        engines=("onnx", "openvino_ir"),
        precisions=("float32",),
        log=logged.append,
    )
    onnx_file, ir = artifacts
    assert onnx_file.error is None and onnx_file.predict is not None
    assert ir.path is None and ir.predict is None
    assert ir.error.startswith("the OpenVINO IR export refused it: the OpenVINO IR's output")
    assert any("not exported" in line for line in logged)
    base = deploy.keras_artifact(model, "residual", "digits")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    rows = deploy.measure([base, *artifacts], images, warmup=0, iters=1, repeats=1, latency_iters=1)
    assert rows[2]["error"] == ir.error and "images_per_s" in rows[1]


def test_a_pruned_form_slim_left_unchanged_is_not_timed_or_shown_as_pruned(monkeypatch):
    """RepVGG's plain form: every BN after fusion has the same scale, so slim(ratio=0.5) drops
    nothing. The deploy section says so instead of timing the plain model again as "pruned"; rows
    recorded before that check are shown the same way."""
    from keras_dmr.bench import deploy

    monkeypatch.setitem(
        deploy.DEPLOY_FAMILIES,
        "Tiny RepVGG",
        ("RepVGG", {"blocks_per_stage": (2, 2, 2, 2), "base_width": 8}),
    )
    forms, missing = deploy.family_forms("Tiny RepVGG")
    assert set(forms) == {"residual", "plain"}
    assert missing == {"pruned plain": deploy.NOTHING_PRUNED}
    forms, missing = deploy.family_forms("ResNet-20")  # BN scales that differ: slimmed
    assert forms["pruned plain"].count_params() < forms["plain"].count_params() and not missing

    same = {"params": 10, "macs": 1000}
    old = {
        "family": "Net",
        "batch_size": 128,
        "missing": {},
        "rows": [
            _deploy_row("residual", "keras", "float32", 100.0),
            {**_deploy_row("plain", "onnx", "float32", 150.0), **same},
            {**_deploy_row("pruned plain", "onnx", "float32", 151.0), **same},
        ],
    }
    shown = deploy.without_unpruned(old)
    assert [r["form"] for r in shown["rows"]] == ["residual", "plain"]
    assert shown["missing"] == {"pruned plain": deploy.NOTHING_PRUNED}
    text = deploy.table([old])
    assert "| Net | pruned plain | ONNX Runtime |" not in text
    assert "| Net | pruned plain | – | – | – | – | not made: slim(ratio=0.5) dropped" in text
    slimmed = dict(old, rows=old["rows"][:2] + [{**old["rows"][2], "params": 5, "macs": 500}])
    assert deploy.without_unpruned(slimmed) == slimmed
