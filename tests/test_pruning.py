"""Network slimming (keras_dmr.prune): the extra BN on the residual path and its RM, slim on
plain models, the residual baseline, sparsity training and ``keras-dmr prune``.

Tolerances: outputs that must not change are compared by maximum relative error, <= 1e-5
(float32 weights copied or re-folded in float64); what is exact by construction (weights copied
as they are) is asserted equal to 1e-6.
"""

import os

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr import cli
from keras_dmr import prune as kp
from keras_dmr.analysis.flops import count_flops
from keras_dmr.cli.prune import prune_command
from keras_dmr.convert import to_plain
from keras_dmr.layers.streams import ChannelScale

TYPICAL = 1e-5


def batch(shape, n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def randomize_all(model, seed):
    """randomize(), then sensible random values for ChannelScale (scale >= 0, variance > 0)."""
    randomize(model, seed)
    rng = np.random.default_rng(seed + 100)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, ChannelScale):
            c = layer.moving_mean.shape[0]
            scale = [rng.uniform(0.2, 1.5, c)] if layer.scale else []
            layer.set_weights([*scale, rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)])
    return model


def resnet(skip_bn=True, seed=1, **kw):
    kw = {"depth": 8, "widths": (4, 8, 8), "input_shape": (8, 8, 3), "compile": False, **kw}
    model = keras_dmr.ResNet(**kw)
    if skip_bn:
        model = kp.with_skip_bn(model)
    return randomize_all(model, seed)


def dmrnet(skip_bn=True, seed=3):
    model = keras_dmr.DMRNet(depth=8, widths=(4, 4, 4), input_shape=(8, 8, 3), compile=False)
    return randomize_all(kp.with_skip_bn(model) if skip_bn else model, seed)


def set_bn(layer, channels, gamma=None, beta=None, var=None):
    g, b, m, v = (np.array(w) for w in layer.get_weights())
    if gamma is not None:
        g[channels] = gamma
    if beta is not None:
        b[channels] = beta
    if var is not None:
        v[channels] = var
    layer.set_weights([g, b, m, v])


