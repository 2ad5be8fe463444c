"""Every public layer of keras_dmr.layers passes Keras' own layer harness (``run_layer_test``):
weights created in ``build``, the expected output shape, trainable and non-trainable weight
counts, serialization, a training step, and mixed precision (sublayers take the block's dtype
policy). Per-layer ``dtype="mixed_float16"`` is also checked on the sublayers themselves."""

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize
from keras.src.testing import TestCase

from keras_dmr.layers import (
    BranchMean,
    ChannelScale,
    ChannelwiseReLU,
    ConstantPadding2D,
    FakeQuantConv2D,
    FakeQuantDense,
    FakeQuantDepthwiseConv2D,
    FakeQuantGroupedConv2D,
    GroupedConv2D,
    InvertedResidualBlock,
    ParallelBranchBlock,
    RepVGGBlock,
    TileBranches,
)

# (class, init kwargs, input shape, output shape, trainable, non-trainable weights)
CASES = {
    "parallel_basic_k2": (
        ParallelBranchBlock,
        {"filters": 8, "branches": 2},
        (2, 8, 8, 16),
        (2, 8, 8, 16),
        2 * (2 + 2 * 2),  # per branch: 2 kernels + 2 BNs × (gamma, beta)
        2 * 2 * 2,  # per branch: 2 BNs × (mean, variance)
    ),
    "parallel_projection_grouped": (
        ParallelBranchBlock,
        {"filters": 8, "branches": 2, "strides": 2, "implementation": "grouped"},
        (2, 8, 8, 8),
        (2, 4, 4, 16),
        (2 + 2 * 2) + (1 + 2),  # grouped path + projection conv and BN
        2 * 2 + 2,
    ),
    "parallel_vanilla_bottleneck_skip_bn": (
        ParallelBranchBlock,
        {"filters": 16, "branches": 2, "mapping": "vanilla", "branch": "bottleneck"},
        (2, 6, 6, 16),
        (2, 6, 6, 16),
        2 * (3 + 3 * 2),
        2 * 3 * 2,
    ),
    "parallel_identity_skip_bn": (
        ParallelBranchBlock,
        {"filters": 4, "branches": 2, "mapping": "identity", "skip_bn": True},
        (2, 6, 6, 8),
        (2, 6, 6, 8),
        2 * (2 + 2 * 2) + 1,  # + the skip scale
        2 * 2 * 2 + 2 + 2,  # + statistics of the skip scale and of the sum
    ),
    "repvgg": (
        RepVGGBlock,
        {"filters": 8, "reserve_ratio": 0.25},
        (2, 6, 6, 8),
        (2, 6, 6, 8),
        2 + 3 * 2,
        3 * 2,
    ),
    "repvgg_strided": (
        RepVGGBlock,
        {"filters": 8, "strides": 2},
        (2, 6, 6, 4),
        (2, 3, 3, 8),
        2 + 2 * 2,
        2 * 2,
    ),
    "inverted_residual": (
        InvertedResidualBlock,
        {"filters": 8, "expansion": 4},
        (2, 6, 6, 8),
        (2, 6, 6, 8),
        3 + 3 * 2,
        3 * 2,
    ),
    "inverted_keras_padding": (
        InvertedResidualBlock,
        {"filters": 8, "strides": 2, "padding": "keras"},
        (2, 7, 7, 4),
        (2, 4, 4, 8),
        3 + 3 * 2,
        3 * 2,
    ),
    "grouped_conv": (
        GroupedConv2D,
        {"filters": 8, "kernel_size": 3, "groups": 2, "padding": "same"},
        (2, 6, 6, 4),
        (2, 6, 6, 8),
        2,
        0,
    ),
    "channel_scale": (ChannelScale, {}, (2, 5, 5, 3), (2, 5, 5, 3), 1, 2),
    # kernel and bias, then the input range and whether a batch has set it
    "fake_quant_conv": (
        FakeQuantConv2D,
        {"filters": 4, "kernel_size": 3, "padding": "same", "weight_bits": 7},
        (2, 6, 6, 3),
        (2, 6, 6, 4),
        2,
        2,
    ),
    "fake_quant_grouped_conv": (
        FakeQuantGroupedConv2D,
        {"filters": 8, "kernel_size": 3, "groups": 2, "padding": "same", "weight_bits": 7},
        (2, 6, 6, 4),
        (2, 6, 6, 8),
        2,
        2,
    ),
    "fake_quant_depthwise": (
        FakeQuantDepthwiseConv2D,
        {"kernel_size": 3, "strides": 2, "depth_multiplier": 2},
        (2, 6, 6, 3),
        (2, 2, 2, 6),
        2,
        2,
    ),
    "fake_quant_dense": (FakeQuantDense, {"units": 5}, (2, 3), (2, 5), 2, 2),
    "channelwise_relu": (
        ChannelwiseReLU,
        {"negative_slope": [0.0, 1.0, 0.0], "max_value": [6.0, np.inf, np.inf]},
        (2, 5, 5, 3),
        (2, 5, 5, 3),
        0,
        0,
    ),
    "constant_padding": (
        ConstantPadding2D,
        {"padding": ((1, 2), (0, 1)), "value": -1.5},
        (2, 5, 5, 3),
        (2, 8, 6, 3),
        0,
        0,
    ),
    "branch_mean": (BranchMean, {"branches": 2}, (2, 5, 5, 6), (2, 5, 5, 3), 0, 0),
    "tile_branches": (TileBranches, {"branches": 3}, (2, 5, 5, 2), (2, 5, 5, 6), 0, 0),
}


