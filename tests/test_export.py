"""SavedModel (TF Serving layout) and ONNX exports of every family: equal outputs, names, errors.

Tolerance: the exported graph against the Keras source model on the same uint8 images, maximum
relative error <= 1e-5 (float32 throughout; measured ~1e-7).
"""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import keras
import numpy as np
import onnx as onnx_lib
import pytest
import tensorflow as tf
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr.data import dataset_info
from keras_dmr.export import ExportError, check_no_xla, onnx, saved_model
from keras_dmr.export.onnx import session_predict

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


def saved_model_cli() -> list[str]:
    cli = Path(tf.__file__).parents[3].parent / "bin" / "saved_model_cli"
    return [str(cli)] if cli.exists() else ["saved_model_cli"]


def documented_saved_model_cli_run() -> str:
    """The ``saved_model_cli run`` line docs/serving.md shows (the one these tests run)."""
    text = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    match = re.search(r"<!-- saved-model-cli-run -->\s*```bash\n(.*?)\n```", text, re.S)
    assert match, "docs/serving.md must show the saved_model_cli run line"
    return match.group(1)


def tf1_session_outputs(path, images) -> dict:
    """Run the export as TF Serving's C++ ``SavedModelBundle`` does: a TF1 Session restores the
    variables from the checkpoint, then the signature's tensors are fed and fetched by name."""
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path))
        signature = meta.signature_def["serving_default"]
        feed = {signature.inputs["images"].name: images}
        names = ("logits", "probabilities", "classes")
        fetched = session.run([signature.outputs[n].name for n in names], feed_dict=feed)
        return dict(zip(names, fetched, strict=True))


def start_saved_model_cli_run(path, images, workdir: Path) -> tuple[subprocess.Popen, Path]:
    """``saved_model_cli run`` (the binary, in a subprocess) writing each output as .npy."""
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(workdir / "images.npy", images)
    command = shlex.split(documented_saved_model_cli_run())
    assert command[:2] == ["saved_model_cli", "run"]
    values = {
        "savedmodels/dmrnet/1": str(path),
        "images=images.npy": f"images={workdir / 'images.npy'}",
        "out": str(workdir / "out"),
    }
    command = [*saved_model_cli(), *(values.get(word, word) for word in command[1:])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, workdir / "out"


def check_serving_loaders(exports: dict, images, want, workdir: Path) -> None:
    """Every export (path → its TF2 ``serving_default`` outputs) runs through both TF1-style
    loaders: each output equals the TF2 call's within 1e-6 (maximum relative error; classes
    exactly) and the logits match the Keras model's ``want`` within the export tolerance. The
    ``saved_model_cli`` binaries run side by side."""

    def check(got, tf2):
        for name in ("logits", "probabilities"):
            assert max_rel_error(got[name], np.asarray(tf2[name])) <= 1e-6, name
        np.testing.assert_array_equal(got["classes"], np.asarray(tf2["classes"]))
        assert max_rel_error(got["logits"], want) <= TOLERANCE

    started = {
        path: start_saved_model_cli_run(path, images, workdir / str(i))
        for i, path in enumerate(exports)
    }
    for path, tf2 in exports.items():
        check(tf1_session_outputs(path, images), tf2)
    for path, (process, out) in started.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        names = ("logits", "probabilities", "classes")
        check({n: np.load(out / f"{n}.npy") for n in names}, exports[path])


def pixels(n=3, seed=0, shape=SHAPE):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def expected_logits(model, images, dataset="digits"):
    info = dataset_info(dataset)
    x = (images.astype("float32") - np.asarray(info.mean, "float32")) / np.asarray(
        info.std, "float32"
    )
    return np.asarray(model(x, training=False))


@pytest.fixture(
    scope="module",
    params=[  # one family in `make test`, every family in `make slow`
        name if name == "resnet" else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(FAMILIES)
    ],
)
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
    out = plain_out = loaded.signatures["serving_default"](images=tf.constant(images))
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
    # What TF Serving runs: the TF1 Session restore, in process and as `saved_model_cli run`.
    check_serving_loaders({path: plain_out, residual: out}, images, want, tmp_path / "cli")

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
    shown = subprocess.run(
        [*saved_model_cli(), "show", "--dir", path, "--all"],
        capture_output=True,
        text=True,
        check=True,
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
    with pytest.raises(ExportError, match="serves feature maps.*`class_names`"):
        saved_model(headless, tmp_path / "b", preprocessing="digits", class_names=["x"] * 64)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_read_only_directory_is_a_clear_error(tmp_path, monkeypatch):
    """Checked before any work (this machine runs tests as root, so permissions are simulated)."""
    import os

    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    locked = tmp_path / "locked"
    locked.mkdir()
    from keras_dmr.utils import arguments

    real_mkstemp = arguments.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # the writability probe: refused in `locked`
        if Path(dir) == locked:
            raise PermissionError(13, os.strerror(13))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(arguments.tempfile, "mkstemp", mkstemp)
    with pytest.raises(ExportError, match=f"cannot create files in {locked} \\(Permission"):
        saved_model(model, locked / "dmrnet", preprocessing="digits")
    with pytest.raises(ExportError, match=f"cannot create files in {locked} \\(Permission"):
        onnx(model, locked / "dmrnet.onnx", preprocessing="digits")
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------ versions and destinations
def test_a_version_taken_during_the_export_makes_version_none_retry(tmp_path, monkeypatch):
    """Another exporter renames its version 1 into place while this one is writing: this one
    lands as version 2, says so in its metadata, and version 1 is left as the other wrote it."""
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    base = tmp_path / "m"
    real_save = tf.saved_model.save

    def save_while_another_lands(obj, export_dir, **kwargs):
        real_save(obj, export_dir, **kwargs)
        shutil.copytree(export_dir, base / "1")  # the other process finished first
        (base / "1" / "other").write_text("the other exporter's version")

    monkeypatch.setattr(tf.saved_model, "save", save_while_another_lands)
    path = saved_model(model, base, preprocessing="digits")
    assert Path(path) == base / "2"
    assert json.loads((base / "2" / "assets" / "keras_dmr.json").read_text())["version"] == 2
    assert (base / "1" / "other").read_text() == "the other exporter's version"
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # no temporary left behind


_CONCURRENT_EXPORT = """
import sys, time
from pathlib import Path
import keras_dmr
from keras_dmr.convert import randomize

base, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
ready.write_text("ready")
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
print(keras_dmr.export.saved_model(model, base, preprocessing="digits"))
"""


@pytest.mark.slow
def test_two_processes_exporting_to_one_base_directory_both_land(tmp_path):
    import os
    import sys
    import time

    base, go = tmp_path / "served", tmp_path / "go"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    processes = []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        command = [sys.executable, "-c", _CONCURRENT_EXPORT, str(base), str(ready), str(go)]
        processes.append(
            (
                ready,
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env),
            )
        )
    deadline = time.monotonic() + 240
    while not all(ready.exists() for ready, _ in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.write_text("go")  # both pick version 1 when they start exporting
    landed = []
    for _, process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-3000:]
        landed.append(Path(out.decode().strip().splitlines()[-1]))
    assert sorted(p.name for p in landed) == ["1", "2"]
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]
    images = pixels(n=2, seed=4)
    for path in landed:
        assert json.loads((path / "assets" / "keras_dmr.json").read_text())["version"] == int(
            path.name
        )
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        assert signature(images=tf.constant(images))["logits"].shape == (2, 10)


