"""MobileNetV2 and its RM conversion to MobileNetV1 (RMNet paper, Sec. 4.4 and 5.3, Fig. 6).

Two variants of one builder, :class:`MobileNetV2`:

* ``variant="cifar"``: Sec. 5.3's re-designed MobileNetV2, whose plain form (``to_plain``: RM,
  then the projection of each block fused with the next block's expansion, Eq. 5) is exactly
  MobileNetV1 (Howard et al., CIFAR form: 3×3 stem 3→32 at stride 1, thirteen depthwise-separable
  layers with depthwise widths 32, 64/2, 128, 128/2, 256, 256/2, 512×5, 512/2, 1024, global
  pooling, classifier). Stem 3×3 conv 3→32; block 0 is a depthwise 32 + projection to 32·f (no
  expansion, no residual); then the blocks of ``CIFAR_SETTINGS`` (t, c, n, s) with
  ``hidden = t·c_in``. A residual block reserves its ``c_in`` shortcut channels, so its plain
  depthwise width is ``(t + 1)·c_in``: MobileNetV1's widths (e.g. t = 3, c = 32: 96 + 32 = 128).
  Block inputs and outputs have ``f·c`` channels (the wide bottleneck, default f = 8, the
  authors' "t_free"), of which the first c carry the shortcut. A last 1×1 conv → 1024 (+BN, act)
  fuses with the last projection. ReLU by default (Fig. 6). ``alpha`` scales every width
  (rounded to multiples of 8); alpha = 1 is the one that reproduces MobileNetV1.
* ``variant="imagenet"``: Sandler et al.'s MobileNetV2, layer for layer as
  ``keras.applications.MobileNetV2`` (same widths, rounding, ReLU6, BN epsilon 1e-3 and momentum
  0.999, padding of the stride-2 depthwise convolutions); :func:`from_keras_mobilenet_v2` copies
  a Keras model's weights into it.
"""

from __future__ import annotations

import re

import keras
import numpy as np

from keras_dmr.errors import ConversionError
from keras_dmr.layers.blocks import check_choice
from keras_dmr.layers.conv import BN_EPSILON, conv2d
from keras_dmr.layers.inverted import ACTIVATIONS, InvertedResidualBlock, keras_pads
from keras_dmr.models.base import (
    DEFAULT_CLASSES,
    ResidualClassifier,
    check_model_kwargs,
    classifier_head,
    resolve_head,
)
from keras_dmr.rm.kernels import max_relative_error, same_output_size