class _Harness(TestCase):
    def runTest(self):  # unittest needs a test method to instantiate the case
        pass


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_run_layer_test(case):
    cls, kwargs, input_shape, output_shape, trainable, non_trainable = CASES[case]
    _Harness().run_layer_test(
        cls,
        init_kwargs=kwargs,
        input_shape=input_shape,
        expected_output_shape=output_shape,
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
        expected_num_seed_generators=0,
        expected_num_losses=0,
        supports_masking=issubclass(cls, keras.layers.Dense),  # as Keras' Dense does
    )


@pytest.mark.parametrize(
    "case", [c for c in sorted(CASES) if CASES[c][4] + CASES[c][5] and c != "grouped_conv"]
)
def test_build_then_set_weights(case):
    """Weights exist after ``build`` alone, so ``set_weights`` works before any call, and the
    layer then computes what a called copy with the same weights computes."""
    cls, kwargs, input_shape, _, trainable, non_trainable = CASES[case]
    reference = cls(**kwargs)
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    reference(x)
    randomize(keras.Sequential([keras.Input(input_shape[1:]), reference]), seed=3)
    layer = cls(**kwargs)
    layer.build(input_shape)
    assert len(layer.weights) == trainable + non_trainable
    layer.set_weights(reference.get_weights())
    got, want = layer(x, training=False), reference(x, training=False)
    assert max_rel_error(got, want) <= 1e-6


@pytest.mark.parametrize(
    "case",
    [
        "parallel_basic_k2",
        "parallel_projection_grouped",
        "parallel_identity_skip_bn",
        "repvgg",
        "inverted_residual",
    ],
)
def test_per_layer_mixed_policy_reaches_sublayers(case):
    cls, kwargs, input_shape, *_ = CASES[case]
    layer = cls(**kwargs, dtype="mixed_float16")
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    y = layer(x, training=False)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    inner = [sub for sub in layer._flatten_layers(include_self=False) if sub.weights]
    assert inner
    for sub in inner:
        assert sub.dtype_policy.name == "mixed_float16", sub.name
        assert sub.compute_dtype == "float16", sub.name
        assert all(w.dtype == "float32" for w in sub.weights), sub.name
