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
        if name.endswith(".tflite") and family == "mobilenet_v2":  # no PReLU left for XNNPACK
            assert "PRELU" not in operator_names(Path(path).read_bytes())
            assert meta["reserved_streams_split"] > 0


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


def test_int8_keeps_named_layers_in_float_and_refuses_unknown_ones(small, calibration, tmp_path):
    """``keep_float`` (the fix the quantization study measures): the named Keras layers of a
    plain model keep float weights in ONNX Runtime's int8 file; a layer the graph lacks, or a
    graph whose node names carry no layer names, is refused saying what would be valid."""
    import onnx as onnx_lib

    from keras_dmr.convert import to_plain
    from keras_dmr.export.onnx import node_layer, quantizable_nodes, quantize_int8

    plain = to_plain(randomize(small, seed=1))
    proto = onnx_lib.load(onnx(plain, tmp_path / "float.onnx", preprocessing="digits"))
    nodes = quantizable_nodes(proto)
    layers = [node_layer(n) for n in nodes]
    convolutions = [lyr.name for lyr in plain.layers if isinstance(lyr, keras.layers.Conv2D)]
    assert layers == [*convolutions, "predictions"]

    def weights_of_first_conv(quantized) -> str | None:
        """What produces the first convolution's weight input (None: an initializer)."""
        produced_by = {o: n.op_type for n in quantized.graph.node for o in n.output}
        conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
        return produced_by.get(conv.input[1])

    def dequantized(quantized) -> int:
        return sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node)

    full = quantize_int8(proto, calibration[:32])
    kept = quantize_int8(proto, calibration[:32], keep_float=[layers[0], "predictions"])
    assert weights_of_first_conv(full) == "DequantizeLinear"  # int8 weights
    assert weights_of_first_conv(kept) is None  # the float initializer itself
    assert dequantized(kept) < dequantized(full)
    with pytest.raises(
        ExportError, match=r"no weighted node of the graph comes from layer 'x'.*" + layers[0]
    ):
        quantize_int8(proto, calibration[:32], keep_float=["x"])
    with pytest.raises(ExportError, match="`calibration_method` must be one of"):
        quantize_int8(proto, calibration[:32], calibration_method="KL")
    # Full 8-bit uint8 weights (U8U8): the weight initializers are uint8, not int8.
    initializers = {
        t.name: t.data_type
        for t in quantize_int8(proto, calibration[:32], weights="uint8").graph.initializer
    }
    assert onnx_lib.TensorProto.UINT8 in {initializers[n] for n in initializers if "quantized" in n}
    assert onnx_lib.TensorProto.INT8 not in set(initializers.values())
    with pytest.raises(ExportError, match="`weights` must be one of"):
        quantize_int8(proto, calibration[:32], weights="int4")
    residual = onnx_lib.load(onnx(small, tmp_path / "r.onnx", preprocessing="digits", plain=False))
    # A residual graph's convolutions have no bias, so no layer name: only the classifier.
    with pytest.raises(ExportError, match=r"layers it can keep in float32: \['predictions'\]"):
        quantize_int8(residual, calibration[:32], keep_float=[layers[0]])
    # The exporter takes the same fix and records it.
    kw = dict(preprocessing="digits", quantize="int8", calibration=calibration[:32])
    fixed = onnx(plain, tmp_path / "fixed.onnx", keep_float=[layers[0]], **kw)
    details = read_metadata(fixed)["quantization"]
    assert details["float32_layers"] == [layers[0]] and details["calibration_method"] == "MinMax"
    with pytest.raises(ExportError, match="only used with quantize='int8'"):
        onnx(plain, tmp_path / "f2.onnx", preprocessing="digits", keep_float=[layers[0]])


def test_openvino_runs_the_onnx_exports_float_and_int8(calibration, images, tmp_path):
    """OpenVINO (the deploy benchmark's fourth engine) compiles the ONNX files as exported:
    float32 within 1e-4 relative of ONNX Runtime's logits, the int8 QDQ file with top-1
    agreement >= 0.95 with it (random weights and BN statistics, 128 digits test images).
    Float32 is pinned: on a CPU with native bfloat16 OpenVINO would compute in it by default;
    there the bfloat16 row rounds (relative error above 1e-6, at most 5e-2) and keeps top-1."""
    from keras_dmr.bench.deploy import _open, bfloat16_supported

    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=2)
    fp32 = onnx(model, tmp_path / "f.onnx", preprocessing="digits")
    int8 = onnx(
        model, tmp_path / "q.onnx", preprocessing="digits", quantize="int8", calibration=calibration
    )
    for path, precision in ((fp32, "float32"), (int8, "int8")):
        want = session_predict(Path(path).read_bytes())(images)
        got = _open("openvino", path, precision)(images)
        if precision == "float32":
            assert max_rel_error(got, want) <= 1e-4
        else:
            assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
    if bfloat16_supported():
        want = session_predict(Path(fp32).read_bytes())(images)
        got = _open("openvino", fp32, "bfloat16")(images)
        assert 1e-6 < max_rel_error(got, want) <= 5e-2
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
