"""``to_plain`` on backbones with several outputs (a feature pyramid): keras.applications ResNets
cut at their stage outputs, KerasHub's ``pyramid_outputs``, the package's builders with
``feature_outputs=True``; every output checked, the output structure and names kept, and what
cannot be carried refused with ``verify=False`` too.

Sources have random weights and random BatchNorm statistics; outputs are compared on three
fresh batches of two images. Tolerance per output: relative error ≤ TYPICAL = 1e-5 (float32, BN
folded in float64 and cast once; observed ≤ 1e-6).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import randomize

import keras_dmr
from keras_dmr.convert import ConversionError, compare, output_names, to_plain
from keras_dmr.export.serving import is_plain
from keras_dmr.rm.ops import ConvOp, TapOp, order_channels

TYPICAL = 1e-5
RESNET50_STAGES = ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
RESNET50V2_STAGES = ("conv3_block4_out", "conv4_block6_out", "post_relu")


def batches(shape, n=3, size=2, seed=10):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(size, *shape)).astype("float32") for _ in range(n)]


def assert_every_output_converts(model, *, seed=1):
    """Convert without verification, then compare every output; the plain model returned."""
    randomize(model, seed)
    plain = to_plain(model, verify=False)
    assert is_plain(plain) and not is_plain(model)
    assert output_names(plain) == output_names(model)
    inputs = batches(tuple(model.inputs[0].shape[1:]))
    errors = compare(model, plain, inputs=inputs, per_output=True)
    assert len(errors) == len(model.outputs) > 1
    assert max(errors) <= TYPICAL, dict(zip(model.output_names, errors, strict=True))
    # the same structure: a list stays a list, a dict keeps its keys
    expected, got = model(inputs[0]), plain(inputs[0])
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected)
    return plain


def cut(model, names, as_dict=False):
    outputs = [model.get_layer(n).output for n in names]
    if as_dict:
        outputs = {f"C{i + 3}": t for i, t in enumerate(outputs)}
    return keras.Model(model.input, outputs, name=f"{model.name}_backbone")


@pytest.mark.slow
@pytest.mark.parametrize("as_dict", [False, True], ids=["list", "dict"])
def test_keras_applications_resnet50_stage_outputs(as_dict):
    source = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    plain = assert_every_output_converts(cut(source, RESNET50_STAGES, as_dict))
    report = plain.conversion_report
    names = ["C3", "C4", "C5"] if as_dict else list(RESNET50_STAGES)
    assert [o["name"] for o in report["outputs"]] == names
    assert [o["shape"] for o in report["outputs"]] == [[8, 8, 512], [4, 4, 1024], [2, 2, 2048]]
    assert len(report["blocks"]) == 16  # 3 + 4 + 6 + 3: every block, none dropped


@pytest.mark.slow
def test_keras_applications_resnet50v2_stage_outputs_are_pre_activation_sums():
    """ResNet50V2's stage outputs are additions (signed): read between blocks, exact."""
    source = keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(64, 64, 3))
    assert_every_output_converts(cut(source, RESNET50V2_STAGES))


def test_verified_conversion_reports_each_outputs_error():
    source = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    model = randomize(cut(source, RESNET50_STAGES[:2]), 3)
    report = to_plain(model).conversion_report
    errors = [o["max_relative_error"] for o in report["outputs"]]
    assert len(errors) == 2 and max(errors) == report["max_relative_error"] <= TYPICAL


def test_outputs_in_any_order_and_twice():
    source = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    c3, c4 = (source.get_layer(n).output for n in RESNET50_STAGES[:2])
    model = keras.Model(source.input, [c4, c3, c4], name="reordered")
    randomize(model, 2)
    plain = to_plain(model, verify=False)
    errors = compare(model, plain, inputs=batches((32, 32, 3)), per_output=True)
    assert len(errors) == 3 and max(errors) <= TYPICAL
    assert [t.shape[-1] for t in plain.outputs] == [1024, 512, 1024]
    assert plain.output_names == ["conv4_block6_out", "conv3_block4_out", "conv4_block6_out_2"]


keras_hub = pytest.importorskip("keras_hub")


