"""The extra BN on the residual path for any residual network the converter reads (issue 28):
``with_skip_bn`` keeps the function, and after it every channel of the ``fuse_bn=False`` plain
model has a BN scale of its own, so graph pruning ranks reserved and merged channels too.
Random weights and random BN (and skip-scale) statistics throughout; tolerance: float32
relative error ≤ 1e-5."""

import keras
import numpy as np
import pytest

import keras_dmr
from keras_dmr.analysis import count_flops
from keras_dmr.convert import randomize
from keras_dmr.layers import ChannelScale
from keras_dmr.prune import BNSparsity, prune_channels, scale_variables, with_skip_bn
from keras_dmr.rm import kernels

L = keras.layers
RNG = np.random.default_rng(0)
TOLERANCE = 1e-5


def rel_err(a, b, shape, n=3):
    errors = []
    for _ in range(n):
        x = RNG.standard_normal((2, *shape)).astype("float32")
        want = a.predict(x, verbose=0)
        errors.append(float(np.abs(want - b.predict(x, verbose=0)).max() / np.abs(want).max()))
    return max(errors)


def identity_bn_channels(model) -> int:
    """Channels whose BN is the identity plus a constant: no scale of their own to rank by."""
    return sum(
        int(
            kernels.identity_bn_channels(
                np.asarray(layer.gamma), np.asarray(layer.moving_variance), layer.epsilon
            ).sum()
        )
        for layer in model.layers
        if isinstance(layer, L.BatchNormalization)
    )


def keras_resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)


def keras_hub_resnet():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[2, 2],
        stackwise_num_strides=[1, 2],
        block_type="bottleneck_block",
        use_pre_activation=False,
        image_shape=(32, 32, 3),
    )
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=5)


def dmrnet14():
    return keras_dmr.DMRNet(depth=14, widths=(8, 16, 32))


@pytest.mark.parametrize(
    "build, shape, scales",
    [
        pytest.param(  # 16 blocks: a skip scale and a sum record each
            keras_resnet50, (64, 64, 3), 32, marks=pytest.mark.slow
        ),
        (keras_hub_resnet, (32, 32, 3), 8),
        (dmrnet14, (32, 32, 3), 0),  # inside its blocks (ParallelBranchBlock(skip_bn=True))
    ],
    ids=["keras.applications.ResNet50", "KerasHub ResNet", "DMRNet-14"],
)
def test_skip_bn_then_plain_then_graph_pruning_to_half_the_macs(build, shape, scales):
    model = randomize(build(), seed=1)
    prepared = with_skip_bn(model)
    assert sum(isinstance(layer, ChannelScale) for layer in prepared.layers) == scales
    assert rel_err(model, prepared, shape) <= TOLERANCE  # the scales start at 1
    randomize(prepared, seed=2)  # as if trained: random skip scales and statistics
    plain = keras_dmr.to_plain(prepared, fuse_bn=False)
    assert plain.conversion_report["max_relative_error"] <= TOLERANCE
    assert identity_bn_channels(plain) == 0  # every reserved and merged channel has a scale
    for source in (plain, prepared):  # the plain form, and the residual model itself
        pruned = prune_channels(source, macs=0.5)
        assert count_flops(pruned) <= 0.5 * count_flops(source)
        x = RNG.standard_normal((2, *shape)).astype("float32")
        assert np.isfinite(pruned.predict(x, verbose=0)).all()


def test_without_skip_bn_the_reserved_channels_have_no_scale_of_their_own():
    """The contrast the extra BN is for: the same conversion of the unprepared model leaves
    its reserved channels with identity BNs."""
    model = randomize(keras_hub_resnet(), seed=1)
    assert identity_bn_channels(keras_dmr.to_plain(model, fuse_bn=False)) > 0


def user_resnet():
    x = inputs = keras.Input((16, 16, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(y))
    x = L.ReLU()(L.Add(name="join")([x, y]))
    outputs = L.Dense(4)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="user")


def test_sparsity_training_shrinks_the_skip_scales_of_a_user_graph():
    prepared = with_skip_bn(user_resnet())
    assert prepared.get_layer("join_skip_bn") and prepared.get_layer("join_sum_stats")
    names = {v.path for v in scale_variables(prepared)}
    assert any("join_skip_bn" in n for n in names)
    prepared.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = RNG.standard_normal((16, 16, 16, 3)).astype("float32"), np.zeros((16, 4), "float32")
    prepared.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[BNSparsity(1.0)])
    skip = np.asarray(prepared.get_layer("join_skip_bn").gamma)
    assert np.all(skip < 1.0)  # two steps of lr·factor = 0.1 each, and the gradient
    stats = prepared.get_layer("join_sum_stats")
    assert not np.allclose(np.asarray(stats.moving_variance), 1.0)  # it recorded the sum
    plain = keras_dmr.to_plain(prepared, fuse_bn=False)
    assert plain.conversion_report["max_relative_error"] <= TOLERANCE
    assert identity_bn_channels(plain) == 0


def test_applying_it_twice_is_refused():
    prepared = with_skip_bn(user_resnet())
    with pytest.raises(ValueError, match="already has the extra BN.*join_skip_bn"):
        with_skip_bn(prepared)