# (expansion t, output channels c, repeats n, stride of the first s); block 0 is the first row.
CIFAR_SETTINGS = (
    (1, 32, 1, 1),
    (2, 32, 1, 2),
    (3, 32, 1, 1),
    (4, 64, 1, 2),
    (3, 64, 1, 1),
    (4, 128, 1, 2),
    (3, 128, 5, 1),
    (4, 256, 1, 2),
    (3, 256, 1, 1),
)
IMAGENET_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_FILTERS = 32
LAST_FILTERS = {"cifar": 1024, "imagenet": 1280}
DEFAULT_BOTTLENECK_FACTOR = {"cifar": 8, "imagenet": 1}
DEFAULT_ACTIVATION = {"cifar": "relu", "imagenet": "relu6"}
# BatchNorm (epsilon, momentum): the package's on CIFAR, keras.applications' on ImageNet.
BN_SETTINGS = {"cifar": (BN_EPSILON, 0.9), "imagenet": (1e-3, 0.999)}
STRIDE_TWO_OPS = {"cifar": 4, "imagenet": 5}


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` (at least ``divisor``), not below 90% of ``value``
    (the rounding of MobileNetV2's widths)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def mobilenet_v2_widths(variant: str, alpha: float) -> tuple[int, list[int], int]:
    """Stem filters, ``filters`` (C) of every block, and last-conv filters for ``alpha``."""
    stem = make_divisible(STEM_FILTERS * alpha)
    settings = CIFAR_SETTINGS if variant == "cifar" else IMAGENET_SETTINGS
    filters = [make_divisible(int(c * alpha)) for _, c, n, _ in settings for _ in range(n)]
    last = LAST_FILTERS[variant]
    if variant == "cifar" or alpha > 1.0:  # Keras keeps 1280 for alpha <= 1
        last = make_divisible(last * alpha)
    return stem, filters, last


def block_plan(variant: str) -> list[tuple[int, int]]:
    """(expansion, stride) of every block."""
    settings = CIFAR_SETTINGS if variant == "cifar" else IMAGENET_SETTINGS
    return [(t, s if i == 0 else 1) for t, _, n, s in settings for i in range(n)]


def _relu(activation: str, name: str):
    return keras.layers.ReLU(max_value=6.0 if activation == "relu6" else None, name=name)


@keras.saving.register_keras_serializable(package="keras_dmr")
class MobileNetV2(ResidualClassifier):
    """MobileNetV2 whose ``to_plain`` form is MobileNetV1 (``variant="cifar"``), or the
    standard MobileNetV2 of ``keras.applications`` (``variant="imagenet"``).

    Args:
        variant: ``"cifar"`` (Sec. 5.3's re-design, 32×32, 4 stride-2 blocks) or
            ``"imagenet"`` (Sandler et al., 224×224, stride-2 stem + 4 stride-2 blocks).
        alpha: width multiplier (> 0), rounded to multiples of 8 as Keras does.
        bottleneck_factor: f, the wide bottleneck (blocks read and write f·C channels, the
            shortcut covers the first C). Default 8 on CIFAR, 1 on ImageNet.
        activation: ``"relu"`` or ``"relu6"``; default ``"relu"`` on CIFAR, ``"relu6"`` on
            ImageNet.
        input_shape, classes, include_top, pooling, classifier_activation, weights: as in
            ``keras.applications``; ``classifier_activation=None`` (default) outputs logits and
            ``weights`` is a path (for ImageNet weights convert ``keras.applications.MobileNetV2
            (weights="imagenet")`` with :func:`from_keras_mobilenet_v2`).
        compile: compile with the package recipe (:mod:`keras_dmr.recipe`) so ``fit`` works.

    Cannot: other block settings than the two tables, depth multipliers, or ``to_plain``
    without a fixed ``input_shape`` unless verification inputs are given.
    """

    def __init__(
        self,
        *,
        variant: str = "cifar",
        alpha: float = 1.0,
        bottleneck_factor: int | None = None,
        activation: str | None = None,
        input_shape: tuple | None = None,
        classes: int | None = None,
        include_top: bool = True,
        pooling: str | None = None,
        classifier_activation: str | None = None,
        weights: str | None = None,
        compile: bool = True,
        name: str | None = None,
        **kwargs,
    ):
        input_shape, classes = resolve_head(
            variant,
            input_shape,
            classes,
            pooling=pooling,
            classifier_activation=classifier_activation,
            weights=weights,
            family="MobileNetV2's",
            downsamples=STRIDE_TWO_OPS,
        )
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ValueError(f"`alpha` must be a number > 0; got {alpha!r}")
        alpha = float(alpha)
        f = DEFAULT_BOTTLENECK_FACTOR[variant] if bottleneck_factor is None else bottleneck_factor
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"`bottleneck_factor` must be an integer >= 1; got {f!r}")
        activation = activation or DEFAULT_ACTIVATION[variant]
        check_choice("activation", activation, ACTIVATIONS)

        epsilon, momentum = BN_SETTINGS[variant]

        def bn(name):
            return keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name=name)

        stem, filters, last = mobilenet_v2_widths(variant, alpha)
        inputs = keras.Input(shape=input_shape, name="images")
        x = conv2d(stem, 3, strides=1 if variant == "cifar" else 2, name="stem_conv")(inputs)
        x = bn("stem_bn")(x)
        x = _relu(activation, "stem_relu")(x)
        for i, (c, (t, s)) in enumerate(zip(filters, block_plan(variant), strict=True)):
            x = InvertedResidualBlock(
                c,
                expansion=t,
                strides=s,
                bottleneck_factor=f,
                activation=activation,
                residual=False if variant == "cifar" and i == 0 else None,
                padding="same" if variant == "cifar" else "keras",
                bn_epsilon=epsilon,
                bn_momentum=momentum,
                name=f"block_{i}",
            )(x)
        x = conv2d(last, 1, name="last_conv")(x)
        x = bn("last_bn")(x)
        x = _relu(activation, "last_relu")(x)
        x = classifier_head(
            x,
            include_top=include_top,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
        )
        default = f"mobilenetv2_cifar_f{f}" if variant == "cifar" else f"mobilenetv2_{alpha:0.2f}"
        check_model_kwargs(type(self).__name__, kwargs)
        super().__init__(inputs=inputs, outputs=x, name=name or default, **kwargs)
        self._finish(
            dict(
                variant=variant,
                alpha=alpha,
                bottleneck_factor=f,
                activation=activation,
                input_shape=list(input_shape),
                classes=classes,
                include_top=include_top,
                pooling=pooling,
                classifier_activation=classifier_activation,
                compile=compile,
            ),
            weights,
        )


# ------------------------------------------------------------------- keras.applications import
_KERAS_BLOCK = re.compile(
    r"^(expanded_conv|block_(\d+))_(expand|expand_BN|expand_relu|pad|depthwise|depthwise_BN|"
    r"depthwise_relu|project|project_BN|add)$"
)
_KERAS_STEM = {"Conv1": "stem_conv", "bn_Conv1": "stem_bn", "Conv1_relu": None}
_KERAS_LAST = {"Conv_1": "last_conv", "Conv_1_bn": "last_bn", "out_relu": None}
_KERAS_SUBLAYERS = {
    "expand": "expand",
    "expand_BN": "expand_bn",
    "depthwise": "depthwise",
    "depthwise_BN": "depthwise_bn",
    "project": "project",
    "project_BN": "project_bn",
}
_ALPHA_CANDIDATES = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def _fail(model, layer, why: str) -> ConversionError:
    what = f"layer {layer.name!r} ({type(layer).__name__}) " if layer is not None else ""
    return ConversionError(
        f"model {model.name!r} is not a keras.applications MobileNetV2: {what}{why}"
    )


def _check_keras_layer(model, layer, kind: str, strides: int = 1) -> None:
    """Raise unless ``layer`` is what keras.applications' MobileNetV2 puts there."""

    def need(condition, why):
        if not condition:
            raise _fail(model, layer, why)

    if kind == "conv":
        need(type(layer) in (keras.layers.Conv2D,), "is not a Conv2D")
        need(layer.data_format == "channels_last", "is not channels_last")
        need(not layer.use_bias and layer.groups == 1, "has a bias or groups")
        need(tuple(layer.dilation_rate) == (1, 1), "is dilated")
        need(keras.activations.serialize(layer.activation) == "linear", "has an activation")
    elif kind == "depthwise":
        need(isinstance(layer, keras.layers.DepthwiseConv2D), "is not a DepthwiseConv2D")
        need(tuple(layer.kernel_size) == (3, 3), "is not 3×3")
        need(layer.depth_multiplier == 1 and not layer.use_bias, "has a multiplier or bias")
        need(tuple(layer.strides) == (strides, strides), f"does not have stride {strides}")
        need(tuple(layer.dilation_rate) == (1, 1), "is dilated")
        need(keras.activations.serialize(layer.activation) == "linear", "has an activation")
        need(layer.padding == ("same" if strides == 1 else "valid"), "has another padding")
    elif kind == "bn":
        need(isinstance(layer, keras.layers.BatchNormalization), "is not a BatchNormalization")
        need(layer.axis in (-1, 3) and layer.center and layer.scale, "is not a plain BN")
        epsilon = BN_SETTINGS["imagenet"][0]
        need(layer.epsilon == epsilon, f"has epsilon {layer.epsilon}, not {epsilon}")
    elif kind == "relu6":
        need(
            isinstance(layer, keras.layers.ReLU)
            and layer.max_value is not None
            and float(layer.max_value) == 6.0
            and float(layer.negative_slope) == 0
            and float(layer.threshold) == 0,
            "is not ReLU6",
        )


def _parse_keras_mobilenet_v2(model):
    """Stem, blocks (index → {suffix: layer}) and head layers of a Keras MobileNetV2."""
    stem, last, head, blocks = {}, {}, [], {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        match = _KERAS_BLOCK.match(layer.name)
        if match and not last:
            index = 0 if match.group(1) == "expanded_conv" else int(match.group(2))
            blocks.setdefault(index, {})[match.group(3)] = layer
        elif layer.name in _KERAS_STEM and not blocks:
            stem[layer.name] = layer
        elif layer.name in _KERAS_LAST and not head:
            last[layer.name] = layer
        elif isinstance(
            layer, keras.layers.GlobalAveragePooling2D | keras.layers.GlobalMaxPooling2D
        ):
            if head or getattr(layer, "keepdims", False):
                raise _fail(model, layer, "is not the one global pooling of the head")
            head.append(layer)
        elif isinstance(layer, keras.layers.Dense) and layer.name == "predictions":
            if len(head) != 1 or not isinstance(head[0], keras.layers.GlobalAveragePooling2D):
                raise _fail(model, layer, "does not follow global average pooling")
            head.append(layer)
        else:
            raise _fail(model, layer, "is not part of it (or out of place)")
    for names, found in ((_KERAS_STEM, stem), (_KERAS_LAST, last)):
        missing = [n for n in names if n not in found]
        if missing:
            raise _fail(model, None, f"layers {missing} are missing")
    expected = list(range(sum(n for _, _, n, _ in IMAGENET_SETTINGS)))
    if sorted(blocks) != expected:
        raise _fail(model, None, f"its blocks are {sorted(blocks)}, not 0..{expected[-1]}")
    return stem, blocks, last, head


def _keras_block_spec(model, index: int, layers: dict, stride: int, input_hw) -> dict:
    required = ["depthwise", "depthwise_BN", "depthwise_relu", "project", "project_BN"]
    if index:
        required += ["expand", "expand_BN", "expand_relu"]
    if stride == 2:
        required.append("pad")
    allowed = {*required, "add"}
    missing = [s for s in required if s not in layers]
    extra = sorted(set(layers) - allowed)
    if missing or extra:
        some = next(iter(layers.values()))
        raise _fail(model, some, f"block {index} misses {missing} or has extra {extra}")
    for suffix, layer in layers.items():
        kind = {"expand": "conv", "project": "conv", "depthwise": "depthwise"}.get(suffix)
        if suffix.endswith("_BN"):
            kind = "bn"
        elif suffix.endswith("_relu"):
            kind = "relu6"
        if kind is not None:
            _check_keras_layer(model, layer, kind, stride)
    for suffix in ("expand", "project"):
        if suffix in layers:
            layer = layers[suffix]
            if tuple(layer.kernel_size) != (1, 1) or tuple(layer.strides) != (1, 1):
                raise _fail(model, layer, "is not a 1×1 stride-1 convolution")
    if "pad" in layers:
        pad = layers["pad"]
        pads = tuple(tuple(int(v) for v in p) for p in pad.padding)
        if not isinstance(pad, keras.layers.ZeroPadding2D) or pads != keras_pads(input_hw):
            raise _fail(model, pad, f"does not pad {keras_pads(input_hw)}")
    if "add" in layers and not isinstance(layers["add"], keras.layers.Add):
        raise _fail(model, layers["add"], "is not an Add")
    return {"filters": layers["project"].filters, "residual": "add" in layers}


def _keras_alpha(stem: int, filters: list[int], last: int) -> float | None:
    """An alpha giving these widths: the model's name, Keras' list, then finer and finer."""
    widths = (stem, filters, last)
    candidates = list(_ALPHA_CANDIDATES)
    for step in (0.05, 0.01, 0.001, 0.0001):
        candidates += [round(k * step, 4) for k in range(1, int(4 / step) + 1)]
    for alpha in candidates:
        if mobilenet_v2_widths("imagenet", alpha) == widths:
            return alpha
    return None


def from_keras_mobilenet_v2(
    model: keras.Model,
    *,
    verify: bool = True,
    tolerance: float = 1e-5,
    verify_inputs=None,
    name: str | None = None,
) -> MobileNetV2:
    """The ``variant="imagenet"`` :class:`MobileNetV2` computing what a
    ``keras.applications.MobileNetV2`` computes, its weights copied layer by layer.

    Any alpha, input size (a model of unknown size keeps Keras' padding rule), head
    (``include_top``, ``pooling``), classifier activation and weights. Every layer is checked
    against Keras' structure; :class:`~keras_dmr.convert.ConversionError` names the first that
    differs. With ``verify=True`` both models run on random batches (64×64 where the size is
    unknown, or ``verify_inputs``) and an error above ``tolerance`` (maximum relative error)
    raises. The result is not compiled and carries ``mapping_report``.

    Cannot: a MobileNetV2 whose layers were renamed, wrapped in another model, extended with
    other layers, or built channels_first.

    Args:
        model: a ``keras.applications.MobileNetV2``.
        verify: compare both models' outputs.
        tolerance: maximum relative error of ``verify``.
        verify_inputs: arrays to verify on instead of random batches.
        name: the new model's name.

    Returns:
        The :class:`MobileNetV2`.
    """
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs"):
        raise ConversionError(f"{model!r} is not a functional keras.Model")
    stem, blocks, last, head = _parse_keras_mobilenet_v2(model)
    for layer_name, kind in (("Conv1", "conv"), ("bn_Conv1", "bn"), ("Conv1_relu", "relu6")):
        _check_keras_layer(model, stem[layer_name], kind)
    for layer_name, kind in (("Conv_1", "conv"), ("Conv_1_bn", "bn"), ("out_relu", "relu6")):
        _check_keras_layer(model, last[layer_name], kind)
    conv1 = stem["Conv1"]
    if tuple(conv1.kernel_size) != (3, 3) or tuple(conv1.strides) != (2, 2):
        raise _fail(model, conv1, "is not a 3×3 stride-2 convolution")
    if conv1.padding != "same":
        raise _fail(model, conv1, "is not 'same' padded")

    input_shape = tuple(model.inputs[0].shape[1:])
    hw = tuple(same_output_size(n, 2) for n in input_shape[:2])
    specs = []
    for index, (_, stride) in enumerate(block_plan("imagenet")):
        specs.append(_keras_block_spec(model, index, blocks[index], stride, hw))
        if stride == 2:
            hw = tuple(same_output_size(n, 2) for n in hw)
    widths = (conv1.filters, [s["filters"] for s in specs], last["Conv_1"].filters)
    alpha = _keras_alpha(*widths)
    if alpha is None:
        raise _fail(model, None, f"no width multiplier gives its widths {widths}")

    include_top = bool(head) and isinstance(head[-1], keras.layers.Dense)
    pooling = None
    if head and not include_top:
        pooling = "avg" if isinstance(head[0], keras.layers.GlobalAveragePooling2D) else "max"
    classes, classifier_activation = DEFAULT_CLASSES["imagenet"], None
    if include_top:
        dense = head[-1]
        classes = int(dense.units)
        activation = keras.activations.serialize(dense.activation)
        classifier_activation = None if activation == "linear" else activation
        if not dense.use_bias:
            raise _fail(model, dense, "has no bias")
    mapped = MobileNetV2(
        variant="imagenet",
        alpha=alpha,
        input_shape=input_shape,
        classes=classes,
        include_top=include_top,
        pooling=pooling,
        classifier_activation=classifier_activation,
        compile=False,
        name=name or model.name,
    )

    pairs = [(stem["Conv1"], mapped.get_layer("stem_conv"))]
    pairs += [(stem["bn_Conv1"], mapped.get_layer("stem_bn"))]
    for index, (block, spec) in enumerate(zip(mapped.blocks, specs, strict=True)):
        source = blocks[index]
        t = block.expansion
        if block.has_residual != spec["residual"] or (t != 1) != ("expand" in source):
            raise _fail(model, source["project"], "differs from Keras' rule for its block")
        for suffix, attribute in _KERAS_SUBLAYERS.items():
            if suffix in source:
                pairs.append((source[suffix], getattr(block, attribute)))
    pairs += [(last["Conv_1"], mapped.get_layer("last_conv"))]
    pairs += [(last["Conv_1_bn"], mapped.get_layer("last_bn"))]
    if include_top:
        pairs.append((head[-1], mapped.get_layer("predictions")))
    for source, target in pairs:
        weights = source.get_weights()
        if [w.shape for w in weights] != [tuple(w.shape) for w in target.weights]:
            raise _fail(model, source, f"has weights of another shape than {target.name!r}")
        target.set_weights(weights)

    error = None
    if verify:
        if verify_inputs is None:
            rng = np.random.default_rng(0)
            shape = [64 if s is None else s for s in input_shape]
            verify_inputs = [rng.normal(size=(2, *shape)).astype("float32") for _ in range(2)]
        error = max_relative_error(model, mapped, verify_inputs)
        if not error <= tolerance:
            raise ConversionError(
                f"model {model.name!r}: the mapped MobileNetV2 differs from it by a maximum "
                f"relative error of {error:.3g}, above the tolerance {tolerance:g}"
            )
    mapped.mapping_report = {
        "source": model.name,
        "architecture": "MobileNetV2",
        "alpha": alpha,
        "blocks": len(mapped.blocks),
        "max_relative_error": error,
        "tolerance": tolerance,
    }
    return mapped
