"""LiteRT and int8 exports, run by their real consumers: the LiteRT interpreter and ONNX Runtime.

Tolerances: float32 LiteRT against the Keras model on the same uint8 images, maximum relative
error of the logits <= 1e-4 (measured 5e-7 – 1e-6). int8 (random weights and random BN
statistics, ranges calibrated on 256 digits training images, 128 digits test images): top-1
agreement with the float model >= 0.95 and logits within 0.2 relative (measured: agreement 1.0
for every family, relative error 8e-3 – 8e-2, RepVGG's the largest).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize
from test_export import FAMILIES, expected_logits

import keras_dmr
from keras_dmr import data
from keras_dmr.export import ExportError, litert, onnx, read_metadata
from keras_dmr.export.litert import interpreter_predict, operator_names
from keras_dmr.export.onnx import session_predict


def _digits(split: str, n: int) -> np.ndarray:
    batches = data.load(split=split, batch_size=128, normalize=False, augment=False, shuffle=False)
    return np.concatenate([x.numpy() for x, _ in batches])[:n].astype(np.uint8)


@pytest.fixture(scope="module")
def calibration():
    return _digits("train", 256)


@pytest.fixture(scope="module")
def images():
    return _digits("test", 128)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_to_litert_and_int8(family, calibration, images, tmp_path):
    model = randomize(FAMILIES[family](), seed=11)
    want = expected_logits(model, images)

    path = litert(model, tmp_path / "f32.tflite", preprocessing="digits")
    ops = operator_names(Path(path).read_bytes())
    assert not [op for op in ops if op.startswith(("CUSTOM", "Flex"))], ops
    predict = interpreter_predict(path)
    for batch in (images[:1], images):  # any batch size
        assert max_rel_error(predict(batch), want[: len(batch)]) <= 1e-4
    classes = interpreter_predict(path, output="classes")(images)
    np.testing.assert_array_equal(classes, np.argmax(predict(images), -1))
    assert read_metadata(path)["plain"] is True

    for name, export, run in (
        ("q.tflite", litert, interpreter_predict),
        ("q.onnx", onnx, lambda p: session_predict(Path(p).read_bytes())),
    ):
        path = export(
            model,
            tmp_path / name,
            preprocessing="digits",
            quantize="int8",
            calibration=calibration,
        )
        got = run(path)(images)
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95, name
        assert max_rel_error(got, want) <= 0.2, name
        meta = read_metadata(path)["quantization"]
        assert meta["mode"] == "int8" and meta["calibration_images"] == 256


@pytest.fixture(scope="module")
def trained():
    """ResNet-8 trained 8 epochs on digits: accuracies that mean something."""
    keras.utils.set_random_seed(0)
    model = keras_dmr.ResNet(depth=8)
    model.fit(data.load(batch_size=64, seed=0), epochs=8, verbose=0)
    return model


def _keras_accuracy(model, batches) -> float:
    info = data.dataset_info("digits")
    correct = total = 0
    for x, y in batches:
        x = (x.numpy() - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
        correct += int(np.sum(np.argmax(model(x, training=False), -1) == y.numpy()))
        total += len(y)
    return correct / total


@pytest.mark.slow
def test_int8_exports_state_their_accuracy_beside_the_float_one(trained, tmp_path):
    test = data.load(split="test", batch_size=100, normalize=False)
    keras_accuracy = _keras_accuracy(trained, test)
    calibration = data.load(batch_size=64, normalize=False, augment=False)
    for name, export in (("m.tflite", litert), ("m.onnx", onnx)):
        path = export(
            trained,
            tmp_path / name,
            preprocessing="digits",
            quantize="int8",
            calibration=calibration,
            evaluation=test,
        )
        accuracy = read_metadata(path)["quantization"]["accuracy"]
        assert accuracy["images"] == 360
        # The float file is the Keras model, image for image (float32 rounding aside).
        assert abs(accuracy["float32"] - keras_accuracy) <= 1 / 360, name
        assert accuracy["float32"] > 0.8, accuracy
        assert abs(accuracy["int8"] - accuracy["float32"]) <= 0.02, (name, accuracy)
        assert accuracy["top1_agreement"] >= 0.97, (name, accuracy)


def test_float16_litert_is_close_to_the_model(images, tmp_path):
    model = randomize(keras_dmr.DMRNet(depth=8, compile=False), seed=3)
    path = litert(model, tmp_path / "h.tflite", preprocessing="digits", quantize="float16")
    assert "DEQUANTIZE" in operator_names(Path(path).read_bytes())  # float16 weights
    want = expected_logits(model, images)
    assert max_rel_error(interpreter_predict(path)(images), want) <= 1e-2
    assert read_metadata(path)["quantization"]["mode"] == "float16"


@pytest.fixture(scope="module")
def small():
    return keras_dmr.ResNet(depth=8, compile=False)


@pytest.mark.parametrize("export", [litert, onnx], ids=["litert", "onnx"])
def test_quantized_exports_refuse_bad_calibration(export, small, tmp_path):
    suffix = ".tflite" if export is litert else ".onnx"
    path = tmp_path / f"m{suffix}"
    good = np.zeros((4, 32, 32, 3), np.uint8)
    cases = [
        (dict(quantize="int8"), "`calibration` is required"),
        (dict(quantize="int8", calibration=np.zeros((4, 28, 28, 3))), r"the model takes \[batch"),
        (
            dict(quantize="int8", calibration=np.full((2, 32, 32, 3), -1.5)),
            "raw 0..255 pixels",
        ),
        (dict(quantize="int8", calibration=[]), "yielded no images"),
        (dict(quantize="int8", calibration="digits"), "must be a NumPy array"),
        (dict(calibration=good), "only used with quantize='int8'"),
        (dict(quantize="int4"), "`quantize` must be one of"),
        (
            dict(evaluation=[good]),
            r"expected \(images, labels\) pairs",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ExportError, match=match):
            export(small, path, preprocessing="digits", **kwargs)
    assert not path.exists() and os.listdir(tmp_path) == []  # nothing half-written


def test_litert_refuses_paths_it_must_not_write(small, tmp_path):
    with pytest.raises(ExportError, match=r"must end in \.tflite"):
        litert(small, tmp_path / "m.onnx", preprocessing="digits")
    existing = tmp_path / "m.tflite"
    existing.write_bytes(b"keep")
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        litert(small, existing, preprocessing="digits")
    assert existing.read_bytes() == b"keep"
    blocker = tmp_path / "file"
    blocker.write_text("")  # a path under a file cannot be written, even by root
    with pytest.raises(ExportError, match="file exists and is not a directory"):
        litert(small, blocker / "m.tflite", preprocessing="digits")
