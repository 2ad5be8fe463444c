"""RepVGG blocks with a reserving ratio (RMNet paper Sec. 4.3, Fig. 5) and the RepVGG builder:
the block against a NumPy reference of its formula, its one-convolution plain form, and the
plain network of the whole model (same output, same structure for every r < 1)."""

import itertools

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_dmr.convert import ConversionError, to_plain
from keras_dmr.convert.plain import PlainContext
from keras_dmr.layers.conv import BN_EPSILON
from keras_dmr.layers.repvgg import RepVGGBlock
from keras_dmr.models.repvgg import REPVGG_STAGES, RepVGG, repvgg_plan

TOL = 1e-5  # float32 relative error of one block
MODEL_TOL = 1e-4  # worst case through a dozen float32 layers
SMALL = dict(blocks_per_stage=(2, 2, 2, 2), base_width=8, compile=False)


# ---------------------------------------------------------------------------- NumPy reference
def np_conv(x, kernel, strides=1):
    """NHWC convolution with TensorFlow's 'same' padding, float64."""
    n, h, w, _ = x.shape
    kh, kw, _, c_out = kernel.shape
    oh, ow = -(-h // strides), -(-w // strides)
    ph, pw = max((oh - 1) * strides + kh - h, 0), max((ow - 1) * strides + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, c_out))
    for i, j in itertools.product(range(kh), range(kw)):
        out += xp[:, i : i + oh * strides : strides, j : j + ow * strides : strides] @ kernel[i, j]
    return out


def np_bn(x, gamma, beta, mean, var):
    return gamma * (x - mean) / np.sqrt(var + BN_EPSILON) + beta


def reference(block, x, c_in, filters, strides, reserve_ratio):
    """``[x[:n], ReLU(BN3(conv3(x)) + BN1(conv1(x)) + BNid(x[n:]))]``, n = floor(r·C)."""
    x = np.float64(x)
    n = int(np.floor(reserve_ratio * filters + 1e-9))
    if n == filters:
        return x
    weights = {w.path.split("/", 1)[1]: np.float64(w.numpy()) for w in block.weights}

    def bn(z, name):
        return np_bn(
            z,
            *(weights[f"{name}/{p}"] for p in ("gamma", "beta", "moving_mean", "moving_variance")),
        )

    y = bn(np_conv(x, weights["conv3x3/kernel"], strides), "bn3x3")
    y = y + bn(np_conv(x, weights["conv1x1/kernel"], strides), "bn1x1")
    if strides == 1 and c_in == filters:
        y = y + bn(x[..., n:], "bn_identity")
    y = np.maximum(y, 0)
    return np.concatenate([x[..., :n], y], axis=-1) if n else y


def run_plain_ops(ops, x):
    """Evaluate a block's plain ConvOps in float64."""
    y = np.float64(x)
    for op in ops:
        assert op.padding == "same"
        y = np_conv(y, op.kernel, op.strides) + op.bias
        y = y if op.act is None else op.act(y)
    return y


def make_block(c_in, filters, strides, reserve_ratio, size, seed):
    block = RepVGGBlock(filters, strides=strides, reserve_ratio=reserve_ratio, name="blk")
    block(np.zeros((1, size, size + 1, c_in), "float32"))
    return randomize(block, seed)


def check_plain_block(block, x, nonnegative):
    ctx = PlainContext(input_hw=x.shape[1:3], input_nonnegative=nonnegative)
    ops = block.plain_ops(ctx)
    if block.reserved == block.filters:
        assert ops == []
    else:
        assert len(ops) == 1 and ops[0].kernel_size == (3, 3) and ops[0].strides == block.strides
        assert ops[0].act.nonnegative == (nonnegative or block.reserved == 0)
    expected = keras.ops.convert_to_numpy(block(x, training=False))
    assert max_rel_error(run_plain_ops(ops, x), expected) < TOL


# ------------------------------------------------------------------------------- block tests
BLOCK_CASES = [
    # (c_in, filters, strides, reserve_ratio)
    *[(8, 8, 1, r) for r in (0.0, 0.25, 0.5, 1.0)],
    (4, 8, 1, 0.0),  # width change: no identity branch
    (8, 8, 2, 0.0),  # stride 2: no identity branch
    (4, 6, 2, 0.0),
]


