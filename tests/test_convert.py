"""RM conversion of the merge-and-run family and ResNets: equivalence, structure, costs, errors.

Tolerances: float32 models against their float64-converted plain forms; the measured maximum
relative error is ~1e-7 to 1e-6, asserted below 1e-5 (typical) and at 1e-4 inside ``to_plain``.
"""

import os

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_dmr
from keras_dmr.analysis.flops import count_flops
from keras_dmr.convert import ConversionError, compare, recalibrate_bn, to_plain
from keras_dmr.layers import ParallelBranchBlock

TYPICAL = 1e-5
PLAIN_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.ReLU,
    keras.layers.PReLU,
    keras.layers.BatchNormalization,
    keras.layers.MaxPooling2D,
    keras.layers.ZeroPadding2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.Dense,
)


def batches(shape, n=3, size=4, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=(size, *shape))).astype("float32") for _ in range(n)]


def assert_plain(model, fuse_bn=True):
    for layer in model.layers:
        assert isinstance(layer, PLAIN_LAYERS), f"{layer.name} ({type(layer).__name__})"
        if fuse_bn:
            assert not isinstance(layer, keras.layers.BatchNormalization)
    # A chain: every layer has one inbound layer, the previous one.
    for before, after in zip(model.layers, model.layers[1:], strict=False):
        assert after.input is before.output, f"{after.name} does not follow {before.name}"


