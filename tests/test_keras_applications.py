"""keras.applications ResNets mapped onto the package's blocks, then made plain by RM.

Sources are built with ``weights=None`` and small inputs (keras.applications accepts >= 32), then
randomized (random BN statistics too). The classifier outputs logits: a softmax of a random deep
network saturates and would hide differences.
"""

import sys
import types

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

from keras_dmr.convert import ConversionError, to_plain
from keras_dmr.convert.keras_applications import from_keras_application
from keras_dmr.layers import ParallelBranchBlock

MAPPED_TOL = 1e-6  # the mapped model runs the very same float32 ops (observed: 0.0)
PLAIN_TOL = 1e-5  # float32, BN folded in float64 and cast once (observed: <= 1e-6 for ResNet50)
DEEP_PLAIN_TOL = 1e-4  # ResNet101/152: twice to three times the depth


def batches(shape, n=3, size=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(size, *shape)).astype("float32") for _ in range(n)]


def worst_error(model, reference, inputs) -> float:
    return max(
        max_rel_error(model(x, training=False), reference(x, training=False)) for x in inputs
    )


def resnet(fn=keras.applications.ResNet50, shape=(32, 32, 3), seed=0, **kw):
    kw.setdefault("classes", 7)
    kw.setdefault("classifier_activation", None)
    return randomize(fn(weights=None, input_shape=shape, **kw), seed)


@pytest.fixture(scope="module")
def resnet50_even():
    source = resnet(shape=(32, 32, 3), seed=1)
    return source, from_keras_application(source)


@pytest.fixture(scope="module")
def resnet50_odd():
    source = resnet(shape=(33, 35, 3), seed=2)
    return source, from_keras_application(source)


# ------------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("which", ["resnet50_even", "resnet50_odd"])
def test_resnet50_maps_onto_blocks_with_identical_outputs(which, request):
    source, mapped = request.getfixturevalue(which)
    blocks = [layer for layer in mapped.layers if isinstance(layer, ParallelBranchBlock)]
    expected = [
        f"conv{s}_block{b + 1}"
        for s, n in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True)
        for b in range(n)
    ]
    assert [b.name for b in blocks] == expected
    strided = {b.name for b in blocks if b.strides == 2}
    assert strided == {"conv3_block1", "conv4_block1", "conv5_block1"}
    assert {b.name for b in blocks if b.projection} == strided | {"conv2_block1"}
    for b in blocks:
        assert (b.stride_on, b.use_bias, b.bn_epsilon) == ("first", True, 1.001e-5)
    assert mapped.mapping_report["architecture"] == "ResNet50"
    assert mapped.mapping_report["max_relative_error"] <= MAPPED_TOL
    assert mapped.count_params() == source.count_params()
    shape = tuple(source.inputs[0].shape[1:])
    assert worst_error(mapped, source, batches(shape, n=3, seed=5)) <= MAPPED_TOL


@pytest.mark.parametrize(
    "which,downsample,fuse_bn",
    [
        ("resnet50_even", "dirac", True),
        ("resnet50_odd", "dirac", False),
        ("resnet50_odd", "prelu", True),
        ("resnet50_even", "prelu", False),
    ],
)
def test_resnet50_to_plain_equals_source(which, downsample, fuse_bn, request):
    """RM of blocks strided on their first 1×1 conv, by both downsample methods; even and odd
    sizes both meet each method (Dirac taps depend on parity)."""
    source, mapped = request.getfixturevalue(which)
    shape = tuple(source.inputs[0].shape[1:])
    plain = to_plain(
        mapped, downsample=downsample, fuse_bn=fuse_bn, verify_inputs=batches(shape, n=1)
    )
    assert not any(hasattr(layer, "plain_ops") for layer in plain.layers)
    assert not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in plain.layers) != (
        fuse_bn
    )
    assert worst_error(plain, source, batches(shape, n=2, seed=9)) <= PLAIN_TOL


