"""MobileNetV2 → MobileNetV1 by RM and fusion (RMNet paper, Sec. 4.4 / 5.3, Fig. 6): the inverted
residual block against a NumPy reference (wide bottleneck, ReLU/ReLU6, strides), the CIFAR
re-design whose plain form is MobileNetV1 layer for layer, and keras.applications' MobileNetV2
(ReLU6) imported and converted with identical outputs."""

import itertools

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

from keras_dmr.analysis.flops import count_flops
from keras_dmr.convert import ConversionError, compare, to_plain
from keras_dmr.convert.plain import PlainContext, build_model, plain_ops
from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.layers.inverted import InvertedResidualBlock
from keras_dmr.models.mobilenet import (
    IMAGENET_SETTINGS,
    MobileNetV2,
    from_keras_mobilenet_v2,
    make_divisible,
)
from keras_dmr.rm.ops import ConvOp

BLOCK_TOL = 1e-5  # float32 relative error of one block
MODEL_TOL = 1e-4  # worst case through ~30 float32 layers
EXACT_TOL = 1e-5  # the Keras import runs the very same float32 operations

# MobileNetV1 (Howard et al.), CIFAR form: a 3×3 stem 3→32 at stride 1, then per
# depthwise-separable layer (depthwise width, its stride, pointwise output width).
V1_STEM = 32
V1_LAYERS = [
    (32, 1, 64),
    (64, 2, 128),
    (128, 1, 128),
    (128, 2, 256),
    (256, 1, 256),
    (256, 2, 512),
    *[(512, 1, 512)] * 5,
    (512, 2, 1024),
    (1024, 1, 1024),
]
CIFAR_RESIDUAL_BLOCKS = {2: 32, 4: 64, 6: 128, 7: 128, 8: 128, 9: 128, 10: 128, 12: 256}


# ---------------------------------------------------------------------------- NumPy reference
def np_conv(x, kernel, strides=1):
    """NHWC convolution (dense kernel) with TensorFlow's 'same' padding, float64."""
    n, h, w, _ = x.shape
    kh, kw, _, c_out = kernel.shape
    oh, ow = -(-h // strides), -(-w // strides)
    ph, pw = max((oh - 1) * strides + kh - h, 0), max((ow - 1) * strides + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, c_out))
    for i, j in itertools.product(range(kh), range(kw)):
        out += xp[:, i : i + oh * strides : strides, j : j + ow * strides : strides] @ kernel[i, j]
    return out


