"""Pruning over the whole graph (issue 28): channel groups read from any functional CNN, ranked
globally, dropped by threshold, ratio or a MACs budget, and the model rebuilt with its weights
sliced. Every model has random weights and random BN statistics (``convert.randomize``)."""

import keras
import numpy as np
import pytest

import keras_dmr
from keras_dmr.analysis import count_flops
from keras_dmr.convert import randomize
from keras_dmr.convert.unfold import unfold
from keras_dmr.errors import ConversionError
from keras_dmr.layers import ParallelBranchBlock
from keras_dmr.prune.channel_groups import build_channel_graph
from keras_dmr.prune.graph_prune import group_importance, prune_channels

L = keras.layers
RNG = np.random.default_rng(0)
BATCHES = [RNG.standard_normal((4, 16, 16, 3)).astype("float32") for _ in range(3)]


def small_graph(seed=0):
    """Every tie the grouping knows: an Add of two producers, a Concatenate, a depthwise
    convolution, a keras.ops addition, Flatten → Dense."""
    x = keras.Input((16, 16, 3), name="pixels")
    a = L.ReLU()(L.BatchNormalization(name="bn_a")(L.Conv2D(8, 3, padding="same", name="a")(x)))
    b = L.BatchNormalization(name="bn_b")(L.Conv2D(8, 1, name="b")(x))
    s = L.ReLU()(L.Add(name="join")([a, b]))
    d = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(s)
    d = L.ReLU()(L.BatchNormalization(name="bn_dw")(d))
    c = L.ReLU()(L.BatchNormalization(name="bn_c")(L.Conv2D(6, 3, strides=2, name="c")(d)))
    e = L.BatchNormalization(name="bn_e")(L.Conv2D(6, 1, name="e")(c))
    c = keras.ops.relu(c + e)
    m = L.Concatenate(name="cat")(
        [c, L.ReLU()(L.BatchNormalization(name="bn_f")(L.Conv2D(4, 1, name="f")(c)))]
    )
    y = L.Dense(5, name="head")(L.Flatten()(L.MaxPooling2D(7)(m)))
    return randomize(keras.Model(x, y, name="small"), seed=seed)


def max_rel_err(a, b, batches=BATCHES):
    return max(
        float(np.abs(a.predict(x, verbose=0) - b.predict(x, verbose=0)).max())
        / float(np.abs(a.predict(x, verbose=0)).max())
        for x in batches
    )


def groups_of(cg, layer, role="out"):
    return {
        g for g, ms in enumerate(cg.members) for m in ms if m.node.name == layer and m.role == role
    }


def test_groups_follow_additions_depthwise_concatenation_and_flatten():
    cg = build_channel_graph(small_graph())
    # The two producers an Add joins share their 8 groups, and so do the depthwise channels.
    assert groups_of(cg, "a") == groups_of(cg, "b") == groups_of(cg, "dw", "param")
    assert len(groups_of(cg, "a")) == 8
    assert groups_of(cg, "c") == groups_of(cg, "e")  # the keras.ops addition
    # The Concatenate's slices are its inputs' groups; Dense reads each through Flatten.
    assert groups_of(cg, "head", "in") == groups_of(cg, "c") | groups_of(cg, "f")
    # The model's output channels and its input channels are fixed.
    assert all(cg.fixed[g] for g in groups_of(cg, "head"))
    assert cg.prunable().sum() == 8 + 6 + 4


