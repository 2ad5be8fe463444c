"""Backbones with several outputs exported: SavedModel (one signature, every output named,
served by the TF1 session loader and by ``saved_model_cli run``, what TF Serving runs), ONNX
(checked in ONNX Runtime), LiteRT (checked in its interpreter), int8 where the format has it.

Sources have random weights and random BN statistics. Tolerance: each exported float32 output
against the Keras source model's on the same uint8 images, maximum relative error ≤ 1e-5 (a
feature map of a 50-layer network: ≤ 1e-4); int8 files are only checked to run and to keep
every output's name and shape.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize
from test_export import pixels, start_saved_model_cli_run

import keras_dmr
from keras_dmr.data import dataset_info
from keras_dmr.export import ExportError, litert, onnx, read_metadata, saved_model

TOLERANCE = 1e-5


def keras_features(model, images, dataset="digits") -> dict:
    """The source model's outputs on uint8 ``images`` normalised for ``dataset``, by name."""
    from keras_dmr.export.serving import feature_names

    info = dataset_info(dataset)
    x = (images.astype("float32") - np.asarray(info.mean, "float32")) / np.asarray(
        info.std, "float32"
    )
    flat = keras.tree.flatten(model(x, training=False))
    return dict(zip(feature_names(model), (np.asarray(t) for t in flat), strict=True))


def tf1_session_features(path, images, names) -> dict:
    import tensorflow as tf

    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path))
        signature = meta.signature_def["serving_default"]
        assert sorted(signature.outputs) == sorted(names)
        fetched = session.run(
            [signature.outputs[n].name for n in names],
            feed_dict={signature.inputs["images"].name: images},
        )
    return dict(zip(names, fetched, strict=True))


def check_all_formats(model, tmp_path, *, tolerance=TOLERANCE, int8=True):
    """Export ``model`` (converted: plain) to the three formats and check every output in each
    format's own runtime; returns the SavedModel metadata."""
    import onnxruntime as ort

    from keras_dmr.export.litert import interpreter

    images = pixels(n=2, seed=5, shape=tuple(model.inputs[0].shape[1:]))
    want = keras_features(model, images)
    names = list(want)

    version = saved_model(model, tmp_path / "sm", preprocessing="digits")
    process, out = start_saved_model_cli_run(version, images, tmp_path / "cli")
    for name, got in tf1_session_features(version, images, names).items():
        assert max_rel_error(got, want[name]) <= tolerance, ("tf1", name)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    for name in names:
        assert max_rel_error(np.load(out / f"{name}.npy"), want[name]) <= tolerance, ("cli", name)

    path = onnx(model, tmp_path / "m.onnx", preprocessing="digits")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert sorted(o.name for o in session.get_outputs()) == sorted(names)
    got = dict(zip(names, session.run(names, {"images": images}), strict=True))
    for name in names:
        assert max_rel_error(got[name], want[name]) <= tolerance, ("onnx", name)

    path = litert(model, tmp_path / "m.tflite", preprocessing="digits")
    runner = interpreter(path).get_signature_runner("serving_default")
    got = runner(images=images)
    assert sorted(got) == sorted(names)
    for name in names:
        assert max_rel_error(got[name], want[name]) <= tolerance, ("litert", name)

    if int8:
        calibration = pixels(n=16, seed=6, shape=images.shape[1:])
        for exporter, suffix in ((onnx, "onnx"), (litert, "tflite")):
            path = exporter(
                model,
                tmp_path / f"int8.{suffix}",
                preprocessing="digits",
                quantize="int8",
                calibration=calibration,
            )
            meta = read_metadata(path)
            assert meta["head"] == "features" and meta["quantization"]["mode"] == "int8"
            assert [o["name"] for o in meta["output_specs"]] == names
        quantized = interpreter(path).get_signature_runner("serving_default")(images=images)
        for name in names:
            assert quantized[name].shape == want[name].shape, name
    meta = read_metadata(version)
    assert meta["plain"] and meta["head"] == "features" and meta["outputs"] == names
    assert [o["shape"][1:] for o in meta["output_specs"]] == [
        list(want[n].shape[1:]) for n in names
    ]
    assert len(meta["conversion"]["outputs"]) == len(names)
    return meta


def test_dmrnet_stage_outputs_export_everywhere(tmp_path):
    model = randomize(
        keras_dmr.DMRNet(8, include_top=False, feature_outputs=True, compile=False), seed=3
    )
    meta = check_all_formats(model, tmp_path)
    assert meta["outputs"] == ["P0", "P1", "P2"]


keras_hub = pytest.importorskip("keras_hub")


def test_keras_hub_pyramid_exports_everywhere(tmp_path):
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(32, 32, 3),
    )
    model = randomize(keras.Model(backbone.inputs, backbone.pyramid_outputs), seed=4)
    meta = check_all_formats(model, tmp_path, int8=False)
    assert meta["outputs"] == ["P2", "P3"]


def test_a_headless_model_exports_its_feature_map(tmp_path):
    """One output that is not a Dense layer's: served under its name, not as logits."""
    model = randomize(keras_dmr.ResNet(8, include_top=False, pooling="avg", compile=False), 2)
    images = pixels(n=2, seed=1)
    path = onnx(model, tmp_path / "pooled.onnx", preprocessing="digits")
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.get_outputs()
    assert output.name == "avg_pool"
    got = session.run(["avg_pool"], {"images": images})[0]
    assert max_rel_error(got, keras_features(model, images)["avg_pool"]) <= TOLERANCE


def test_what_only_a_classifier_has_is_refused_for_features(tmp_path):
    model = randomize(keras_dmr.ResNet(8, include_top=False, feature_outputs=True, compile=False))
    with pytest.raises(ExportError, match=r"serves feature maps \(P0, P1, P2\).*`class_names`"):
        saved_model(model, tmp_path / "a", preprocessing="digits", class_names=["a"] * 10)
    images = pixels(n=4, seed=2)
    labels = np.zeros(4, np.int64)
    with pytest.raises(ExportError, match="`evaluation`"):
        onnx(
            model,
            tmp_path / "a.onnx",
            preprocessing="digits",
            quantize="int8",
            calibration=images,
            evaluation=[(images, labels)],
        )
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.slow
def test_keras_applications_resnet50_stage_outputs_export_everywhere(tmp_path):
    """The 50-layer backbone cut at C3, C4 (its plain form at C5 would be 95M parameters,
    beyond tf2onnx's memory on this machine)."""
    source = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    names = ("conv3_block4_out", "conv4_block6_out")
    model = keras.Model(source.input, [source.get_layer(n).output for n in names])
    meta = check_all_formats(randomize(model, 5), tmp_path, tolerance=1e-4, int8=False)
    assert meta["outputs"] == list(names)
