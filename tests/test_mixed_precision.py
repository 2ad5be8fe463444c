"""Every builder trains under mixed precision and still predicts: finite loss, finite predictions,
and a plain model (``to_plain``) that agrees with it in argmax.

The protocol is the one that exposed the RepVGG overflow: one epoch on 64 random 32×32 images in
batches of 32, so the BN moving statistics are still close to their initial values when the model
predicts. Argmax agreement is checked on the images whose top two logits differ by more than
float16/bfloat16 rounding can move them (1% of the logits' range).

Full-width RepVGG-21 under ``mixed_float16`` predicted NaN after this protocol (issue 27): with
every branch BN starting at γ = 1 and moving statistics still near (0, 1), nothing normalises
RepVGG's three-branch sum at inference, activations grew ~1.6× per block and logits reached ~1e5
at initialisation (float32), past float16's 65,504. Each branch BN now starts at γ = 1/√k for the
k branches summed; the full-width case is a regular test, and a fast test pins the bound.
"""

import keras
import numpy as np
import pytest

import keras_dmr

BUILDERS = {
    "dmrnet": lambda: keras_dmr.DMRNet(depth=8),
    "dvanet": lambda: keras_dmr.DVANet(depth=8),
    "resnet": lambda: keras_dmr.ResNet(depth=8),
    "dmrnext": lambda: keras_dmr.DMRNeXt(
        depth=11, cardinality=4, bottleneck_width=4, widths=(32, 64, 128), stem_filters=16
    ),
    "repvgg": lambda: keras_dmr.RepVGG(base_width=16),
    "repvgg_reserving": lambda: keras_dmr.RepVGG(base_width=16, reserve_ratio=0.25),
    "rmnext": lambda: keras_dmr.RMNeXt(
        depth=None, blocks_per_stage=(1, 1, 1, 1), widths=(16, 32, 64, 128), channels_per_group=4
    ),
    "mobilenet_v2": lambda: keras_dmr.MobileNetV2(variant="cifar", alpha=0.25),
}


@pytest.mark.slow
@pytest.mark.parametrize("global_policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("name", BUILDERS)
def test_builder_trains_and_predicts_under_mixed_precision(name, global_policy):
    check_builder(BUILDERS[name], global_policy)


@pytest.mark.slow
@pytest.mark.parametrize("global_policy", ["mixed_float16"], indirect=True)
def test_full_width_repvgg_under_float16(global_policy):
    check_builder(keras_dmr.RepVGG, global_policy)


def test_untrained_repvgg_predicts_within_float16_range():
    """At initialisation, in inference mode (BN moving statistics 0 and 1), full-width RepVGG-21
    in float32 keeps its logits far inside float16's range (they were ~1e5 with γ = 1)."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    model = keras_dmr.RepVGG(compile=False)
    logits = np.asarray(model(x, training=False))
    assert np.isfinite(logits).all()
    assert np.abs(logits).max() < 100, np.abs(logits).max()


def check_builder(build, policy):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    model = build()
    assert model.dtype_policy.name == policy
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    predictions = np.asarray(model.predict(x[:16], verbose=0), np.float32)
    assert np.isfinite(predictions).all(), f"{model.name} predicts non-finite values, {policy}"

    plain = keras_dmr.to_plain(model)
    plain_predictions = np.asarray(plain.predict(x[:16], verbose=0), np.float32)
    assert np.isfinite(plain_predictions).all()
    top2 = np.sort(predictions, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.01 * np.ptp(predictions)
    assert clear.sum() >= 4
    np.testing.assert_array_equal(predictions[clear].argmax(1), plain_predictions[clear].argmax(1))
