"""Plain models' slope-1 PReLU rewritten as separate reserved streams (the LiteRT int8 path)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr.convert import streams
from keras_dmr.convert.streams import reserved_split, split_reserved_streams
from keras_dmr.errors import ConversionError
from keras_dmr.layers.activations import ChannelwiseReLU

# float32, the same products summed in the same order: relative error ≤ 1e-5 on every batch.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def plain_mobilenet():
    model = randomize(keras_dmr.MobileNetV2(variant="cifar", alpha=0.25, compile=False), seed=5)
    return keras_dmr.to_plain(model)


def _chain(activation_1, activation_2, channels=5):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(channels, 3, padding="same")(inputs)
    x = activation_1(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = activation_2(x)
    x = keras.layers.Conv2D(4, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    slopes = [(la, la.get_weights()) for la in model.layers if isinstance(la, keras.layers.PReLU)]
    randomize(model, seed=2)
    for layer, weights in slopes:  # the slopes under test, not random ones
        layer.set_weights(weights)
    return model


def _prelu(slopes):
    layer = keras.layers.PReLU(shared_axes=[1, 2])
    layer.build((None, 8, 8, len(slopes)))
    layer.set_weights([np.asarray(slopes, "float32").reshape(1, 1, -1)])
    return layer


def test_the_plain_mobilenet_loses_every_prelu_and_keeps_its_outputs(plain_mobilenet, tmp_path):
    prelus = [la for la in plain_mobilenet.layers if isinstance(la, keras.layers.PReLU)]
    assert prelus  # RM carries each block's signed input through slope-1 PReLU
    split, count = split_reserved_streams(plain_mobilenet)
    assert count == len(prelus)
    assert not [la for la in split.layers if isinstance(la, keras.layers.PReLU)]
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=(4, *plain_mobilenet.inputs[0].shape[1:])).astype("float32")
        assert max_rel_error(split(x), plain_mobilenet(x)) <= TOLERANCE
    # The source model is untouched (still a chain: a second split finds the same).
    assert split_reserved_streams(plain_mobilenet)[1] == count
    path = tmp_path / "split.keras"
    split.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = rng.normal(size=(2, *plain_mobilenet.inputs[0].shape[1:])).astype("float32")
    assert max_rel_error(loaded(x), plain_mobilenet(x)) <= TOLERANCE


def test_relu6_with_unclipped_reserved_channels_splits_too():
    def act():
        return ChannelwiseReLU([0, 0, 0, 1, 1], [6, 6, 6, np.inf, np.inf])

    model = _chain(act(), act())
    split, count = split_reserved_streams(model)
    assert count == 2
    assert [la.name for la in split.layers if la.name.endswith("_own")]
    x = 10 * np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")  # past 6
    assert max_rel_error(split(x), model(x)) <= TOLERANCE


@pytest.mark.parametrize(
    "slopes",
    [
        [1, 0, 0, 0, 1],  # identity first: not one ReLU block and one identity block
        [0, 0, 0, 0.5, 1],  # a slope neither 0 nor 1
        [0, 0, 0, 0, 0],  # no reserved channel
        [1, 1, 1, 1, 1],  # no ReLU channel
    ],
)
def test_other_activations_are_left_as_they_are(slopes):
    model = _chain(_prelu(slopes), keras.layers.ReLU())
    split, count = split_reserved_streams(model)
    assert count == 0 and split is model
    assert reserved_split(model.layers[2]) is None


def test_a_depthwise_split_needs_its_input_split_at_the_same_channel():
    # The first activation splits after 3 channels, the second after 2: only the first splits.
    model = _chain(_prelu([0, 0, 0, 1, 1]), _prelu([0, 0, 1, 1, 1]))
    split, count = split_reserved_streams(model)
    assert count == 1
    x = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype("float32")
    assert max_rel_error(split(x), model(x)) <= TOLERANCE


def test_models_that_are_not_chains_are_left_as_they_are():
    residual = keras_dmr.ResNet(depth=8, compile=False)
    assert split_reserved_streams(residual) == (residual, 0)
    assert reserved_split(keras.layers.ReLU()) is None


def test_a_rewrite_that_changed_the_outputs_raises(monkeypatch):
    model = _chain(_prelu([0, 0, 0, 1, 1]), _prelu([0, 0, 0, 1, 1]))
    part = streams._part

    def wrong(layer, channels, activation, name):
        new, weights = part(layer, channels, activation, name)
        return new, [weights[0] * 1.01, *weights[1:]]

    monkeypatch.setattr(streams, "_part", wrong)
    with pytest.raises(ConversionError, match="changed the outputs"):
        split_reserved_streams(model)