@pytest.mark.parametrize("size", [6, 7])  # even and odd: different 'same' padding with stride 2
@pytest.mark.parametrize("c_in,filters,strides,reserve_ratio", BLOCK_CASES)
def test_block_matches_formula_and_converts(c_in, filters, strides, reserve_ratio, size, rng):
    block = make_block(c_in, filters, strides, reserve_ratio, size, seed=size + c_in)
    assert block.reserved == int(reserve_ratio * filters)
    for nonnegative in (True, False):  # a previous block's ReLU output, or a signed input
        x = rng.normal(size=(2, size, size + 1, c_in)).astype("float32")
        x = np.abs(x) if nonnegative else x
        got = keras.ops.convert_to_numpy(block(x, training=False))
        assert got.shape == (2, -(-size // strides), -(-(size + 1) // strides), filters)
        want = reference(block, x, c_in, filters, strides, reserve_ratio)
        assert max_rel_error(got, want) < TOL
        check_plain_block(block, x, nonnegative)


@settings(max_examples=25, deadline=None)
@given(
    filters=st.integers(1, 6),
    strides=st.sampled_from([1, 2]),
    same_width=st.booleans(),
    reserve_ratio=st.floats(0, 1, allow_subnormal=False),  # ratios, not denormals
    height=st.integers(3, 8),
    width=st.integers(3, 8),
    nonnegative=st.booleans(),
)
def test_block_conversion_property(
    filters, strides, same_width, reserve_ratio, height, width, nonnegative
):
    """Any small block re-parameterises into one 3×3 convolution (or none) exactly."""
    c_in = filters if same_width else filters + 1
    if strides != 1 or not same_width:
        reserve_ratio = 0.0
    block = RepVGGBlock(filters, strides=strides, reserve_ratio=reserve_ratio)
    x = np.random.default_rng(height * 10 + width).normal(size=(2, height, width, c_in))
    x = (np.abs(x) if nonnegative else x).astype("float32")
    block(x)
    randomize(block, seed=filters)
    want = reference(block, x, c_in, filters, strides, reserve_ratio)
    assert max_rel_error(keras.ops.convert_to_numpy(block(x, training=False)), want) < TOL
    check_plain_block(block, x, nonnegative)


def test_block_weights_and_config():
    full = RepVGGBlock(8)
    full.build((None, 5, 5, 8))
    half = RepVGGBlock(8, reserve_ratio=0.5, name="half")
    half.build((None, 5, 5, 8))
    # Reserving half the channels halves every branch's outputs.
    assert [tuple(w.shape) for w in half.trainable_weights][:2] == [(3, 3, 8, 4), (4,)]
    assert half.count_params() * 2 == full.count_params()
    clone = RepVGGBlock.from_config(half.get_config())
    assert clone.get_config() == half.get_config() and clone.reserved == 4
    identity = RepVGGBlock(8, reserve_ratio=1.0)
    identity.build((None, 5, 5, 8))
    assert identity.count_params() == 0


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(filters=0), "filters"),
        (dict(filters=8, strides=3), "strides"),
        (dict(filters=8, reserve_ratio=-0.1), "reserve_ratio"),
        (dict(filters=8, reserve_ratio=1.5), "reserve_ratio"),
        (dict(filters=8, reserve_ratio="half"), "reserve_ratio"),
        (dict(filters=8, strides=2, reserve_ratio=0.5), "reserve_ratio"),
    ],
)
def test_block_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        RepVGGBlock(**kwargs)


def test_block_reserving_needs_equal_width():
    with pytest.raises(ValueError, match="`reserve_ratio`"):
        RepVGGBlock(8, reserve_ratio=0.5)(np.zeros((1, 4, 4, 6), "float32"))


# ------------------------------------------------------------------------------- model tests
def plain_listing(plain):
    """(kernel, strides, groups, channels in, channels out) of every convolution."""
    return [
        (lyr.kernel_size, lyr.strides, lyr.groups, lyr.kernel.shape[2], lyr.filters)
        for lyr in plain.layers
        if isinstance(lyr, keras.layers.Conv2D)
    ]


@pytest.mark.parametrize("fuse_bn", [True, False])
def test_to_plain_equivalence_and_same_structure_for_every_ratio(fuse_bn, rng):
    shape = (15, 15, 3)  # 15 → 8 → 4 → 2: odd and even sizes at the stride-2 blocks
    batches = [rng.normal(size=(3, *shape)).astype("float32") for _ in range(3)]
    listings, params, trained = [], [], []
    for seed, r in enumerate((0.0, 0.25, 0.5, 0.75)):
        model = randomize(RepVGG(reserve_ratio=r, input_shape=shape, classes=5, **SMALL), seed)
        # to_plain runs both models on the batches and raises above the tolerance.
        plain = to_plain(model, fuse_bn=fuse_bn, verify_inputs=batches, tolerance=MODEL_TOL)
        assert plain.conversion_report["max_relative_error"] <= MODEL_TOL
        kinds = {type(lyr).__name__ for lyr in plain.layers} - {"InputLayer"}
        expected = {"Conv2D", "ReLU", "GlobalAveragePooling2D", "Dense"}  # Keras' own Conv2D
        assert kinds == (expected if fuse_bn else expected | {"BatchNormalization"})
        convs = [lyr for lyr in plain.layers if isinstance(lyr, keras.layers.Conv2D)]
        if not fuse_bn:  # an identity BN (Eq. 3) after every merged convolution
            bns = [lyr for lyr in plain.layers if isinstance(lyr, keras.layers.BatchNormalization)]
            assert len(bns) == len(convs) and not any(c.use_bias for c in convs)
        listings.append(plain_listing(plain))
        params.append(plain.count_params())
        trained.append(model.count_params())
    assert trained == sorted(trained, reverse=True) and len(set(trained)) == 4
    assert all(listing == listings[0] for listing in listings)
    assert len(set(params)) == 1
    assert {k for k, *_ in listings[0]} == {(3, 3)} and {g for _, _, g, *_ in listings[0]} == {1}
    widths = [c_out for *_, c_out in listings[0]]
    assert widths == [8] * 3 + [16] * 3 + [32] * 3 + [64] * 3


