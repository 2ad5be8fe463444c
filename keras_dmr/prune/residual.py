"""The baseline of Fig. 7: network slimming of the residual network itself, where the channels a
shortcut adds together can only go together; and BN folding of a pruned model."""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np

from keras_dmr.layers.blocks import ParallelBranchBlock
from keras_dmr.layers.conv import bn_weights
from keras_dmr.layers.streams import ChannelScale
from keras_dmr.prune.slim import (
    _balance,
    _build_unit_layers,
    _report,
    _validate,
    threshold_for_ratio,
)
from keras_dmr.prune.units import (
    Unit,
    clone_layer,
    describe_layer,
    input_like,
    is_activation,
    is_global_pool,
    is_passthrough,
    is_residual_block,
    layer_chain,
    make_unit,
)
from keras_dmr.rm import kernels
from keras_dmr.utils import keras_internals
from keras_dmr.utils.arguments import renamed_keyword


# ----------------------------------------------------------------- the residual baseline
def _block_units(block: ParallelBranchBlock) -> list[Unit]:
    units = []
    for i, (conv, bn) in enumerate(block.paths[0]):
        act = keras.layers.ReLU() if i < len(block.paths[0]) - 1 else None
        units.append(make_unit(conv, bn, act))
    return units


def _check_block(block) -> None:
    if not isinstance(block, ParallelBranchBlock):
        raise ValueError(f"{describe_layer(block)} is not a residual block slim_residual can prune")
    if block.branches != 1:
        raise ValueError(
            f"{describe_layer(block)} has {block.branches} branches: slim_residual prunes ResNets "
            "(branches=1); prune a multi-branch network's plain form with slim"
        )
    if block.branch not in ("basic", "bottleneck") or block.groups != 1:
        raise ValueError(
            f"{describe_layer(block)}: slim_residual supports basic and bottleneck branches "
            f"without groups; got branch={block.branch!r}, groups={block.groups}"
        )


@dataclasses.dataclass
class _Block:
    layer: ParallelBranchBlock
    units: list
    projection: Unit | None
    scale: np.ndarray  # the skip scale s (ones without skip_bn)
    scale_stats: tuple | None  # (mean, var) of the block input, with skip_bn
    sum_stats: tuple | None  # (mean, var) of the sum before the ReLU, with skip_bn
    space: int = 0  # index of the stream (channel space tied by the shortcuts) it writes


def _parse_residual(model):
    layers = layer_chain(model, "model")
    for layer in layers:
        if is_residual_block(layer):
            _check_block(layer)
    stem, blocks, head, i = [], [], [], 0
    while i < len(layers) and not is_residual_block(layers[i]):
        layer = layers[i]
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(
            layer, keras.layers.SeparableConv2D
        ):
            if layer.groups != 1:
                raise ValueError(
                    f"{describe_layer(layer)}: grouped stem convolutions are unsupported"
                )
            bn = layers[i + 1] if i + 1 < len(layers) else None
            act = layers[i + 2] if i + 2 < len(layers) else None
            act = act if is_activation(act) else None
            stem.append(make_unit(layer, bn, act))
            i += 2 if act is None else 3
            continue
        if isinstance(layer, keras.layers.ZeroPadding2D | keras.layers.MaxPooling2D):
            stem.append(("layer", layer))
        else:
            raise ValueError(f"{describe_layer(layer)} is not supported in a ResNet's stem")
        i += 1
    while i < len(layers) and is_residual_block(layers[i]):
        block = layers[i]
        _check_block(block)
        units = _block_units(block)
        projection = None
        if block.projection:
            conv, bn = block.projection[0]
            projection = make_unit(conv, bn, None)
        d_in = units[0].kernel.shape[2]
        if block.skip_bn:
            s, m, v = (np.asarray(w, np.float64) for w in block.skip_scale.get_weights())
            sm, sv = (np.asarray(w, np.float64) for w in block.sum_stats.get_weights())
            blocks.append(_Block(block, units, projection, s, (m, v), (sm, sv)))
        else:
            blocks.append(_Block(block, units, projection, np.ones(d_in), None, None))
        i += 1
    for layer in layers[i:]:
        if isinstance(layer, keras.layers.Dense):
            head.append(("dense", layer))
        elif (
            is_global_pool(layer)
            or is_passthrough(layer)
            or isinstance(layer, keras.layers.Flatten)
        ):
            head.append(("layer", layer))
        else:
            raise ValueError(f"{describe_layer(layer)} is not supported in a ResNet's head")
    if not blocks or not any(isinstance(item, Unit) for item in stem):
        raise ValueError(f"model {model.name!r} is not a ResNet: a stem, blocks and a head")
    return stem, blocks, head


