"""Blocks against NumPy references of the DMRNet paper's equations (random weights, random BN)."""

import itertools

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

from keras_dmr.layers import ParallelBranchBlock, merge_and_run_matrix
from keras_dmr.layers.conv import BN_EPSILON

TOL = 1e-5  # float32 relative error


# ---------------------------------------------------------------------------- NumPy reference
def np_conv(x, kernel, strides=1, groups=1):
    """NHWC convolution with TensorFlow's 'same' padding, in float64."""
    n, h, w, c = x.shape
    kh, kw, cin_g, cout = kernel.shape
    oh, ow = -(-h // strides), -(-w // strides)
    ph = max((oh - 1) * strides + kh - h, 0)
    pw = max((ow - 1) * strides + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, cout))
    og = cout // groups
    for g in range(groups):
        xs = xp[..., g * cin_g : (g + 1) * cin_g]
        ks = kernel[..., g * og : (g + 1) * og]
        for i, j in itertools.product(range(kh), range(kw)):
            patch = xs[:, i : i + oh * strides : strides, j : j + ow * strides : strides, :]
            out[..., g * og : (g + 1) * og] += patch @ ks[i, j]
    return out


def np_bn(x, gamma, beta, mean, var):
    return gamma * (x - mean) / np.sqrt(var + BN_EPSILON) + beta


def np_branch(x, unit_weights, strides):
    """A basic branch, conv-BN-ReLU-conv-BN, from the block's split-layout weights."""
    (k1,), bn1 = unit_weights[0]
    (k2,), bn2 = unit_weights[1]
    h = np.maximum(np_bn(np_conv(x, k1, strides), *bn1), 0)
    return np_bn(np_conv(h, k2), *bn2)


def unit_params(block):
    """Per branch, per unit: (conv kernels, BN params) in float64."""
    w = block.branch_weights()
    out = []
    for branch in w["branches"]:
        out.append(
            [
                (
                    [np.float64(k) for lyr in unit[:-1] for k in lyr],
                    [np.float64(p) for p in unit[-1]],
                )
                for unit in branch
            ]
        )
    proj = [
        ([np.float64(k) for lyr in unit[:-1] for k in lyr], [np.float64(p) for p in unit[-1]])
        for unit in w["projection"]
    ]
    return out, proj


# -------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_merge_and_run_matrix_is_idempotent(k):
    m = merge_and_run_matrix(k, 5)
    np.testing.assert_allclose(m @ m, m, atol=1e-15)
    assert m.shape == (5 * k, 5 * k)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)  # an average: rows sum to one
    if k > 1:
        assert not np.allclose(m, np.eye(5 * k))


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("strides,d_in,d", [(1, 6, 6), (2, 4, 6)])
def test_merge_and_run_block_matches_eq3(k, strides, d_in, d, rng):
    """x_k' = ReLU(H_k(x_k) + skip(mean_j x_j)), Eq. 3 and its K-branch form."""
    block = ParallelBranchBlock(d, branches=k, mapping="merge_and_run", strides=strides)
    x = rng.normal(size=(3, 7, 7, k * d_in)).astype("float32")
    block(x)
    randomize(block, seed=k)
    branches, proj = unit_params(block)

    def reference(xb):
        # Eq. 3 through the matrix: the stacked skip is M·x, the mean in every branch slot.
        merged = (np.float64(xb) @ merge_and_run_matrix(k, d_in).T)[..., :d_in]
        if proj:
            (pk,), pbn = proj[0]
            merged = np_bn(np_conv(merged, pk, strides), *pbn)
        xs = np.split(np.float64(xb), k, axis=-1)
        outs = [
            np.maximum(np_branch(xi, bw, strides) + merged, 0)
            for xi, bw in zip(xs, branches, strict=True)
        ]
        return np.concatenate(outs, -1)

    for xb in (x, rng.normal(size=x.shape).astype("float32")):  # several batches
        got = keras.ops.convert_to_numpy(block(xb, training=False))
        assert max_rel_error(got, reference(xb)) < TOL


