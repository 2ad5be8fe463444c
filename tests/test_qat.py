"""Quantization-aware fine-tuning (keras_dmr.training.qat) and its fake-quantized layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr import cli, data
from keras_dmr.export import onnx, read_metadata
from keras_dmr.layers import GroupedConv2D
from keras_dmr.layers.fake_quant import (
    FakeQuantConv2D,
    FakeQuantDense,
    FakeQuantDepthwiseConv2D,
    FakeQuantGroupedConv2D,
    asymmetric_fake_quant,
    symmetric_fake_quant,
)
from keras_dmr.training import qat


@pytest.fixture(scope="module")
def plain_mobilenet():
    model = randomize(keras_dmr.MobileNetV2(variant="cifar", alpha=0.25, compile=False), seed=4)
    return keras_dmr.to_plain(model)


def test_symmetric_rounding_per_channel_and_straight_through_gradient():
    w = tf.constant([[0.5, 0.1], [-1.0, 0.2], [0.26, -0.05]])  # two channels (last axis)
    got = np.asarray(symmetric_fake_quant(w, (0,), bits=3))  # levels -3..3
    # channel 0: scale 1/3 → 0.5 → 2/3, -1 → -1, 0.26 → 1/3; channel 1: scale 0.2/3
    want = np.array([[2 / 3, 0.2 * 2 / 3], [-1.0, 0.2], [1 / 3, -0.2 / 3]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = tf.reduce_sum(symmetric_fake_quant(w, (0,), bits=3) * 2.0)
    np.testing.assert_allclose(tape.gradient(y, w), np.full((3, 2), 2.0))


def test_asymmetric_rounding_keeps_zero_and_clips():
    x = tf.constant([-1.0, 0.0, 0.3, 2.0, 5.0])
    got = np.asarray(asymmetric_fake_quant(x, tf.constant(-1.0), tf.constant(2.0), bits=2))
    # range [-1, 2], 3 steps of 1 (zero at level 1): 0.3 → 0, 5 → 2 (clipped)
    np.testing.assert_allclose(got, [-1.0, 0.0, 0.0, 2.0, 2.0], atol=1e-6)
    positive = asymmetric_fake_quant(x, tf.constant(0.5), tf.constant(2.0), bits=8)
    assert float(positive[1]) == 0.0  # the range is widened to include zero


def test_input_range_follows_training_batches_and_is_fixed_in_inference():
    layer = FakeQuantDense(3, momentum=0.5)
    x1 = np.linspace(-1, 1, 8, dtype="float32").reshape(2, 4)
    layer(x1, training=True)
    np.testing.assert_allclose(layer.input_range.numpy(), [-1.0, 1.0])  # the first batch
    layer(x1 * 3, training=True)
    np.testing.assert_allclose(layer.input_range.numpy(), [-2.0, 2.0])  # 0.5·old + 0.5·batch
    layer(x1 * 10, training=False)
    np.testing.assert_allclose(layer.input_range.numpy(), [-2.0, 2.0])


@pytest.mark.parametrize("bad", [dict(weight_bits=9), dict(activation_bits=1), dict(momentum=1)])
def test_fake_quant_layers_refuse_bad_settings(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"`{name}`"):
        FakeQuantConv2D(4, 3, **bad)


def test_prepare_replaces_weighted_layers_and_strip_gives_the_same_model(plain_mobilenet):
    quantized = qat.prepare(plain_mobilenet, weight_bits=7)
    kinds = {type(la) for la in quantized.layers}
    assert {FakeQuantConv2D, FakeQuantDepthwiseConv2D, FakeQuantDense} <= kinds
    assert keras.layers.Conv2D not in kinds and keras.layers.Dense not in kinds
    assert all(la.weight_bits == 7 for la in quantized.layers if isinstance(la, FakeQuantDense))
    back = qat.strip(quantized, plain_mobilenet)
    assert [type(la) for la in back.layers] == [type(la) for la in plain_mobilenet.layers]
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    assert max_rel_error(back(x), plain_mobilenet(x)) == 0.0
    # Trained ranges: the fake-quantized model is close to the float one (8-bit inputs and
    # 7-bit weights; random weights, so only loosely).
    quantized(x, training=True)
    assert max_rel_error(quantized(x, training=False), plain_mobilenet(x)) < 0.5


def test_prepare_simulates_grouped_convolutions_per_output_channel():
    """DMRNet's plain form is built of GroupedConv2D: its kernels round per output channel
    (each group's convolution, as the exporters quantize it), its input on one range."""
    inputs = keras.Input((8, 8, 4))
    x = GroupedConv2D(8, 3, groups=2, padding="same", name="grouped")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    randomize(model, seed=1)
    quantized = qat.prepare(model, weight_bits=4)
    layer = quantized.get_layer("grouped")
    assert type(layer) is FakeQuantGroupedConv2D and layer.groups == 2
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype("float32")
    quantized(x, training=True)  # sets the input range
    kernel = layer.kernel.numpy()
    expected = keras.ops.convert_to_numpy(symmetric_fake_quant(kernel, (0, 1, 2), 4))
    assert len(np.unique(expected[..., 0])) <= 15  # 4 bits: at most 15 levels per channel
    got = GroupedConv2D(8, 3, groups=2, padding="same")
    got.build((None, 8, 8, 4))
    got.set_weights([expected, layer.bias.numpy()])
    x_q = asymmetric_fake_quant(x, *layer.input_range.numpy(), 8)
    np.testing.assert_allclose(
        layer(x, training=False), got(x_q), rtol=1e-5, atol=1e-5
    )  # the grouped convolution of the rounded input and kernel
    back = qat.strip(quantized, model)
    assert type(back.get_layer("grouped")) is GroupedConv2D
    assert max_rel_error(back(x), model(x)) == 0.0


def test_prepare_refuses_layers_it_cannot_simulate_and_subclassed_models():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2DTranspose(4, 3, padding="same", name="transposed")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    with pytest.raises(ValueError, match=r"transposed \(Conv2DTranspose\)"):
        qat.prepare(model)
    kept = qat.prepare(model, skip_unknown=True).get_layer("transposed")
    assert type(kept) is keras.layers.Conv2DTranspose

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="functional or sequential models only"):
        qat.prepare(net)


