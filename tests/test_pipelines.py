"""The two input pipelines of ``keras_dmr.data.load``: tf.data and the backend-neutral
``keras.utils.PyDataset`` (keras_dmr.data.sampling), which must yield the same batches for the
same seed, epoch after epoch; the PyDataset in NumPy alone; and a run without TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_dmr import data
from keras_dmr.data import DatasetUnavailableError, sampling

ROOT = Path(__file__).parents[1]


def _epochs(pipeline, epochs: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Every batch of ``epochs`` epochs, as ``fit`` would see them."""
    out = []
    for _ in range(epochs):
        if isinstance(pipeline, keras.utils.PyDataset):
            out.append([pipeline[i] for i in range(len(pipeline))])
            pipeline.on_epoch_end()
        else:
            out.append([(x.numpy(), y.numpy()) for x, y in pipeline])
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b, strict=True):
        assert len(epoch_a) == len(epoch_b)
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b, strict=True):
            assert xa.dtype == xb.dtype == np.float32 and ya.dtype == yb.dtype == np.int32
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)  # bit for bit: data movement and one division


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "train", "seed": 3},
        {"split": "train", "seed": 3, "drop_remainder": True, "batch_size": 100},
        {"split": "train", "seed": 0, "normalize": False, "take": 300},
        {"split": "test"},
    ],
    ids=["train", "drop-remainder", "raw-subset", "test"],
)
def test_both_pipelines_yield_the_same_batches_on_digits(kwargs):
    batches = {
        p: _epochs(data.load("digits", pipeline=p, **kwargs), 2) for p in ("tf.data", "pydataset")
    }
    _same(batches["tf.data"], batches["pydataset"])
    if kwargs["split"] == "train":  # each epoch its own order and crops
        first, second = batches["pydataset"]
        assert not np.array_equal(first[0][1], second[0][1])


def test_both_pipelines_yield_the_same_batches_on_fashion_mnist_with_flips(tmp_path):
    from tests.test_fashion_mnist import write_fashion_mnist

    write_fashion_mnist(tmp_path, train=70, test=10, seed=1)
    kwargs = {"batch_size": 16, "seed": 5, "data_dir": tmp_path}
    tf_batches = _epochs(data.load("fashion_mnist", pipeline="tf.data", **kwargs), 3)
    py_batches = _epochs(data.load("fashion_mnist", pipeline="pydataset", **kwargs), 3)
    _same(tf_batches, py_batches)


def test_the_plan_crops_flips_and_shuffles_as_documented():
    plan = sampling.epoch_plan(2000, 0, seed=1, shuffle=True, augment=True, flip=True)
    assert sorted(plan.order) == list(range(2000))
    assert plan.rows.min() == 0 and plan.rows.max() == 2 * sampling.PAD
    assert 0.4 < plan.flips.mean() < 0.6
    again = sampling.epoch_plan(2000, 0, seed=1, shuffle=True, augment=True, flip=True)
    np.testing.assert_array_equal(plan.order, again.order)
    np.testing.assert_array_equal(plan.cols, again.cols)
    still = sampling.epoch_plan(10, 3, seed=1, shuffle=False, augment=False, flip=True)
    assert list(still.order) == list(range(10)) and not still.flips.any()
    assert set(still.rows) == set(still.cols) == {sampling.PAD}


def test_crop_and_flip_is_a_translation_then_a_mirror():
    image = np.arange(1, 1 + 6 * 5 * 2, dtype=np.uint8).reshape(1, 6, 5, 2)
    pad = 2
    # Crop at (0, 4) of the padded image: the content moves 2 down and 2 left.
    out = sampling.crop_and_flip(image, np.array([0]), np.array([4]), np.array([False]), pad)
    np.testing.assert_array_equal(out[0, 2:, :3], image[0, :4, 2:])
    assert not out[0, :2].any() and not out[0, :, 3:].any()
    flipped = sampling.crop_and_flip(image, np.array([0]), np.array([4]), np.array([True]), pad)
    np.testing.assert_array_equal(flipped, out[:, :, ::-1])
    centred = sampling.crop_and_flip(image, np.array([pad]), np.array([pad]), np.array([0]), pad)
    np.testing.assert_array_equal(centred, image)