def test_vanilla_assembly_matches_eq2(rng):
    """x' = ReLU(H_a(x) + H_b(x) + x) — both branches read the same input."""
    block = ParallelBranchBlock(5, branches=2, mapping="vanilla")
    x = rng.normal(size=(2, 6, 6, 5)).astype("float32")
    block(x)
    randomize(block, seed=3)
    branches, _ = unit_params(block)
    expected = np.maximum(sum(np_branch(np.float64(x), bw, 1) for bw in branches) + x, 0)
    got = keras.ops.convert_to_numpy(block(x, training=False))
    assert max_rel_error(got, expected) < TOL


def test_identity_mapping_is_k_separate_residual_blocks(rng):
    """Table 7's ablation: with skip = I the K streams never interact."""
    block = ParallelBranchBlock(4, branches=2, mapping="identity", strides=2)
    x = rng.normal(size=(2, 8, 8, 6)).astype("float32")
    block(x)
    randomize(block, seed=5)
    weights = block.branch_weights()
    parts = []
    for b, xi in enumerate(np.split(x, 2, axis=-1)):
        single = ParallelBranchBlock(4, branches=1, mapping="identity", strides=2)
        single(xi)
        single.set_branch_weights(
            {"branches": [weights["branches"][b]], "projection": [weights["projection"][b]]}
        )
        parts.append(keras.ops.convert_to_numpy(single(xi, training=False)))
    got = keras.ops.convert_to_numpy(block(x, training=False))
    assert max_rel_error(got, np.concatenate(parts, -1)) < TOL


CASES = [
    ("merge_and_run", "basic", 2, 1),
    ("merge_and_run", "basic", 3, 2),
    ("merge_and_run", "bottleneck", 2, 2),
    ("merge_and_run", "resnext", 2, 2),
    ("merge_and_run", "xception", 2, 2),
    ("identity", "basic", 2, 2),
    ("identity", "xception", 3, 1),
    ("vanilla", "basic", 2, 2),
    ("vanilla", "resnext", 4, 1),
    ("merge_and_run", "basic", 1, 2),
]


@pytest.mark.parametrize("mapping,branch,k,strides", CASES)
def test_grouped_implementation_equals_split(mapping, branch, k, strides, rng):
    """Fig. 5's single grouped convolution computes what K separate convolutions compute, and
    the two forms exchange weights."""
    kw = dict(
        branches=k, mapping=mapping, branch=branch, strides=strides, groups=2, bottleneck_width=8
    )
    split = ParallelBranchBlock(16, implementation="split", **kw)
    grouped = ParallelBranchBlock(16, implementation="grouped", **kw)
    c_in = 8 * (k if mapping != "vanilla" else 1)
    x = rng.normal(size=(2, 8, 8, c_in)).astype("float32")
    split(x)
    grouped(x)
    randomize(split, seed=7)
    grouped.set_branch_weights(split.branch_weights())
    for _ in range(2):
        xb = rng.normal(size=x.shape).astype("float32")
        a = keras.ops.convert_to_numpy(split(xb, training=False))
        b = keras.ops.convert_to_numpy(grouped(xb, training=False))
        assert max_rel_error(b, a) < TOL
    # and back: grouped → split layout is lossless
    back = grouped.branch_weights()
    for wa, wb in zip(
        keras.tree.flatten(split.branch_weights()), keras.tree.flatten(back), strict=True
    ):
        np.testing.assert_array_equal(wa, wb)


def test_block_config_round_trips():
    block = ParallelBranchBlock(
        8,
        branches=3,
        mapping="vanilla",
        branch="resnext",
        strides=2,
        groups=2,
        bottleneck_width=4,
        implementation="grouped",
        name="b",
    )
    clone = ParallelBranchBlock.from_config(block.get_config())
    assert clone.get_config() == block.get_config()


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(branches=0), "branches"),
        (dict(mapping="sum"), "mapping"),
        (dict(branch="dense"), "branch"),
        (dict(implementation="fast"), "implementation"),
    ],
)
def test_block_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ParallelBranchBlock(8, **kwargs)


