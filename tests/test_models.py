"""Builders: parameter counts against the paper, configs, saving, the recipe, bad arguments."""

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr.analysis import path_length_distribution, path_length_stats, plot_path_lengths
from keras_dmr.recipe import RecipeSGD, StepDecay
from tools.tables import PAPER_PARAMETERS, parameter_counts, parameter_table

# The tolerance is 5%. Table 2 prints one rounded figure per row for four networks
# (0.4/0.6/1.2M); the textbook CIFAR ResNet-26/38/74 partners count 0.37/0.56/1.15M and our
# DMRNets of the paired depth have the same convolutions, so those rows get 15% and a second test
# holds each DMRNet to its ResNet partner instead (the paper's premise: equal budgets).
ROUNDED_ROWS = {
    "DMRNet-14",
    "DMRNet-20",
    "DMRNet-38",
    "ResNet-26",
    "ResNet-38",
    "ResNet-74",
    "Wide ResNet-14 (23/46/92)",
}


@pytest.mark.parametrize("row", PAPER_PARAMETERS, ids=[r[0] for r in PAPER_PARAMETERS])
def test_parameter_counts_match_paper(row):
    label, _, _, paper, source = row
    count = parameter_counts()[label] / 1e6
    tolerance = 0.15 if label in ROUNDED_ROWS else 0.05
    assert abs(count - paper) / paper <= tolerance, f"{source}: {count:.3f}M vs {paper}M"


@pytest.mark.parametrize("dmr,resnet", [(14, 26), (20, 38), (38, 74), (50, 98)])
def test_table2_partners_have_equal_budgets(dmr, resnet):
    counts = parameter_counts()
    a, b = counts[f"DMRNet-{dmr}"], counts[f"ResNet-{resnet}"]
    assert abs(a - b) / b <= 0.07


def test_docs_parameter_table_is_generated():
    text = (Path(__file__).parents[1] / "docs" / "architectures.md").read_text()
    assert parameter_table() in text, "run `python -m tools.tables`"


def test_block_structure_follows_depth():
    model = keras_dmr.DMRNet(50, compile=False)
    assert len(model.blocks) == 24 and {b.branches for b in model.blocks} == {2}
    assert [b.filters for b in model.blocks[::8]] == [16, 32, 64]
    assert len(keras_dmr.ResNet(98, compile=False).blocks) == 48
    assert len(keras_dmr.DMRNet(29, branch="bottleneck", compile=False).blocks) == 9
    wide = keras_dmr.DMRNet(32, width=4, compile=False)
    assert [b.filters for b in wide.blocks[::5]] == [64, 128, 256]


def test_fig3_path_lengths():
    figures = {
        "ResNet": (keras_dmr.ResNet(38, compile=False), 20.0, 4.24),
        "DVANet": (keras_dmr.DVANet(20, compile=False), 14.0, 2.83),
        "DMRNet": (keras_dmr.DMRNet(20, compile=False), 8.0, 2.83),
    }
    for name, (model, mean, std) in figures.items():
        dist = path_length_distribution(model)
        assert abs(sum(dist.values()) - 1) < 1e-12
        m, s = path_length_stats(dist)
        assert (round(m, 2), round(s, 2)) == (mean, std), name