def test_a_model_fits_on_the_pydataset():
    import keras_dmr

    train = data.load("digits", "train", batch_size=64, take=256, pipeline="pydataset")
    test = data.load("digits", "test", batch_size=128, pipeline="pydataset")
    model = keras_dmr.ResNet(depth=8, widths=(8, 16, 32))
    history = model.fit(train, validation_data=test, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and train.epoch == 2


def test_tfds_datasets_need_the_tf_data_pipeline():
    with pytest.raises(DatasetUnavailableError, match="streams from TensorFlow Datasets"):
        data.load("cifar10", pipeline="pydataset")
    with pytest.raises(ValueError, match=r"^pipeline must be one of \('auto', 'tf.data'"):
        data.load("digits", pipeline="numpy")
    with pytest.raises(ValueError, match=r"^workers must be an integer >= 1"):
        data.load("digits", pipeline="pydataset", workers=0)


def test_auto_is_tf_data_under_tensorflow():
    assert keras.backend.backend() == "tensorflow"
    assert data.default_pipeline() == "tf.data"
    assert not isinstance(data.load("digits"), keras.utils.PyDataset)


# Blocks every import of TensorFlow (and what needs it) in the child process: the package must
# build, train and convert under JAX with the PyDataset pipeline alone.
WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("tensorflow", "tf2onnx", "tensorflow_datasets"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoTensorFlow())
    """
)


@pytest.mark.slow
def test_the_package_trains_and_converts_under_jax_without_tensorflow():
    script = WITHOUT_TENSORFLOW + textwrap.dedent(
        """
        import keras_dmr
        from keras_dmr import data

        assert data.default_pipeline() == "pydataset"
        train = data.load("digits", "train", batch_size=64, take=128)
        model = keras_dmr.DMRNet(depth=8)
        model.fit(train, epochs=1, verbose=0)
        plain = keras_dmr.to_plain(model)
        print("error", plain.conversion_report["max_relative_error"])
        assert "tensorflow" not in sys.modules
        try:
            data.load("cifar10")
        except data.DatasetUnavailableError as e:
            assert "streams from TensorFlow Datasets, which needs TensorFlow" in str(e), e
        else:
            raise AssertionError("cifar10 loaded without TensorFlow")
        import contextlib, io, tempfile
        from keras_dmr import cli

        with tempfile.TemporaryDirectory() as tmp:
            model.save(f"{tmp}/m.keras")
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                argv = ["export", f"{tmp}/m.keras", "--name", "m", "--base-dir", tmp]
                code = cli.main([*argv, "--preprocessing", "digits"])
        assert code == 2, code
        assert err.getvalue().strip() == (
            'keras-dmr: error: export needs TensorFlow, which is not installed here '
            '(pip install "keras-dmr[export]")'
        ), err.getvalue()
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("error")[-1]) <= 1e-5


def test_arrays_a_user_holds_batch_the_same_way_in_both_pipelines():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (50, 12, 10, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 50)
    kwargs = {"batch_size": 16, "shuffle": True, "augment": True, "seed": 9}
    tf_batches = _epochs(data.from_arrays(images, labels, pipeline="tf.data", **kwargs), 2)
    py_batches = _epochs(data.from_arrays(images, labels, pipeline="pydataset", **kwargs), 2)
    _same(tf_batches, py_batches)
    plain = data.from_arrays(images, labels, batch_size=50, pipeline="pydataset")
    x, y = plain[0]  # no shuffle, no augmentation: stored order, normalised per channel
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-4)
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, C\] and labels \[N\]"):
        data.from_arrays(images[0], labels)