@pytest.mark.parametrize("pre", [False, True], ids=["v1", "v2"])
def test_keras_hub_resnet_pyramid_outputs(pre):
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 32, 16],
        stackwise_num_blocks=[2, 2, 2],
        stackwise_num_strides=[1, 2, 2],
        block_type="basic_block",
        use_pre_activation=pre,
        image_shape=(64, 64, 3),
    )
    model = keras.Model(backbone.inputs, backbone.pyramid_outputs, name="hub_pyramid")
    assert sorted(backbone.pyramid_outputs) == ["P2", "P3", "P4"]
    assert_every_output_converts(model)


@pytest.mark.parametrize(
    "builder,kwargs",
    [
        ("DMRNet", {"implementation": "split"}),
        ("DMRNet", {"implementation": "grouped"}),
        ("ResNet", {}),
    ],
    ids=["dmrnet-split", "dmrnet-grouped", "resnet"],
)
def test_builders_feature_outputs(builder, kwargs):
    depth = 14 if builder == "DMRNet" else 20
    model = getattr(keras_dmr, builder)(depth, include_top=False, feature_outputs=True, **kwargs)
    assert sorted(model.output) == ["P0", "P1", "P2"]
    assert [model.output[k].shape[1] for k in ("P0", "P1", "P2")] == [32, 16, 8]
    assert sorted(model.pyramid_outputs) == ["P0", "P1", "P2"]
    assert_every_output_converts(model)


def test_feature_outputs_round_trip_and_need_no_top():
    model = keras_dmr.ResNet(
        18, variant="imagenet", include_top=False, feature_outputs=True, input_shape=(64, 64, 3)
    )
    assert sorted(model.output) == ["P2", "P3", "P4", "P5"]
    again = type(model).from_config(model.get_config())
    assert sorted(again.output) == ["P2", "P3", "P4", "P5"]
    with pytest.raises(ValueError, match="`feature_outputs=True`.*include_top=False"):
        keras_dmr.DMRNet(14, feature_outputs=True)
    with pytest.raises(ValueError, match="pooling='avg'"):
        keras_dmr.DMRNet(14, include_top=False, pooling="avg", feature_outputs=True)


# ------------------------------------------------------------------------------ refusals
def _block_with_inner_output():
    inputs = keras.Input((8, 8, 4))
    y = keras.layers.Conv2D(4, 3, padding="same", name="branch_conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.Add()([inputs, y]))
    return keras.Model(inputs, [y, x], name="inner")


def _side_head():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    head = keras.layers.Conv2D(2, 1, name="side_head")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    return keras.Model(inputs, [head, x], name="side")


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize(
    "build,match",
    [
        (_block_with_inner_output, r"'branch_conv'.*output of the model inside a residual block"),
        (_side_head, r"output of the model inside a residual block"),
    ],
    ids=["inside-a-block", "side-head"],
)
def test_outputs_off_the_main_path_are_refused(build, match, verify):
    model = randomize(build())
    with pytest.raises(ConversionError, match=match):
        to_plain(model, verify=verify)


def test_graph_rewriters_still_take_one_output():
    from keras_dmr import prune

    model = randomize(keras_dmr.ResNet(8, include_top=False, feature_outputs=True, compile=False))
    with pytest.raises(ConversionError, match="3 outputs; this operation handles models"):
        prune.with_skip_bn(model)
    with pytest.raises(ConversionError, match="3 outputs; this operation handles models"):
        prune.prune_channels(model, ratio=0.5)


def test_a_tapped_convolution_keeps_its_channel_order():
    """A convolution whose outputs regroup only after reordering stays dense when an output
    reads them (the output sees the source's channel order)."""
    kernel = np.zeros((1, 1, 4, 4))
    kernel[0, 0, 0, 0] = kernel[0, 0, 1, 2] = kernel[0, 0, 2, 1] = kernel[0, 0, 3, 3] = 1.0
    conv = ConvOp(kernel, np.zeros(4), name="c")
    untapped = order_channels([conv])
    assert untapped[0][1] == 4 and not np.array_equal(untapped[0][0].kernel, kernel)
    tapped = order_channels([conv, TapOp(0)])
    assert tapped[0][1] == 1 and np.array_equal(tapped[0][0].kernel, kernel)