def test_nothing_dropped_is_the_same_function_exactly():
    model = small_graph()
    for kwargs in ({"threshold": 0.0}, {"ratio": 0.0}, {"macs": 1.0}):
        pruned = prune_channels(model, **kwargs)
        for x in BATCHES:
            np.testing.assert_array_equal(model.predict(x, verbose=0), pruned.predict(x, verbose=0))
        assert pruned.pruning_report["groups_dropped"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dropping_channels_that_carry_zeros_keeps_the_function(seed):
    """Channels whose every BN has gamma = beta = 0 carry exact zeros everywhere: dropping them
    (and only them) must leave the outputs unchanged, which checks every slice of the rebuild."""
    model = small_graph(seed)
    cg = build_channel_graph(model)
    rng = np.random.default_rng(seed)
    prunable = np.flatnonzero(cg.prunable())
    zeroed = rng.choice(prunable, size=len(prunable) // 2, replace=False)
    for g in zeroed:
        for m in cg.members[g]:
            if isinstance(m.node.operation, L.BatchNormalization):
                bn = m.node.operation
                gamma, beta, mean, var = (np.array(w) for w in bn.get_weights())
                gamma[m.indices] = beta[m.indices] = 0.0
                bn.set_weights([gamma, beta, mean, var])
    pruned = prune_channels(model, threshold=1e-9)
    report = pruned.pruning_report
    assert report["groups_dropped"] == len(zeroed)
    assert report["params_after"] < report["params_before"]
    assert max_rel_err(model, pruned) <= 1e-5


@pytest.mark.parametrize("criterion", ["bn", pytest.param("l2", marks=pytest.mark.slow)])
def test_macs_budget_on_keras_applications_resnet50(criterion):
    model = randomize(
        keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10), seed=3
    )
    pruned = prune_channels(model, criterion=criterion, macs=0.5)
    report = pruned.pruning_report
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    assert report["macs_after"] >= 0.45 * report["macs_before"]  # the budget, not far below
    assert report["macs_after"] == count_flops(pruned)
    x = RNG.standard_normal((2, 64, 64, 3)).astype("float32")
    assert np.isfinite(pruned.predict(x, verbose=0)).all()
    # Shortcut-tied channels went together: every Add's operands still have equal widths.
    for layer in pruned.layers:
        if isinstance(layer, L.Add):
            assert len({tuple(t.shape) for t in layer.input}) == 1


def test_ratio_and_threshold_rank_globally():
    model = small_graph()
    cg = build_channel_graph(model)
    importance = group_importance(cg, "bn")
    finite = np.sort(importance[np.isfinite(importance)])
    pruned = prune_channels(model, threshold=float(finite[3]))
    assert pruned.pruning_report["groups_dropped"] == 3
    half = prune_channels(model, ratio=0.5).pruning_report
    assert half["channels_after"] >= half["channels_before"] / 2


def test_a_plain_model_from_to_plain_prunes_to_a_macs_budget():
    resnet = keras_dmr.prune.with_skip_bn(keras_dmr.ResNet(depth=8, widths=(8, 16, 32)))
    randomize(resnet, seed=4)
    plain = keras_dmr.to_plain(resnet, fuse_bn=False)
    pruned = prune_channels(plain, criterion="l2", macs=0.5)
    assert pruned.pruning_report["macs_after"] <= 0.5 * count_flops(plain)
    x = RNG.standard_normal((2, 32, 32, 3)).astype("float32")
    assert np.isfinite(pruned.predict(x, verbose=0)).all()


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda x: L.LayerNormalization(name="norm")(L.Conv2D(4, 1)(x)), "norm"),
        (lambda x: keras_dmr.layers.RepVGGBlock(4, name="repvgg")(x), "repvgg"),
    ],
)
def test_layers_it_cannot_follow_are_refused_by_name(build, named):
    x = keras.Input((8, 8, 3))
    y = L.Dense(2)(L.GlobalAveragePooling2D()(build(x)))
    with pytest.raises(ConversionError, match=named):
        prune_channels(keras.Model(x, y), ratio=0.5)


def test_a_shared_layer_is_refused():
    x = keras.Input((8, 8, 4))
    conv = L.Conv2D(4, 1, name="shared")
    y = L.Dense(2)(L.GlobalAveragePooling2D()(conv(conv(x))))
    with pytest.raises(ConversionError, match="shared.*more than once"):
        prune_channels(keras.Model(x, y), ratio=0.5)