@pytest.mark.parametrize("pooling", [None, "avg", "max"])
def test_resnet50_without_top(pooling):
    source = resnet(shape=(32, 32, 3), seed=3, include_top=False, pooling=pooling)
    mapped = from_keras_application(source)
    assert mapped.outputs[0].shape == source.outputs[0].shape
    assert worst_error(mapped, source, batches((32, 32, 3), seed=4)) <= MAPPED_TOL
    if pooling == "avg":
        plain = to_plain(mapped, verify_inputs=batches((32, 32, 3), n=1))
        assert worst_error(plain, source, batches((32, 32, 3), n=2, seed=6)) <= PLAIN_TOL


def test_resnet50_of_unknown_input_size_maps():
    source = randomize(keras.applications.ResNet50(weights=None, include_top=False), 4)
    mapped = from_keras_application(source)
    assert tuple(mapped.inputs[0].shape) == (None, None, None, 3)
    for shape in [(40, 48, 3), (33, 35, 3)]:
        assert worst_error(mapped, source, batches(shape, n=1)) <= MAPPED_TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "fn,name,downsample",
    [
        (keras.applications.ResNet101, "ResNet101", "dirac"),
        (keras.applications.ResNet152, "ResNet152", "prelu"),
    ],
)
def test_deeper_resnets_map_and_convert(fn, name, downsample):
    source = resnet(fn, shape=(33, 32, 3), seed=5)
    mapped = from_keras_application(source)
    assert mapped.mapping_report["architecture"] == name
    plain = to_plain(mapped, downsample=downsample, verify_inputs=batches((33, 32, 3), n=1))
    assert worst_error(plain, source, batches((33, 32, 3), n=1, seed=7)) <= DEEP_PLAIN_TOL


# ----------------------------------------------------------------------------- dispatching
def test_vgg16_is_refused_not_passed_through():
    """VGG16 has no residual block to map: refused, naming the model and what is supported."""
    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    with pytest.raises(ConversionError, match=r"'vgg16'.*Supported: .*ResNet50.*MobileNetV2"):
        from_keras_application(vgg)


def test_unknown_models_are_refused():
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.LayerNormalization()],
        name="tiny",
    )
    with pytest.raises(ConversionError, match=r"'tiny'.*ResNet101"):
        from_keras_application(model)
    with pytest.raises(ConversionError, match="not a keras.Model"):
        from_keras_application(keras.layers.Dense(3))


def test_resnet_v2_is_refused():
    v2 = keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(32, 32, 3))
    with pytest.raises(ConversionError, match=r"'resnet50v2'.*ResNet v2"):
        from_keras_application(v2)


def test_resnet_with_a_foreign_head_is_refused(resnet50_even):
    source, _ = resnet50_even
    features = source.get_layer("conv5_block3_out").output
    head = keras.layers.Dense(3, name="my_head")(keras.layers.Flatten(name="flat")(features))
    model = keras.Model(source.inputs, head, name="custom")
    with pytest.raises(ConversionError, match=r"'custom'.*'flat'"):
        from_keras_application(model)


def test_mobilenet_v2_goes_to_its_converter(monkeypatch):
    calls = []
    fake = types.ModuleType("keras_dmr.models.mobilenet")
    fake.from_keras_mobilenet_v2 = lambda model: calls.append(model) or "converted"
    monkeypatch.setitem(sys.modules, "keras_dmr.models.mobilenet", fake)
    net = keras.applications.MobileNetV2(
        weights=None, include_top=False, alpha=0.35, input_shape=(32, 32, 3)
    )
    assert from_keras_application(net) == "converted"
    assert calls == [net]


# -------------------------------------------------------------- ParallelBranchBlock options
def test_block_options_round_trip_through_config():
    block = ParallelBranchBlock(
        16,
        branch="bottleneck",
        strides=2,
        stride_on="first",
        use_bias=True,
        bn_epsilon=1.001e-5,
        name="b",
    )
    config = block.get_config()
    assert (config["stride_on"], config["use_bias"], config["bn_epsilon"]) == (
        "first",
        True,
        1.001e-5,
    )
    clone = ParallelBranchBlock.from_config(config)
    assert clone.get_config() == config


