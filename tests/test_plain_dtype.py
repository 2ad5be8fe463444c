"""The plain model's dtype, whatever the global policy, and a plain model that is plain Keras.

Tolerances (random weights and random BN statistics, three batches of 4): a float32 plain model
against the float32 computation of the source, maximum relative error <= 1e-5 (measured 2e-7 to
6e-7); a mixed_float16 plain model against the same float32 reference <= 5e-3 (measured 3.5e-4 to
6e-4: float16 keeps 11 significant bits, 2^-11 ≈ 4.9e-4 per rounding).
"""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import max_rel_error, randomize

import keras_dmr
from keras_dmr.convert import ConversionError, to_plain
from keras_dmr.convert.plain import float32_reference

FLOAT32 = 1e-5
FLOAT16 = 5e-3

BUILDERS = {
    "resnet20": lambda: keras_dmr.ResNet(depth=20, compile=False),
    "dmrnet14": lambda: keras_dmr.DMRNet(depth=14, compile=False),
    "rmnext": lambda: keras_dmr.RMNeXt(
        depth=None,
        blocks_per_stage=(1, 1, 1, 1),
        widths=(16, 32, 64, 128),
        channels_per_group=4,
        compile=False,
    ),
}


def batches(shape, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, *shape)).astype("float32") for _ in range(n)]


def _reference_outputs(build, weights, inputs):
    """The source architecture under float32, with the given weights: the ground truth."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        model = build()
        model.set_weights(weights)
        return [np.asarray(model(x, training=False), np.float64) for x in inputs]
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("global_policy", ["float32", "mixed_float16"], indirect=True)
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_conversion_under_either_global_policy(global_policy, family):
    model = randomize(BUILDERS[family](), seed=4)
    inputs = batches(model.inputs[0].shape[1:])
    want = _reference_outputs(BUILDERS[family], model.get_weights(), inputs)

    plain = to_plain(model)  # float32 by default, whatever the global policy
    computing = [layer for layer in plain.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert {layer.compute_dtype for layer in computing} == {"float32"}
    assert plain.conversion_report["dtype"] == "float32"
    assert plain.conversion_report["max_relative_error"] <= FLOAT32
    for x, w in zip(inputs, want, strict=True):
        assert max_rel_error(plain(x, training=False), w) <= FLOAT32

    half = to_plain(model, dtype="mixed_float16")
    computing = [layer for layer in half.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert {layer.dtype_policy.name for layer in computing} == {"mixed_float16"}
    assert all(w.dtype == "float32" for w in half.weights)  # variables stay float32
    assert half.conversion_report["max_relative_error"] <= FLOAT16
    for x, w in zip(inputs, want, strict=True):
        assert max_rel_error(np.asarray(half(x, training=False), np.float64), w) <= FLOAT16


def test_float32_reference_of_a_mixed_model_has_the_same_weights(global_policy_mixed):
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=2)
    assert model.layers[1].compute_dtype == "float16"
    twin = float32_reference(model)
    assert twin is not model
    computing = [
        layer for layer in twin._flatten_layers() if not isinstance(layer, keras.layers.InputLayer)
    ]
    assert {layer.compute_dtype for layer in computing} == {"float32"}
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    keras.mixed_precision.set_global_policy("float32")
    same = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=2)
    assert float32_reference(same) is same  # nothing to copy


@pytest.fixture
def global_policy_mixed():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def test_dtype_is_checked_and_float16_tolerance_is_enforced():
    model = randomize(keras_dmr.ResNet(depth=8, compile=False), seed=0)
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        to_plain(model, dtype="float64")
    with pytest.raises(ConversionError, match="above the tolerance 1e-06"):
        to_plain(model, dtype="mixed_float16", tolerance=1e-6)  # float16 cannot reach it
    bf16 = to_plain(model, dtype="mixed_bfloat16")  # measured 5.6e-3 to 8.5e-3, default 5e-2
    assert bf16.layers[-1].compute_dtype == "bfloat16"
    assert bf16.conversion_report["max_relative_error"] <= 5e-2


# ------------------------------------------------------------------ plain Keras, no keras_dmr
PLAIN_KERAS = {
    "resnet20": lambda: keras_dmr.ResNet(depth=20, compile=False),
    "repvgg": lambda: keras_dmr.RepVGG(blocks_per_stage=(2, 2, 2, 2), base_width=8, compile=False),
}


def test_plain_models_without_groups_are_keras_layers_only():
    for build in PLAIN_KERAS.values():
        plain = to_plain(randomize(build(), seed=1))
        modules = {type(layer).__module__ for layer in plain._flatten_layers()}
        assert not [m for m in modules if m.startswith("keras_dmr")], modules
    rmnext = to_plain(randomize(BUILDERS["rmnext"](), seed=1))
    grouped = [layer for layer in rmnext.layers if getattr(layer, "groups", 1) > 1]
    assert grouped and all(type(layer).__name__ == "GroupedConv2D" for layer in grouped)


def test_plain_keras_file_loads_without_keras_dmr(tmp_path):
    """The real consumer: a process that never imports keras_dmr loads the files in safe mode
    and predicts what the plain models predict here."""
    inputs = batches((32, 32, 3), n=2, seed=7)
    for name, build in PLAIN_KERAS.items():
        plain = to_plain(randomize(build(), seed=3))
        plain.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}_x.npy", np.concatenate(inputs))
        np.save(
            tmp_path / f"{name}_y.npy",
            np.concatenate([np.asarray(plain(x, training=False)) for x in inputs]),
        )
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, keras
        for name in {sorted(PLAIN_KERAS)!r}:
            model = keras.saving.load_model(r"{tmp_path}/" + name + ".keras", safe_mode=True)
            x = np.load(r"{tmp_path}/" + name + "_x.npy")
            np.save(r"{tmp_path}/" + name + "_got.npy", np.asarray(model(x, training=False)))
        assert not [m for m in sys.modules if m.startswith("keras_dmr")]
        print("loaded without keras_dmr")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded without keras_dmr" in done.stdout
    for name in PLAIN_KERAS:
        got, want = np.load(tmp_path / f"{name}_got.npy"), np.load(tmp_path / f"{name}_y.npy")
        assert max_rel_error(got, want) <= 1e-6


# ------------------------------------------------------------ one walker protocol, idempotent
IDEMPOTENT = {
    **BUILDERS,
    "mobilenet_v2": lambda: keras_dmr.MobileNetV2(variant="cifar", alpha=0.25, compile=False),
    "dmrnet_headless": lambda: keras_dmr.DMRNet(
        depth=8, include_top=False, pooling="avg", compile=False
    ),
}


@pytest.mark.parametrize("family", sorted(IDEMPOTENT))
def test_a_plain_model_converts_again_to_itself(family):
    """The walker reads everything its emitter writes (Conv2D, GroupedConv2D, DepthwiseConv2D,
    ReLU, PReLU, ChannelwiseReLU, pooling, Dense): converting a plain model again gives the same
    layers and the same outputs (float32, max. relative error <= 1e-6 over three batches)."""
    model = randomize(IDEMPOTENT[family](), seed=8)
    plain = to_plain(model)
    again = to_plain(plain)
    kinds = [type(layer).__name__ for layer in plain.layers]
    assert [type(layer).__name__ for layer in again.layers] == kinds
    assert again.count_params() == plain.count_params()
    for x in batches(model.inputs[0].shape[1:]):
        assert max_rel_error(again(x, training=False), plain(x, training=False)) <= 1e-6
        assert max_rel_error(again(x, training=False), model(x, training=False)) <= FLOAT32