def test_reserve_ratio_one_is_half_depth(rng):
    shape = (8, 8, 3)
    model = randomize(RepVGG(reserve_ratio=1.0, input_shape=shape, **SMALL), seed=4)
    plain = to_plain(model)
    # The first block of every pair is the identity: 4 stage blocks and 4 entry blocks remain.
    assert len(plain_listing(plain)) == 8
    x = rng.normal(size=(2, *shape)).astype("float32")
    assert max_rel_error(plain(x, training=False), model(x, training=False)) <= MODEL_TOL


@pytest.mark.parametrize(
    "variant,shape,convs",
    [("cifar", (8, 8, 3), 20), ("imagenet", (33, 33, 3), 21)],  # 33 → 17 → 9 → 5 → 3 → 1
)
def test_depth_counts_layers(variant, shape, convs, rng):
    """RepVGG-21: [4,4,4,4] blocks plus five; CIFAR counts the classifier among the five."""
    model = RepVGG(21, reserve_ratio=0.25, variant=variant, input_shape=shape, base_width=4)
    assert model.depth == 21 and model.name == "rm_repvgg21_r25"
    assert len(model.blocks) == convs
    assert sum(b.strides == 2 for b in model.blocks) == (3 if variant == "cifar" else 5)
    assert [b.reserved for b in model.blocks if b.name.startswith("stage1")] == [1, 0, 1, 0]
    plain = to_plain(randomize(model, seed=6))
    dense = [lyr for lyr in plain.layers if isinstance(lyr, keras.layers.Dense)]
    assert len(plain_listing(plain)) == convs and len(dense) == 1
    assert convs + (variant == "cifar") == 21
    x = rng.normal(size=(2, *shape)).astype("float32")
    assert max_rel_error(plain(x, training=False), model(x, training=False)) <= MODEL_TOL


def test_paper_depths():
    for depth, blocks in REPVGG_STAGES.items():
        assert repvgg_plan(depth) == (depth, blocks)
        assert sum(blocks) + 5 == depth and len(set(blocks)) == 1
    assert repvgg_plan(21, (2, 4, 6, 2)) == (19, (2, 4, 6, 2))
    model = RepVGG(37, base_width=2, input_shape=(8, 8, 3), compile=False)
    assert len(model.blocks) == 36 and model.name == "repvgg37"


def test_keras_applications_arguments(rng):
    feats = RepVGG(input_shape=(8, 8, 3), include_top=False, pooling="avg", **SMALL)
    assert feats.output_shape == (None, 64)
    spatial = RepVGG(input_shape=(16, 16, 3), include_top=False, **SMALL)
    assert spatial.output_shape == (None, 2, 2, 64)
    soft = RepVGG(input_shape=(8, 8, 3), classes=3, classifier_activation="softmax", **SMALL)
    p = soft(rng.normal(size=(2, 8, 8, 3)).astype("float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(p).sum(-1), 1, rtol=1e-5)
    compiled = RepVGG(input_shape=(8, 8, 3), blocks_per_stage=(2, 2, 2, 2), base_width=4)
    assert compiled.compiled and compiled.loss.from_logits


def test_unknown_input_size_cannot_convert():
    model = RepVGG(input_shape=(None, None, 3), **SMALL)
    with pytest.raises(ConversionError, match="input_shape"):
        to_plain(model, verify=False)


def test_save_load_safe_mode(tmp_path, rng):
    model = randomize(RepVGG(reserve_ratio=0.5, input_shape=(8, 8, 3), **SMALL), seed=9)
    config = model.get_config()
    assert RepVGG.from_config(config).get_config() == config
    plain = to_plain(model)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    for source in (model, plain):
        path = tmp_path / f"{source.name}.keras"
        source.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        assert type(loaded) is type(source)
        np.testing.assert_array_equal(loaded(x, training=False), source(x, training=False))


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(depth=22), "depth"),
        (dict(depth=True), "depth"),
        (dict(blocks_per_stage=(2, 2, 2)), "blocks_per_stage"),
        (dict(blocks_per_stage=(1, 2, 2, 2)), "blocks_per_stage"),
        (dict(blocks_per_stage=(0, 2, 2, 2)), "blocks_per_stage"),
        (dict(reserve_ratio=-0.5), "reserve_ratio"),
        (dict(reserve_ratio=2), "reserve_ratio"),
        (dict(base_width=0), "base_width"),
        (dict(base_width=8.5), "base_width"),
        (dict(variant="svhn"), "variant"),
        (dict(classes=0), "classes"),
        (dict(pooling="sum", include_top=False), "pooling"),
        (dict(input_shape=(4, 4, 3)), "input_shape"),
        (dict(input_shape=(16, 16, 3), variant="imagenet"), "input_shape"),
        (dict(input_shape=(16, 16)), "input_shape"),
    ],
)
def test_builder_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        RepVGG(compile=False, **kwargs)