FAMILIES = {
    "resnet20": lambda s: keras_dmr.ResNet(depth=20, input_shape=s, compile=False),
    "resnet29_bottleneck": lambda s: keras_dmr.ResNet(
        depth=29, branch="bottleneck", widths=(8, 16, 32), input_shape=s, compile=False
    ),
    "dmrnet14_k2": lambda s: keras_dmr.DMRNet(depth=14, input_shape=s, compile=False),
    "dmrnet8_k3_grouped": lambda s: keras_dmr.DMRNet(
        depth=8, branches=3, implementation="grouped", input_shape=s, compile=False
    ),
    "dmrnet8_k4": lambda s: keras_dmr.DMRNet(depth=8, branches=4, input_shape=s, compile=False),
    "dmrnet8_identity_unshared": lambda s: keras_dmr.DMRNet(
        depth=8,
        mapping="identity",
        share_stem_and_head=False,
        input_shape=s,
        compile=False,
    ),
    "dvanet14_k2": lambda s: keras_dmr.DVANet(depth=14, input_shape=s, compile=False),
    "dvanet8_k3": lambda s: keras_dmr.DVANet(depth=8, branches=3, input_shape=s, compile=False),
    "dmrnet14_xception": lambda s: keras_dmr.DMRNet(
        depth=14, branch="xception", input_shape=s, compile=False
    ),
    "dmrnext11": lambda s: keras_dmr.DMRNeXt(
        depth=11,
        cardinality=4,
        bottleneck_width=4,
        widths=(32, 64, 128),
        stem_filters=16,
        input_shape=s,
        compile=False,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("downsample", ["dirac", "prelu"])
def test_family_converts_with_equal_outputs(family, downsample):
    shape = (32, 32, 3) if downsample == "dirac" else (33, 31, 3)  # both parities
    model = randomize(FAMILIES[family](shape), seed=3)
    for fuse_bn in (True, False):
        plain = to_plain(model, fuse_bn=fuse_bn, downsample=downsample)
        assert_plain(plain, fuse_bn)
        assert plain.conversion_report["max_relative_error"] <= TYPICAL
        assert compare(model, plain, inputs=batches(shape, seed=7)) <= TYPICAL


@pytest.mark.parametrize(
    "depth", [18, 34, *(pytest.param(d, marks=pytest.mark.slow) for d in (50, 101, 152))]
)
def test_imagenet_resnets_convert(depth):
    shape = (64, 64, 3) if depth <= 50 else (33, 35, 3)
    model = randomize(
        keras_dmr.ResNet(
            depth=depth, variant="imagenet", input_shape=shape, classes=7, compile=False
        ),
        seed=depth,
    )
    plain = to_plain(model)
    assert_plain(plain)
    error = compare(model, plain, inputs=batches(shape, n=2, size=2, seed=1))
    assert error <= TYPICAL
    convs = [lyr for lyr in plain.layers if isinstance(lyr, keras.layers.Conv2D)]
    blocks = len(model.blocks)
    units = 2 if depth < 50 else 3
    assert len(convs) == 1 + units * blocks  # stem + every branch layer, no shortcut layer


def test_plain_model_is_conv_relu_chain():
    model = randomize(keras_dmr.ResNet(depth=20, compile=False), seed=0)
    plain = to_plain(model)
    kinds = [type(lyr).__name__ for lyr in plain.layers[1:-2]]
    # conv, relu alternating: 1 stem + 18 block convs
    assert kinds == ["Conv2D", "ReLU"] * 19  # Keras' own Conv2D: no group, no keras_dmr layer
    assert [type(lyr).__name__ for lyr in plain.layers[-2:]] == ["GlobalAveragePooling2D", "Dense"]


def _block_kernel_params(plain, block):
    return sum(
        int(np.prod(lyr.kernel.shape))
        for lyr in plain.layers
        if isinstance(lyr, keras.layers.Conv2D) and lyr.name.startswith(f"{block}_")
    )


@pytest.mark.parametrize("size", [32, 33])
def test_downsample_dirac_has_three_quarters_of_prelu_parameters(size):
    """Appendix A.1: 81·C² (Fig. 9b) against 108·C² (Fig. 9a) for a C → 2C block."""
    model = randomize(keras_dmr.ResNet(depth=8, input_shape=(size, size, 3), compile=False), 0)
    dirac = to_plain(model, downsample="dirac")
    prelu = to_plain(model, downsample="prelu")
    for block, c in (("stage2_block1", 16), ("stage3_block1", 32)):
        assert _block_kernel_params(dirac, block) == 81 * c * c
        assert _block_kernel_params(prelu, block) == 108 * c * c
        assert _block_kernel_params(dirac, block) / _block_kernel_params(prelu, block) == 0.75
    assert any(isinstance(lyr, keras.layers.PReLU) for lyr in prelu.layers)
    assert not any(isinstance(lyr, keras.layers.PReLU) for lyr in dirac.layers)


def test_count_flops_matches_a_hand_count():
    model = keras_dmr.ResNet(depth=8, input_shape=(32, 32, 3), classes=10, compile=False)
    # stem 3→16; stage1: 2 convs 16→16 at 32²; stage2: 16→32 s2 + 32→32 + 1×1 proj at 16²;
    # stage3: 32→64 s2 + 64→64 + proj at 8²; Dense 64→10.
    hand = (
        32 * 32 * 9 * 3 * 16
        + 2 * 32 * 32 * 9 * 16 * 16
        + 16 * 16 * (9 * 16 * 32 + 9 * 32 * 32 + 16 * 32)
        + 8 * 8 * (9 * 32 * 64 + 9 * 64 * 64 + 32 * 64)
        + 64 * 10
    )
    assert count_flops(model) == hand
    plain = to_plain(model)
    # Plain: each block's conv1 also carries its input (C_in extra outputs), conv2 reads them.
    plain_hand = (
        32 * 32 * 9 * 3 * 16
        + 32 * 32 * (9 * 16 * 32 + 9 * 32 * 16)
        + 16 * 16 * (9 * 16 * 48 + 9 * 48 * 32)
        + 8 * 8 * (9 * 32 * 96 + 9 * 96 * 64)
        + 64 * 10
    )
    assert count_flops(plain) == plain_hand
    assert plain.conversion_report["flops_before"] == hand
    assert plain.conversion_report["flops_after"] == plain_hand


def test_grouped_structure_survives_conversion():
    """DMRNet's branches stay a K-group convolution in the plain model (reserved channels
    interleaved per group); the merge convolution reads all groups."""
    model = randomize(keras_dmr.DMRNet(depth=8, branches=2, compile=False), seed=2)
    plain = to_plain(model)
    conv1 = plain.get_layer("stage1_block1_conv1")
    conv2 = plain.get_layer("stage1_block1_conv2")
    assert conv1.groups == 2 and conv1.filters == 64  # 2 × (16 branch + 16 reserved)
    assert conv2.groups == 1 and conv2.filters == 32


def test_fuse_bn_false_keeps_bn_and_recalibration_removes_drift():
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=4)
    plain = to_plain(model, fuse_bn=False)
    convs = [lyr for lyr in plain.layers if isinstance(lyr, keras.layers.Conv2D)]
    bns = [lyr for lyr in plain.layers if isinstance(lyr, keras.layers.BatchNormalization)]
    assert len(bns) == len(convs)
    for conv in convs:  # every conv is followed by its BN
        assert isinstance(
            plain.layers[plain.layers.index(conv) + 1], keras.layers.BatchNormalization
        )
    data = batches((32, 32, 3), n=4, size=16, seed=5, scale=2.0)
    before = [np.asarray(plain(x)) for x in data[:2]]
    reserved = "stage1_block1_conv1_bn"
    bn = plain.get_layer(reserved)
    probe = keras.Model(plain.inputs[0], bn.input)

    def drift():
        """Training-mode BN (batch statistics) against its input on the reserved channels."""
        z = np.asarray(probe(data[0]), np.float64)
        gamma, beta = (np.asarray(w, np.float64) for w in bn.get_weights()[:2])
        mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
        y = gamma * (z - mean) / np.sqrt(var + bn.epsilon) + beta
        return max_rel_error(y[..., 16:], z[..., 16:])

    drift_before = drift()
    counts = recalibrate_bn(plain, data, verbose=0)
    assert counts[reserved] == 16  # the 16 reserved channels, not the 16 branch channels
    after = [np.asarray(plain(x)) for x in data[:2]]
    for a, b in zip(after, before, strict=True):
        assert max_rel_error(a, b) <= TYPICAL  # inference outputs unchanged
    assert drift() < 0.1 < drift_before


def test_recalibrate_bn_needs_bn():
    plain = to_plain(randomize(keras_dmr.ResNet(depth=8, compile=False), 0))
    with pytest.raises(ValueError, match="fuse_bn=False"):
        recalibrate_bn(plain, batches((32, 32, 3), n=1), verbose=0)


def test_recalibrate_bn_and_count_flops_name_bad_input():
    plain = to_plain(randomize(keras_dmr.ResNet(depth=8, compile=False), 0), fuse_bn=False)
    with pytest.raises(ValueError, match=r"`data` must yield image batches of shape \(batch, 32"):
        recalibrate_bn(plain, batches((16, 16, 3), n=1), verbose=0)
    unbuilt = keras.Sequential([keras.layers.Conv2D(2, 3)])
    with pytest.raises(ValueError, match="no defined input.*`input_shape`"):
        keras_dmr.analysis.count_flops(unbuilt)
    assert keras_dmr.analysis.count_flops(unbuilt, input_shape=(5, 5, 3)) == 3 * 3 * 2 * 27


def test_plain_model_saves_and_loads_in_safe_mode(tmp_path):
    model = randomize(keras_dmr.DMRNet(depth=8, compile=False), seed=6)
    for downsample in ("dirac", "prelu"):
        plain = to_plain(model, downsample=downsample)
        path = os.fspath(tmp_path / f"plain_{downsample}.keras")
        plain.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        x = batches((32, 32, 3), n=1)[0]
        np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(plain(x)))


