"""``to_plain`` reads the model's graph: hand-written ResNets (layers or operators), transfer
learning models, keras.applications and KerasHub ResNets, and clear refusals of what RM cannot
carry, with ``verify=False`` too (a wrong plain model is never returned).

Every source has random weights and random BatchNorm statistics (``randomize``); outputs are
compared on three fresh batches. Tolerances (float32, BN folded in float64 and cast once):
TYPICAL = 1e-5 for networks up to ResNet-50 depth (observed ≤ 3e-6), WORST = 1e-4 for deeper ones.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_dmr.convert import ConversionError, compare, from_keras_application, to_plain
from keras_dmr.export.serving import is_plain
from keras_dmr.layers import ChannelwiseReLU

TYPICAL = 1e-5
WORST = 1e-4


def batches(shape, n=3, size=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(size, *shape)).astype("float32") for _ in range(n)]


def assert_converts(model, tolerance=TYPICAL, seed=1, **kwargs):
    """Convert without verification (the converter alone must be right), then compare."""
    randomize(model, seed)
    plain = to_plain(model, verify=False, **kwargs)
    assert is_plain(plain), "the converted model still has a fork"
    assert not is_plain(model) or not plain.conversion_report["blocks"]
    shape = tuple(s or 40 for s in model.inputs[0].shape[1:])
    error = compare(model, plain, inputs=batches(shape, seed=seed + 10))
    assert error <= tolerance, error
    return plain


# ------------------------------------------------------------------ hand-written CIFAR ResNets
def relu(x, how):
    if how == "ReLU":
        return keras.layers.ReLU()(x)
    if how == "Activation":
        return keras.layers.Activation("relu")(x)
    return keras.ops.relu(x)


def cifar_resnet(add="layer", act="ReLU", bias=False, bottleneck=False, first_width=12):
    """A textbook CIFAR ResNet: projection in the first block (16 → first_width), a stride-2
    projection, an identity block."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=bias)(inputs)
    x = relu(keras.layers.BatchNormalization()(x), act)
    for filters, stride in [(first_width, 1), (16, 2), (16, 1)]:
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=bias)(x)
            shortcut = keras.layers.BatchNormalization()(shortcut)
        if bottleneck:
            y = keras.layers.Conv2D(filters // 2, 1, use_bias=bias)(x)
            y = relu(keras.layers.BatchNormalization()(y), act)
            y = keras.layers.Conv2D(filters // 2, 3, strides=stride, padding="same")(y)
            y = relu(keras.layers.BatchNormalization()(y), act)
            y = keras.layers.Conv2D(filters, 1, use_bias=bias)(y)
        else:
            y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=bias)(x)
            y = relu(keras.layers.BatchNormalization()(y), act)
            y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=bias)(y)
        y = keras.layers.BatchNormalization()(y)
        x = keras.layers.Add()([shortcut, y]) if add == "layer" else shortcut + y
        x = relu(x, act)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="textbook")