def np_depthwise(x, kernel, strides):
    """Depthwise 'same' convolution with a Keras kernel ``(kh, kw, c, 1)``, float64."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    oh, ow = -(-h // strides), -(-w // strides)
    ph, pw = max((oh - 1) * strides + kh - h, 0), max((ow - 1) * strides + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, c))
    for i, j in itertools.product(range(kh), range(kw)):
        out += (
            xp[:, i : i + oh * strides : strides, j : j + ow * strides : strides]
            * kernel[i, j, :, 0]
        )
    return out


def np_bn(x, bn):
    gamma, beta, mean, var = (np.float64(w) for w in bn.get_weights())
    return gamma * (x - mean) / np.sqrt(var + bn.epsilon) + beta


def reference(block, x):
    """[act(BN(expand))] → act(BN(depthwise)) → BN(project), + x on the first C channels."""
    x = np.float64(x)
    cap = 6.0 if block.activation == "relu6" else np.inf

    def act(z):
        return np.clip(z, 0, cap)

    h = x
    if block.expansion != 1:
        h = act(np_bn(np_conv(h, np.float64(block.expand.get_weights()[0])), block.expand_bn))
    h = np_depthwise(h, np.float64(block.depthwise.get_weights()[0]), block.strides)
    h = act(np_bn(h, block.depthwise_bn))
    y = np_bn(np_conv(h, np.float64(block.project.get_weights()[0])), block.project_bn)
    if block.has_residual:
        c = block.filters
        y[..., :c] += x[..., :c]
    return y


def run_plain_ops(ops, x):
    y = np.float64(x)
    for op in ops:
        assert op.padding == "same"
        y = np_conv(y, op.kernel, op.strides) + op.bias
        y = y if op.act is None else op.act(y)
    return y


def make_block(c_in, size, seed, **kwargs):
    block = InvertedResidualBlock(name="blk", **kwargs)
    block(np.zeros((1, *size, c_in), "float32"))
    return randomize(block, seed)


# -------------------------------------------------------------------------------------- block
BLOCK_CASES = [
    # (filters, expansion, strides, bottleneck_factor, activation, c_in, residual expected)
    (4, 3, 1, 1, "relu", 4, True),
    (4, 3, 1, 2, "relu", 8, True),
    (4, 3, 1, 1, "relu6", 4, True),
    (4, 3, 1, 2, "relu6", 8, True),
    (4, 1, 1, 2, "relu6", 8, True),  # no expansion, with residual
    (4, 3, 2, 1, "relu", 4, False),
    (4, 3, 2, 2, "relu6", 8, False),
    (6, 2, 1, 2, "relu6", 8, False),  # width changes: no residual
    (4, 1, 1, 2, "relu", 3, False),  # block 0 of the CIFAR variant
]


@pytest.mark.parametrize("filters,t,strides,f,act,c_in,residual", BLOCK_CASES)
def test_block_matches_numpy_and_its_plain_ops(filters, t, strides, f, act, c_in, residual):
    size = (7, 8)
    block = make_block(
        c_in,
        size,
        seed=filters + t + strides + f + c_in,
        filters=filters,
        expansion=t,
        strides=strides,
        bottleneck_factor=f,
        activation=act,
    )
    assert block.has_residual == residual
    rng = np.random.default_rng(0)
    ctx = PlainContext(input_hw=size, input_nonnegative=False)
    ops = block.plain_ops(ctx)
    for _ in range(2):
        # Scaled so that ReLU6 clips and the block input (reserved channels) exceeds 6 in size.
        x = (4 * rng.normal(size=(2, *size, c_in))).astype("float32")
        expected = reference(block, x)
        assert np.max(np.abs(x)) > 6
        if act == "relu6" and t != 1:
            pre = np_bn(np_conv(np.float64(x), block.expand.get_weights()[0]), block.expand_bn)
            assert np.max(pre) > 6
        got = np.asarray(block(x, training=False))
        assert got.shape == expected.shape == (2, *(-(-n // strides) for n in size), f * filters)
        assert max_rel_error(got, expected) <= BLOCK_TOL
        assert max_rel_error(run_plain_ops(ops, x), expected) <= 1e-10
    if residual:
        # Reserved: exactly the C shortcut channels, passed with slope 1 and no cap.
        hidden = block.hidden
        assert ops[0].c_out == hidden + filters
        for op in ops[:-1]:
            np.testing.assert_array_equal(op.act.slope[hidden:], 1.0)
            assert np.all(np.isinf(op.act.cap[hidden:]))
            expected_cap = 6.0 if act == "relu6" else np.inf
            np.testing.assert_array_equal(op.act.cap[:hidden], expected_cap)
            np.testing.assert_array_equal(op.act.slope[:hidden], 0.0)
        assert ops[-1].act is None
    else:
        assert len(ops) == (3 if t != 1 else 2)


def test_block_nonnegative_input_is_reserved_by_relu():
    block = make_block(8, (6, 6), 3, filters=4, expansion=3, bottleneck_factor=2)
    ops = block.plain_ops(PlainContext(input_hw=(6, 6), input_nonnegative=True))
    x = np.abs(np.random.default_rng(1).normal(size=(2, 6, 6, 8)) * 4).astype("float32")
    assert all(op.act.nonnegative for op in ops[:-1])
    assert max_rel_error(run_plain_ops(ops, x), reference(block, x)) <= 1e-10


def test_block_residual_options():
    forced_off = make_block(8, (4, 4), 0, filters=8, expansion=2, residual=False)
    assert not forced_off.has_residual
    x = np.random.default_rng(0).normal(size=(1, 4, 4, 8)).astype("float32")
    assert max_rel_error(forced_off(x, training=False), reference(forced_off, x)) <= BLOCK_TOL
    with pytest.raises(ValueError, match="residual=True"):
        make_block(6, (4, 4), 0, filters=8, residual=True)


def test_block_keras_padding_of_an_unknown_size():
    """ "keras" padding: fixed when built, 1 after for an unknown size (as keras.applications)."""
    block = InvertedResidualBlock(4, expansion=2, strides=2, padding="keras", name="blk")
    inputs = keras.Input((None, None, 4))
    model = keras.Model(inputs, block(inputs))
    randomize(model, 0)
    assert block.pads == ((0, 1), (0, 1))
    x = np.random.default_rng(0).normal(size=(1, 7, 7, 4)).astype("float32")
    # One row/column after, then 'valid': (7 + 1 - 3) // 2 + 1 = 3 ('same' would give 4).
    assert model(x).shape == (1, 3, 3, 4)
    known = InvertedResidualBlock(4, expansion=2, strides=2, padding="keras", name="blk2")
    known(np.zeros((1, 7, 7, 4), "float32"))
    assert known.pads is None  # a known size: TensorFlow's 'same'


# ---------------------------------------------------------------------- CIFAR: MobileNetV1
@pytest.fixture(scope="module")
def cifar_pair():
    model = randomize(MobileNetV2(compile=False), 5)  # variant="cifar", f = 8, ReLU
    plain = to_plain(model)
    return model, plain


def conv_sequence(plain):
    """(kind, kernel, c_in, c_out, stride) of every convolution of a plain model."""
    seq = []
    for layer in plain.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            k = layer.kernel.shape
            seq.append(("dw", k[0], k[2], k[2], layer.strides[0]))
        elif isinstance(layer, keras.layers.Conv2D):
            k = layer.kernel.shape
            assert layer.groups == 1
            seq.append(("conv", k[0], k[2], k[3], layer.strides[0]))
    return seq


def v1_sequence():
    seq, c = [("conv", 3, 3, V1_STEM, 1)], V1_STEM
    for dw, stride, pw in V1_LAYERS:
        assert dw == c
        seq += [("dw", 3, dw, dw, stride), ("conv", 1, dw, pw, 1)]
        c = pw
    return seq


def test_cifar_plain_is_mobilenet_v1(cifar_pair):
    model, plain = cifar_pair
    assert model.get_config()["bottleneck_factor"] == 8
    assert conv_sequence(plain) == v1_sequence()
    kinds = [type(layer).__name__ for layer in plain.layers]
    body, head = kinds[1:-2], kinds[-2:]
    assert head == ["GlobalAveragePooling2D", "Dense"]
    assert plain.layers[-1].kernel.shape == (1024, 10)
    # Every convolution is followed by exactly one activation (ReLU, or PReLU where mixed).
    assert len(body) == 2 * len(v1_sequence())
    for conv, act in zip(body[::2], body[1::2], strict=True):
        assert conv in ("Conv2D", "DepthwiseConv2D")  # groups == 1: Keras' own layer
        assert act in ("ReLU", "PReLU")
    assert count_flops(plain) < count_flops(model)
    report = plain.conversion_report
    assert report["flops_after"] == count_flops(plain)
    assert report["max_relative_error"] <= MODEL_TOL


def test_cifar_reserved_signed_channels_pass_prelu_with_slope_one(cifar_pair):
    _, plain = cifar_pair
    for i in range(13):
        names = [f"block_{i}_expand", f"block_{i}_depthwise"]
        for name in names:
            layers = [lyr for lyr in plain.layers if lyr.name.startswith(name + "_")]
            if not layers:
                continue
            (act,) = layers
            if i in CIFAR_RESIDUAL_BLOCKS:
                # The block input is a linear projection: signed, so slope 1 on the reserved.
                c = CIFAR_RESIDUAL_BLOCKS[i]
                assert isinstance(act, keras.layers.PReLU), act.name
                slopes = act.get_weights()[0].reshape(-1)
                np.testing.assert_array_equal(slopes[-c:], 1.0)
                np.testing.assert_array_equal(slopes[:-c], 0.0)
            else:
                assert isinstance(act, keras.layers.ReLU), act.name


@pytest.mark.parametrize("fuse_bn", [True, False])
def test_cifar_plain_equivalence(cifar_pair, fuse_bn):
    model, plain = cifar_pair
    if not fuse_bn:
        plain = to_plain(model, fuse_bn=False)
        assert any(isinstance(lyr, keras.layers.BatchNormalization) for lyr in plain.layers)
    rng = np.random.default_rng(7)
    batches = [(3 * rng.normal(size=(4, 32, 32, 3))).astype("float32") for _ in range(3)]
    assert compare(model, plain, inputs=batches) <= MODEL_TOL


def test_cifar_flops_grow_with_the_bottleneck_factor():
    small = randomize(MobileNetV2(bottleneck_factor=1, alpha=0.5, compile=False), 3)
    wide = randomize(MobileNetV2(bottleneck_factor=2, alpha=0.5, compile=False), 2)
    wider = randomize(MobileNetV2(bottleneck_factor=4, alpha=0.5, compile=False), 4)
    assert count_flops(small) < count_flops(wide) < count_flops(wider)
    plain, wider_plain, small_plain = to_plain(wide), to_plain(wider), to_plain(small)
    # From f = 2 on, fusing a projection with the next expansion costs no more than the pair:
    # both convert to the same MobileNetV1 (alpha 0.5). With f = 1 the narrow bottleneck is
    # cheaper kept: the walker does not fuse, and the plain form keeps the pairs.
    assert conv_sequence(plain) == conv_sequence(wider_plain)
    assert count_flops(plain) == count_flops(wider_plain)
    assert len(conv_sequence(small_plain)) > len(conv_sequence(plain))
    assert count_flops(small_plain) < count_flops(plain)


# ------------------------------------------------------------- keras.applications, ReLU6
@pytest.fixture(scope="module")
def keras_pair():
    source = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(64, 64, 3), weights=None, classes=10
    )
    return amplify(randomize(source, 11)), from_keras_mobilenet_v2(source)


def amplify(model, factor=4.0):
    """BN gamma and beta ×factor: ReLU6 bounds every layer's input and BN renormalises, so
    scaling the images alone keeps most values below 6; this makes many exceed it."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([factor * gamma, factor * beta, mean, var])
    return model