def grouped_graph(seed):
    x = keras.Input((16, 16, 3))
    f = L.ReLU()(L.BatchNormalization(name="bn_first")(L.Conv2D(8, 1, name="first")(x)))
    g = L.Conv2D(12, 3, groups=4, padding="same", name="grouped")(f)
    g = L.ReLU()(L.BatchNormalization(name="bn_grouped")(g))
    y = L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="last")(g)))
    return randomize(keras.Model(x, y), seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_grouped_convolution_loses_as_many_channels_in_every_group(seed):
    """'grouped' reads 4 groups of 2 channels. Zeroing one channel of each group and the second
    of group 0 leaves group 0 with none: balancing brings one back, 1 per group is kept."""
    model = grouped_graph(seed)
    bn = model.get_layer("bn_first")
    gamma, beta, mean, var = (np.array(w) for w in bn.get_weights())
    zeroed = [0, 1, 3, 4, 6]
    gamma[zeroed] = beta[zeroed] = 0.0
    bn.set_weights([gamma, beta, mean, var])
    pruned = prune_channels(model, threshold=1e-9)
    assert pruned.pruning_report["groups_dropped"] == 4
    assert pruned.get_layer("first").filters == 4
    assert pruned.get_layer("grouped").kernel.shape[2] == 1  # one input channel per group
    assert max_rel_err(model, pruned) <= 1e-5


@pytest.mark.slow
def test_resnet50_plain_form_with_grouped_convolutions_prunes_to_a_macs_budget():
    """to_plain writes a bottleneck's 3×3 convolution with its reserved channels as a grouped
    convolution; pruning keeps every group even and still meets the budget."""
    resnet = randomize(
        keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10), seed=5
    )
    plain = keras_dmr.to_plain(resnet, fuse_bn=False, verify=False)
    assert any(getattr(layer, "groups", 1) > 1 for layer in plain.layers)
    for criterion in ("bn", "l2"):
        pruned = prune_channels(plain, criterion=criterion, macs=0.5)
        report = pruned.pruning_report
        assert 0.45 * report["macs_before"] <= report["macs_after"] <= 0.5 * report["macs_before"]
        x = RNG.standard_normal((2, 32, 32, 3)).astype("float32")
        assert np.isfinite(pruned.predict(x, verbose=0)).all()


# ------------------------------------------------------------- the package's residual models
IMAGES = [RNG.standard_normal((4, 32, 32, 3)).astype("float32") for _ in range(3)]
SMALL = {"widths": (8, 16, 32)}


@pytest.mark.parametrize(
    "build",
    [
        lambda: keras_dmr.DMRNet(depth=14, **SMALL),
        lambda: keras_dmr.DMRNet(depth=14, branches=3, implementation="grouped", **SMALL),
        lambda: keras_dmr.DMRNet(depth=14, mapping="identity", **SMALL),
        lambda: keras_dmr.DVANet(depth=14, **SMALL),
        lambda: keras_dmr.ResNet(depth=8, **SMALL),
        lambda: keras_dmr.DMRNet(depth=11, branch="bottleneck", widths=(16, 32, 64)),
    ],
    ids=["dmrnet", "dmrnet3-grouped", "identity", "dvanet", "resnet", "bottleneck"],
)
@pytest.mark.parametrize("skip_bn", [False, True], ids=["", "skip_bn"])
def test_unfolded_blocks_compute_the_same_function(build, skip_bn):
    model = build()
    if skip_bn:
        model = keras_dmr.prune.with_skip_bn(model)
    randomize(model, seed=6)
    unfolded = unfold(model)
    assert not any(isinstance(layer, ParallelBranchBlock) for layer in unfolded.layers)
    assert max_rel_err(model, unfolded, IMAGES) <= 1e-5
    # Every stream is a tensor of its own: the merge is an Average of K inputs.
    config = model.get_config()
    if config.get("mapping") == "merge_and_run" and config.get("branches", 1) > 1:
        merges = [layer for layer in unfolded.layers if isinstance(layer, L.Average)]
        assert merges and all(len(m.input) == config["branches"] for m in merges)


