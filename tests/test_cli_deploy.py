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
from keras_dmr.training import checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A keras-dmr train checkpoint (random weights and BN statistics, digits recorded)."""
    path = tmp_path_factory.mktemp("ckpt") / "dmrnet8_digits.keras"
    model = randomize(keras_dmr.DMRNet(depth=8), seed=3)
    checkpoints.save_checkpoint(model, path, {"args": {"dataset": "digits"}, "completed_epochs": 1})
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


def test_convert_reads_any_keras_file_and_lists_the_blocks(tmp_path, capsys):
    """A hand-written Keras-3 ResNet (``x + y``, ``keras.ops.relu``, a projection) saved by
    Keras: ``keras-dmr convert`` converts it and prints each block it found."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = keras.ops.relu(keras.layers.BatchNormalization()(x))
    y = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="b1_conv1")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", name="b1_conv2")(keras.ops.relu(y))
    shortcut = keras.layers.Conv2D(16, 1, strides=2, name="b1_projection")(x)
    x = keras.ops.relu(y + shortcut)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
    model = randomize(keras.Model(inputs, outputs, name="hand_written"))
    source, out = tmp_path / "hand.keras", tmp_path / "plain.keras"
    model.save(source)
    assert cli.main(["convert", str(source), str(out)]) == 0
    text = capsys.readouterr().out
    assert "residual blocks: 1" in text
    assert "branch b1_conv1, relu" in text and "shortcut 1×1 conv/2" in text
    plain = keras.saving.load_model(out, safe_mode=True)
    x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype("float32")
    assert max_rel_error(plain(x), model(x, training=False)) <= 1e-5


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