def test_block_defaults_are_unchanged():
    block = ParallelBranchBlock(16, branch="bottleneck", strides=2)
    config = block.get_config()
    assert (config["stride_on"], config["use_bias"], config["bn_epsilon"]) == (
        "spatial",
        False,
        1e-5,
    )
    block(np.zeros((1, 8, 8, 8), "float32"))
    (c1, bn1), (c2, _), (c3, _) = block.paths[0]
    assert (c1.strides, c2.strides, c3.strides) == ((1, 1), (2, 2), (1, 1))
    assert not any(c.use_bias for c in (c1, c2, c3, block.projection[0][0]))
    assert bn1.epsilon == 1e-5
    assert len(block.weights) == 4 * (1 + 4)  # 3 branch convs + projection, each with its BN


def test_block_options_change_the_layers():
    block = ParallelBranchBlock(
        16, branch="bottleneck", strides=2, stride_on="first", use_bias=True, bn_epsilon=1e-3
    )
    block(np.zeros((1, 8, 8, 8), "float32"))
    (c1, bn1), (c2, _), (c3, _) = block.paths[0]
    assert (c1.strides, c2.strides, c3.strides) == ((2, 2), (1, 1), (1, 1))
    assert all(c.use_bias for c in (c1, c2, c3, block.projection[0][0]))
    assert {bn.epsilon for unit in [*block.paths[0], *block.projection] for bn in unit[-1:]} == {
        1e-3
    }


@pytest.mark.parametrize(
    "kwargs,argument",
    [(dict(stride_on="last"), "stride_on"), (dict(bn_epsilon=0), "bn_epsilon")],
)
def test_block_rejects_bad_options(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ParallelBranchBlock(8, **kwargs)


def small_model(implementation):
    """Blocks with biases, a non-default epsilon and the stride on the first conv."""
    inputs = keras.Input((9, 10, 6))
    x = ParallelBranchBlock(
        16,
        branch="bottleneck",
        strides=2,
        stride_on="first",
        use_bias=True,
        bn_epsilon=1e-3,
        bottleneck_width=8,
    )(inputs)
    x = ParallelBranchBlock(
        8,
        branches=2,
        branch="xception",
        use_bias=True,
        bn_epsilon=1e-3,
        implementation=implementation,
    )(x)
    x = ParallelBranchBlock(
        8,
        branches=2,
        branch="resnext",
        groups=2,
        strides=2,
        stride_on="first",
        use_bias=True,
        implementation=implementation,
    )(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


@pytest.mark.parametrize("downsample", ["dirac", "prelu"])
def test_block_options_convert_to_plain(downsample):
    """plain_ops folds the convolution biases and honours the epsilon and the stride position."""
    model = randomize(small_model("grouped"), seed=11)
    split = small_model("split")
    for a, b in zip(model.layers, split.layers, strict=True):
        if isinstance(a, ParallelBranchBlock):
            b.set_branch_weights(a.branch_weights())
        else:
            b.set_weights(a.get_weights())
    inputs = batches((9, 10, 6), n=2, seed=12)
    assert worst_error(split, model, inputs) <= PLAIN_TOL  # grouped == split with biases
    for fuse_bn in (True, False):
        plain = to_plain(model, downsample=downsample, fuse_bn=fuse_bn, verify_inputs=inputs)
        assert worst_error(plain, model, batches((9, 10, 6), n=2, seed=13)) <= PLAIN_TOL


def test_block_options_survive_saving(tmp_path):
    model = randomize(small_model("grouped"), seed=14)
    path = tmp_path / "options.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    inputs = batches((9, 10, 6), n=1, seed=15)
    assert worst_error(loaded, model, inputs) <= 1e-6
    blocks = [layer for layer in loaded.layers if isinstance(layer, ParallelBranchBlock)]
    assert [(b.stride_on, b.use_bias, b.bn_epsilon) for b in blocks] == [
        ("first", True, 1e-3),
        ("spatial", True, 1e-3),
        ("first", True, 1e-5),
    ]