def scaled_batches(shape, count=3, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=(2, *shape))).astype("float32") for _ in range(count)]


def test_keras_mobilenet_v2_relu6_import_and_plain(keras_pair):
    source, mapped = keras_pair
    assert isinstance(mapped, MobileNetV2)
    config = mapped.get_config()
    assert (config["variant"], config["alpha"], config["activation"]) == ("imagenet", 0.35, "relu6")
    assert config["bottleneck_factor"] == 1
    assert mapped.count_params() == source.count_params()
    assert count_flops(mapped) == count_flops(source)
    batches = scaled_batches((64, 64, 3))
    # Scaled images and amplified BN: many pre-activations exceed 6 (ReLU6 clips them), and so
    # do values on the reserved (shortcut) channels, the inputs of residual blocks 2 and 4.
    probes = ["block_1_expand_BN", "block_2_depthwise_BN", "block_1_project_BN"]
    probes.append("block_3_project_BN")
    probe = keras.Model(source.inputs, [source.get_layer(n).output for n in probes])
    values = probe(batches[0], training=False)
    for name, value in zip(probes, values, strict=True):
        assert float(np.mean(np.asarray(value) > 6)) > 0.01, name
    assert mapped.get_layer("block_2").has_residual and mapped.get_layer("block_4").has_residual
    for batch in batches:
        assert max_rel_error(mapped(batch, training=False), source(batch, training=False)) <= (
            EXACT_TOL
        )
    plain = to_plain(mapped, verify_inputs=batches, tolerance=MODEL_TOL)
    assert any(isinstance(layer, ChannelwiseReLU) for layer in plain.layers)
    assert compare(source, plain, inputs=batches) <= MODEL_TOL