def test_stacked_states_without_tile_branches_are_refused():
    model = keras_dmr.DMRNet(depth=14, share_stem_and_head=False, **SMALL)
    with pytest.raises(ConversionError, match="share_stem_and_head"):
        unfold(model)


@pytest.mark.slow
def test_dmrnet_prunes_as_residual_and_as_plain_model_to_a_macs_budget():
    """Issue 28's DMRNet path: with_skip_bn → residual pruning, and to_plain(fuse_bn=False) →
    plain pruning, both at macs=0.5; a threshold that drops nothing keeps the function."""
    model = randomize(keras_dmr.prune.with_skip_bn(keras_dmr.DMRNet(depth=14, **SMALL)), seed=7)
    plain = keras_dmr.to_plain(model, fuse_bn=False)
    for source in (model, plain):
        same = prune_channels(source, threshold=0.0)
        assert max_rel_err(source, same, IMAGES) <= 1e-5
        for criterion in ("bn", "l2"):
            report = prune_channels(source, criterion=criterion, macs=0.5).pruning_report
            assert 0.45 <= report["macs_after"] / report["macs_before"] <= 0.5
            assert report["macs_before"] == count_flops(source)


# ------------------------------------------------------------------ statistics and budgets
def test_reestimated_statistics_are_the_data_statistics_and_identities_stay():
    """After reestimate_bn, a BN's moving mean and variance are those of its input over the
    batches (each BN normalising with batch statistics before it, as in training), and an
    identity BN channel still computes the identity plus its constant."""
    x = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 3, padding="same", name="conv")(x)
    bn = L.BatchNormalization(name="bn")
    model = keras.Model(x, L.GlobalAveragePooling2D()(bn(y)))
    randomize(model, seed=8)
    gamma, beta, mean, var = (np.array(w) for w in bn.get_weights())
    gamma[0] = np.sqrt(var[0] + bn.epsilon)  # channel 0: the identity plus (beta - mean)
    bn.set_weights([gamma, beta, mean, var])
    offset = beta[0] - mean[0]
    batches = [RNG.standard_normal((16, 8, 8, 3)).astype("float32") for _ in range(4)]
    assert keras_dmr.convert.reestimate_bn(model, batches) == 4
    conv = keras.Model(x, y)
    z = np.concatenate([np.asarray(conv(b)) for b in batches]).reshape(-1, 4)
    _, beta2, mean2, var2 = (np.array(w) for w in bn.get_weights())
    np.testing.assert_allclose(mean2, z.mean(0), rtol=1e-4, atol=1e-5)
    batch_vars = np.mean([np.asarray(conv(b)).reshape(-1, 4).var(0) for b in batches], axis=0)
    np.testing.assert_allclose(var2, batch_vars, rtol=1e-4)
    assert np.isclose(beta2[0] - mean2[0], offset, atol=1e-5)  # still identity + constant
    assert np.isclose(np.asarray(bn.gamma)[0], np.sqrt(var2[0] + bn.epsilon), rtol=1e-6)