def _block_output_importance(block: _Block) -> np.ndarray:
    if block.sum_stats is not None:
        var = np.maximum(block.sum_stats[1], 0.0)
        return np.sqrt(var)
    imp = block.units[-1].importance()
    if block.projection is not None:
        imp = np.maximum(imp, block.projection.importance())
    return imp


def _residual_decisions(stem, blocks):
    """Importance of each decision: hidden channels one by one, stream channels per stream
    (the max over everything that writes them: the stem or a projection block, and every
    block adding to it)."""
    stem_units = [u for u in stem if isinstance(u, Unit)]
    streams = [np.abs(_as_importance(stem_units[-1]))]
    for block in blocks:
        if block.projection is not None:
            streams.append(_block_output_importance(block))
        else:
            streams[-1] = np.maximum(streams[-1], _block_output_importance(block))
        block.space = len(streams) - 1
    hidden = [u.importance() for u in stem_units[:-1]]
    hidden += [u.importance() for b in blocks for u in b.units[:-1]]
    return streams, hidden


def _as_importance(unit: Unit) -> np.ndarray:
    return np.where(unit.column_weights() == 0, 0.0, unit.importance())


def _keep_best(drop: np.ndarray, priority: np.ndarray) -> np.ndarray:
    return _balance(drop, priority, [1])


def _relu(x):
    return np.maximum(x, 0.0)


def slim_residual(
    model: keras.Model,
    threshold: float | None = None,
    ratio: float | None = None,
    fuse_bn: bool = False,
    **deprecated,
) -> keras.Model:
    """Network slimming of the residual network itself: the baseline of RMNet's Fig. 7.

    ``model`` is a ResNet of the package (a stem of convolutions with BN, residual blocks
    with one basic or bottleneck branch, global pooling, Dense). Channels inside a branch are
    dropped one by one as in :func:`slim`. The channels a shortcut adds together -- a stage's
    stream, written by the stem or the stage's projection and by every block of the stage --
    can only go together: a stream channel goes when its importance in every one of them is
    below the threshold (each block's output: the statistics of its sum before the ReLU when it
    has ``skip_bn``, else the scale of its last BN and of its projection's). ``ratio`` takes the
    threshold from the branch channels' and streams' importances.

    The result is a functional ResNet of Conv2D, BatchNormalization (folded with
    ``fuse_bn=True``), ReLU and Add layers (a skip scale as :class:`ChannelScale` where the
    block had ``skip_bn``, a fixed ``Rescaling`` with ``fuse_bn=True``, folded into the
    projection where there is one), with
    ``pruning_report`` as :func:`slim`'s.

    Args:
        model: the residual network.
        threshold: drop channels whose importance is below it.
        ratio: drop the lowest ``ratio`` (0..1) of channels instead.
        fuse_bn: fold the BNs of the result.

    Returns:
        The slimmed residual model, with ``pruning_report``.
    """
    fuse_bn = renamed_keyword(deprecated, "fold_bn", "fuse_bn", fuse_bn, "slim_residual")
    _validate(threshold, ratio)
    if not isinstance(fuse_bn, bool):
        raise ValueError(f"`fuse_bn` must be True or False; got {fuse_bn!r}")
    stem, blocks, head = _parse_residual(model)
    streams, hidden = _residual_decisions(stem, blocks)
    if ratio is not None:
        threshold = threshold_for_ratio(np.concatenate(streams + hidden), ratio)
    t = float(threshold)
    stream_drop = [_keep_best(imp < t, imp) for imp in streams]
    dropped, values = _plan_residual(stem, blocks, stream_drop, t)
    pruned, channels = _build_residual(model, stem, blocks, head, dropped, values, fuse_bn)
    pruned.pruning_report = _report(model, pruned, t, ratio, *channels)
    return pruned