def test_a_cap_of_6_on_reserved_channels_would_fail(keras_pair):
    """Negative control: the same plain ops with the reserved channels capped at 6 differ."""
    source, mapped = keras_pair
    ops = plain_ops(mapped)
    capped = 0
    for op in ops:
        if isinstance(op, ConvOp) and op.act is not None and np.isinf(op.act.cap).any():
            if np.isfinite(op.act.cap).any():
                op.act.cap[np.isinf(op.act.cap)] = 6.0
                capped += 1
    assert capped
    spec = (tuple(mapped.inputs[0].shape[1:]), "float32", "images")
    wrong = build_model(ops, spec, fuse_bn=True, name="wrong")
    assert compare(source, wrong, inputs=scaled_batches((64, 64, 3))) > 1e-2


@pytest.mark.slow
def test_keras_mobilenet_v2_odd_and_unknown_sizes_without_top():
    source = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(65, 65, 3), weights=None, include_top=False, pooling="avg"
    )
    amplify(randomize(source, 4))
    mapped = from_keras_mobilenet_v2(source)
    assert mapped.get_config()["pooling"] == "avg" and not mapped.get_config()["include_top"]
    batches = scaled_batches((65, 65, 3), count=2)
    plain = to_plain(mapped, verify_inputs=batches, tolerance=MODEL_TOL)
    assert compare(source, plain, inputs=batches) <= MODEL_TOL

    unknown = keras.applications.MobileNetV2(alpha=0.35, weights=None, include_top=False)
    amplify(randomize(unknown, 5))
    mapped = from_keras_mobilenet_v2(unknown)
    # Keras pads 1 after a stride-2 depthwise convolution when the size is unknown: odd sizes
    # show whether that is kept.
    batches = [scaled_batches(shape, count=1)[0] for shape in ((64, 65, 3), (65, 64, 3))]
    plain = to_plain(mapped, verify_inputs=batches, tolerance=MODEL_TOL)
    for batch in batches:
        expected = unknown(batch, training=False)
        assert max_rel_error(mapped(batch, training=False), expected) <= EXACT_TOL
        assert max_rel_error(plain(batch, training=False), expected) <= MODEL_TOL


