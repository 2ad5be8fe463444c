"""The extra BN on the residual path (RMNet Sec. 4.2) for any residual network the converter
reads: :func:`with_skip_bn`.

Network slimming ranks a channel by its BN scale. After RM, a block's reserved channels (copies
of its input) and merged channels (branch plus shortcut) have no BN of their own unless the
residual network had one where they come from: a scale on the shortcut, ``s·x`` with the
statistics of ``x``, and the statistics of the sum before the activation. :func:`with_skip_bn`
adds both, as :class:`~keras_dmr.layers.ChannelScale` layers, to every residual block that
:func:`keras_dmr.to_plain` finds, found by the converter's own walk
(:func:`keras_dmr.convert.plain.residual_shortcuts`): the scale on the block input where the
shortcut reads it (before a projection, as the package's blocks do), the statistics after the
addition. This package's :class:`~keras_dmr.layers.ParallelBranchBlock` layers are rebuilt with
``skip_bn=True`` instead. At ``s = 1`` the function is unchanged; after sparsity training,
``to_plain(model, fuse_bn=False)`` gives every reserved channel the scale's BN and every merged
channel the sum's.

Cannot: what the converter refuses (it raises, naming the layer). A block whose addition joins
several linear shortcuts gets its scale on each of them, and RM folds those scales into the
shortcut: its reserved channels then have no BN of their own.
"""

from __future__ import annotations

import collections

import keras

from keras_dmr.convert.graph import copy_call
from keras_dmr.convert.plain import residual_shortcuts
from keras_dmr.layers.blocks import ParallelBranchBlock
from keras_dmr.layers.conv import BN_EPSILON
from keras_dmr.layers.streams import ChannelScale
from keras_dmr.utils import keras_internals


def with_skip_bn(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with the extra BN on the residual path of every residual block.

    Same weights and, with the new scales at 1, the same function. The copy is a functional
    ``keras.Model`` (nested models flattened; it no longer rebuilds from builder arguments),
    compiled with the paper's recipe when ``model`` was compiled; add
    :class:`keras_dmr.recipe.StepDecay` to its ``fit`` for the recipe's schedule.

    Args:
        model: a residual network the converter reads (this package's builders,
            keras.applications and KerasHub ResNets, hand-written graphs).

    Returns:
        The functional copy.

    Raises:
        ConversionError: a layer the converter cannot read (named).
    """
    from keras_dmr.recipe import compile_with_recipe

    _check_not_prepared(model)
    graph, shortcuts = residual_shortcuts(model)
    starts = {use: join for join, uses in shortcuts.items() for use in uses}
    joins = {node.index: node for node in graph.nodes if node.index in shortcuts}
    epsilon = _bn_epsilon(model)
    inputs = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name=model.inputs[0].name)
    values = {graph.input.index: inputs}
    scaled = {}  # (join index, fork value index) -> the scaled fork
    names = collections.Counter()
    for node in graph.nodes:
        args = []
        for position, value in enumerate(node.inputs):
            join = starts.get((node.index, position))
            if join is None:
                args.append(values[value.index])
                continue
            key = (join, value.index)
            if key not in scaled:
                name = _unique(f"{joins[join].name}_skip_bn", names)
                scaled[key] = ChannelScale(epsilon=epsilon, name=name)(values[value.index])
            args.append(scaled[key])
        names[node.name] += 1
        name = node.name if names[node.name] == 1 else f"{node.name}_{names[node.name] - 1}"
        if isinstance(node.operation, ParallelBranchBlock):
            block = node.operation
            out = copy_call(node, args, name, weights=False, skip_bn=True)
            keras_internals.producer(out).set_branch_weights(block.branch_weights())
        else:
            out = copy_call(node, args, name)
        if node.index in joins:
            out = ChannelScale(
                scale=False, epsilon=epsilon, name=_unique(f"{name}_sum_stats", names)
            )(out)
        values[node.output.index] = out
    copy = keras.Model(inputs, values[graph.output.index], name=model.name)
    if getattr(model, "optimizer", None) is not None:
        last = graph.nodes[-1].operation
        linear = getattr(last, "activation", None) in (None, keras.activations.linear)
        compile_with_recipe(copy, from_logits=linear)
    return copy


def _check_not_prepared(model: keras.Model) -> None:
    for layer in keras_internals.all_layers(model):
        if isinstance(layer, ChannelScale) or getattr(layer, "skip_bn", False):
            raise ValueError(
                f"model {model.name!r} already has the extra BN on the residual path (layer "
                f"{layer.name!r}); with_skip_bn adds it once"
            )


def _unique(name: str, names: collections.Counter) -> str:
    names[name] += 1
    return name if names[name] == 1 else f"{name}_{names[name] - 1}"


def _bn_epsilon(model: keras.Model) -> float:
    """The epsilon of the model's first BatchNormalization (the package's default without)."""
    for layer in keras_internals.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            return float(layer.epsilon)
    return BN_EPSILON