def test_include_top_false_converts():
    model = randomize(
        keras_dmr.DMRNet(depth=8, include_top=False, pooling="avg", compile=False), seed=8
    )
    plain = to_plain(model)
    assert compare(model, plain) <= TYPICAL


# ------------------------------------------------------------------------------------ errors
def _functional(*layers, shape=(16, 16, 3)):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name="custom")


def test_error_names_unknown_layer():
    inputs = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="left")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="right", activation="relu")(inputs)
    a = keras.layers.Conv2D(4, 3, padding="same", name="left2")(keras.layers.ReLU()(a))
    model = keras.Model(inputs, keras.layers.Add(name="joined")([a, b]))
    with pytest.raises(ConversionError, match=r"'joined' \(Add"):
        to_plain(model)


def test_error_names_non_relu_activation():
    model = _functional(
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.Activation("tanh", name="squash"),
    )
    with pytest.raises(ConversionError, match=r"'squash' \(Activation\)"):
        to_plain(model)


def test_error_for_signed_residual_input_when_relu_only():
    """A block straight on the (signed) images: its reserved channels need slope-1 PReLU; a
    ReLU-only conversion must refuse, naming the block."""
    model = randomize(
        _functional(
            ParallelBranchBlock(3, name="first_block"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ),
        seed=0,
    )
    with pytest.raises(ConversionError, match=r"'first_block' \(ParallelBranchBlock\).*negative"):
        to_plain(model, relu_only=True)
    plain = to_plain(model)  # default: slope-1 PReLU keeps the signed input
    assert any(isinstance(lyr, keras.layers.PReLU) for lyr in plain.layers)


def test_error_for_unbuilt_model():
    model = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.ReLU()])
    with pytest.raises(ConversionError, match="not a built"):
        to_plain(model)


