"""Quantization-aware fine-tuning: train a (plain) model a few epochs through fake-quantized
weights and inputs, then hand its float weights to a post-training int8 exporter.

:func:`prepare` rewrites every ``Conv2D`` (the package's ``GroupedConv2D`` included),
``DepthwiseConv2D`` and ``Dense`` of a functional or sequential model into its fake-quantized
counterpart (:mod:`keras_dmr.layers.fake_quant`), with the same weights; :func:`strip` copies
the fine-tuned weights back into the model's own architecture; :func:`fine_tune` does both
around ``fit`` with a small constant-then-cosine learning rate. The result is a float model
whose weights sit where the int8 grid puts them and whose activations the network learned to
tolerate rounded; the exporters then quantize it as any model (calibrating their own ranges).
RepVGG's fused kernels are the case this exists for (docs/quantization.md).

What it cannot do: subclassed models (no layer graph to rewrite) and layers it does not know
(transposed convolutions, attention) are refused by :func:`prepare` naming the
layer, unless ``skip_unknown`` leaves them float; BatchNormalization is not folded first (a
plain model from :func:`keras_dmr.to_plain` has none).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras

from keras_dmr.layers.fake_quant import FAKE_QUANT_LAYERS
from keras_dmr.utils.keras_internals import Functional

FAKE_QUANT_CLASSES = tuple(FAKE_QUANT_LAYERS.values())

# The weight grid each exporter's int8 uses: ONNX Runtime's QDQ keeps weights to 7 bits
# (reduce_range, keras_dmr.export.onnx.QDQ_SETTINGS); LiteRT and OpenVINO use all 8.
WEIGHT_BITS = {"onnx": 7, "litert": 8, "openvino": 8}
LEARNING_RATE = 1e-3
_WEIGHTED_UNKNOWN = "a layer with a kernel that QAT cannot simulate"


def _counterpart(layer):
    """The fake-quantized class for ``layer`` (its exact Keras class only), or None."""
    return FAKE_QUANT_LAYERS.get(type(layer))


def prepare(
    model: keras.Model, *, weight_bits: int = 8, momentum: float = 0.99, skip_unknown=False
) -> keras.Model:
    """A copy of ``model`` with every ``Conv2D``, ``GroupedConv2D``, ``DepthwiseConv2D`` and
    ``Dense`` replaced by its fake-quantized counterpart (same name, same weights; inputs'
    ranges start unset and are set by the first training batch).

    Args:
        model: a functional or sequential Keras model.
        weight_bits: the kernels' grid (see :data:`WEIGHT_BITS`).
        momentum: of the input ranges' moving average.
        skip_unknown: leave other weighted layers float instead of refusing the model.

    Returns:
        The fake-quantized model (not compiled).

    Raises:
        ValueError: ``model`` is subclassed, or has a weighted layer of another class (its
            name and class said) and ``skip_unknown`` is false.
    """
    if not isinstance(model, Functional):  # a Sequential model is a Functional one
        raise ValueError(f"{model.name}: QAT rewrites functional or sequential models only")
    unknown = [  # a layer with a kernel: a product the int8 exporters quantize
        f"{layer.name} ({type(layer).__name__})"
        for layer in model.layers
        if hasattr(layer, "kernel") and _counterpart(layer) is None
    ]
    if unknown and not skip_unknown:
        raise ValueError(
            f"{model.name} has {_WEIGHTED_UNKNOWN}: {', '.join(unknown)}; QAT simulates Conv2D, "
            "GroupedConv2D, DepthwiseConv2D and Dense (pass skip_unknown=True to leave the "
            "others float)"
        )
    extra = {"weight_bits": weight_bits, "momentum": momentum}

    def clone(layer):
        cls = _counterpart(layer)
        config = layer.get_config()
        return cls.from_config({**config, **extra}) if cls else type(layer).from_config(config)

    quantized = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, quantized.layers, strict=True):
        weights = source.get_weights()
        if weights:
            target.set_weights(weights + target.get_weights()[len(weights) :])
    return quantized


def strip(quantized: keras.Model, like: keras.Model) -> keras.Model:
    """A copy of ``like`` (the model :func:`prepare` was given) holding ``quantized``'s
    fine-tuned weights; the fake-quantized layers' input ranges are dropped."""
    model = keras.models.clone_model(like)
    for target, source in zip(model.layers, quantized.layers, strict=True):
        count = len(target.get_weights())
        if count:
            target.set_weights(source.get_weights()[:count])
    return model


