"""The Keras internals keras_dmr reads (``utils.keras_internals``) exist in this Keras, and a
missing one is reported with the Keras version: an upgrade fails here first, by name."""

import keras
import pytest

from keras_dmr.utils import keras_internals


def test_this_keras_has_every_internal_the_package_reads():
    keras_internals.check()


def test_a_missing_internal_is_named_with_the_keras_version(monkeypatch):
    renamed = (keras_internals.Functional, "_run_through_graph_v2")  # as if Keras renamed it
    monkeypatch.setattr(keras_internals, "_REQUIRED", (*keras_internals._REQUIRED, renamed))
    with pytest.raises(RuntimeError) as exc:
        keras_internals.check()
    message = str(exc.value)
    assert "Functional._run_through_graph_v2" in message and keras.__version__ in message


def test_the_accessors_read_a_nested_functional_graph():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(3, name="d1")(inner_in), name="inner")
    x = keras.Input((4,))
    y = keras.layers.Dense(2, name="d2")(inner(x))
    model = keras.Model(x, y)
    names = [layer.name for layer in keras_internals.all_layers(model)]
    assert "d1" in names and "d2" in names and "inner" in names
    assert keras_internals.has_sublayers(inner)
    assert not keras_internals.has_sublayers(model.get_layer("d2"))
    assert keras_internals.producer(y) is model.get_layer("d2")
    assert len(keras_internals.call_sites(model.get_layer("d2"))) == 1
    seen = []
    keras_internals.run_through_graph(
        model, [x], lambda op, *args, **kwargs: seen.append(op.name) or op(*args, **kwargs)
    )
    assert seen == ["inner", "d2"]