def test_path_lengths_general_k_and_identity(tmp_path):
    # K branches: mean B·L/(K+1) + 2 (Sec. 5's extension); identity mapping = L-block ResNet.
    m, _ = path_length_stats(
        path_length_distribution(keras_dmr.DMRNet(14, branches=4, compile=False))
    )
    assert m == pytest.approx(2 * 6 / 5 + 2)
    ident = path_length_distribution(keras_dmr.DMRNet(20, mapping="identity", compile=False))
    assert ident == path_length_distribution(keras_dmr.ResNet(20, compile=False))
    png = plot_path_lengths({"DMRNet-20": keras_dmr.DMRNet(20, compile=False)}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png


SMALL = [
    (keras_dmr.DMRNet, dict(depth=8, branches=2)),
    (keras_dmr.DMRNet, dict(depth=8, branches=3, implementation="grouped")),
    (keras_dmr.DMRNet, dict(depth=8, mapping="identity", share_stem_and_head=False)),
    (keras_dmr.DVANet, dict(depth=8, branch="xception")),
    (keras_dmr.ResNet, dict(depth=11, branch="bottleneck")),
    (keras_dmr.DMRNeXt, dict(depth=11, widths=(16, 32, 64), bottleneck_width=4, stem_filters=8)),
]


@pytest.mark.parametrize("builder,kwargs", SMALL)
def test_save_load_safe_mode_identical(builder, kwargs, tmp_path, rng):
    model = randomize(builder(input_shape=(16, 16, 3), classes=5, **kwargs), seed=11)
    config = model.get_config()
    assert builder.from_config(config).get_config() == config
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is builder and isinstance(loaded.optimizer, RecipeSGD)
    for _ in range(2):
        x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
        np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_fit_without_compile_follows_recipe(rng):
    model = keras_dmr.DMRNet(8, input_shape=(8, 8, 3), classes=3)
    opt = model.optimizer
    assert isinstance(opt, RecipeSGD) and opt.nesterov and opt.momentum == 0.9 and opt.l2 == 1e-4
    assert model.loss.from_logits
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 16)
    history = model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    # lr 0.1 divided by 10 at 1/2, 3/4 and 7/8 of the epochs
    np.testing.assert_allclose(
        history.history["learning_rate"], [0.1] * 4 + [0.01] * 2 + [1e-3] + [1e-4], rtol=1e-6
    )
    assert np.isfinite(history.history["loss"]).all() and "accuracy" in history.history


def test_recipe_weight_decay_is_coupled_l2():
    """One Nesterov step with the L2 term added to the gradient before momentum."""
    v = keras.Variable(np.array([1.0, -2.0], "float32"))
    opt = RecipeSGD(learning_rate=0.1, l2=0.01)
    g = np.array([0.5, 0.5], "float32")
    opt.apply_gradients([(keras.ops.convert_to_tensor(g), v)])
    grad = g + 0.01 * np.array([1.0, -2.0])
    m = -0.1 * grad
    expected = np.array([1.0, -2.0]) + 0.9 * m - 0.1 * grad
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v), expected, rtol=1e-6)
    assert RecipeSGD.from_config(opt.get_config()).get_config() == opt.get_config()


def test_compile_false_and_recompile(rng):
    model = keras_dmr.DMRNet(8, input_shape=(8, 8, 3), classes=3, compile=False)
    assert not model.compiled
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = rng.normal(size=(8, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 8)
    history = model.fit(x, y, epochs=1, verbose=0)
    assert "learning_rate" not in history.history  # no recipe callback on a user's compile
    assert not any(
        isinstance(c, StepDecay) for c in keras_dmr.recipe.with_recipe_callbacks(model, [])
    )


def test_keras_applications_arguments(rng):
    feats = keras_dmr.DMRNet(8, include_top=False, pooling="avg", compile=False)
    assert feats.output_shape == (None, 64 * 2)
    soft = keras_dmr.ResNet(8, classes=4, classifier_activation="softmax")
    assert not soft.loss.from_logits
    p = soft.predict(rng.normal(size=(2, 32, 32, 3)).astype("float32"), verbose=0)
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-5)
    spatial = keras_dmr.DVANet(8, include_top=False, compile=False)
    assert spatial.output_shape == (None, 8, 8, 64)
    imagenet = keras_dmr.ResNet(18, variant="imagenet", input_shape=(64, 64, 3), compile=False)
    assert imagenet.output_shape == (None, 1000)


def test_weights_argument_loads_a_file(tmp_path, rng):
    a = randomize(keras_dmr.DMRNet(8, compile=False), seed=2)
    a.save_weights(tmp_path / "w.weights.h5")
    b = keras_dmr.DMRNet(8, compile=False, weights=str(tmp_path / "w.weights.h5"))
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    assert max_rel_error(b.predict(x, verbose=0), a.predict(x, verbose=0)) == 0


@pytest.mark.parametrize(
    "builder",
    [
        keras_dmr.DMRNet,
        keras_dmr.DMRNeXt,
        keras_dmr.RepVGG,
        keras_dmr.RMNeXt,
        keras_dmr.MobileNetV2,
    ],
)
def test_weights_and_classifier_activation_are_checked_before_building(builder, tmp_path):
    with pytest.raises(ValueError, match="`weights` must be None or .*ImageNet"):
        builder(weights="imagenet")
    with pytest.raises(ValueError, match="`weights` must be None or the path"):
        builder(weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match="`classifier_activation` must be .*got 'softmaxx'"):
        builder(classifier_activation="softmaxx")