def fine_tune(
    model: keras.Model,
    train,
    *,
    epochs: int,
    engine: str = "onnx",
    learning_rate: float = LEARNING_RATE,
    steps_per_epoch: int | None = None,
    validation_data=None,
    verbose: int | str = "auto",
    callbacks: list | None = None,
    log: Callable[[str], None] = print,
) -> keras.Model:
    """``model`` fine-tuned ``epochs`` epochs on ``train`` (``(images, labels)`` batches, as
    the model was trained on: normalised) through fake quantization for ``engine``'s int8
    (:data:`WEIGHT_BITS`), with SGD (momentum 0.9) at ``learning_rate`` decayed by a cosine to
    zero; returns the float model (:func:`strip`), ``model`` itself untouched, with a
    ``qat_report`` attribute (epochs, bits, last training loss and accuracy through fake
    quantization, and ``model``'s ``conversion_report`` when it has one) that the exporters
    store in their metadata under ``qat``.

    Only the fake-quantized layers train (kernels and biases): every other layer is frozen,
    so a plain model's PReLU slopes stay exactly 0 and 1 (the exporters split on them) and
    BatchNormalization, if any, keeps its statistics. The input ranges are set by the first
    training batch."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer; got {epochs!r}")
    if engine not in WEIGHT_BITS:
        raise ValueError(f"`engine` must be one of {sorted(WEIGHT_BITS)}; got {engine!r}")
    quantized = prepare(model, weight_bits=WEIGHT_BITS[engine])
    for layer in quantized.layers:  # PReLU slopes of 0 and 1 stay exact, BN statistics frozen
        layer.trainable = isinstance(layer, FAKE_QUANT_CLASSES)
    steps = steps_per_epoch or _steps(train)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, epochs * steps))
    quantized.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=_has_logits(model)),
        metrics=["accuracy"],
    )
    log(
        f"QAT: {epochs} epoch(s) of {model.name} through {WEIGHT_BITS[engine]}-bit weights and "
        f"8-bit inputs ({engine}), learning rate {learning_rate:g} with cosine decay"
    )
    history = quantized.fit(
        train,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=validation_data,
        verbose=verbose,
        callbacks=callbacks,
        shuffle=False,  # the pipeline shuffles
    )
    tuned = strip(quantized, model)
    tuned.qat_report = {  # the exporters store it in their metadata ("qat")
        "epochs": epochs,
        "steps_per_epoch": steps,
        "engine": engine,
        "weight_bits": WEIGHT_BITS[engine],
        "activation_bits": 8,
        "learning_rate": learning_rate,
        "loss": float(history.history["loss"][-1]),
        "accuracy": float(history.history["accuracy"][-1]),
        "conversion": getattr(model, "conversion_report", None),
    }
    return tuned


def _has_logits(model: keras.Model) -> bool:
    """Whether the model's last layer outputs logits (no softmax)."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", "")
    return name != "softmax" and type(last).__name__ != "Softmax"


def _steps(train) -> int:
    """Batches per epoch of a finite ``train`` (a tf.data dataset or a PyDataset)."""
    try:
        n = len(train)
    except TypeError:
        cardinality = getattr(train, "cardinality", None)
        n = int(cardinality()) if cardinality else -1
    if n is None or n < 1 or (isinstance(n, float) and math.isinf(n)):
        raise ValueError(
            "`train` must be a finite dataset of (images, labels) batches, or pass "
            "`steps_per_epoch`"
        )
    return int(n)
