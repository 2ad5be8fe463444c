"""The core installs alone: with every optional extra made unimportable (TensorFlow, tf2onnx,
ONNX Runtime, Keras Tuner, TensorBoard, scikit-learn, matplotlib, TFDS), ``import keras_dmr``
builds a model and converts it, verified, on the JAX backend; using an extra's feature then
fails on the missing module by its name."""

import os
import subprocess
import sys
import textwrap

import pytest

BLOCKED = (
    "tensorflow",
    "tf2onnx",
    "onnxruntime",
    "onnx",
    "keras_tuner",
    "tensorboard",
    "sklearn",
    "matplotlib",
    "tensorflow_datasets",
)

SCRIPT = textwrap.dedent(
    f"""
    import importlib.abc, sys

    BLOCKED = set({BLOCKED!r})

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {{name!r}} (an optional extra, blocked)")
            return None

    sys.meta_path.insert(0, Block())
    import keras
    import keras_dmr
    from keras_dmr.convert import randomize

    assert keras.backend.backend() == "jax"
    model = randomize(keras_dmr.DMRNet(depth=8, compile=True), seed=1)
    plain = keras_dmr.to_plain(model)
    assert plain.conversion_report["max_relative_error"] <= 1e-5
    assert keras_dmr.analysis.count_flops(plain) > 0
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    try:
        keras_dmr.export.saved_model(plain, "/nonexistent/never", preprocessing="none")
    except ImportError as err:
        print("export:", err)
    print("core ok")
    """
)


@pytest.mark.slow
def test_core_imports_builds_and_converts_without_the_extras():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "core ok" in done.stdout
    assert "export: No module named 'tensorflow'" in done.stdout  # the extra's module, by name