@pytest.mark.parametrize(
    "builder,kwargs,argument",
    [
        (keras_dmr.DMRNet, dict(depth=51), "depth"),
        (keras_dmr.DMRNet, dict(depth=14, branch="bottleneck"), "depth"),
        (keras_dmr.DMRNet, dict(depth=51, variant="imagenet"), "depth"),
        (keras_dmr.DMRNet, dict(depth=50, variant="imagenet", branch="basic"), "branch"),
        (keras_dmr.DMRNet, dict(branches=0), "branches"),
        (keras_dmr.DMRNet, dict(branches=1.5), "branches"),
        (keras_dmr.DMRNet, dict(width=0), "width"),
        (keras_dmr.DMRNet, dict(width=-1), "width"),
        (keras_dmr.DMRNet, dict(classes=0), "classes"),
        (keras_dmr.DMRNet, dict(input_shape=(2, 2, 3)), "input_shape"),
        (
            keras_dmr.DMRNet,
            dict(variant="imagenet", depth=50, input_shape=(16, 16, 3)),
            "input_shape",
        ),
        (keras_dmr.DMRNet, dict(branch="dense"), "branch"),
        (keras_dmr.DMRNet, dict(mapping="sum"), "mapping"),
        (keras_dmr.DMRNet, dict(mapping="vanilla"), "mapping"),
        (keras_dmr.DMRNet, dict(variant="svhn"), "variant"),
        (keras_dmr.DMRNet, dict(implementation="fast"), "implementation"),
        (keras_dmr.DMRNet, dict(pooling="sum", include_top=False), "pooling"),
        (keras_dmr.ResNet, dict(depth=20, widths=(16, 32)), "widths"),
        (keras_dmr.DMRNeXt, dict(cardinality=5), "cardinality"),
        (keras_dmr.DMRNeXt, dict(depth=30), "depth"),
    ],
)
def test_invalid_arguments_name_the_argument(builder, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        builder(compile=False, **kwargs)


@pytest.mark.parametrize(
    "builder, family, smallest",
    [
        (lambda s: keras_dmr.DMRNet(depth=8, input_shape=s, compile=False), "the", 4),
        (lambda s: keras_dmr.RepVGG(input_shape=s, compile=False), "RepVGG's", 8),
        (lambda s: keras_dmr.RMNeXt(input_shape=s, compile=False), "RMNeXt's", None),
        (lambda s: keras_dmr.MobileNetV2(input_shape=s, compile=False), "MobileNetV2's", None),
    ],
)
def test_too_small_inputs_name_the_family_and_the_smallest_size(builder, family, smallest):
    """One check for every builder: the message names the family and the smallest size."""
    with pytest.raises(ValueError, match=rf"too small for {family} cifar variant") as info:
        builder((2, 2, 3))
    size = int(str(info.value).rsplit(">= ", 1)[1])
    assert smallest is None or size == smallest
    builder((size, size, 3))  # the smallest size it names builds


@pytest.mark.parametrize(
    "builder, kwargs, argument",
    [
        (keras_dmr.ResNet, {"branches": 2}, "branches"),
        (keras_dmr.ResNet, {"mapping": "identity"}, "mapping"),
        (keras_dmr.DVANet, {"mapping": "merge_and_run"}, "mapping"),
    ],
)
def test_builders_refuse_arguments_they_cannot_honour(builder, kwargs, argument):
    """Never silently dropped: an argument a family cannot take is an error naming it."""
    with pytest.raises(ValueError, match=f"`{argument}`"):
        builder(depth=8, compile=False, **kwargs)
    model = builder(depth=8, compile=False)
    assert type(model).from_config(model.get_config()).count_params() == model.count_params()


@pytest.mark.parametrize(
    "builder,kwargs",
    [
        (lambda **kw: keras_dmr.DMRNeXt(11, compile=False, **kw), {"width": 2}),
        (lambda **kw: keras_dmr.DMRNeXt(11, compile=False, **kw), {"mapping": "identity"}),
        (lambda **kw: keras_dmr.ResNet(20, compile=False, **kw), {"bogus": 1}),
        (lambda **kw: keras_dmr.RepVGG(21, compile=False, **kw), {"branches": 2}),
    ],
)
def test_builders_refuse_arguments_they_do_not_take(builder, kwargs):
    """No argument is silently dropped (keras.Model would ignore unknown keywords)."""
    with pytest.raises(ValueError, match=f"does not take '{next(iter(kwargs))}'"):
        builder(**kwargs)