@pytest.mark.parametrize("add", ["layer", "operator"])
@pytest.mark.parametrize("act", ["ReLU", "Activation", "keras.ops.relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_hand_written_resnets_convert(add, act, bias):
    plain = assert_converts(cifar_resnet(add, act, bias))
    blocks = plain.conversion_report["blocks"]
    assert [b["shortcut"] for b in blocks] == ["1×1 conv", "1×1 conv/2", "identity"]


@pytest.mark.parametrize("downsample", ["dirac", "prelu"])
@pytest.mark.parametrize("fuse_bn", [True, False])
def test_hand_written_bottleneck_converts(downsample, fuse_bn):
    plain = assert_converts(cifar_resnet(bottleneck=True), downsample=downsample, fuse_bn=fuse_bn)
    has_bn = any(isinstance(lyr, keras.layers.BatchNormalization) for lyr in plain.layers)
    assert has_bn != fuse_bn


def test_branch_ending_in_relu_and_leaky_relu_inside_convert():
    """A branch may end in an activation (a linear 1×1 is added) and use LeakyReLU inside:
    reserved channels pass through the emitter's own slope-1/ReLU channels, so both are exact."""
    inputs = keras.Input((8, 8, 4))
    y = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    y = keras.layers.LeakyReLU(0.1)(y)
    y = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(y)
    x = keras.layers.Add()([inputs, y])
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    assert_converts(model)


def test_repvgg_style_sum_of_linear_paths_is_one_convolution():
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    b = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(inputs))
    c = keras.layers.BatchNormalization()(inputs)
    x = keras.layers.ReLU()(keras.layers.Add()([a, b, c]))
    plain = assert_converts(keras.Model(inputs, x))
    assert sum(isinstance(lyr, keras.layers.Conv2D) for lyr in plain.layers) == 1


def test_a_plain_model_converts_again_to_the_same_outputs():
    plain = assert_converts(cifar_resnet())
    again = to_plain(plain, verify=False)
    assert again.count_params() == plain.count_params()
    assert compare(plain, again, inputs=batches((16, 16, 3))) <= TYPICAL


# --------------------------------------------------------------------- keras.applications
def apps(fn, shape=(32, 32, 3), **kwargs):
    kwargs.setdefault("classes", 7)
    kwargs.setdefault("classifier_activation", None)
    return fn(weights=None, input_shape=shape, **kwargs)


@pytest.mark.slow
def test_keras_resnet50_converts_on_an_odd_size_keeping_bn():
    """keras.applications' ResNet v1 (stride on the first 1×1, biases, epsilon 1.001e-5) on an
    odd size (Dirac taps depend on parity), by Fig. 9a, BN kept for fine-tuning. Fig. 9b on an
    even size is the transfer-learning test below."""
    plain = assert_converts(
        apps(keras.applications.ResNet50, (33, 35, 3)), downsample="prelu", fuse_bn=False
    )
    assert len(plain.conversion_report["blocks"]) == 16


@pytest.mark.slow
def test_keras_resnet50_v2_converts_through_slope_one_prelu():
    plain = assert_converts(apps(keras.applications.ResNet50V2, (33, 32, 3)))
    report = plain.conversion_report
    assert len(report["blocks"]) == 16
    assert {b["shortcut"] for b in report["blocks"]} >= {"identity", "subsample/2", "1×1 conv"}
    assert any(isinstance(lyr, keras.layers.PReLU | ChannelwiseReLU) for lyr in plain.layers)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fn",
    [
        keras.applications.ResNet101,
        keras.applications.ResNet152,
        keras.applications.ResNet101V2,
        keras.applications.ResNet152V2,
    ],
)
def test_deep_keras_resnets_convert(fn):
    assert_converts(apps(fn, (33, 32, 3)), tolerance=WORST)


@pytest.mark.parametrize(
    "alpha,shape,kwargs",
    [
        (0.35, (33, 33, 3), {}),
        (1.4, (75, 75, 3), {}),
        (1.0, (40, 48, 3), {"include_top": False, "pooling": "max"}),
        (0.5, (35, 32, 3), {"include_top": False, "pooling": None}),
        (0.75, (32, 32, 3), {"include_top": False, "pooling": "avg"}),
    ],
)
def test_keras_mobilenet_v2_converts(alpha, shape, kwargs):
    if kwargs.get("include_top") is False:
        kwargs = {**kwargs, "classes": 1000, "classifier_activation": "softmax"}
    plain = assert_converts(apps(keras.applications.MobileNetV2, shape, alpha=alpha, **kwargs))
    assert len(plain.conversion_report["blocks"]) == 10


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(keras.applications.ResNet50, marks=pytest.mark.slow),
        keras.applications.MobileNetV2,
    ],
    ids=["r50", "mnv2"],
)
def test_transfer_learning_model_converts(fn):
    """The usual fine-tuning model: a keras.applications backbone nested in a new head."""
    base = fn(weights=None, include_top=False, input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))
    plain = assert_converts(model, downsample="dirac")
    assert "dropout" in plain.conversion_report["passed_through"][0]


