"""The main job (``keras-dmr demo``, the README's ``make demo``) end to end, at 1 epoch."""

from __future__ import annotations

import json

import pytest

from keras_dmr import cli
from keras_dmr.cli.demo import shipped_form, shipped_row, summary


@pytest.mark.slow
def test_demo_trains_converts_quantizes_exports_and_reruns(tmp_path, capfd):
    """The default family (MobileNetV2 → RMNetV1, shipped unpruned). ``capfd`` reads the file
    descriptors, so native (C++) output would be caught too: the console gets no warnings."""
    argv = ["demo", "--epochs", "1", "--repeats", "1", "--runs", str(tmp_path / "runs")]
    argv += ["--base-dir", str(tmp_path / "savedmodels")]
    assert cli.main(argv) == 0
    out, err = capfd.readouterr()
    noise = [
        line
        for line in err.splitlines()
        if any(word in line for word in ("Warning", "WARNING", "deprecated", "fully_quantize"))
    ]
    assert not noise, noise[:5]
    for expected in ("== summary", "(baseline)", "(shipped)", "max relative error", "images/s"):
        assert expected in out
    assert out.count("met   ") + out.count("MISSED ") == 3  # each target says which
    base = tmp_path / "savedmodels"
    assert (base / "rmnetv1_w0.5_digits" / "1" / "saved_model.pb").is_file()
    assert (base / "rmnetv1_w0.5_digits_v1_int8.onnx").is_file()
    assert (base / "rmnetv1_w0.5_digits_v1_int8.tflite").is_file()
    record = json.loads((tmp_path / "runs" / "demo_digits.json").read_text())
    assert record["train_images"] == 1437 and record["epochs"] == 1
    assert record["family"] == "mobilenetv2" and record["pruning"] is None
    assert {r["form"] for r in record["rows"]} == {"residual", "plain"}
    shipped = shipped_row(record["rows"])
    assert shipped["form"] == "plain" and shipped["engine"] != "keras"
    # OpenVINO runs both the ONNX file and its own IR, each form in each precision.
    ran = {(r["form"], r["engine"], r["precision"]) for r in record["rows"] if "error" not in r}
    for form in ("residual", "plain"):
        assert {(form, "openvino_ir", p) for p in ("float32", "int8")} <= ran
    precision = "int8" if shipped["precision"] == "int8" else "float32"
    suffix = {"litert": "tflite", "openvino_ir": "xml"}.get(shipped["engine"], "onnx")
    assert (base / f"rmnetv1_w0.5_digits_v1_{precision}.{suffix}").is_file()  # the shipped file
    assert [t["met"] for t in record["targets"]] == [
        line.startswith("met") for line in out.splitlines() if line.startswith(("met ", "MISSED"))
    ]
    assert summary(record["rows"], record["machine"], record["load_average"]) in out
    # A second run reuses the trained checkpoint and exports a new version (measuring one
    # engine: the shipped files are the same whatever it measures).
    assert cli.main([*argv, "--engines", "litert"]) == 0
    out = capfd.readouterr().out
    assert "already trained for 1 epochs" in out
    assert (base / "rmnetv1_w0.5_digits" / "2" / "saved_model.pb").is_file()
    assert (base / "rmnetv1_w0.5_digits_v2_int8.tflite").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family, budget", [("resnet20", 0.5), ("dmrnet14", 0.75)])
