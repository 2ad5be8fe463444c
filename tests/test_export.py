"""SavedModel (TF Serving layout) and ONNX exports of every family: equal outputs, names, errors.

Tolerance: the exported graph against the Keras source model on the same uint8 images, maximum
relative error <= 1e-5 (float32 throughout; measured ~1e-7).
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr.data import dataset_info
from keras_dmr.export import ExportError, check_no_xla, onnx, saved_model

TOLERANCE = 1e-5
SHAPE = (32, 32, 3)

FAMILIES = {
    "resnet": lambda: keras_dmr.ResNet(depth=8, compile=False),
    "dmrnet": lambda: keras_dmr.DMRNet(depth=8, branches=2, compile=False),
    "dvanet": lambda: keras_dmr.DVANet(depth=8, branches=2, compile=False),
    "dmrnext": lambda: keras_dmr.DMRNeXt(
        depth=11,
        cardinality=4,
        bottleneck_width=4,
        widths=(32, 64, 128),
        stem_filters=16,
        compile=False,
    ),
    "repvgg": lambda: keras_dmr.RepVGG(
        reserve_ratio=0.5, blocks_per_stage=(2, 2, 2, 2), base_width=8, compile=False
    ),
    "rmnext": lambda: keras_dmr.RMNeXt(
        depth=None,
        blocks_per_stage=(1, 1, 1, 1),
        widths=(16, 32, 64, 128),
        channels_per_group=4,
        compile=False,
    ),
    "mobilenet_v2": lambda: keras_dmr.MobileNetV2(variant="cifar", alpha=0.25, compile=False),
}


def pixels(n=3, seed=0, shape=SHAPE):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def expected_logits(model, images, dataset="digits"):
    info = dataset_info(dataset)
    x = (images.astype("float32") - np.asarray(info.mean, "float32")) / np.asarray(
        info.std, "float32"
    )
    return np.asarray(model(x, training=False))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    return request.param, randomize(FAMILIES[request.param](), seed=11)


def test_every_family_exports_to_saved_model_and_onnx(family_model, tmp_path):
    import onnxruntime as ort

    name, model = family_model
    images = pixels(seed=3)
    want = expected_logits(model, images)

    path = saved_model(model, tmp_path / "models" / name, preprocessing="digits")
    assert Path(path).name == "1"
    assert (Path(path) / "saved_model.pb").is_file() and (Path(path) / "variables").is_dir()
    check_no_xla(path)
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    assert set(out) == {"logits", "probabilities", "classes"}
    assert max_rel_error(out["logits"].numpy(), want) <= TOLERANCE
    np.testing.assert_array_equal(out["classes"].numpy(), np.argmax(want, -1))
    meta = json.loads((Path(path) / "assets" / "keras_dmr.json").read_text())
    assert meta["conversion"]["max_relative_error"] <= 1e-4
    assert meta["input"] == {
        "name": "images",
        "shape": [None, 32, 32, 3],
        "dtype": "uint8",
        "normalization": {
            "mean": pytest.approx(list(dataset_info("digits").mean)),
            "std": pytest.approx(list(dataset_info("digits").std)),
            "scale": "0..255",
        },
    }
    assert meta["source"]["class"] == type(model).__name__

    # The residual (training) form exports as it is with plain=False.
    residual = saved_model(model, tmp_path / "residual" / name, preprocessing="digits", plain=False)
    out = tf.saved_model.load(residual).signatures["serving_default"](images=tf.constant(images))
    assert max_rel_error(out["logits"].numpy(), want) <= TOLERANCE
    assert (
        json.loads((Path(residual) / "assets" / "keras_dmr.json").read_text())["conversion"] is None
    )

    onnx_path = onnx(model, tmp_path / f"{name}.onnx", preprocessing="digits")
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].shape[0] != 1  # dynamic batch
    names = [o.name for o in session.get_outputs()]
    assert sorted(names) == ["classes", "logits", "probabilities"]
    for batch in (images[:1], images):
        got = dict(zip(names, session.run(None, {"images": batch}), strict=True))
        assert max_rel_error(got["logits"], want[: len(batch)]) <= TOLERANCE
        np.testing.assert_array_equal(got["classes"], np.argmax(want[: len(batch)], -1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = randomize(keras_dmr.DMRNet(depth=8, compile=False), seed=5)
    base = tmp_path_factory.mktemp("serving") / "dmrnet"
    path = saved_model(model, base, preprocessing="digits", class_names=[str(i) for i in range(10)])
    return model, base, path


def test_versions_are_numbered_and_never_overwritten(exported):
    model, base, path = exported
    second = saved_model(model, base, preprocessing="digits")
    assert Path(second).name == "2"
    with pytest.raises(ExportError, match="never overwritten"):
        saved_model(model, base, preprocessing="digits", version=1)
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]
    shutil.rmtree(second)


def test_saved_model_cli_shows_the_names(exported):
    _, _, path = exported
    cli = Path(tf.__file__).parents[3].parent / "bin" / "saved_model_cli"
    command = [str(cli)] if cli.exists() else ["saved_model_cli"]
    shown = subprocess.run(
        [*command, "show", "--dir", path, "--all"], capture_output=True, text=True, check=True
    ).stdout
    assert "signature_def['serving_default']" in shown
    for name in ("images", "logits", "probabilities", "classes"):
        assert re.search(rf"\['{name}'\] tensor_info", shown), name
    assert "DT_UINT8" in shown


def test_predict_request_runs_through_the_signature(exported):
    from tensorflow_serving.apis import predict_pb2

    model, _, path = exported
    images = pixels(n=2, seed=8)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dmrnet"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # the wire
    signature = tf.saved_model.load(path).signatures[request.model_spec.signature_name]
    feeds = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    out = signature(**feeds)
    assert max_rel_error(out["logits"].numpy(), expected_logits(model, images)) <= TOLERANCE


def _documented_rest_body() -> str:
    text = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    match = re.search(r"<!-- rest-body -->\s*```json\n(.*?)```", text, re.S)
    assert match, "docs/serving.md must show the REST body after <!-- rest-body -->"
    return match.group(1)


def test_documented_rest_body_runs_through_the_signature(exported):
    """The JSON of docs/serving.md, with its image filled in, fed as TF Serving would."""
    model, _, path = exported
    body = json.loads(_documented_rest_body())
    assert body["signature_name"] == "serving_default"
    assert list(body["instances"][0]) == ["images"]
    image = pixels(n=1, seed=9)[0]
    body["instances"][0]["images"] = image.tolist()
    body = json.loads(json.dumps(body))
    images = np.asarray([inst["images"] for inst in body["instances"]], dtype=np.uint8)
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    assert max_rel_error(out["logits"].numpy(), expected_logits(model, image[None])) <= TOLERANCE


def test_metadata_has_class_names_and_versions(exported):
    _, _, path = exported
    meta = json.loads((Path(path) / "assets" / "keras_dmr.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["versions"]["tensorflow"] == tf.__version__
    assert meta["versions"]["keras_dmr"] == keras_dmr.__version__
    assert meta["source"]["config"]["depth"] == 8
    assert meta["version"] == 1


def test_wrong_image_size_is_refused_with_the_expected_shape(exported):
    _, _, path = exported
    signature = tf.saved_model.load(path).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[batch, 32, 32, 3\]"):
        signature(images=tf.constant(pixels(n=1, shape=(28, 28, 3))))


# --------------------------------------------------------------------------------- errors
def test_keras_grouped_conv_is_refused_by_the_xla_check(tmp_path):
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=1)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=2)(x)  # Keras' own grouped conv
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    with pytest.raises(ExportError, match="XLA"):
        saved_model(model, tmp_path / "xla", preprocessing="none")
    assert list((tmp_path / "xla").iterdir()) == []  # nothing left behind


def test_a_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        saved_model(model, tmp_path / "m", preprocessing="digits")
    assert list((tmp_path / "m").iterdir()) == []


def test_bad_arguments(tmp_path):
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        saved_model(model, tmp_path / "file", preprocessing="digits")
    with pytest.raises(ExportError, match="`version`"):
        saved_model(model, tmp_path / "a", preprocessing="digits", version=0)
    with pytest.raises(ExportError, match="`preprocessing`"):
        saved_model(model, tmp_path / "a", preprocessing="imagenet21k")
    with pytest.raises(ExportError, match="`class_names`"):
        saved_model(model, tmp_path / "a", preprocessing="digits", class_names=["a", "b"])
    with pytest.raises(ExportError, match=r"\.onnx"):
        onnx(model, tmp_path / "model.pb", preprocessing="digits")
    (tmp_path / "file.onnx").write_text("x")
    with pytest.raises(ExportError, match="overwrite"):
        onnx(model, tmp_path / "file.onnx", preprocessing="digits")
    headless = keras_dmr.ResNet(depth=8, include_top=False, pooling="avg", compile=False)
    with pytest.raises(ExportError, match="Dense classifier"):
        saved_model(headless, tmp_path / "b", preprocessing="digits")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_read_only_directory_is_a_clear_error(tmp_path, monkeypatch):
    """Checked before any work (this machine runs tests as root, so permissions are simulated)."""
    import os

    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(ExportError, match="not writable"):
        saved_model(model, locked / "dmrnet", preprocessing="digits")
    with pytest.raises(ExportError, match="not writable"):
        onnx(model, locked / "dmrnet.onnx", preprocessing="digits")
    assert list(locked.iterdir()) == []