def _plan_residual(stem, blocks, stream_drop, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Decide every unit's kept channels in order, folding dropped channels' constants forward
    (each unit's ``keep_in``/``keep_out``); the stream's dropped channels and their constant
    values at the head."""

    def decide(unit, dropped, values, force=None):
        unit.fold_inputs(dropped, values)
        unit.keep_in = ~dropped
        imp = _as_importance(unit)
        drop = force if force is not None else _keep_best(imp < t, imp)
        unit.keep_out = ~drop
        exact = unit.column_weights() == 0
        return drop, np.where(drop, unit.dropped_values(exact), 0.0)

    stem_units = [u for u in stem if isinstance(u, Unit)]
    dropped = np.zeros(stem_units[0].kernel.shape[2], bool)
    values = np.zeros(len(dropped))
    for k, unit in enumerate(stem_units):
        force = stream_drop[0] if k == len(stem_units) - 1 else None
        dropped, values = decide(unit, dropped, values, force)
    for block in blocks:
        x_drop, x_vals = dropped, values
        out_drop = stream_drop[block.space]
        h_drop, h_vals = x_drop, x_vals
        for k, unit in enumerate(block.units):
            last = k == len(block.units) - 1
            h_drop, h_vals = decide(unit, h_drop, h_vals, out_drop if last else None)
        if block.projection is not None:
            decide(block.projection, x_drop, x_vals * block.scale, out_drop)
            skip_vals = block.projection.beta
        else:
            skip_vals = block.scale * x_vals
        if block.sum_stats is not None:
            out_vals = _relu(block.sum_stats[0])
        else:
            out_vals = _relu(block.units[-1].beta + skip_vals)
        dropped, values = out_drop, np.where(out_drop, out_vals, 0.0)
    return dropped, values


def _build_residual(model, stem, blocks, head, dropped, values, fuse_bn: bool):
    """The planned network as a functional ResNet; ``(model, (channels before, after))``."""
    inputs = input_like(model)
    x = inputs
    counts = [0, 0]

    def count(unit):
        counts[0] += unit.c_out
        counts[1] += int(unit.keep_out.sum())

    for item in stem:
        if isinstance(item, Unit):
            count(item)
            x = _build_unit_layers(item, x, fuse_bn)
        else:
            x = clone_layer(item[1])(x)
    for block in blocks:
        for unit in (*block.units, *([block.projection] if block.projection else [])):
            count(unit)
        x = _build_residual_block(block, x, fuse_bn)
    for kind, layer in head:
        if kind == "dense":
            w = layer.get_weights()
            kernel = np.asarray(w[0], np.float64)
            delta = values[dropped] @ kernel[dropped]
            bias = (w[1] if layer.use_bias else np.zeros(layer.units)) + delta
            new = clone_layer(layer, use_bias=True)
            x = new(x)
            new.set_weights([np.asarray(kernel[~dropped], "float32"), bias.astype("float32")])
            dropped = np.zeros(layer.units, bool)
        else:
            x = clone_layer(layer)(x)
    return keras.Model(inputs, x, name=f"{model.name}_slim"), tuple(counts)


def _build_residual_block(block, x, fuse_bn: bool):
    """One planned residual block: its branch, its shortcut (projection, skip scale or the
    identity), the addition and the ReLU."""
    name = block.layer.name
    keep_x = block.units[0].keep_in
    h = x
    for unit in block.units:
        h = _build_residual_unit(unit, h, fuse_bn, name)
    if block.projection is not None:
        unit = block.projection
        unit.kernel = unit.kernel * block.scale[:, None][None, None]  # s folded in
        skip = _build_residual_unit(unit, x, fuse_bn, name)
    elif block.scale_stats is not None and fuse_bn:  # deployment: a fixed scale
        scale = [float(v) for v in block.scale[keep_x]]
        skip = keras.layers.Rescaling(scale, name=f"{name}_skip_scale")(x)
    elif block.scale_stats is not None:
        layer = ChannelScale(epsilon=block.layer.bn_epsilon, name=f"{name}_skip_bn")
        skip = layer(x)
        arrays = (block.scale, *block.scale_stats)
        layer.set_weights([np.asarray(a[keep_x], "float32") for a in arrays])
    else:
        skip = x
    x = keras.layers.Add(name=f"{name}_add")([h, skip])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def _build_residual_unit(unit: Unit, x, fuse_bn: bool, block_name: str):
    conv, bn = unit.conv, unit.bn
    scale, shift = unit.folded_bn()
    keep_in, keep_out = unit.keep_in, unit.keep_out
    kernel = unit.kernel[:, :, keep_in][..., keep_out]
    bias = unit.bias[keep_out]
    if fuse_bn:
        kernel = kernel * scale[keep_out]
        bias = bias * scale[keep_out] + shift[keep_out]
    use_bias = fuse_bn or conv.use_bias
    layer = keras.layers.Conv2D(
        int(keep_out.sum()),
        conv.kernel_size,
        strides=conv.strides,
        padding=conv.padding,
        use_bias=use_bias,
        name=f"{block_name}_{conv.name}",
    )
    x = layer(x)
    layer.set_weights([np.asarray(w, "float32") for w in [kernel] + ([bias] if use_bias else [])])
    if not fuse_bn:
        new_bn = keras.layers.BatchNormalization(
            momentum=bn.momentum, epsilon=bn.epsilon, name=f"{block_name}_{bn.name}"
        )
        x = new_bn(x)
        new_bn.set_weights(
            [
                np.asarray(a[keep_out], "float32")
                for a in (unit.gamma, unit.beta, unit.mean, unit.var)
            ]
        )
    if unit.act is not None:
        x = keras.layers.ReLU(name=f"{block_name}_{conv.name}_relu")(x)
    return x


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """Deprecated name of :func:`fuse_batchnorm`.

    Args:
        model: as :func:`fuse_batchnorm`.

    Returns:
        :func:`fuse_batchnorm`'s result.
    """
    warnings.warn(
        "keras_dmr.prune.fold_batchnorm is deprecated, use fuse_batchnorm (same function)",
        DeprecationWarning,
        stacklevel=2,
    )
    return fuse_batchnorm(model)


def fuse_batchnorm(model: keras.Model) -> keras.Model:
    """A copy of a functional ``model`` with every convolution whose only reader is a
    BatchNormalization folded with it into one convolution with bias, and every
    :class:`ChannelScale` a fixed ``Rescaling`` (deployment; inference outputs unchanged to
    float rounding). Other layers are copied with their weights. Layers called more than once
    (shared) are not supported.

    Args:
        model: a functional model.

    Returns:
        A new model without BatchNormalization after convolutions.
    """
    layers = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    for layer in layers:
        if len(keras_internals.call_sites(layer)) != 1:
            raise ValueError(f"{describe_layer(layer)} is called more than once; not supported")
    readers: dict[int, int] = {}
    for layer in layers:
        for t in keras_internals.call_sites(layer)[0].input_tensors:
            readers[id(t)] = readers.get(id(t), 0) + 1
    fold = {}  # conv name → its BN
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            source = keras_internals.producer(keras_internals.call_sites(layer)[0].input_tensors[0])
            if (
                isinstance(source, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)
                and readers.get(id(source.output)) == 1
                and keras.activations.serialize(source.activation) in ("linear", None)
                and layer.axis in (-1, 3, [-1], [3])
            ):
                fold[source.name] = layer
    inputs = input_like(model)
    tensors = {id(model.inputs[0]): inputs}
    for layer in layers:
        args = [tensors[id(t)] for t in keras_internals.call_sites(layer)[0].input_tensors]
        if isinstance(layer, keras.layers.BatchNormalization) and any(
            bn is layer for bn in fold.values()
        ):
            tensors[id(layer.output)] = args[0]  # folded into its convolution
            continue
        if layer.name in fold:
            scale, shift = kernels.fold_bn(*bn_weights(fold[layer.name]), fold[layer.name].epsilon)
            w = layer.get_weights()
            bias = w[1] if layer.use_bias else 0.0
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kernel = w[0] * scale.reshape(-1, 1)
            else:
                kernel = w[0] * scale
            new = clone_layer(layer, use_bias=True)
            out = new(args[0])
            new.set_weights([kernel.astype("float32"), (bias * scale + shift).astype("float32")])
            tensors[id(layer.output)] = out
            tensors[id(fold[layer.name].output)] = out
            continue
        if isinstance(layer, ChannelScale):  # deployment: a fixed scale, or nothing
            scale = [float(v) for v in np.asarray(layer.gamma)] if layer.scale else None
            out = keras.layers.Rescaling(scale, name=layer.name)(args[0]) if scale else args[0]
            tensors[id(layer.output)] = out
            continue
        new = clone_layer(layer)
        out = new(args if len(args) > 1 else args[0])
        if layer.weights:
            new.set_weights(layer.get_weights())
        tensors[id(layer.output)] = out
    return keras.Model(inputs, tensors[id(model.outputs[0])], name=model.name)