def test_demo_pruned_families_train_for_slimming_prune_and_fine_tune(
    tmp_path, capsys, family, budget
):
    argv = ["demo", "--family", family, "--epochs", "1", "--finetune-epochs", "1"]
    argv += ["--prune-steps", "2", "--engines", "onnx", "--repeats", "1"]
    argv += ["--runs", str(tmp_path / "runs"), "--base-dir", str(tmp_path / "savedmodels")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"pruning the plain model to {budget:g}× the residual model's MACs" in out
    assert "cut 2/2" in out and "fine-tuned 1 epoch(s)" in out
    base = tmp_path / "savedmodels"
    assert (base / f"{family}_pruned_digits" / "1" / "saved_model.pb").is_file()
    assert (base / f"{family}_pruned_digits_v1_int8.onnx").is_file()
    assert not (tmp_path / "runs" / "demo_digits.json").exists()  # the default family's record
    record = json.loads((tmp_path / "runs" / f"demo_digits_{family}.json").read_text())
    assert record["family"] == family and record["sparsity_factor"] > 0
    assert record["prune_macs"] == budget and record["pruning"]["round_to"] == 8
    residual = next(r for r in record["rows"] if r["form"] == "residual")
    pruned = next(r for r in record["rows"] if r["form"] == "pruned plain")
    assert pruned["macs"] <= budget * residual["macs"]  # the budget, against the residual model
    assert record["pruning"]["macs_after"] < record["pruning"]["macs_before"]
    assert {r["form"] for r in record["rows"]} == {"residual", "plain", "pruned plain"}
    assert shipped_row(record["rows"])["form"] == "pruned plain"


def _row(form, engine, precision, ips, accuracy):
    return {
        "form": form,
        "engine": engine,
        "precision": precision,
        "params": 1000,
        "macs": 10_000,
        "images_per_s": ips,
        "accuracy": accuracy,
    }


def _rows(*specs):
    rows = [_row(*spec) for spec in specs]
    for r in rows:
        r["ratio"] = r["images_per_s"] / rows[0]["images_per_s"]
    return rows


MACHINE = {"cpu": "test CPU", "usable_cores": 2}


def test_summary_ships_the_fastest_file_within_the_accuracy_target():
    rows = _rows(
        ("residual", "keras", "float32", 1000, 0.990),
        ("residual", "litert", "int8", 4000, 0.990),
        ("residual", "onnx", "float32", 2000, 0.990),
        ("residual", "onnx", "int8", 3000, 0.990),
        ("pruned plain", "keras", "float32", 9000, 0.990),  # never the shipped one
        ("pruned plain", "litert", "int8", 7000, 0.980),  # fastest, but 1 point lost
        ("pruned plain", "onnx", "int8", 6000, 0.988),
        ("pruned plain", "onnx", "float32", 5000, 0.990),
    )
    text = summary(rows, MACHINE, [1.0])
    assert "pruned plain, ONNX Runtime int8 (shipped)" in text
    assert "met    shipped ≥ 5× the baseline's throughput: 6.00×" in text
    assert (
        "met    shipped ≥ 1.2× the residual model under the same engine (its fastest "
        "precision): 2.00× (ONNX Runtime, residual int8)" in text
    )
    assert "met    accuracy loss ≤ 0.5 points: +0.20 points" in text
    assert shipped_form(rows) == "pruned plain"


def test_summary_can_ship_float32_and_compares_with_the_residuals_faster_precision():
    rows = _rows(
        ("residual", "keras", "float32", 1000, 0.990),
        ("residual", "openvino_ir", "float32", 3000, 0.990),
        ("residual", "openvino_ir", "int8", 2500, 0.990),
        ("plain", "keras", "float32", 3000, 0.990),
        ("plain", "openvino", "float32", 3200, 0.990),  # the ONNX file: slower than the IR
        ("plain", "openvino_ir", "int8", 4000, 0.970),
        ("plain", "openvino_ir", "float32", 3300, 0.990),
    )
    text = summary(rows, MACHINE, None)
    assert "plain, OpenVINO IR float32 (shipped)" in text  # int8 lost 2 points
    assert "MISSED shipped ≥ 5× the baseline's throughput: 3.30×" in text
    assert "MISSED shipped ≥ 1.2× the residual model under the same engine" in text
    assert "1.10× (OpenVINO IR, residual float32)" in text
    # When every file loses too much, the fastest one ships and the accuracy target is missed.
    rows[-1]["accuracy"] = rows[-3]["accuracy"] = 0.980
    text = summary(rows, MACHINE, None)
    assert "plain, OpenVINO IR int8 (shipped)" in text
    assert "MISSED accuracy loss ≤ 0.5 points: +2.00 points" in text


def test_summary_ships_only_what_ran_and_misses_every_target_when_nothing_did():
    rows = _rows(
        ("residual", "keras", "float32", 1000, 0.990),
        ("residual", "litert", "int8", 4000, 0.990),
        ("pruned plain", "onnx", "int8", 3300, 0.990),
    )
    failed = {**_row("pruned plain", "litert", "int8", 0, 0), "error": "LiteRT could not run x"}
    for key in ("images_per_s", "accuracy"):
        failed.pop(key)
    text = summary([*rows, failed], MACHINE, None)
    assert "pruned plain, ONNX Runtime int8 (shipped)" in text  # the one that ran
    assert "could not run: LiteRT could not run x" in text
    # No residual ONNX Runtime row to compare with: that target cannot be met.
    assert "the residual model did not run in ONNX Runtime" in text
    text = summary([rows[0], rows[1], failed], MACHINE, None)
    assert text.count("MISSED") == 3 and "no pruned plain file ran" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prune-macs", "0.3"], "apply to --family resnet20, dmrnet14 only"),
        (["--family", "resnet20", "--prune-macs", "0"], "--prune-macs: must be a fraction"),
        (["--family", "dmrnet14", "--prune-steps", "0"], "--prune-steps"),
        (["--engines", "onnx,tensorrt"], "--engines: a comma-separated list of onnx, litert"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_demo_arguments_are_checked_before_training(tmp_path, capsys, extra, message):
    argv = ["demo", *extra, "--runs", str(tmp_path / "runs"), "--base-dir", str(tmp_path / "sm")]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_demo_refuses_an_engine_that_is_not_installed_before_training(
    tmp_path, capsys, monkeypatch
):
    from keras_dmr.bench import engines

    monkeypatch.setattr(engines, "available_engines", lambda names: ("onnx", "litert"))
    argv = ["demo", "--engines", "litert,openvino_ir", "--runs", str(tmp_path / "runs")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--engines: openvino_ir cannot run here (not installed); installed: onnx, litert" in err
    assert not (tmp_path / "runs").exists()
