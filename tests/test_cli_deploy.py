"""``keras-dmr convert`` and ``keras-dmr export``, in-process through ``cli.main``."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr import cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A keras-dmr train checkpoint (random weights and BN statistics, digits recorded)."""
    path = tmp_path_factory.mktemp("ckpt") / "dmrnet8_digits.keras"
    model = randomize(keras_dmr.DMRNet(depth=8), seed=3)
    cli.save_checkpoint(model, path, {"args": {"dataset": "digits"}, "completed_epochs": 1})
    return path, model


def test_convert_prints_the_report_and_saves_a_plain_model(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "plain.keras"
    assert cli.main(["convert", str(path), str(out)]) == 0
    text = capsys.readouterr().out
    assert "parameters:" in text and "MACs per image:" in text and "max rel. error:" in text
    plain = keras.saving.load_model(out, safe_mode=True)
    assert not any(
        isinstance(lyr, keras.layers.Add) or hasattr(lyr, "plain_ops") for lyr in plain.layers
    )
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    assert max_rel_error(plain(x), model(x, training=False)) <= 1e-5
    assert cli.main(["convert", str(path), str(out)]) == 2  # never overwritten silently
    assert "--overwrite" in capsys.readouterr().err


def test_export_versions_saved_models_and_writes_onnx(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    base = tmp_path / "savedmodels"
    for version in ("1", "2"):
        assert cli.main(["export", str(path), "--name", "dmr", "--base-dir", str(base)]) == 0
        out = capsys.readouterr().out
        assert f"savedmodels/dmr/{version}" in out and "max rel. error:" in out
    meta = json.loads((base / "dmr" / "1" / "assets" / "keras_dmr.json").read_text())
    assert meta["input"]["dtype"] == "uint8"
    assert meta["class_names"] == [str(i) for i in range(10)]
    signature = tf.saved_model.load(str(base / "dmr" / "2")).signatures["serving_default"]
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    info = keras_dmr.data.dataset_info("digits")
    want = model((images - np.float32(info.mean)) / np.float32(info.std), training=False)
    assert max_rel_error(signature(images=tf.constant(images))["logits"], want) <= 1e-5
    args = ["export", str(path), "--name", "dmr", "--base-dir", str(base), "--format", "onnx"]
    assert cli.main(args) == 0
    assert (base / "dmr.onnx").is_file()
    meta = keras_dmr.export.read_metadata(base / "dmr.onnx")
    assert meta["format"] == "onnx" and meta["conversion"]["max_relative_error"] <= 1e-4


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if err.startswith("usage: "):  # argparse's own errors (a value's type) show the usage first
        err = err[err.index("keras-dmr: error:") :]
    assert err.startswith("keras-dmr: error:")
    return err


def test_bad_input_is_a_clear_error_and_writes_nothing(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert "is not a file" in _error(
        capsys, ["convert", str(tmp_path / "no.keras"), str(tmp_path / "o.keras")]
    )
    foreign = tmp_path / "foreign.keras"
    inputs = keras.Input((8, 8, 3))
    keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs)).save(foreign)
    assert "not a keras_dmr model" in _error(capsys, ["export", str(foreign), "--name", "x"])
    # A keras_dmr block followed by a tanh: no plain form.
    inputs = keras.Input((8, 8, 3))
    x = keras_dmr.layers.ParallelBranchBlock(4)(inputs)
    odd = tmp_path / "odd.keras"
    keras.Model(inputs, keras.layers.Activation("tanh", name="squash")(x)).save(odd)
    err = _error(capsys, ["convert", str(odd), str(tmp_path / "odd_plain.keras")])
    assert "'squash' (Activation)" in err
    assert not (tmp_path / "odd_plain.keras").exists()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    err = _error(capsys, ["export", str(path), "--name", "m", "--base-dir", str(blocker)])
    assert "not a directory" in err
    assert "--name" in _error(capsys, ["export", str(path), "--name", "../up"])
    assert "--version" in _error(
        capsys,
        [
            "export",
            str(path),
            "--name",
            "m",
            "--format",
            "onnx",
            "--version",
            "3",
            "--base-dir",
            str(tmp_path / "b"),
        ],
    )
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
