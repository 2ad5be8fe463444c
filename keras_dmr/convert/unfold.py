"""The package's residual models as graphs of standard Keras layers, for tools that read graphs.

A :class:`~keras_dmr.layers.ParallelBranchBlock` is one Keras layer whose K branches, merge and
shortcut live inside its ``call``: a graph reader (pruning's channel groups, a profiler) sees one
opaque node. :func:`unfold` rewrites the model with each such block spelled out in
``Conv2D``/``DepthwiseConv2D``, ``BatchNormalization``, ``ReLU``, ``Add`` and ``Average`` layers
(and :class:`~keras_dmr.layers.ChannelScale` for a block built with ``skip_bn``), carrying the
block's weights, and each of the K branch states as its own tensor instead of K slices of one
stacked tensor: ``TileBranches`` becomes K uses of one tensor, ``BranchMean`` an ``Average``, a
merge-and-run shortcut an ``Average`` of the K inputs added to every branch. Weightless
per-channel layers (pooling, activations, dropout) run on each stream; any other layer that reads
stacked states reads their ``Concatenate``, which is the stacked tensor. Same function (float32
summation order aside).

Cannot: a model whose K states are stacked by its own layers (``share_stem_and_head=False``: its
stem writes K·d channels at once) raises :class:`~keras_dmr.errors.ConversionError`; blocks of
other kinds (RepVGG, inverted residual, RMNeXt) are copied as they are, so a
graph reader still meets them as one node (and pruning refuses them by name).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_dmr.convert.graph import Node, copy_call, read_graph
from keras_dmr.errors import ConversionError
from keras_dmr.layers.blocks import ParallelBranchBlock, Unit
from keras_dmr.layers.streams import BranchMean, ChannelScale, TileBranches

L = keras.layers
# Weightless layers that act on each channel alone: they run on each stream separately (an
# Activation layer is not among them: softmax mixes channels; it reads the concatenation).
PER_STREAM = (
    L.ReLU,
    L.LeakyReLU,
    L.Dropout,
    L.SpatialDropout2D,
    L.MaxPooling2D,
    L.AveragePooling2D,
    L.GlobalAveragePooling2D,
    L.GlobalMaxPooling2D,
    L.ZeroPadding2D,
    L.Identity,
)


def unfold(model: keras.Model) -> keras.Model:
    """``model`` with this package's parallel-branch blocks as standard Keras layers.

    Args:
        model: a built single-input, single-output Keras model (a DMRNet, DVANet or ResNet of
            this package, or any graph holding their blocks).

    Returns:
        A functional ``keras.Model`` of fresh layers with the same weights and function; the
        model itself when it holds no block to unfold.
    """
    graph = read_graph(model)
    if not any(_unfolds(node) for node in graph.nodes):
        return model
    inputs = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name=model.inputs[0].name)
    values: dict[int, object] = {graph.input.index: inputs}
    for node in graph.nodes:
        args = [values[v.index] for v in node.inputs]
        values[node.output.index] = _unfold_node(node, args)
    output = values[graph.output.index]
    if isinstance(output, list):
        output = L.Concatenate(name="streams")(output)
    return keras.Model(inputs, output, name=model.name)


def _unfolds(node: Node) -> bool:
    return isinstance(node.operation, (ParallelBranchBlock, TileBranches, BranchMean))


def _unfold_node(node: Node, args: list):
    op = node.operation
    if isinstance(op, TileBranches):
        return args[0] if op.branches == 1 else [args[0]] * op.branches
    if isinstance(op, BranchMean):
        streams = args[0] if isinstance(args[0], list) else [args[0]]
        if len(streams) != op.branches:
            raise _stacked(node, op.branches)
        return streams[0] if len(streams) == 1 else L.Average(name=op.name)(streams)
    if isinstance(op, ParallelBranchBlock):
        stacked = op.stacked_input and op.branches > 1
        if stacked and not isinstance(args[0], list):
            raise _stacked(node, op.branches)
        return unfold_block(op, args[0])
    if len(args) == 1 and isinstance(args[0], list) and isinstance(op, PER_STREAM):
        return [_copy(op, f"{op.name}_s{b}")(x) for b, x in enumerate(args[0])]
    args = [
        L.Concatenate(name=f"{node.name}_streams")(a) if isinstance(a, list) else a for a in args
    ]
    return copy_call(node, args)


def _copy(layer, name: str):
    return type(layer).from_config({**layer.get_config(), "name": name})


def _stacked(node: Node, k: int) -> ConversionError:
    return ConversionError(
        f"{node.describe()} reads {k} branch states stacked by another layer than TileBranches "
        "(a model built with share_stem_and_head=False): unfolding needs them as separate streams"
    )


def unfold_block(block: ParallelBranchBlock, x):
    """One block as standard layers: ``x`` is a list of the K stream tensors (a single tensor
    when the block reads one shared state, or K = 1); returns the same form (a single tensor
    after a vanilla block, whose branches are summed).

    Args:
        block: a built :class:`~keras_dmr.layers.ParallelBranchBlock`.
        x: its input streams.

    Returns:
        Its output streams.
    """
    k, name = block.branches, block.name
    streams = list(x) if isinstance(x, list) else [x] * (k if block.stacked_input else 1)
    if block.stacked_input and len(streams) != k:
        raise ValueError(f"{name}: expected {k} input streams, got {len(streams)}")
    weights = block.branch_weights()
    d_in = block.filters_in((None, None, None, sum(int(s.shape[-1]) for s in streams)))
    units = block.units(d_in)
    branch_inputs = streams if block.stacked_input else [streams[0]] * k
    h = [
        _run_units(block, units, weights["branches"][b], x_b, f"{name}_b{b}")
        for b, x_b in enumerate(branch_inputs)
    ]
    skip_in = streams
    if block.skip_bn:
        skip_in = _per_stream(block.skip_scale, streams, f"{name}_skip_bn")
    if block.mapping == "vanilla":
        skip = _projection(block, weights, 0, skip_in[0], f"{name}_proj")
        z = [L.Add(name=f"{name}_add")([*h, skip])]
    else:
        if block.mapping == "merge_and_run":
            merged = skip_in[0] if k == 1 else L.Average(name=f"{name}_merge")(skip_in)
            merged = _projection(block, weights, 0, merged, f"{name}_proj")
            skips = [merged] * k
        else:  # identity: K separate shortcuts
            skips = [
                _projection(block, weights, b, s, f"{name}_proj{b}") for b, s in enumerate(skip_in)
            ]
        z = [
            L.Add(name=f"{name}_add{b}")([h_b, s])
            for b, (h_b, s) in enumerate(zip(h, skips, strict=True))
        ]
    if block.skip_bn:
        z = _per_stream(block.sum_stats, z, f"{name}_sum_stats")
    out = [L.ReLU(name=f"{name}_out{b}")(z_b) for b, z_b in enumerate(z)]
    return out[0] if len(out) == 1 else out


def _run_units(block, units, unit_weights, x, prefix: str):
    for i, (unit, layer_weights) in enumerate(zip(units, unit_weights, strict=True)):
        layers = block.unit_layers(unit, 1, f"{prefix}_{i}")
        for layer, w in zip(layers, layer_weights, strict=True):
            x = layer(x)
            layer.set_weights(w)
        if i < len(units) - 1:
            x = L.ReLU(name=f"{prefix}_{i}_relu")(x)
    return x


def _projection(block, weights, b: int, x, prefix: str):
    if not block.projection:
        return x
    d_in = int(x.shape[-1])
    unit = Unit(1, d_in, block.filters, block.strides)
    return _run_units(block, [unit], [weights["projection"][b]], x, prefix)


def _per_stream(scale: ChannelScale, streams: list, prefix: str) -> list:
    """``scale`` (over the stacked channels) as one copy per stream with its weights sliced."""
    weights = [np.asarray(w) for w in scale.get_weights()]
    width = int(streams[0].shape[-1])
    out = []
    for b, x in enumerate(streams):
        copy = _copy(scale, f"{prefix}{b}" if len(streams) > 1 else prefix)
        y = copy(x)
        copy.set_weights([w[..., b * width : (b + 1) * width] for w in weights])
        out.append(y)
    return out
