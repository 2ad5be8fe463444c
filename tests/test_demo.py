"""The main job (``keras-dmr demo``, the README's ``make demo``) end to end, at 1 epoch."""

from __future__ import annotations

import json

import pytest

from keras_dmr import cli
from keras_dmr.cli.demo import summary


@pytest.mark.slow
def test_demo_trains_prunes_quantizes_exports_and_reruns(tmp_path, capsys):
    argv = ["demo", "--epochs", "1", "--finetune-epochs", "1", "--runs", str(tmp_path / "runs")]
    argv += ["--base-dir", str(tmp_path / "savedmodels")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for expected in ("== summary", "(baseline)", "(shipped)", "max relative error", "images/s"):
        assert expected in out
    assert out.count("met   ") + out.count("MISSED ") == 3  # each target says which
    base = tmp_path / "savedmodels"
    assert (base / "resnet20_pruned_digits" / "1" / "saved_model.pb").is_file()
    assert (base / "resnet20_pruned_digits_v1_int8.onnx").is_file()
    assert (base / "resnet20_pruned_digits_v1_int8.tflite").is_file()
    record = json.loads((tmp_path / "runs" / "demo_digits.json").read_text())
    assert record["train_images"] == 1437 and record["epochs"] == 1
    assert [t["met"] for t in record["targets"]] == [
        line.startswith("met") for line in out.splitlines() if line.startswith(("met ", "MISSED"))
    ]
    assert summary(record["rows"], record["machine"], record["load_average"]) in out
    # A second run reuses the trained checkpoint and exports a new version.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "already trained for 1 epochs" in out
    assert (base / "resnet20_pruned_digits" / "2" / "saved_model.pb").is_file()
    assert (base / "resnet20_pruned_digits_v2_int8.tflite").is_file()


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


def test_summary_says_which_targets_are_met_and_which_are_missed():
    rows = [
        _row("residual", "keras", "float32", 1000, 0.990),
        _row("residual", "litert", "int8", 4000, 0.990),
        _row("residual", "onnx", "int8", 3000, 0.990),
        _row("pruned plain", "keras", "float32", 9000, 0.990),  # never the shipped one
        _row("pruned plain", "litert", "int8", 6000, 0.980),
        _row("pruned plain", "onnx", "int8", 3300, 0.990),
    ]
    for r in rows:
        r["ratio"] = r["images_per_s"] / 1000
    machine = {"cpu": "test CPU", "usable_cores": 2}
    text = summary(rows, machine, [1.0])
    assert "pruned plain, LiteRT int8 (shipped)" in text  # the fastest pruned form
    assert "met    shipped ≥ 5× the baseline's throughput: 6.00×" in text
    assert "met    shipped ≥ 1.2× the residual model under the same engine, int8: 1.50×" in text
    assert "MISSED accuracy loss ≤ 0.5 points: +1.00 points" in text


def test_summary_ships_only_what_ran_and_misses_every_target_when_nothing_did():
    rows = [
        _row("residual", "keras", "float32", 1000, 0.990),
        _row("residual", "litert", "int8", 4000, 0.990),
        _row("pruned plain", "onnx", "int8", 3300, 0.990),
    ]
    for r in rows:
        r["ratio"] = r["images_per_s"] / 1000
    failed = {**_row("pruned plain", "litert", "int8", 0, 0), "error": "LiteRT could not run x"}
    for key in ("images_per_s", "accuracy"):
        failed.pop(key)
    machine = {"cpu": "test CPU", "usable_cores": 2}
    text = summary([*rows, failed], machine, None)
    assert "pruned plain, ONNX Runtime int8 (shipped)" in text  # the one that ran
    assert "could not run: LiteRT could not run x" in text
    # No residual ONNX int8 row to compare with: that target cannot be met.
    assert (
        "MISSED shipped ≥ 1.2× the residual model under the same engine, int8: the residual" in text
    )
    text = summary([rows[0], rows[1], failed], machine, None)
    assert text.count("MISSED") == 3 and "no pruned plain int8 file ran" in text
