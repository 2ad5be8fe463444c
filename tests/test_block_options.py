"""ParallelBranchBlock's options for foreign ResNet layouts (stride on the first 1×1, biases,
BN epsilon): config, conversion and saving. keras.applications models themselves convert by
``to_plain`` from their graph (tests/test_graph_convert.py)."""

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

from keras_dmr.convert import to_plain
from keras_dmr.layers import ParallelBranchBlock

PLAIN_TOL = 1e-5  # float32, BN folded in float64 and cast once


def batches(shape, n=3, size=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(size, *shape)).astype("float32") for _ in range(n)]


def worst_error(model, reference, inputs) -> float:
    return max(
        max_rel_error(model(x, training=False), reference(x, training=False)) for x in inputs
    )


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