def test_fine_tune_trains_the_kernels_only_and_the_export_records_it(plain_mobilenet, tmp_path):
    train = data.load("digits", "train", batch_size=64, take=256, seed=0)
    with pytest.raises(ValueError, match="`epochs`"):
        qat.fine_tune(plain_mobilenet, train, epochs=0)
    with pytest.raises(ValueError, match="`engine`"):
        qat.fine_tune(plain_mobilenet, train, epochs=1, engine="tensorrt")
    before = [w.copy() for w in plain_mobilenet.get_weights()]
    tuned = qat.fine_tune(plain_mobilenet, train, epochs=1, verbose=0, log=lambda m: None)
    for w, original in zip(plain_mobilenet.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, original)  # the source is untouched
    assert [type(la) for la in tuned.layers] == [type(la) for la in plain_mobilenet.layers]
    changed = False
    for new, old in zip(tuned.layers, plain_mobilenet.layers, strict=True):
        if isinstance(old, keras.layers.PReLU):  # the reserved streams' slopes stay 0 and 1
            np.testing.assert_array_equal(new.get_weights()[0], old.get_weights()[0])
        elif isinstance(old, keras.layers.Conv2D):
            changed |= not np.array_equal(new.get_weights()[0], old.get_weights()[0])
    assert changed
    report = tuned.qat_report
    assert report["epochs"] == 1 and report["weight_bits"] == 7 and report["steps_per_epoch"] == 4
    assert report["conversion"]["max_relative_error"] <= 1e-5
    path = onnx(
        tuned,
        tmp_path / "q.onnx",
        preprocessing="digits",
        quantize="int8",
        calibration=data.load_digits_arrays("train")[0][:64],
    )
    meta = read_metadata(path)
    assert meta["qat"]["epochs"] == 1 and meta["plain"] and meta["quantization"]["mode"] == "int8"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--qat-epochs", "1"], "--qat-epochs: only with --quantize int8"),
        (
            ["--quantize", "int8", "--calibration-dataset", "digits", "--qat-learning-rate", "0.1"],
            "--qat-learning-rate: only with --qat-epochs",
        ),
        (
            ["--quantize", "int8", "--calibration-dataset", "digits", "--qat-epochs", "1"]
            + ["--qat-learning-rate", "-1"],
            "--qat-learning-rate: must be positive",
        ),
    ],
)
def test_cli_qat_arguments_are_checked_before_any_work(tmp_path, capsys, extra, message):
    checkpoint = tmp_path / "m.keras"
    keras_dmr.ResNet(depth=8).save(checkpoint)
    argv = ["export", str(checkpoint), "--name", "m", "--format", "onnx"]
    argv += ["--preprocessing", "digits", "--base-dir", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_exports_int8_after_quantization_aware_fine_tuning(tmp_path, capsys):
    checkpoint = tmp_path / "m.keras"
    keras_dmr.ResNet(depth=8).save(checkpoint)
    argv = ["export", str(checkpoint), "--name", "m", "--format", "litert"]
    argv += ["--preprocessing", "digits", "--base-dir", str(tmp_path / "out")]
    argv += ["--quantize", "int8", "--calibration-dataset", "digits", "--qat-epochs", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "quantization-aware fine-tuning: 1 epoch(s), 8-bit weights" in out
    meta = read_metadata(tmp_path / "out" / "m.tflite")
    assert meta["qat"]["engine"] == "litert" and meta["plain"]


def test_a_fake_quantized_model_saves_and_loads_in_safe_mode(plain_mobilenet, tmp_path):
    quantized = qat.prepare(plain_mobilenet, weight_bits=7, momentum=0.9)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    quantized(x, training=True)  # ranges set
    quantized.save(tmp_path / "q.keras")
    loaded = keras.saving.load_model(tmp_path / "q.keras", safe_mode=True)
    conv = next(la for la in loaded.layers if isinstance(la, FakeQuantConv2D))
    assert conv.weight_bits == 7 and conv.momentum == 0.9
    np.testing.assert_array_equal(loaded(x, training=False), quantized(x, training=False))