def test_a_custom_head_on_one_pixel_converts():
    base = apps(keras.applications.MobileNetV2, alpha=0.35, include_top=False)
    head = keras.layers.Dense(3)(keras.layers.Flatten()(base.output))  # 1×1 features here
    assert_converts(keras.Model(base.inputs, head))


def test_keras_model_of_unknown_input_size_converts_with_given_batches():
    source = randomize(keras.applications.MobileNetV2(weights=None, include_top=False), 4)
    plain = to_plain(source, verify_inputs=batches((64, 64, 3), n=2))
    assert plain.conversion_report["max_relative_error"] <= TYPICAL
    for shape in [(40, 48, 3), (64, 64, 3)]:
        assert compare(source, plain, inputs=batches(shape, n=1)) <= TYPICAL


def test_from_keras_application_is_a_deprecated_alias():
    source = randomize(keras.applications.VGG16(weights=None, include_top=False), 1)
    with pytest.warns(DeprecationWarning, match="to_plain"):
        plain = from_keras_application(source, verify_inputs=batches((32, 32, 3), n=2))
    assert plain.count_params() == source.count_params()  # a plain network converts to itself
    assert plain.conversion_report["blocks"] == []


# ------------------------------------------------------------------------------- KerasHub
keras_hub = pytest.importorskip("keras_hub")


def hub_backbone(block_type, pre, shape=(32, 32, 3), stem=(64,)):
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=list(stem),
        input_conv_kernel_sizes=[7] if len(stem) == 1 else [3] * len(stem),
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[2, 2],
        stackwise_num_strides=[1, 2],
        block_type=block_type,
        use_pre_activation=pre,
        image_shape=shape,
    )


@pytest.mark.parametrize(
    "block_type,pre",
    [
        ("basic_block", False),
        ("basic_block", True),
        ("bottleneck_block", False),
        ("bottleneck_block", True),
        ("basic_block_vd", False),
        ("bottleneck_block_vd", False),
    ],
)
def test_keras_hub_backbones_convert(block_type, pre):
    """v1, v2 (pre-activation, its stem pads with -inf before the max pool) and vd (average-pool
    shortcuts carried in the strided convolution)."""
    stem = (32, 32, 64) if block_type.endswith("vd") else (64,)
    plain = assert_converts(hub_backbone(block_type, pre, stem=stem))
    assert len(plain.conversion_report["blocks"]) == 4
    if block_type.endswith("vd"):
        shortcuts = {b["shortcut"] for b in plain.conversion_report["blocks"]}
        assert any(s.startswith("avg pool 2×2") for s in shortcuts)


def test_keras_hub_image_classifier_converts():
    backbone = hub_backbone("bottleneck_block", True)
    classifier = keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=5)
    assert_converts(classifier)


def test_keras_hub_vd_on_sizes_its_pools_do_not_tile_is_refused():
    backbone = randomize(hub_backbone("bottleneck_block_vd", False, (34, 34, 3), (32, 32, 64)))
    with pytest.raises(ConversionError, match=r"'stack1_block0_add'.*do not tile the 9×9"):
        to_plain(backbone, verify=False)


# ------------------------------------------------------------------------------- refusals
def residual_with(inside, name="odd"):
    """A residual block whose branch holds ``inside`` (a function of a tensor)."""
    inputs = keras.Input((8, 8, 4))
    y = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    y = inside(y)
    y = keras.layers.Conv2D(4, 3, padding="same")(y)
    x = keras.layers.ReLU()(keras.layers.Add()([inputs, y]))
    return randomize(keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name=name))


