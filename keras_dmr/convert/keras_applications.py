"""``keras.applications`` models rebuilt from the package's layers, so that ``to_plain`` applies.

Keras' ResNet50/101/152 (ResNet v1) become a functional model whose residual blocks are
:class:`~keras_dmr.layers.ParallelBranchBlock` (one bottleneck branch, stride on the first 1×1
convolution, convolution biases, BN epsilon 1.001e-5); the stem and the head stay the same Keras
layers. MobileNetV2 goes to :func:`keras_dmr.models.mobilenet.from_keras_mobilenet_v2`.
"""

from __future__ import annotations

import re

import keras
import numpy as np

from keras_dmr.errors import ConversionError
from keras_dmr.layers import RESIDUAL_BLOCKS
from keras_dmr.rm.kernels import max_relative_error

SUPPORTED = ("ResNet50", "ResNet101", "ResNet152", "MobileNetV2")
RESNET_V1_STAGES = {
    (3, 4, 6, 3): "ResNet50",
    (3, 4, 23, 3): "ResNet101",
    (3, 8, 36, 3): "ResNet152",
}
DEFAULT_TOLERANCE = 1e-5
VERIFY_SIZE = 64  # height and width of the verification batches when the input size is unknown

_STEM = (
    ("conv1_pad", keras.layers.ZeroPadding2D),
    ("conv1_conv", keras.layers.Conv2D),
    ("conv1_bn", keras.layers.BatchNormalization),
    ("conv1_relu", keras.layers.Activation),
    ("pool1_pad", keras.layers.ZeroPadding2D),
    ("pool1_pool", keras.layers.MaxPooling2D),
)
_HEADS = {
    (): "include_top=False, pooling=None",
    ("avg_pool",): "include_top=False, pooling='avg'",
    ("max_pool",): "include_top=False, pooling='max'",
    ("avg_pool", "predictions"): "include_top=True",
}
_HEAD_TYPES = {
    "avg_pool": keras.layers.GlobalAveragePooling2D,
    "max_pool": keras.layers.GlobalMaxPooling2D,
    "predictions": keras.layers.Dense,
}
_BLOCK_LAYER = re.compile(r"^(conv(\d+)_block(\d+))_(?:([0-3])_(conv|bn|relu)|(add|out))$")
_MOBILENET_V2_LAYERS = {"Conv1", "expanded_conv_depthwise", "expanded_conv_project", "Conv_1"}


def _describe(model) -> str:
    return f"model {getattr(model, 'name', model)!r} ({type(model).__name__})"


def _unsupported(model, why: str) -> ConversionError:
    return ConversionError(
        f"{_describe(model)} cannot be mapped: {why}. Supported: keras.applications "
        f"{', '.join(SUPPORTED)} (ResNet v1: any weights, include_top, pooling and input size)"
    )


def from_keras_application(
    model: keras.Model,
    *,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    verify_inputs=None,
    name: str | None = None,
) -> keras.Model:
    """A functional model of the package's layers computing what ``model`` computes.

    ``model`` is a ``keras.applications`` ResNet50, ResNet101 or ResNet152 (recognised by Keras'
    layer names, so any ResNet v1 stack built the same way also maps), or a MobileNetV2, which is
    handed to :func:`keras_dmr.models.mobilenet.from_keras_mobilenet_v2` (``verify``,
    ``tolerance``, ``verify_inputs`` and ``name`` apply to ResNets only). Weights are copied by
    layer name. With ``verify=True`` both models run on random batches (of 64×64 images when the
    input size is unknown, or ``verify_inputs``) and :class:`ConversionError` is raised above
    ``tolerance`` (maximum relative error); the result carries ``mapping_report``.

    Cannot: ResNet v2, ResNeXt or other applications (VGG16 included: it has no residual block
    and is refused rather than passed through), channels_first models, or a ResNet with layers
    added around it (a nested model, a custom head).
    """
    if not isinstance(model, keras.Model):
        raise _unsupported(model, "it is not a keras.Model")
    names = {layer.name for layer in model.layers}
    if _MOBILENET_V2_LAYERS <= names:
        from keras_dmr.models.mobilenet import from_keras_mobilenet_v2

        return from_keras_mobilenet_v2(model)
    if not {"conv1_conv", "conv2_block1_1_conv"} <= names:
        raise _unsupported(model, "it is not a ResNet v1 or a MobileNetV2 of keras.applications")
    if any(n.endswith("_preact_bn") for n in names) or "post_bn" in names:
        raise _unsupported(model, "ResNet v2 (pre-activation) is not supported")
    mapped, architecture = _map_resnet_v1(model, name or model.name)
    error = None
    if verify:
        if verify_inputs is None:
            rng = np.random.default_rng(0)
            shape = [VERIFY_SIZE if s is None else s for s in model.inputs[0].shape[1:]]
            verify_inputs = [rng.normal(size=(2, *shape)).astype("float32") for _ in range(2)]
        error = max_relative_error(model, mapped, verify_inputs)
        if not error <= tolerance:
            raise ConversionError(
                f"{_describe(model)}: the mapped model differs from it by a maximum relative "
                f"error of {error:.3g}, above the tolerance {tolerance:g}"
            )
    mapped.mapping_report = {
        "source": model.name,
        "architecture": architecture,
        "blocks": sum(1 for layer in mapped.layers if isinstance(layer, RESIDUAL_BLOCKS)),
        "max_relative_error": error,
        "tolerance": tolerance,
    }
    return mapped