def test_failed_verification_raises_with_the_figure(monkeypatch):
    import keras_dmr.convert.plain as plain_module

    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    weights = [w.copy() for w in model.get_weights()]
    monkeypatch.setattr(
        plain_module, "compare", lambda *a, per_output=False, **k: [3e-3] if per_output else 3e-3
    )
    with pytest.raises(ConversionError, match=r"3e-03|0\.003.*tolerance 0\.0001"):
        to_plain(model)
    for a, b in zip(model.get_weights(), weights, strict=True):  # the source is untouched
        np.testing.assert_array_equal(a, b)


def test_bad_downsample_argument():
    model = keras_dmr.ResNet(depth=8, compile=False)
    with pytest.raises(ValueError, match="`downsample` must be one of"):
        to_plain(model, downsample="pool")


# ------------------------------------------------------------------------- property-based
@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    branches=st.integers(1, 3),
    mapping=st.sampled_from(["merge_and_run", "identity", "vanilla"]),
    branch=st.sampled_from(["basic", "bottleneck", "xception", "resnext"]),
    filters=st.sampled_from([4, 8]),
    groups=st.sampled_from([1, 2]),
    stem=st.sampled_from([2, 4]),
    strides=st.sampled_from([1, 2]),
    size=st.integers(5, 9),
    downsample=st.sampled_from(["dirac", "prelu"]),
    fuse_bn=st.booleans(),
    implementation=st.sampled_from(["split", "grouped"]),
)
def test_random_blocks_convert(
    branches,
    mapping,
    branch,
    filters,
    groups,
    stem,
    strides,
    size,
    downsample,
    fuse_bn,
    implementation,
):
    width = filters // 2 if branch in ("bottleneck", "resnext") else None
    stacked = mapping != "vanilla"
    inputs = keras.Input((size, size + 1, 3))
    x = keras.layers.Conv2D(stem * (branches if stacked else 1), 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    for s in (strides, 1):
        x = ParallelBranchBlock(
            filters,
            branches=branches,
            mapping=mapping,
            branch=branch,
            strides=s,
            bottleneck_width=width,
            groups=groups if branch == "resnext" else 1,
            implementation=implementation,
        )(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inputs, keras.layers.Dense(3)(x)), seed=size)
    plain = to_plain(model, downsample=downsample, fuse_bn=fuse_bn)
    assert compare(model, plain, inputs=batches((size, size + 1, 3), n=2, seed=2)) <= TYPICAL


def test_conversion_table_is_current():
    """docs/conversion.md shows docs/data/conversion.json, and a row's counts still hold."""
    import json
    from pathlib import Path

    from tools.conversion_table import FAMILIES, render

    root = Path(__file__).parents[1]
    rows = json.loads((root / "docs/data/conversion.json").read_text())["rows"]
    assert [r["family"] for r in rows] == list(FAMILIES)
    assert render(rows) in (root / "docs/conversion.md").read_text()
    row = next(r for r in rows if r["family"] == "ResNet-56 (CIFAR)")
    model = FAMILIES[row["family"]][0]()
    plain = to_plain(model, verify=False)
    report = plain.conversion_report
    for key in ("params_before", "params_after", "flops_before", "flops_after"):
        assert report[key] == row[key], key
    assert all(r["max_relative_error"] <= 1e-4 for r in rows)