@pytest.mark.parametrize(
    "inside,match",
    [
        (lambda y: keras.ops.sin(y), r"operation 'sin' \(Sin\) at node \d+ of 'odd'"),
        (lambda y: keras.layers.Activation("swish", name="sw")(y), r"'sw'.*'silu'.*ReLU"),
        (lambda y: keras.layers.Activation("gelu", name="ge")(y), r"'ge'.*'gelu'.*PReLU"),
        (lambda y: keras.layers.LayerNormalization(name="ln")(y), r"'ln' \(LayerNormalization"),
        (
            lambda y: keras.layers.Multiply(name="se")(
                [y, keras.layers.Dense(4, activation="sigmoid")(y)]
            ),
            r"used again inside a residual branch",
        ),
        (lambda y: y + 1.0, r"adds a constant"),
    ],
    ids=["sin", "swish", "gelu", "layernorm", "gate", "constant"],
)
def test_unsupported_operation_in_a_branch_is_refused_without_verify(inside, match):
    model = residual_with(inside)
    with pytest.raises(ConversionError, match=match):
        to_plain(model, verify=False)


def test_two_branches_and_concatenation_are_refused():
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    joined = keras.layers.Concatenate(name="cat")([a, b])
    with pytest.raises(ConversionError, match=r"'cat' \(Concatenate\)"):
        to_plain(keras.Model(inputs, joined), verify=False)
    summed = keras.layers.Add(name="sum")([a, b])
    with pytest.raises(ConversionError, match=r"'sum' \(Add\).*one branch"):
        to_plain(keras.Model(inputs, summed), verify=False)


def test_efficientnet_and_mobilenet_v3_are_refused_by_name():
    net = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), include_preprocessing=False
    )
    with pytest.raises(ConversionError, match=r"'MobileNetV3Small'.*'hard_silu' is not piecewise"):
        to_plain(net, verify=False)


def test_export_labels_only_converted_models_plain():
    """A ResNet written with ``x + y`` is not plain to the exporter (it used to be)."""
    model = cifar_resnet(add="operator", act="keras.ops.relu")
    assert not is_plain(model)
    assert is_plain(to_plain(randomize(model), verify=False))


# ----------------------------------------------------------------- generated residual graphs
@st.composite
def residual_graphs(draw):
    height = draw(st.integers(5, 9))
    channels = draw(st.integers(1, 4))
    inputs = keras.Input((height, height + draw(st.integers(0, 2)), channels))
    x = inputs
    for _ in range(draw(st.integers(1, 3))):
        width = draw(st.integers(1, 5))
        stride = draw(st.sampled_from([1, 1, 2]))
        bias = draw(st.booleans())
        y = x
        for j in range(draw(st.integers(1, 3))):
            kernel = draw(st.sampled_from([1, 3]))
            y = keras.layers.Conv2D(
                width, kernel, strides=stride if j == 0 else 1, padding="same", use_bias=bias
            )(y)
            y = keras.layers.BatchNormalization()(y)
            y = keras.layers.ReLU()(y) if draw(st.booleans()) else keras.ops.relu(y)
        y = keras.layers.Conv2D(width, 3, padding="same", use_bias=bias)(y)
        y = keras.layers.BatchNormalization()(y)
        shortcut = x
        kind = draw(st.sampled_from(["projection", "pool"] if stride == 2 else ["identity"]))
        if stride == 2 and kind == "pool" and x.shape[-1] == width:
            shortcut = keras.layers.MaxPooling2D(1, strides=2)(x)
        elif stride == 2 or x.shape[-1] != width:
            shortcut = keras.layers.Conv2D(width, 1, strides=stride, use_bias=bias)(x)
            shortcut = keras.layers.BatchNormalization()(shortcut)
        x = keras.layers.Add()([shortcut, y]) if draw(st.booleans()) else shortcut + y
        if draw(st.booleans()):
            x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    model=residual_graphs(),
    seed=st.integers(0, 1000),
    downsample=st.sampled_from(["dirac", "prelu"]),
)
def test_generated_residual_graphs_convert(model, seed, downsample):
    assert_converts(model, seed=seed, downsample=downsample)


