"""Models that are already plain convert to themselves, and SeparableConv2D is understood.

Random weights and random BN statistics (``randomize``), converted with ``verify=False`` (the
converter alone must be right), compared on three batches of two images: maximum relative error
<= 1e-5 (float32).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import randomize

from keras_dmr.convert import ConversionError, compare, to_plain
from keras_dmr.export.serving import is_plain

TYPICAL = 1e-5


def batches(shape, n=3, size=2, seed=11):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(size, *shape)).astype("float32") for _ in range(n)]


def converts_exactly(model, seed=1, **kwargs) -> keras.Model:
    randomize(model, seed)
    plain = to_plain(model, verify=False, **kwargs)
    assert is_plain(plain)
    error = compare(model, plain, inputs=batches(tuple(model.inputs[0].shape[1:])))
    assert error <= TYPICAL, error
    return plain


@pytest.mark.parametrize("fn", [keras.applications.VGG16, keras.applications.VGG19])
@pytest.mark.parametrize("activation", [None, "softmax"])
def test_vgg_converts_to_itself(fn, activation):
    # 64×64: the last pool leaves a 2×2×512 map that Flatten hands to fc1.
    model = fn(weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=activation)
    plain = converts_exactly(model)
    assert plain.conversion_report["blocks"] == []
    assert "flatten" in plain.conversion_report["passed_through"]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    plain_convs = [layer for layer in plain.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(plain_convs) == len(convs) + 1  # fc1 reads the 2×2 map as a 2×2 convolution
    assert plain.count_params() == model.count_params()


@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
def test_flatten_then_one_dense_converts(activation):
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, keras.layers.Dense(4, activation=activation)(x))
    plain = converts_exactly(model)
    extra = 4 * 4 + 4 if activation == "softmax" else 0  # an identity Dense carries the softmax
    assert plain.count_params() == model.count_params() + extra


@pytest.mark.parametrize("activation", [None, "softmax"])
def test_keras_mobilenet_v1_converts_to_itself(activation):
    # Its head: GlobalAveragePooling2D(keepdims=True) → Dropout → 1×1 Conv2D → Reshape → softmax.
    model = keras.applications.MobileNet(
        weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=activation
    )
    plain = converts_exactly(model)

    def convs(m):
        return [layer.name for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]

    assert convs(plain) == [name for name in convs(model) if name != "conv_preds"]
    assert plain.layers[-1].name.startswith("conv_preds")  # the 1×1 head, now a Dense layer
    assert isinstance(plain.layers[-1], keras.layers.Dense)


def test_a_flatten_followed_by_anything_but_dense_is_refused():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.BatchNormalization(name="bn_after_flatten")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    with pytest.raises(ConversionError, match="'bn_after_flatten'.*follows layer 'flat'"):
        to_plain(model, verify=False)


def test_a_flatten_at_the_output_is_refused():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, keras.layers.Flatten(name="flat_out")(x))
    with pytest.raises(ConversionError, match="'flat_out'.*no Dense layer reads"):
        to_plain(model, verify=False)


def test_a_reshape_of_a_spatial_map_is_refused():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Reshape((16, 16, 1), name="odd_reshape")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    with pytest.raises(ConversionError, match="'odd_reshape'.*only understood on pooled"):
        to_plain(model, verify=False)


# ------------------------------------------------------------------------------ SeparableConv2D
def _bn_relu(x, name):
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def test_separable_convolutions_in_a_chain_convert():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.SeparableConv2D(8, 3, padding="same", name="sep1")(inputs)
    x = _bn_relu(x, "sep1")
    x = keras.layers.SeparableConv2D(
        16, 3, strides=2, depth_multiplier=2, padding="valid", use_bias=False, name="sep2"
    )(x)
    x = _bn_relu(x, "sep2")
    x = keras.layers.SeparableConv2D(8, 1, activation="relu", name="sep3")(x)
    outputs = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x))
    converts_exactly(keras.Model(inputs, outputs))


def xception_style(entry_flow: bool, shape=(16, 16, 3)) -> keras.Model:
    """A stem, then Xception middle-flow blocks (ReLU → SepConv → BN, three times, + identity),
    and optionally an entry-flow block (its branch ends in a strided MaxPooling2D)."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = _bn_relu(x, "stem")
    if entry_flow:
        shortcut = keras.layers.Conv2D(32, 1, strides=2, use_bias=False, name="proj")(x)
        shortcut = keras.layers.BatchNormalization(name="proj_bn")(shortcut)
        y = keras.layers.SeparableConv2D(32, 3, padding="same", use_bias=False, name="e1")(x)
        y = _bn_relu(y, "e1")
        y = keras.layers.SeparableConv2D(32, 3, padding="same", use_bias=False, name="e2")(y)
        y = keras.layers.BatchNormalization(name="e2_bn")(y)
        y = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="entry_pool")(y)
        x = keras.layers.Add(name="entry_add")([y, shortcut])
    for block in range(2):
        y = x
        for i in range(3):
            y = keras.layers.ReLU(name=f"m{block}_{i}_relu")(y)
            y = keras.layers.SeparableConv2D(
                x.shape[-1], 3, padding="same", use_bias=False, name=f"m{block}_{i}_sep"
            )(y)
            y = keras.layers.BatchNormalization(name=f"m{block}_{i}_bn")(y)
        x = keras.layers.Add(name=f"m{block}_add")([y, x])
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_xception_style_middle_flow_converts_exactly():
    plain = converts_exactly(xception_style(entry_flow=False))
    assert len(plain.conversion_report["blocks"]) == 2
    assert not any(isinstance(layer, keras.layers.SeparableConv2D) for layer in plain.layers)


def test_xception_style_entry_flow_is_refused_naming_its_pooling():
    model = randomize(xception_style(entry_flow=True), 2)
    with pytest.raises(ConversionError, match="entry_add.*pooling \\(entry_pool\\)"):
        to_plain(model, verify=False)