def test_export_litert_int8_calibrated_and_evaluated(checkpoint, tmp_path, capsys):
    """``--format litert --quantize int8 --calibration-dataset digits --evaluate``: a LiteRT
    file whose metadata states the float and int8 accuracy on the 360 digits test images."""
    from keras_dmr.export.litert import interpreter_predict

    path, model = checkpoint
    base = tmp_path / "lite"
    argv = ["export", str(path), "--name", "m", "--base-dir", str(base), "--format", "litert"]
    argv += ["--quantize", "int8", "--calibration-dataset", "digits", "--evaluate"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy on 360 test images: float32 " in out and ", int8 " in out
    meta = keras_dmr.export.read_metadata(base / "m.tflite")
    assert meta["format"] == "litert" and meta["plain"] is True
    assert meta["quantization"]["calibration_images"] == 512
    images = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    info = keras_dmr.data.dataset_info("digits")
    want = model((images - np.float32(info.mean)) / np.float32(info.std), training=False)
    got = interpreter_predict(base / "m.tflite")(images)
    assert got.shape == (8, 10) and max_rel_error(got, want) <= 0.2  # int8 (random weights)


def test_export_quantization_flags_are_checked_together(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    argv = ["export", str(path), "--name", "m", "--base-dir", str(tmp_path / "q")]
    for extra, message in (
        (["--quantize", "int8"], "only for --format onnx, litert or openvino"),
        (["--format", "onnx", "--quantize", "int8"], "needs --calibration-dataset"),
        (["--format", "onnx", "--quantize", "float16"], "float16 is for --format litert"),
        (["--format", "litert", "--evaluate"], "needs --calibration-dataset"),
        (["--format", "litert", "--calibration-dataset", "digits"], "only used with --quantize"),
        (["--format", "litert", "--keep-float", "x"], "only for --format onnx --quantize int8"),
        (["--format", "onnx", "--calibration-method", "Entropy"], "only for --format onnx --q"),
        (["--format", "litert", "--weights", "uint8"], "only for --format onnx --quantize int8"),
        (
            ["--format", "onnx", "--quantize", "int8", "--calibration-dataset", "digits"]
            + ["--keep-float", "no_such_layer"],
            "no weighted node of the graph comes from layer 'no_such_layer'",
        ),
    ):
        assert message in _error(capsys, [*argv, *extra])
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_export_onnx_int8_keeps_the_named_layers_in_float(checkpoint, tmp_path, capsys):
    """``--keep-float LAYER --calibration-method Percentile``: the fixes of
    docs/quantization.md, recorded in the file's metadata."""
    path, _ = checkpoint
    base = tmp_path / "fix"
    argv = ["export", str(path), "--name", "m", "--base-dir", str(base), "--format", "onnx"]
    argv += ["--quantize", "int8", "--calibration-dataset", "digits"]
    argv += ["--keep-float", "stem_conv", "--calibration-method", "Percentile"]
    argv += ["--weights", "uint8"]
    assert cli.main(argv) == 0
    details = keras_dmr.export.read_metadata(base / "m.onnx")["quantization"]
    assert details["weights"] == "uint8" and details["reduce_range"] is False
    assert details["float32_layers"] == ["stem_conv"]
    assert details["calibration_method"] == "Percentile"


def test_a_converted_plain_model_exports_through_the_cli(checkpoint, tmp_path, capsys):
    """``convert`` writes plain Keras (no keras_dmr layer); ``export`` takes that file."""
    path, model = checkpoint
    plain_path = tmp_path / "plain.keras"
    assert cli.main(["convert", str(path), str(plain_path)]) == 0
    base = tmp_path / "served"
    argv = ["export", str(plain_path), "--name", "p", "--base-dir", str(base)]
    assert cli.main([*argv, "--preprocessing", "digits"]) == 0
    meta = json.loads((base / "p" / "1" / "assets" / "keras_dmr.json").read_text())
    assert meta["plain"] is True and meta["conversion"] is None  # already plain: not converted
    signature = tf.saved_model.load(str(base / "p" / "1")).signatures["serving_default"]
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    info = keras_dmr.data.dataset_info("digits")
    want = model((images - np.float32(info.mean)) / np.float32(info.std), training=False)
    assert max_rel_error(signature(images=tf.constant(images))["logits"], want) <= 1e-5
    capsys.readouterr()


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
    foreign = tmp_path / "foreign.keras"  # any Keras model is read; a gate is refused by name
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid")(inputs)
    keras.Model(inputs, keras.layers.Multiply(name="gate")([x, inputs])).save(foreign)
    argv = ["export", str(foreign), "--name", "x", "--preprocessing", "none"]
    assert "'gate'" in _error(capsys, [*argv, "--base-dir", str(tmp_path / "f")])
    headless = tmp_path / "headless.keras"  # no classifier: its feature map is served
    keras.Model(inputs, keras.layers.Conv2D(2, 3, name="features")(inputs)).save(headless)
    argv = ["export", str(headless), "--name", "x", "--base-dir", str(tmp_path / "h")]
    assert cli.main([*argv, "--preprocessing", "none"]) == 0
    assert "outputs (feature maps): features [6, 6, 2]" in capsys.readouterr().out
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


# ------------------------------------------------------------------------ truncated checkpoints
@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_checkpoints_are_named_corrupt_and_nothing_is_written(
    checkpoint, tmp_path, capsys, fraction
):
    path, _ = checkpoint
    data = path.read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(data[: int(len(data) * fraction)])
    work = tmp_path / "work"
    work.mkdir()
    commands = {
        "convert": ["convert", str(cut), str(work / "plain.keras")],
        "export": ["export", str(cut), "--name", "m", "--base-dir", str(work / "sm")],
    }
    for argv in commands.values():
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "corrupt or truncated" in err and str(cut) in err
        assert "File not found" not in err and "Traceback" not in err
    assert list(work.iterdir()) == []
    assert cut.read_bytes() == data[: int(len(data) * fraction)]


def test_train_refuses_to_resume_or_overwrite_a_truncated_checkpoint(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    data = path.read_bytes()
    ckpt = tmp_path / "dmrnet8_digits.keras"
    ckpt.write_bytes(data[: len(data) // 2])
    (tmp_path / "dmrnet8_digits.keras.state.json").write_text(
        json.dumps({"args": {"dataset": "digits"}, "completed_epochs": 1, "history": []})
    )
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    argv = ["train", "--model", "dmrnet", "--depth", "8", "--epochs", "2", "--output", str(ckpt)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and str(ckpt) in err and "--fresh" in err
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before


def test_check_keras_archive_detects_a_flipped_byte(checkpoint, tmp_path):
    from keras_dmr.utils.archives import CorruptArchiveError, check_keras_archive

    path, _ = checkpoint
    check_keras_archive(path)  # intact
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a member's compressed or stored bytes
    bad = tmp_path / "flipped.keras"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptArchiveError, match="flipped.keras is corrupt"):
        check_keras_archive(bad)
    (tmp_path / "notzip.keras").write_text("hello")
    with pytest.raises(CorruptArchiveError, match="notzip.keras is corrupt or truncated"):
        check_keras_archive(tmp_path / "notzip.keras")


# --------------------------------------------------------------------------------- quiet start
@pytest.mark.slow
def test_console_script_hides_tensorflow_startup_logging_unless_verbose(tmp_path):
    """The installed ``keras-dmr`` script, as a user runs it: TensorFlow's C++ start-up lines
    (CUDA probing on a machine without a GPU, CPU features) are dropped; --verbose keeps them;
    the package's own errors still reach stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _keras_dmr_launcher import is_startup_noise

    script = Path(sys.executable).parent / "keras-dmr"
    assert script.exists(), "the console script is installed by `pip install -e .`"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    argv = ["paths", "--model", "resnet", "--depth", "8", "--output", str(tmp_path / "p.png")]
    quiet = subprocess.run([str(script), *argv], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "wrote" in quiet.stdout
    assert [line for line in quiet.stderr.splitlines() if is_startup_noise(line)] == []
    assert "I0000" not in quiet.stderr and "E0000" not in quiet.stderr

    failing = subprocess.run(
        [str(script), "convert", str(tmp_path / "missing.keras"), str(tmp_path / "o.keras")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert failing.returncode == 2
    assert "keras-dmr: error: argument CHECKPOINT:" in failing.stderr  # real errors pass

    verbose = subprocess.run(
        [str(script), "--verbose", *argv], capture_output=True, text=True, env=env
    )
    assert verbose.returncode == 0, verbose.stderr
    noise = [line for line in verbose.stderr.splitlines() if is_startup_noise(line)]
    if not noise:
        pytest.skip("TensorFlow printed no start-up lines on this machine")
    assert any("absl::InitializeLog" in line or "cuda" in line for line in noise)


def test_one_flag_name_for_fusing_bn_and_the_former_ones_still_parse():
    parser = cli.make_parser()
    convert = ["convert", "in.keras", "out.keras"]
    assert parser.parse_args(convert).fuse_bn is True
    assert parser.parse_args([*convert, "--no-fuse-bn"]).fuse_bn is False
    assert parser.parse_args([*convert, "--keep-bn"]).fuse_bn is False  # former name
    if any(c.name == "prune" for c in cli.COMMANDS):
        prune = ["prune", "in.keras", "--threshold", "0.1"]
        assert parser.parse_args(prune).fuse_bn is False
        assert parser.parse_args([*prune, "--fuse-bn"]).fuse_bn is True
        assert parser.parse_args([*prune, "--fold-bn"]).fuse_bn is True  # former name