def test_a_branch_starting_with_an_activation_deep_in_the_network():
    """Pre-activation without BN (ReLU first in the branch) after a widening stem: the identity
    convolution the activation needs has the fork's channels, not the input's."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same")(inputs)
    y = keras.layers.Conv2D(6, 3, padding="same")(keras.layers.ReLU()(x))
    y = keras.layers.Conv2D(6, 3, padding="same")(keras.layers.ReLU(max_value=6.0)(y))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x + y))
    assert_converts(model)


def test_rescaling_in_the_model_converts():
    """A model that rescales its uint8-range input itself (a scalar Rescaling) and a
    per-channel one inside: both are per-channel affine maps the plain model keeps exactly."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    y = keras.layers.Rescaling([0.5, 2.0, 1.0, 3.0])(x)
    y = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.ReLU()(y))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x + y))
    assert_converts(model)


def test_a_convolution_that_computes_something_else_is_refused():
    """A Conv2D subclass that standardises its kernel is not the convolution its weights say:
    refused by name rather than read as a plain Conv2D."""

    class StandardizedConv2D(keras.layers.Conv2D):
        def convolution_op(self, inputs, kernel):
            mean = keras.ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
            return super().convolution_op(inputs, kernel - mean)

    inputs = keras.Input((8, 8, 3))
    x = StandardizedConv2D(4, 3, padding="same", name="ws")(inputs)
    with pytest.raises(ConversionError, match=r"'ws' \(StandardizedConv2D\).*convolution_op"):
        to_plain(keras.Model(inputs, x), verify=False)


def test_lora_layers_are_refused():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    dense = keras.layers.Dense(2, name="head")
    model = keras.Model(inputs, dense(x))
    dense.enable_lora(2)
    with pytest.raises(ConversionError, match=r"'head' \(Dense\).*LoRA"):
        to_plain(model, verify=False)


def test_a_backbone_called_in_training_mode_is_refused():
    base = keras.applications.MobileNetV2(
        weights=None, include_top=False, alpha=0.35, input_shape=(32, 32, 3)
    )
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=True))
    with pytest.raises(ConversionError, match="training=True"):
        to_plain(keras.Model(inputs, x), verify=False)


def test_the_plain_model_is_built_letting_go_of_each_float64_op(monkeypatch):
    """The walker's ops hold dense float64 kernels (7 GB for a plain ResNet-152, whose grouped
    float32 layers hold 1.3 GB): the builder consumes the chain, letting go of each kernel once
    its layer is built, so that they are never all held beside the layers' weights (the slow
    suite's ResNet-152 conversions peaked at 8.6 GB RSS holding them; 6.0 GB streamed).
    Counted here: the walker's kernels still alive when the last convolution is built."""
    import weakref

    import keras_dmr.convert.plain as plain_module
    from keras_dmr.rm.ops import ConvOp

    model = randomize(cifar_resnet(bottleneck=True), seed=4)
    ops = plain_module.plain_ops(model)
    kernels = [weakref.ref(op.kernel) for op in ops if isinstance(op, ConvOp)]
    alive = []
    build_conv = plain_module._conv_layer

    def counting(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in kernels))
        return build_conv(*args, **kwargs)

    monkeypatch.setattr(plain_module, "_conv_layer", counting)
    spec = (tuple(model.inputs[0].shape[1:]), "float32", "images")
    plain = plain_module.build_model(ops, spec, fuse_bn=True, name="streamed")
    assert ops == []
    assert len(kernels) >= 8 and len(alive) >= 8
    assert alive[-1] <= 2, alive  # the last op and at most the one held back to fuse
    assert compare(model, plain, inputs=batches((16, 16, 3), seed=5)) <= TYPICAL