def test_imagenet_variant_widths_follow_keras():
    for alpha in (0.35, 1.0, 1.4):
        ours = MobileNetV2(variant="imagenet", alpha=alpha, input_shape=(32, 32, 3), compile=False)
        theirs = keras.applications.MobileNetV2(
            alpha=alpha, input_shape=(32, 32, 3), weights=None, classes=1000
        )
        assert ours.count_params() == theirs.count_params()
        assert [b.filters for b in ours.blocks] == [
            make_divisible(int(c * alpha)) for _, c, n, _ in IMAGENET_SETTINGS for _ in range(n)
        ]


def test_from_keras_refuses_other_models():
    source = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(32, 32, 3), weights=None, include_top=False
    )
    extended = keras.Model(
        source.inputs, keras.layers.Conv2D(4, 1, name="extra_conv")(source.outputs[0])
    )
    with pytest.raises(ConversionError, match="extra_conv"):
        from_keras_mobilenet_v2(extended)
    inputs = keras.Input((32, 32, 3))
    plain_cnn = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="my_conv")(inputs))
    with pytest.raises(ConversionError, match="my_conv"):
        from_keras_mobilenet_v2(plain_cnn)


# ------------------------------------------------------------------- serialisation, arguments
def test_save_load_training_and_plain_forms(tmp_path):
    model = randomize(MobileNetV2(alpha=0.25, bottleneck_factor=2, activation="relu6"), 9)
    plain = to_plain(model)
    x = scaled_batches((32, 32, 3), count=1, scale=3.0)[0]
    for m in (model, plain):
        path = tmp_path / f"{m.name}.keras"
        m.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
        assert type(loaded) is type(m)
        assert max_rel_error(loaded(x, training=False), m(x, training=False)) <= 1e-6
    assert loaded.get_config()["name"] == plain.name


def test_get_config_round_trips():
    model = MobileNetV2(
        variant="imagenet",
        alpha=0.5,
        input_shape=(48, 40, 3),
        classes=5,
        classifier_activation="softmax",
        compile=False,
    )
    config = model.get_config()
    again = MobileNetV2.from_config(config)
    assert again.get_config() == config
    assert again.count_params() == model.count_params()
    assert [b.get_config() for b in again.blocks] == [b.get_config() for b in model.blocks]
    block = model.get_layer("block_3")
    clone = InvertedResidualBlock.from_config(block.get_config())
    assert clone.get_config() == block.get_config()
    assert block.get_config()["padding"] == "keras" and block.bn_epsilon == 1e-3


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(variant="mobile"), "variant"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=True), "alpha"),
        (dict(bottleneck_factor=0), "bottleneck_factor"),
        (dict(bottleneck_factor=1.5), "bottleneck_factor"),
        (dict(activation="gelu"), "activation"),
        (dict(input_shape=(8, 8, 3)), "input_shape"),
        (dict(variant="imagenet", input_shape=(16, 16, 3)), "input_shape"),
        (dict(pooling="min"), "pooling"),
        (dict(classes=0), "classes"),
        (dict(weights="imagenet"), "weights"),
    ],
)
def test_builder_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        MobileNetV2(compile=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(filters=0), "filters"),
        (dict(filters=4, expansion=0), "expansion"),
        (dict(filters=4, strides=3), "strides"),
        (dict(filters=4, bottleneck_factor=0), "bottleneck_factor"),
        (dict(filters=4, activation="swish"), "activation"),
        (dict(filters=4, strides=2, residual=True), "residual"),
        (dict(filters=4, residual="yes"), "residual"),
        (dict(filters=4, padding="valid"), "padding"),
        (dict(filters=4, bn_epsilon=0), "bn_epsilon"),
        (dict(filters=4, bn_momentum=1.0), "bn_momentum"),
    ],
)
def test_block_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        InvertedResidualBlock(**kwargs)


def test_block_input_must_split_by_the_bottleneck_factor():
    with pytest.raises(ValueError, match="bottleneck_factor"):
        make_block(6, (4, 4), 0, filters=4, expansion=2, bottleneck_factor=4)