def test_block_rejects_channels_not_divisible_by_branches():
    with pytest.raises(ValueError, match="multiple of `branches`"):
        ParallelBranchBlock(8, branches=3)(np.zeros((1, 4, 4, 8), "float32"))


def test_the_grouped_convolution_probe_runs_while_a_function_is_traced_again():
    """The probe of TensorFlow's grouped kernels may first run while a function is retraced
    (an exporter's ``tf.saved_model.save``): it must not create variables there, which
    TensorFlow refuses on a non-first trace, and must answer as it does eagerly."""
    tf = pytest.importorskip("tensorflow")
    from keras_dmr.layers import conv

    conv.native_grouped_conv_works.cache_clear()
    eager = conv.native_grouped_conv_works()
    answers = []

    @tf.function
    def traced(x):
        conv.native_grouped_conv_works.cache_clear()
        answers.append(conv.native_grouped_conv_works())
        return x

    traced(tf.ones(1))
    traced(tf.ones(2))  # a second trace
    assert answers == [eager, eager]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_grouped_convolutions_ask_the_probe_in_their_own_dtype(dtype, monkeypatch):
    """oneDNN takes a dtype only where the CPU has instructions for it: a Xeon without
    AVX512-FP16 runs float32 grouped convolutions natively and leaves float16 ones to Eigen,
    whose filter gradient refuses groups (CI: ``mixed_float16`` training of DMRNeXt failed with
    "filter_size does not have enough elements"). Where only float32 passes the probe (forced
    here), a convolution in ``dtype`` must trace split, one Conv2D per group."""
    tf = pytest.importorskip("tensorflow")
    from keras_dmr.layers import conv

    asked = []

    def float32_only(dtype="float32"):
        asked.append(dtype)
        return dtype == "float32"

    monkeypatch.setattr(conv, "native_grouped_conv_works", float32_only)

    def grouped_conv2d_ops(layer_dtype):
        layer = conv.GroupedConv2D(8, 3, groups=4, padding="same", dtype=layer_dtype)
        x = tf.ones((1, 6, 6, 8), keras.backend.standardize_dtype(layer.compute_dtype))
        graph = tf.function(layer).get_concrete_function(x).graph
        ops = [op for op in graph.get_operations() if op.type == "Conv2D"]
        return [op for op in ops if op.inputs[0].shape[-1] != op.inputs[1].shape[2]], len(ops)

    grouped, total = grouped_conv2d_ops("float32")
    assert (len(grouped), total) == (1, 1)
    assert set(asked) == {"float32"}
    asked.clear()
    grouped, total = grouped_conv2d_ops(keras.DTypePolicy(f"mixed_{dtype}"))
    assert (grouped, total) == ([], 4)
    assert set(asked) == {dtype}


def test_the_grouped_convolution_probe_runs_the_filter_gradient():
    """The probe runs under ``tf.init_scope``, which pauses gradient tapes: a tape's gradient
    there is None, so the probe never saw the grouped filter gradient that TensorFlow's Eigen
    kernels refuse (a VNNI Xeon's float16). Its gradient op, run there, computes the tape's
    gradient (dense kernel: every backend runs it); and a refusing gradient makes it answer no."""
    tf = pytest.importorskip("tensorflow")
    from keras_dmr.layers import conv

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 5, 5, 3)), "float32")
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 4)), "float32")
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
    expected = tape.gradient(loss, kernel).numpy()
    with tf.init_scope():
        got = conv.grouped_filter_gradient(x, kernel).numpy()
    assert max_rel_error(expected, got) <= 1e-5


def test_the_grouped_convolution_probe_answers_no_when_the_gradient_is_refused(monkeypatch):
    tf = pytest.importorskip("tensorflow")
    from keras_dmr.layers import conv

    def refused(x, kernel):
        raise tf.errors.InvalidArgumentError(
            None, None, "filter_size does not have enough elements"
        )

    monkeypatch.setattr(conv, "grouped_filter_gradient", refused)
    conv.native_grouped_conv_works.cache_clear()
    try:
        assert conv.native_grouped_conv_works("float32") is False
    finally:
        conv.native_grouped_conv_works.cache_clear()