def tiny_plain(groups=1, depthwise=False, seed=0):
    """Conv 3×3 → BN → ReLU → (grouped 3×3 | depthwise 3×3 → BN → ReLU → 1×1) → BN → ReLU →
    global average pooling → Dense, random weights and statistics."""
    x = inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    x = keras.layers.BatchNormalization(name="c1_bn")(x)
    x = keras.layers.ReLU(name="c1_relu")(x)
    if depthwise:
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
        x = keras.layers.BatchNormalization(name="dw_bn")(x)
        x = keras.layers.ReLU(name="dw_relu")(x)
        x = keras.layers.Conv2D(4, 1, use_bias=False, name="c2")(x)
    else:
        size = 1 if groups == 1 else 3
        x = keras_dmr.layers.GroupedConv2D(
            4, size, padding="same", groups=groups, use_bias=False, name="c2"
        )(x)
    x = keras.layers.BatchNormalization(name="c2_bn")(x)
    x = keras.layers.ReLU(name="c2_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(2, name="predictions")(x)
    return randomize(keras.Model(inputs, x, name="tiny"), seed)


# ------------------------------------------------------------------ the extra BN, through RM
@pytest.mark.parametrize(
    "build, downsample",
    [
        (lambda: resnet(), "dirac"),
        (lambda: resnet(), "prelu"),
        (lambda: resnet(branch="bottleneck", depth=11, widths=(2, 4, 4)), "dirac"),
        (
            lambda: randomize_all(
                kp.with_skip_bn(
                    keras_dmr.DMRNet(
                        depth=8, widths=(4, 4, 4), input_shape=(8, 8, 3), compile=False
                    )
                ),
                3,
            ),
            "dirac",
        ),
    ],
    ids=["resnet", "resnet_prelu", "bottleneck", "dmrnet_k2"],
)
def test_skip_bn_blocks_convert_exactly_with_and_without_bn(build, downsample):
    model = build()
    x = [batch(model.input_shape[1:], seed=s) for s in range(2)]
    for fuse_bn in (True, False):
        plain = to_plain(model, fuse_bn=fuse_bn, downsample=downsample, verify_inputs=x)
        for xi in x:
            assert max_rel_error(plain(xi), model(xi)) <= TYPICAL


def test_reserved_channels_get_the_skip_bn_and_merged_channels_the_sum_statistics():
    model = resnet()
    block = model.get_layer("stage1_block1")
    s, mean, var = (np.asarray(w, np.float64) for w in block.skip_scale.get_weights())
    plain = to_plain(model, fuse_bn=False)
    gamma, beta, m, v = (np.asarray(w) for w in plain.get_layer("stage1_block1_conv1_bn").weights)
    # conv1 = [4 hidden, 4 reserved]: the reserved BN has the input's statistics, gamma s·std.
    np.testing.assert_allclose(gamma[4:], s * np.sqrt(var), rtol=1e-6)
    np.testing.assert_allclose(m[4:], mean, rtol=1e-6)
    np.testing.assert_allclose(v[4:], var, rtol=1e-6)
    _, sum_var = block.sum_stats.get_weights()
    merged = plain.get_layer("stage1_block1_conv2_bn")
    np.testing.assert_allclose(np.asarray(merged.moving_variance), sum_var, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(merged.gamma), np.sqrt(sum_var), rtol=1e-6)


def test_skip_bn_model_trains_its_statistics_and_reloads_in_safe_mode(tmp_path):
    model = kp.with_skip_bn(
        keras_dmr.ResNet(depth=8, widths=(4, 4, 4), input_shape=(8, 8, 3), compile=False)
    )
    x = batch((8, 8, 3), n=8)
    before = np.asarray(model.get_layer("stage1_block1").skip_scale.moving_mean)
    model(x, training=True)
    after = np.asarray(model.get_layer("stage1_block1").skip_scale.moving_mean)
    assert not np.allclose(before, after)
    path = os.fspath(tmp_path / "skip_bn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("stage1_block1").skip_bn
    assert max_rel_error(loaded(x), model(x)) <= 1e-6


def test_with_skip_bn_keeps_the_function():
    model = randomize(
        keras_dmr.ResNet(depth=8, widths=(4, 8, 8), input_shape=(8, 8, 3), compile=False), 2
    )
    copy = kp.with_skip_bn(model)
    x = batch((8, 8, 3))
    assert max_rel_error(copy(x), model(x)) <= 1e-6


# ------------------------------------------------------------------------------------ slim
@pytest.mark.parametrize("make", [lambda: to_plain(resnet(), fuse_bn=False), tiny_plain])
def test_threshold_zero_is_a_no_op(make):
    plain = make()
    slimmed = kp.slim(plain, threshold=0)
    assert slimmed.count_params() == plain.count_params()
    x = batch(plain.input_shape[1:])
    np.testing.assert_array_equal(np.asarray(slimmed(x)), np.asarray(plain(x)))
    assert kp.slim(plain, ratio=0).count_params() == plain.count_params()


def test_dropping_channels_without_signal_keeps_outputs():
    """gamma = 0: c1's dropped channels are constants (beta > 0 too: read by a 1×1 conv, the fold
    is exact); c2's are folded into the Dense bias."""
    model = tiny_plain()
    set_bn(model.get_layer("c1_bn"), [0, 3, 5], gamma=0.0, beta=[0.4, -0.3, 0.9])
    set_bn(model.get_layer("c2_bn"), [1], gamma=0.0, beta=0.7)
    slimmed = kp.slim(model, threshold=1e-3)
    assert slimmed.get_layer("c1").filters == 5 and slimmed.get_layer("c2").filters == 3
    for seed in range(3):
        x = batch((6, 6, 3), seed=seed)
        assert max_rel_error(slimmed(x), model(x)) <= TYPICAL


def test_zero_scales_of_a_skip_bn_resnet_drop_exactly_in_its_plain_form():
    """Reserved channels with s = 0 and hidden channels with gamma = 0, beta <= 0 (what a ReLU
    network's dead channels look like): slimming the plain model changes nothing."""
    model = resnet()
    block = model.get_layer("stage2_block1")
    s, m, v = block.skip_scale.get_weights()
    block.skip_scale.set_weights([np.where(np.arange(4) < 2, 0.0, s), m, v])
    set_bn(model.get_layer("stage1_block1").paths[0][0][1], [1, 2], gamma=0.0, beta=-0.2)
    plain = to_plain(model, fuse_bn=False)
    slimmed = kp.slim(plain, threshold=1e-3)
    # stage1 conv1: 4 hidden + 4 reserved → 2 + 4; stage2 conv1: 8 hidden + 4 reserved → 8 + 2.
    assert slimmed.get_layer("stage1_block1_conv1").filters == 6
    assert slimmed.get_layer("stage2_block1_conv1").filters == 10
    for seed in range(3):
        x = batch((8, 8, 3), seed=seed)
        assert max_rel_error(slimmed(x), model(x)) <= TYPICAL


def test_parameter_and_flop_counts_fall_as_computed_by_hand():
    model = tiny_plain()
    set_bn(model.get_layer("c1_bn"), [0, 3, 5], gamma=0.0)
    set_bn(model.get_layer("c2_bn"), [1], gamma=0.0)
    # conv 3·3·3·8 + BN 4·8 + conv 8·4 + BN 4·4 + Dense 4·2 + 2
    assert model.count_params() == 216 + 32 + 32 + 16 + 10
    assert count_flops(model) == 36 * 8 * 27 + 36 * 4 * 8 + 8
    slimmed = kp.slim(model, threshold=1e-3)
    assert slimmed.count_params() == 135 + 20 + 15 + 12 + 8
    assert count_flops(slimmed) == 36 * 5 * 27 + 36 * 3 * 5 + 6
    report = slimmed.pruning_report
    assert (report["params_before"], report["params_after"]) == (306, 190)
    assert (report["channels_before"], report["channels_after"]) == (12, 8)
    folded = kp.slim(model, threshold=1e-3, fuse_bn=True)
    assert not any(isinstance(lyr, keras.layers.BatchNormalization) for lyr in folded.layers)
    assert folded.count_params() == 135 + 5 + 15 + 3 + 8
    x = batch((6, 6, 3))
    assert max_rel_error(folded(x), slimmed(x)) <= TYPICAL


def test_ratio_drops_the_lowest_fraction_globally():
    model = tiny_plain()
    importances = kp.channel_importances(model)
    assert importances.shape == (12,)
    slimmed = kp.slim(model, ratio=0.25)
    assert slimmed.pruning_report["channels_after"] == 9
    kept = np.sort(importances)[3:]
    assert slimmed.pruning_report["threshold"] == pytest.approx(kept[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": -0.1}, "`threshold`"),
        ({"threshold": float("nan")}, "`threshold`"),
        ({"threshold": "0.1"}, "`threshold`"),
        ({"threshold": True}, "`threshold`"),
        ({"ratio": 1.0}, "`ratio`"),
        ({"ratio": -0.2}, "`ratio`"),
        ({}, "exactly one of `threshold`"),
        ({"threshold": 0.1, "ratio": 0.1}, "exactly one of `threshold`"),
        ({"threshold": 0.1, "fuse_bn": 1}, "`fuse_bn`"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kp.slim(tiny_plain(), **kwargs)
    with pytest.raises(ValueError, match=match):
        kp.slim_residual(resnet(skip_bn=False), **kwargs)


def test_former_names_of_fuse_bn_still_work_with_a_warning():
    """One name for folding BN into the convolutions (``fuse_bn``, as ``to_plain``); the former
    ``fold_bn=`` and ``fold_batchnorm`` still work and say so."""
    model = tiny_plain()
    with pytest.warns(DeprecationWarning, match="use `fuse_bn`"):
        old = kp.slim(model, threshold=0, fold_bn=True)
    new = kp.slim(model, threshold=0, fuse_bn=True)
    assert [w.shape for w in old.weights] == [w.shape for w in new.weights]
    with pytest.warns(DeprecationWarning, match="fuse_batchnorm"):
        kp.fold_batchnorm(new)
    with pytest.raises(TypeError, match="'fuse'"):
        kp.slim(model, threshold=0, fuse=True)


def test_models_without_bn_or_not_plain_get_clear_errors():
    fused = to_plain(resnet(), fuse_bn=True)
    with pytest.raises(ValueError, match="'stem_conv'.*not followed by a BatchNormalization"):
        kp.slim(fused, threshold=0.1)
    with pytest.raises(ValueError, match="'stage1_block1'.*residual block"):
        kp.slim(resnet(), threshold=0.1)
    dmrnet = keras_dmr.DMRNet(depth=8, widths=(4, 4, 4), input_shape=(8, 8, 3), compile=False)
    with pytest.raises(ValueError, match="'stage1_block1'.*2 branches"):
        kp.slim_residual(dmrnet, threshold=0.1)
    with pytest.raises(ValueError, match="`factor`"):
        kp.BNSparsity(factor=0)


def test_grouped_convolutions_drop_equally_from_every_group():
    """c2 has 2 groups of 4 inputs: c1's zero channels 0, 1 (group 0) and 5 (group 1) can only
    go one per group, the least important first; the other stays, unchanged."""
    model = tiny_plain(groups=2)
    set_bn(model.get_layer("c1_bn"), [0, 1, 5], gamma=0.0, beta=-0.5)
    slimmed = kp.slim(model, threshold=1e-3)
    c2 = slimmed.get_layer("c2")
    assert c2.groups == 2 and c2.kernel.shape == (3, 3, 3, 4)
    assert slimmed.get_layer("c1").filters == 6
    x = batch((6, 6, 3))
    assert max_rel_error(slimmed(x), model(x)) <= TYPICAL


def test_depthwise_convolutions_drop_a_channel_with_the_channel_it_reads():
    model = tiny_plain(depthwise=True)
    set_bn(model.get_layer("c1_bn"), [4], gamma=0.0, beta=-0.5)  # the producer's channel
    set_bn(model.get_layer("dw_bn"), [2], gamma=0.0, beta=0.3)  # the depthwise's own
    slimmed = kp.slim(model, threshold=1e-3)
    assert slimmed.get_layer("c1").filters == 6
    assert slimmed.get_layer("dw").kernel.shape == (3, 3, 6, 1)
    assert slimmed.get_layer("c2").kernel.shape == (1, 1, 6, 4)
    for seed in range(2):
        x = batch((6, 6, 3), seed=seed)
        assert max_rel_error(slimmed(x), model(x)) <= TYPICAL


def test_merged_channels_without_skip_bn_are_never_dropped_by_scale():
    """Without skip_bn a merged channel's BN is its branch's alone; its shortcut is unrecorded."""
    model = resnet(skip_bn=False)
    set_bn(model.get_layer("stage1_block1").paths[0][1][1], [0, 1, 2], gamma=1e-4)
    plain = to_plain(model, fuse_bn=False)
    slimmed = kp.slim(plain, threshold=1e-3)
    assert slimmed.get_layer("stage1_block1_conv2").filters == 4
    x = batch((8, 8, 3))
    assert max_rel_error(slimmed(x), model(x)) <= TYPICAL


# -------------------------------------------------------------------------- the baseline
def test_residual_threshold_zero_is_a_no_op_and_folds():
    model = resnet()
    slimmed = kp.slim_residual(model, threshold=0)
    x = batch((8, 8, 3))
    assert max_rel_error(slimmed(x), model(x)) <= TYPICAL
    folded = kp.slim_residual(model, threshold=0, fuse_bn=True)
    assert max_rel_error(folded(x), model(x)) <= TYPICAL
    refolded = kp.fuse_batchnorm(slimmed)  # the generic fold, on the functional ResNet
    assert not any(isinstance(lyr, keras.layers.BatchNormalization) for lyr in refolded.layers)
    assert refolded.count_params() == folded.count_params()
    assert max_rel_error(refolded(x), model(x)) <= TYPICAL


def test_residual_baseline_ties_the_channels_a_shortcut_adds():
    """Stage 1's stream (stem + block 1): a channel goes only when both write nothing; the
    plain model can drop the merged channel alone."""
    model = resnet()
    block = model.get_layer("stage1_block1")
    sm, sv = block.sum_stats.get_weights()
    block.sum_stats.set_weights([sm, np.where(np.arange(4) < 2, 1e-10, sv)])  # channels 0, 1
    set_bn(model.get_layer("stem_bn"), [1, 3], gamma=0.0)  # channels 1, 3
    set_bn(block.paths[0][0][1], [2], gamma=0.0, beta=-0.1)  # a hidden channel
    slimmed = kp.slim_residual(model, threshold=1e-3)
    widths = {lyr.name: lyr.filters for lyr in slimmed.layers if hasattr(lyr, "filters")}
    assert widths["stem_conv"] == 3  # only channel 1 is silent in both
    assert widths["stage1_block1_b0_1_conv"] == 3
    assert widths["stage1_block1_b0_0_conv"] == 3  # the hidden channel, on its own
    assert slimmed.get_layer("stage2_block1_proj_conv").kernel.shape[2] == 3
    plain = kp.slim(to_plain(model, fuse_bn=False), threshold=1e-3)
    assert plain.get_layer("stem_conv").filters == 2  # channels 1 and 3
    assert plain.get_layer("stage1_block1_conv2").filters == 2  # channels 0 and 1


def test_residual_dropping_silent_hidden_channels_keeps_outputs():
    model = resnet()
    set_bn(model.get_layer("stage2_block1").paths[0][0][1], [0, 5], gamma=0.0, beta=-0.3)
    slimmed = kp.slim_residual(model, threshold=1e-3)
    assert slimmed.get_layer("stage2_block1_b0_0_conv").filters == 6
    x = batch((8, 8, 3))
    assert max_rel_error(slimmed(x), model(x)) <= TYPICAL


# ---------------------------------------------------------------------------- sparsity
@pytest.mark.parametrize("method", ["proximal", "subgradient"])
def test_sparsity_callback_drives_scales_down(method):
    model = kp.with_skip_bn(
        keras_dmr.ResNet(depth=8, widths=(4, 4, 4), input_shape=(8, 8, 3), compile=False)
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    before = kp.bn_scales(model)
    x, y = batch((8, 8, 3), n=16), np.zeros((16, 10), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[kp.BNSparsity(5.0, method)])
    after = kp.bn_scales(model)
    assert len(kp.scale_variables(model)) == 9 + 3  # 9 BNs, 3 skip scales
    assert after.mean() < before.mean() - 0.1  # 4 steps of lr·factor = 0.05
    skip = np.asarray(model.get_layer("stage1_block1").skip_scale.gamma)
    assert np.all(skip < 0.9)


def test_proximal_sparsity_reaches_exact_zeros():
    model = keras_dmr.ResNet(depth=8, widths=(4, 4, 4), input_shape=(8, 8, 3), compile=False)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = batch((8, 8, 3), n=8), np.zeros((8, 10), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[kp.BNSparsity(20.0)])
    assert np.all(kp.bn_scales(model) == 0)


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture
def with_prune(monkeypatch):
    if not any(c.name == "prune" for c in cli.COMMANDS):
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, prune_command()])


@pytest.mark.slow
def test_cli_prune_end_to_end(tmp_path, with_prune, capsys):
    model = randomize(keras_dmr.ResNet(depth=8, widths=(4, 4, 4), compile=False), 0)
    checkpoint = tmp_path / "tiny.keras"
    model.save(checkpoint)
    output = tmp_path / "out" / "tiny_pruned.keras"
    argv = ["prune", str(checkpoint), "--ratio", "0.3", "--finetune-epochs", "1"]
    argv += ["--batch-size", "256", "--output", str(output), "--fuse-bn"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "pruned" in printed and "wrote" in printed
    pruned = keras.saving.load_model(output, safe_mode=True)
    assert pruned.count_params() < to_plain(model).count_params()
    # The residual baseline: random BN scales are U(0.5, 1.5), so a threshold of 0.9 prunes some
    # channels; the result keeps its residual blocks and computes with fewer parameters.
    res_path = tmp_path / "res.keras"
    argv = ["prune", str(checkpoint), "--threshold", "0.9", "--residual", "--fuse-bn", "--output"]
    argv += [str(res_path), "--finetune-epochs", "0", "--batch-size", "256"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "wrote" in printed and str(res_path) in printed
    residual = keras.saving.load_model(res_path, safe_mode=True)
    assert residual.count_params() < model.count_params()
    assert any(
        hasattr(layer, "plain_ops") or isinstance(layer, keras.layers.Add)
        for layer in residual._flatten_layers()
    ), "the residual baseline keeps its residual blocks"
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    assert residual(x, training=False).shape == (2, 10)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "-1"], "--threshold: must be a number >= 0"),
        (["--ratio", "1"], "--ratio: must be a number in [0, 1)"),
        (["--ratio", "0.1", "--threshold", "0.1"], "not allowed with argument"),
        ([], "one of the arguments --threshold --ratio --macs is required"),
        (["--macs", "0"], "--macs: must be the fraction of MACs to keep"),
        (["--macs", "1.5"], "--macs: must be the fraction of MACs to keep"),
        (["--macs", "0.5", "--criterion", "l1"], "--criterion: invalid choice"),
        (["--ratio", "0.1", "--dataset", "cifar100"], "--dataset: cifar100 has 100 classes"),
    ],
)
def test_cli_prune_usage_errors(tmp_path, with_prune, capsys, extra, message):
    checkpoint = tmp_path / "tiny.keras"
    keras_dmr.ResNet(depth=8, widths=(4, 4, 4), compile=False).save(checkpoint)
    assert cli.main(["prune", str(checkpoint), *extra]) == 2
    assert message in capsys.readouterr().err


def user_resnet() -> keras.Model:
    """A hand-written functional ResNet (no block of this package), as a user would save."""
    L = keras.layers
    x = inputs = keras.Input((32, 32, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    for filters, strides in ((8, 1), (16, 2)):
        y = L.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        y = L.Conv2D(filters, 3, padding="same", use_bias=False)(
            L.ReLU()(L.BatchNormalization()(y))
        )
        y = L.BatchNormalization()(y)
        if strides != 1:
            x = L.BatchNormalization()(L.Conv2D(filters, 1, strides=strides, use_bias=False)(x))
        x = L.ReLU()(L.Add()([x, y]))
    outputs = L.Dense(10)(L.GlobalAveragePooling2D()(x))
    return randomize(keras.Model(inputs, outputs, name="user_resnet"), 0)


@pytest.mark.parametrize(
    "extra", [[], ["--residual", "--criterion", "l2", "--round-to", "4"]], ids=["plain", "as-is"]
)
def test_cli_prune_by_macs_takes_a_user_graph(tmp_path, with_prune, capsys, extra):
    """``--macs`` on a CNN written by hand: its plain form (or itself, ``--residual``) pruned
    over the whole graph to the budget, saved, loadable in safe mode."""
    model = user_resnet()
    checkpoint, output = tmp_path / "user.keras", tmp_path / "user_pruned.keras"
    model.save(checkpoint)
    argv = ["prune", str(checkpoint), "--macs", "0.5", "--finetune-epochs", "0"]
    argv += ["--batch-size", "256", "--output", str(output), *extra]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "MACs budget 0.5" in printed and "wrote" in printed
    pruned = keras.saving.load_model(output, safe_mode=True)
    source = model if extra else to_plain(model, fuse_bn=False)
    assert count_flops(pruned) <= 0.5 * count_flops(source)
    assert any(isinstance(layer, keras.layers.Add) for layer in pruned.layers) == bool(extra)
    if extra:  # --round-to 4: every convolution keeps a multiple of 4 filters (or all)
        for layer in pruned.layers:
            if isinstance(layer, keras.layers.Conv2D):
                was = model.get_layer(layer.name).filters
                assert layer.filters % 4 == 0 or layer.filters == was


def test_fold_through_a_padded_spatial_convolution_is_exact_inside_the_image():
    """A dropped constant > 0 read by a 'same'-padded 3×3 convolution: exact where the filter
    stays inside the image; at the border the padding read zeros, not the constant."""
    x = inputs = keras.Input((6, 6, 3))
    for name, filters, size in (("c1", 6, 3), ("c2", 4, 3), ("c3", 3, 1)):
        x = keras.layers.Conv2D(filters, size, padding="same", use_bias=False, name=name)(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    model = randomize(keras.Model(inputs, x), 4)
    set_bn(model.get_layer("c1_bn"), [2], gamma=0.0, beta=0.8)
    slimmed = kp.slim(model, threshold=1e-3)
    assert slimmed.get_layer("c1").filters == 5 and slimmed.get_layer("c3").filters == 3
    x = batch((6, 6, 3))
    got, want = np.asarray(slimmed(x)), np.asarray(model(x))
    assert max_rel_error(got[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1]) <= TYPICAL
    assert max_rel_error(got, want) > 1e-3


def test_every_channel_of_a_skip_bn_plain_model_has_a_scale():
    """With skip_bn, reserved copies through every layer of a branch (bottleneck: two) and
    merged channels carry BN records; without it, merged channels are protected (inf)."""
    with_bn = to_plain(resnet(branch="bottleneck", depth=11, widths=(2, 4, 4)), fuse_bn=False)
    assert np.all(np.isfinite(kp.channel_importances(with_bn)))
    without = to_plain(
        resnet(skip_bn=False, branch="bottleneck", depth=11, widths=(2, 4, 4)), fuse_bn=False
    )
    assert np.sum(np.isinf(kp.channel_importances(without))) == 8 + 16 + 16


def test_mobilenet_plain_model_slims():
    """Depthwise convolutions and ReLU6 (ChannelwiseReLU on reserved channels) in a real model."""
    model = randomize(keras_dmr.MobileNetV2(input_shape=(16, 16, 3), alpha=0.35, compile=False), 0)
    plain = to_plain(model, fuse_bn=False)
    x = batch((16, 16, 3), n=2)
    np.testing.assert_array_equal(np.asarray(kp.slim(plain, threshold=0)(x)), np.asarray(plain(x)))
    slimmed = kp.slim(plain, ratio=0.3)
    assert slimmed.pruning_report["channels_after"] < slimmed.pruning_report["channels_before"]
    assert slimmed(x).shape == (2, 10)