# ---------------------------------------------------------------------------------- ResNet v1
def _clone(layer):
    """A fresh copy of a Keras layer (same config); its weights are set once it is built."""
    return type(layer).from_config(layer.get_config())


def _apply_clone(layer, x):
    clone = _clone(layer)
    y = clone(x)
    if layer.weights:
        clone.set_weights(layer.get_weights())
    return y


def _check(model, condition: bool, layer, why: str) -> None:
    if not condition:
        raise _unsupported(model, f"layer {layer.name!r} ({type(layer).__name__}) {why}")


def _parse_resnet_v1(model):
    """Stem layers, blocks (name → {suffix: layer}) in order, and head layers of a ResNet v1."""
    stem, head, blocks = [], [], {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        match = _BLOCK_LAYER.match(layer.name)
        if match:
            block, _, _, index, kind, end = match.groups()
            if head:
                raise _unsupported(model, f"block layer {layer.name!r} after the head")
            blocks.setdefault(block, {})[f"{index}_{kind}" if index else end] = layer
        elif layer.name in dict(_STEM):
            if blocks:
                raise _unsupported(model, f"stem layer {layer.name!r} after a residual block")
            stem.append(layer)
        elif layer.name in _HEAD_TYPES:
            head.append(layer)
        else:
            raise _unsupported(
                model,
                f"layer {layer.name!r} ({type(layer).__name__}) is not part of Keras' ResNet v1",
            )
    if [layer.name for layer in stem] != [n for n, _ in _STEM]:
        raise _unsupported(model, "its stem is not conv1_pad, conv1_conv, ..., pool1_pool")
    for layer, (_, cls) in zip(stem, _STEM, strict=True):
        _check(model, isinstance(layer, cls), layer, f"is not a {cls.__name__}")
    if tuple(layer.name for layer in head) not in _HEADS:
        raise _unsupported(model, f"its head {[layer.name for layer in head]} is not Keras' own")
    for layer in head:
        cls = _HEAD_TYPES[layer.name]
        _check(model, isinstance(layer, cls), layer, f"is not a {cls.__name__}")
    return stem, blocks, head


def _block_spec(model, block: str, layers: dict) -> dict:
    """The ParallelBranchBlock arguments of one Keras bottleneck block, after checking it."""
    required = ["1_conv", "1_bn", "1_relu", "2_conv", "2_bn", "2_relu", "3_conv", "3_bn"]
    required += ["add", "out"]
    projection = "0_conv" in layers or "0_bn" in layers
    if projection:
        required += ["0_conv", "0_bn"]
    missing = [s for s in required if s not in layers]
    extra = sorted(set(layers) - set(required))
    if missing or extra:
        raise _unsupported(
            model,
            f"block {block!r} is not a Keras ResNet v1 bottleneck (missing {missing}, "
            f"unexpected {extra})",
        )
    convs = {s: layers[f"{s}_conv"] for s in ("0", "1", "2", "3") if f"{s}_conv" in layers}
    bns = [layers[f"{s}_bn"] for s in convs]
    for s, conv in convs.items():
        _check(model, type(conv) is keras.layers.Conv2D, conv, "is not a plain Conv2D")
        _check(model, conv.data_format == "channels_last", conv, "is not channels_last")
        _check(model, tuple(conv.dilation_rate) == (1, 1) and conv.groups == 1, conv, "is odd")
        _check(model, conv.strides[0] == conv.strides[1], conv, "has non-square strides")
        linear = keras.activations.serialize(conv.activation) == "linear"
        _check(model, linear, conv, "has an activation")
        size = 3 if s == "2" else 1
        _check(model, tuple(conv.kernel_size) == (size, size), conv, f"is not {size}×{size}")
    _check(model, convs["2"].padding == "same", convs["2"], "is not 'same' padded")
    for s in ("2", "3"):
        _check(model, convs[s].strides[0] == 1, convs[s], "is strided")
    strides = convs["1"].strides[0]
    if projection:
        _check(model, convs["0"].strides[0] == strides, convs["0"], "has another stride")
    use_bias = convs["1"].use_bias
    for conv in convs.values():
        _check(model, conv.use_bias == use_bias, conv, "differs from `_1_conv` in use_bias")
    epsilon = bns[0].epsilon
    for bn in bns:
        _check(model, bn.axis in (-1, 3) and bn.center and bn.scale, bn, "is not a plain BN")
        _check(model, bn.epsilon == epsilon, bn, "differs from `_1_bn` in epsilon")
    for s in ("1_relu", "2_relu", "out"):
        act = layers[s]
        _check(
            model,
            isinstance(act, keras.layers.Activation)
            and keras.activations.serialize(act.activation) == "relu",
            act,
            "is not a ReLU",
        )
    _check(model, isinstance(layers["add"], keras.layers.Add), layers["add"], "is not an Add")
    return {
        "filters": convs["3"].filters,
        "bottleneck_width": convs["1"].filters,
        "strides": strides,
        "use_bias": use_bias,
        "bn_epsilon": epsilon,
        "projection": projection,
    }


def _map_resnet_v1(model, name: str) -> tuple[keras.Model, str]:
    from keras_dmr.layers.blocks import ParallelBranchBlock

    stem, blocks, head = _parse_resnet_v1(model)
    source = model.inputs[0]
    inputs = keras.Input(shape=source.shape[1:], dtype=source.dtype, name=source.name)
    x = inputs
    for layer in stem:
        x = _apply_clone(layer, x)
    stages: dict[int, int] = {}
    for block, layers in blocks.items():
        spec = _block_spec(model, block, layers)
        has_projection = spec.pop("projection")
        stage = int(_BLOCK_LAYER.match(f"{block}_add").group(2))
        stages[stage] = stages.get(stage, 0) + 1
        layer = ParallelBranchBlock(
            branches=1,
            mapping="identity",
            branch="bottleneck",
            stride_on="first",
            name=block,
            **spec,
        )
        x = layer(x)
        if layer.needs_projection != has_projection:
            raise _unsupported(
                model,
                f"block {block!r}: a projection shortcut is "
                f"{'present' if has_projection else 'absent'} though its stride and widths "
                f"{'need none' if has_projection else 'need one'}",
            )
        pairs = [(("1_conv", "1_bn"), layer.paths[0][0])]
        pairs += [(("2_conv", "2_bn"), layer.paths[0][1]), (("3_conv", "3_bn"), layer.paths[0][2])]
        if has_projection:
            pairs.append((("0_conv", "0_bn"), layer.projection[0]))
        for suffixes, targets in pairs:
            for suffix, target in zip(suffixes, targets, strict=True):
                try:
                    target.set_weights(layers[suffix].get_weights())
                except ValueError as err:
                    raise _unsupported(
                        model, f"weights of {layers[suffix].name!r} do not fit: {err}"
                    ) from err
    for layer in head:
        x = _apply_clone(layer, x)
    counts = tuple(stages[s] for s in sorted(stages))
    architecture = RESNET_V1_STAGES.get(counts, f"ResNet v1 with {counts} blocks per stage")
    return keras.Model(inputs, x, name=name), architecture