def test_a_file_named_like_a_version_is_skipped(tmp_path):
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    base = tmp_path / "m"
    base.mkdir()
    (base / "1").write_text("not a version")
    path = saved_model(model, base, preprocessing="digits")
    assert Path(path).name == "2" and (Path(path) / "saved_model.pb").is_file()
    assert (base / "1").read_text() == "not a version"
    with pytest.raises(ExportError, match="never overwritten"):
        saved_model(model, base, preprocessing="digits", version=1)


def test_onnx_onto_a_directory_is_refused_by_name(tmp_path):
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    target = tmp_path / "model.onnx"
    target.mkdir()
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"model\.onnx is a directory"):
            onnx(model, target, preprocessing="digits", overwrite=overwrite)
    assert target.is_dir() and not any(target.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left


def test_onnx_files_get_the_permissions_of_the_saved_model_files(tmp_path):
    import os
    import stat

    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    previous = os.umask(0o022)
    try:
        onnx_path = Path(onnx(model, tmp_path / "m.onnx", preprocessing="digits"))
        version = Path(saved_model(model, tmp_path / "sm", preprocessing="digits"))
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(onnx_path.stat().st_mode)
    assert mode == stat.S_IMODE((version / "saved_model.pb").stat().st_mode) == 0o644
    assert stat.S_IMODE(version.stat().st_mode) == 0o755


def _conv_nodes(saved_model_dir) -> tuple[int, list[str]]:
    """How many Conv2D nodes the serving signature runs, and those whose filter reads fewer
    channels than the input has (TensorFlow's native grouped convolution)."""
    signature = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    graphs = [signature.graph, *(f.graph for f in signature.graph._functions.values())]
    convs = [op for g in graphs for op in g.get_operations() if op.type == "Conv2D"]
    grouped = [op.name for op in convs if op.inputs[0].shape[-1] != op.inputs[1].shape[2]]
    return len(convs), grouped


def test_exports_carry_no_native_grouped_convolution(tmp_path, monkeypatch):
    """Even where this machine's TensorFlow runs grouped convolutions natively (forced here),
    the exported graph splits them: a TF Serving build without oneDNN cannot run a grouped
    Conv2D fused with its bias."""
    import keras_dmr.layers.conv as conv

    monkeypatch.setattr(conv, "native_grouped_conv_works", lambda dtype="float32": True)
    model = randomize(FAMILIES["rmnext"](), seed=2)
    x = tf.random.normal((2, *SHAPE))
    traced = tf.function(lambda t: model(t, training=False)).get_concrete_function(x)
    native = [
        op.name
        for op in traced.graph.get_operations()
        if op.type == "Conv2D" and op.inputs[0].shape[-1] != op.inputs[1].shape[2]
    ]
    assert native, "outside an export the native grouped kernel is used (the test's premise)"
    path = saved_model(model, tmp_path / "rmnext", preprocessing="digits")
    count, grouped = _conv_nodes(path)
    assert count > len(native) and grouped == []  # every group became its own convolution
    images = pixels(n=2, seed=6)
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    assert max_rel_error(out["logits"].numpy(), expected_logits(model, images)) <= TOLERANCE


@pytest.mark.parametrize(
    "fmt, module_name, predict_name, message",
    [
        ("onnx", "keras_dmr.export.onnx", "session_predict", "the ONNX graph's output 'logits'"),
        (
            "litert",
            "keras_dmr.export.litert",
            "interpreter_predict",
            "the LiteRT file's output 'logits'",
        ),
    ],
)
def test_a_file_its_runtime_computes_differently_is_refused(
    fmt, module_name, predict_name, message, tmp_path, monkeypatch
):
    """Each float32 file runs in its own runtime before it is written: outputs that differ from
    the Keras model (here the runtime's logits perturbed by 1%) raise, naming the output, and
    leave no file."""
    import importlib

    from keras_dmr import export

    module = importlib.import_module(module_name)
    real = getattr(module, predict_name)

    def perturbed(blob, output="logits", **kw):
        predict = real(blob, output, **kw)
        return lambda images: predict(images) * 1.01

    monkeypatch.setattr(module, predict_name, perturbed)
    model = randomize(keras_dmr.ResNet(8, compile=False), seed=4)
    suffix = {"onnx": ".onnx", "litert": ".tflite"}[fmt]
    with pytest.raises(ExportError, match=re.escape(message) + " differs"):
        getattr(export, fmt)(model, tmp_path / f"wrong{suffix}", preprocessing="digits")
    assert list(tmp_path.iterdir()) == []


def test_onnx_writes_each_grouped_convolution_as_one_conv_with_group(tmp_path, monkeypatch):
    """Where this machine's TensorFlow cannot run grouped convolutions natively (forced here),
    the ONNX file still has one ``Conv`` with ``group`` per grouped convolution — no Split,
    Concat or per-group layout Transpose (19 Transposes in DMRNet-14's plain graph before) —
    and computes the same as the model: float32 relative error ≤ TOLERANCE in ONNX Runtime on
    2 batches of random images (random weights and BN statistics). The exporter's own check
    runs TensorFlow on the split form, which every machine runs."""
    import keras_dmr.layers.conv as conv

    monkeypatch.setattr(conv, "native_grouped_conv_works", lambda dtype="float32": False)
    model = randomize(FAMILIES["rmnext"](), seed=3)
    grouped = [
        la for la in model._flatten_layers() if isinstance(la, conv.GroupedConv2D) and la.groups > 1
    ]
    assert grouped, "the test's premise: the model has grouped convolutions"
    path = onnx(model, tmp_path / "m.onnx", preprocessing="digits")
    nodes = onnx_lib.load(path).graph.node
    ops = [n.op_type for n in nodes]
    assert "Split" not in ops and ops.count("Transpose") == 1, ops  # the input's NHWC → NCHW
    groups = [a.i for n in nodes if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    # One grouped Conv per grouped convolution (their widths include the reserved streams the
    # exporter splits off as channels of their own).
    assert len([g for g in groups if g > 1]) == len(grouped), groups
    predict = session_predict(Path(path).read_bytes())
    for seed in (7, 8):
        images = pixels(n=2, seed=seed)
        assert max_rel_error(predict(images), expected_logits(model, images)) <= TOLERANCE


def test_a_grouped_convolution_reading_the_images_keeps_the_normalisation_unfolded(tmp_path):
    """1/std is folded into the kernels of convolutions that read the images along their input
    channels; a grouped one reads channels/groups of them per kernel, so the Mul stays."""
    inputs = keras.Input((8, 8, 3))
    x = keras_dmr.layers.GroupedConv2D(6, 3, groups=3, padding="same")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inputs, keras.layers.Dense(4)(x)), seed=5)
    path = onnx(model, tmp_path / "g.onnx", preprocessing="cifar10", plain=False)
    ops = [n.op_type for n in onnx_lib.load(path).graph.node]
    assert ops[:5] == ["Transpose", "Cast", "Sub", "Mul", "Conv"], ops
    mean, std = keras_dmr.export.serving.resolve_preprocessing("cifar10")
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    want = model((images.astype("float32") - mean) / std)
    got = session_predict(Path(path).read_bytes())(images)
    assert max_rel_error(got, want) <= 1e-5
