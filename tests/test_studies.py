"""The Fashion-MNIST studies of ``tools/`` at their ``--quick`` size (smoke runs, figures mean
nothing): they train, write their JSON, resume without retraining and regenerate the docs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from keras_dmr.data import fashion_mnist

ROOT = Path(__file__).parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        fashion_mnist.find_files(None) is None,
        reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
    ),
]


@pytest.fixture
def docs(tmp_path):
    target = tmp_path / "docs"
    (target / "data").mkdir(parents=True)
    for page in ("studies.md", "pruning.md", "quantization.md"):
        shutil.copyfile(ROOT / "docs" / page, target / page)
    return target


def test_tables_2_and_7_train_resume_and_regenerate(docs, capsys):
    from tools import fmnist_study, study_table2, study_table7

    assert study_table2.main(["--quick", "--docs", str(docs)]) == 0
    runs = json.loads((docs / "data" / "fashion_mnist_runs.json").read_text())
    assert len(runs) == len(study_table2.LABELS)
    record = next(iter(runs.values()))
    assert {"residual_accuracy", "plain_accuracy", "differing_predictions", "machine"} <= set(
        record
    )
    assert study_table7.main(["--quick", "--docs", str(docs)]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 runs to train" in out  # DMRNet-14 is Table 2's run, reused
    runs = json.loads((docs / "data" / "fashion_mnist_runs.json").read_text())
    text = (docs / "studies.md").read_text()
    for name, content in study_table7.sections(runs, fmnist_study.QUICK).items():
        assert content in text, name
    assert (docs / "study_table2.png").read_bytes()[:4] == b"\x89PNG"
    assert (docs / "study_table7.png").read_bytes()[:4] == b"\x89PNG"


def test_a_study_starts_no_run_after_max_minutes(docs, capsys):
    """A device session's limit: the study stops before its next run and resumes later."""
    from tools import study_table2

    assert study_table2.main(["--quick", "--docs", str(docs), "--max-minutes", "0"]) == 0
    assert "stopping after 0 minutes: 4 runs left" in capsys.readouterr().out
    assert not (docs / "data" / "fashion_mnist_runs.json").exists()


def test_pruning_study_quick(docs, tmp_path, capsys):
    """Both networks trained, both forms pruned to the budget by the same graph method, every
    model saved and timed, the page regenerated; a rerun trains nothing."""
    from tools import pruning_study

    argv = ["--quick", "--docs", str(docs), "--models", str(tmp_path / "models")]
    assert pruning_study.main(argv) == 0
    record = json.loads((docs / "data" / "pruning.json").read_text())
    assert record["protocol"]["name"] == "quick"
    runs = list(record["runs"].values())
    assert {run["family"] for run in runs} == set(pruning_study.FAMILIES)
    for run in runs:
        models = run["models"]
        assert set(models) == {"residual", "plain", "residual@0.5", "plain@0.5"}
        for name in ("residual@0.5", "plain@0.5"):  # the budget, against the residual MACs
            assert models[name]["macs"] <= 0.5 * models["residual"]["macs"]
        assert models["plain"]["accuracy"] == pytest.approx(models["residual"]["accuracy"])
    assert len(record["timing"]["images_per_s"]) == 4 * len(runs) + len(runs)  # + references
    text = (docs / "pruning.md").read_text()
    assert pruning_study.table(record) in text
    assert (docs / "pruning.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert pruning_study.main(argv) == 0
    assert "0 of 2 runs to train" in capsys.readouterr().out


def test_quantization_study_quick(docs, tmp_path, capsys):
    """Both forms through both runtimes' int8, the per-layer search where the plain form loses
    (at --quick size it does), a rerun that measures nothing again, the page regenerated."""
    from tools import quantization_study as qs

    argv = ["--quick", "--docs", str(docs), "--checkpoints", str(tmp_path / "ckpt")]
    assert qs.main(argv) == 0
    results = json.loads((docs / "data" / "quantization.json").read_text())
    (record,) = results.values()
    for form in qs.FORMS:
        for engine in qs.ENGINES:
            r = record[form][engine]
            assert 0 <= r["int8"] <= 1 and r["images"] == qs.QUICK["test_examples"]
            assert r["drop_points"] == pytest.approx(100 * (r["float32"] - r["int8"]))
    if "sensitivity" in record:
        assert len(record["sensitivity"]["layers"]) == 20  # 19 convolutions and the classifier
    assert qs.main(argv) == 0
    assert "0 of 1 families to measure" in capsys.readouterr().out
    text = (docs / "quantization.md").read_text()
    for name, content in qs.sections(results, qs.QUICK).items():
        assert content in text, name
    assert (docs / "quantization.png").read_bytes()[:4] == b"\x89PNG"


def test_qat_study_quick(docs, tmp_path, capsys):
    """Float32, post-training and quantization-aware int8 of one family through three runtimes
    (one fine-tuning per weight grid), a rerun that measures nothing again, the page
    regenerated."""
    from tools import qat_study as qs

    argv = ["--quick", "--docs", str(docs), "--checkpoints", str(tmp_path / "ckpt")]
    assert qs.main(argv) == 0
    results = json.loads((docs / "data" / "qat.json").read_text())
    (record,) = results.values()
    for engine in qs.ENGINES:
        for key in ("residual", "plain", "qat"):
            r = record[key][engine]
            assert 0 <= r["int8"] <= 1 and r["images"] == qs.QUICK["test_examples"]
        q = record["qat"][engine]
        assert q["weight_bits"] == (7 if engine == "onnx" else 8)
        float32 = record["plain"][engine]["float32"]
        assert q["drop_points"] == pytest.approx(100 * (float32 - q["int8"]))
    assert (
        record["qat"]["litert"]["fine_tune_seconds"]
        == record["qat"]["openvino"]["fine_tune_seconds"]
    )  # one 8-bit fine-tuning for both
    assert qs.main(argv) == 0
    assert "0 of 1 families to measure" in capsys.readouterr().out
    text = (docs / "quantization.md").read_text()
    for name, content in qs.sections(results, qs.QUICK).items():
        assert content in text, name
    assert (docs / "quantization_qat.png").read_bytes()[:4] == b"\x89PNG"
    # The float32 reference with more data: trained once, recorded beside the study's, stated.
    assert qs.main([*argv, "--reference"]) == 0
    results = json.loads((docs / "data" / "qat.json").read_text())
    (record,) = results.values()
    ref = record["reference"]
    assert 0 <= ref["accuracy"] <= 1 and ref["protocol"]["train_examples"] == 512
    assert "With more data — all 512 training images" in (docs / "quantization.md").read_text()
    assert qs.main([*argv, "--reference"]) == 0
    assert "0 of 1 families to train at the reference protocol" in capsys.readouterr().out