@pytest.mark.slow
def test_prune_to_budget_reaches_the_macs_in_steps_and_fine_tunes():
    model = randomize(keras_dmr.ResNet(depth=8, widths=(8, 16, 32), compile=False), seed=9)
    plain = keras_dmr.to_plain(model, fuse_bn=False)
    images = RNG.standard_normal((64, 32, 32, 3)).astype("float32")
    labels = RNG.integers(0, 10, 64)
    import tensorflow as tf

    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    lines = []
    pruned = keras_dmr.prune.prune_to_budget(
        plain, train, macs=0.4, steps=2, epochs=1, criterion="l2", log=lines.append
    )
    report = pruned.pruning_report
    assert [cut["step"] for cut in report["steps"]] == [1, 2] and len(lines) == 2
    first, second = (cut["macs"] / report["macs_before"] for cut in report["steps"])
    assert 0.6 <= first <= np.sqrt(0.4) + 1e-9 and 0.36 <= second <= 0.4
    assert report["macs_after"] == count_flops(pruned)
    assert all(np.isfinite(cut["loss"]) for cut in report["steps"])
    assert pruned.optimizer is not None  # compiled with the recipe, ready to train further
    with pytest.raises(ValueError, match="`macs` must be a fraction"):
        keras_dmr.prune.prune_to_budget(plain, train, macs=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_keeps_a_multiple_of_filters_in_every_layer(round_to):
    model = randomize(
        keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10), seed=10
    )
    plain = keras_dmr.to_plain(model, fuse_bn=False, verify=False)  # grouped convolutions too
    pruned = prune_channels(plain, criterion="l2", macs=0.5, round_to=round_to)
    assert count_flops(pruned) <= 0.5 * count_flops(plain)
    widths = {
        layer.name: (layer.filters, plain.get_layer(layer.name).filters)
        for layer in pruned.layers
        if isinstance(layer, L.Conv2D) and not isinstance(layer, L.DepthwiseConv2D)
    }
    assert all(kept % round_to == 0 or kept == was for kept, was in widths.values()), widths
    assert any(kept < was for kept, was in widths.values())
    with pytest.raises(ValueError, match="`round_to` must be an integer >= 1"):
        prune_channels(plain, macs=0.5, round_to=0)


@pytest.mark.parametrize("macs", [0.2, 0.1])
def test_round_to_reaches_small_budgets_through_grouped_convolutions(macs):
    """A DMRNet's plain form has grouped convolutions (two streams): equalising their groups
    and rounding to 8 filters once brought channels back for each other until whole layers
    returned (a one-shot cut stopped at 31% of the MACs whatever the budget)."""
    model = randomize(keras_dmr.prune.with_skip_bn(keras_dmr.DMRNet(depth=14)), seed=3)
    plain = keras_dmr.to_plain(model, fuse_bn=False, verify=False)
    pruned = prune_channels(plain, macs=macs, round_to=8)
    assert 0.8 * macs <= count_flops(pruned) / count_flops(plain) <= macs
    for layer in pruned.layers:
        if isinstance(layer, L.Conv2D) and not isinstance(layer, L.DepthwiseConv2D):
            was = plain.get_layer(layer.name).filters
            assert layer.filters % 8 == 0 or layer.filters == was, layer.name
            assert layer.filters % layer.groups == 0, layer.name


def test_sparsity_factor_spreads_the_budget_over_the_runs_steps_and_schedule():
    # 130 images in batches of 64: 3 steps an epoch; 4 epochs under the recipe's schedule
    # (x0.1 at half and three quarters of the run): learning rates 0.1, 0.1, 0.01, 0.001.
    factor = keras_dmr.prune.sparsity_factor(0.95, images=130, epochs=4, batch_size=64)
    assert factor == pytest.approx(0.95 / (3 * (0.1 + 0.1 + 0.01 + 0.001)), rel=1e-12)
    # 260 images are 5 steps an epoch: the same budget over 5/3 as many steps.
    longer = keras_dmr.prune.sparsity_factor(0.95, images=260, epochs=4, batch_size=64)
    assert longer == pytest.approx(factor * 3 / 5)
    # The demo's Fashion-MNIST record was trained with this function's factor.
    assert f"{keras_dmr.prune.sparsity_factor(0.95, 10_000, 8):.4g}" == "0.01437"
    with pytest.raises(ValueError, match="`epochs` must be an integer >= 1"):
        keras_dmr.prune.sparsity_factor(0.95, images=130, epochs=0)
