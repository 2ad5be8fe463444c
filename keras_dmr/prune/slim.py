"""Network slimming on the plain RMNet, and on the residual network as the baseline (RMNet
Sec. 4.2 and 5.1, Fig. 4 and 7).

The recipe: train the residual network with an L1 penalty on its BN scales (:class:`BNSparsity`)
and the extra BN on the residual path (:func:`with_skip_bn`, ``ParallelBranchBlock(skip_bn=True)``),
convert it with ``to_plain(model, fuse_bn=False)``, drop the channels whose BN scale is small
(:func:`slim`), fine-tune. :func:`slim_residual` prunes the residual network itself, where
the channels a shortcut adds together can only go together.

A channel's importance is its BN's ``|gamma|·sqrt(var / (var + eps))``: network slimming's
``|gamma|`` up to the epsilon term, i.e. the standard deviation of the channel that its BN's
statistics estimate. (It lets a BN that only records statistics -- ``gamma = sqrt(var + eps)``,
the merged channels of a block with ``skip_bn`` -- rank by the channel's real spread.)

What a dropped channel leaves behind: its value with the normalised input at its mean,
``act(beta)`` (exact when ``gamma == 0``), or the exact constant when every weight it reads was
dropped. That constant is folded into the next layer: the moving mean of the next BN
(``BN(z + d) = BN'(z)`` with ``mean' = mean - d``, also harmless in training-mode BN) or the bias
of the next Dense. A 'same'-padded k×k convolution reads zeros, not the constant, at the image
border, so there the fold is exact only for taps that stay inside the image (1×1 convolutions,
Dense layers, and the Dirac taps of reserved channels) or a constant of 0 (a ReLU of a negative
``beta``); elsewhere the border pixels of the next layer move by the dropped weights times the
constant.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.prune.units import (
    Unit,
    clone_layer,
    describe_layer,
    input_like,
    is_activation,
    is_global_pool,
    is_passthrough,
    layer_chain,
    macs_or_none,
    make_unit,
)
from keras_dmr.rm import kernels
from keras_dmr.utils.arguments import renamed_keyword


def _parse_plain(model: keras.Model) -> list:
    """Items of the chain: :class:`Unit`, ``("dense", layer)`` or ``("layer", layer)``."""
    layers = layer_chain(model, "plain_model")
    items, i, pooled, dense_seen = [], 0, False, False
    while i < len(layers):
        layer = layers[i]
        if dense_seen:  # after the classifier: copied as they are
            items.append(("layer", layer))
        elif hasattr(layer, "plain_ops"):
            raise ValueError(
                f"{describe_layer(layer)} is a residual block: slim prunes the plain model; "
                "convert with keras_dmr.to_plain(model, fuse_bn=False), or use slim_residual"
            )
        elif isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
            if isinstance(layer, keras.layers.SeparableConv2D | keras.layers.Conv2DTranspose):
                raise ValueError(f"{describe_layer(layer)} is not supported by slim")
            if pooled:
                raise ValueError(f"{describe_layer(layer)}: a convolution after global pooling")
            bn = layers[i + 1] if i + 1 < len(layers) else None
            act = layers[i + 2] if i + 2 < len(layers) else None
            act = act if is_activation(act) else None
            items.append(make_unit(layer, bn, act))
            i += 2 if act is None else 3
            continue
        elif isinstance(layer, keras.layers.BatchNormalization):
            raise ValueError(f"{describe_layer(layer)} does not follow a convolution")
        elif is_activation(layer):
            raise ValueError(
                f"{describe_layer(layer)}: an activation must follow a convolution's BN"
            )
        elif isinstance(layer, keras.layers.Dense):
            if not pooled:
                raise ValueError(
                    f"{describe_layer(layer)}: a Dense layer must follow global pooling"
                )
            items.append(("dense", layer))
            dense_seen = True
        elif is_global_pool(layer):
            if getattr(layer, "keepdims", False):
                raise ValueError(f"{describe_layer(layer)}: keepdims=True is not supported")
            items.append(("layer", layer))
            pooled = True
        elif is_passthrough(layer) or (isinstance(layer, keras.layers.Flatten) and pooled):
            items.append(("layer", layer))
        else:
            raise ValueError(
                f"{describe_layer(layer)} is not supported by slim: a plain model is convolutions, "
                "each with its BN and activation, pooling and a Dense classifier"
            )
        i += 1
    units = [item for item in items if isinstance(item, Unit)]
    if not units:
        raise ValueError(f"model {model.name!r} has no convolution followed by BatchNormalization")
    return items


def _passthrough_columns(unit: Unit) -> np.ndarray:
    """Channels that copy one input pixel of one channel (a reserved channel's Dirac filter)."""
    if unit.depthwise:
        return np.count_nonzero(unit.kernel, axis=(0, 1)) == 1
    return np.count_nonzero(unit.kernel, axis=(0, 1, 2)) == 1


def _protected(unit: Unit, producer: Unit | None) -> np.ndarray:
    """Channels whose BN scale does not describe them: those that read a reserved copy of a
    block input whose BN is the identity (a block converted without ``skip_bn``: the merged
    channel's BN is its branch's alone, and the shortcut it adds is unrecorded)."""
    if producer is None:
        return np.zeros(unit.c_out, bool)
    reserved = producer.identity() & _passthrough_columns(producer)
    if not reserved.any():
        return np.zeros(unit.c_out, bool)
    if unit.depthwise:
        reads = reserved & (np.count_nonzero(unit.kernel, axis=(0, 1)) > 0)
    else:
        reads = np.any(unit.kernel[:, :, reserved, :] != 0, axis=(0, 1, 2))
    return reads & ~unit.identity()


@dataclasses.dataclass
class _Chain:
    """A convolution and the depthwise convolutions that follow it: they keep or drop each
    channel together (a depthwise convolution reads only its own channel)."""

    head: Unit | None  # None: the model input (nothing dropped there)
    members: list  # depthwise units after the head
    consumer: object  # the next non-depthwise unit, ("dense", layer), or None (model output)
    producer: Unit | None = None


def _chains(items) -> list[_Chain]:
    units_or_dense = [it for it in items if isinstance(it, Unit) or it[0] == "dense"]
    chains, current, previous = [], None, None
    for item in units_or_dense:
        if isinstance(item, Unit) and item.depthwise:
            if current is None:
                current = _Chain(None, [], None, producer=previous)
            current.members.append(item)
        else:
            if current is not None:
                current.consumer = item
                chains.append(current)
            if isinstance(item, Unit):
                current = _Chain(item, [], None, producer=previous)
            else:
                current = None
        if isinstance(item, Unit):
            previous = item
    if current is not None:
        chains.append(current)
    return chains


def _priority(chain: _Chain) -> np.ndarray:
    """How much each channel of a chain matters: the smallest importance along it (a
    negligible link makes the channel negligible); inf where nothing can be dropped."""
    if chain.head is None or chain.consumer is None:
        n = chain.head.c_out if chain.head is not None else chain.members[0].c_out
        return np.full(n, np.inf)
    head = chain.head
    imp = head.importance()
    imp = np.where(head.column_weights() == 0, 0.0, imp)
    imp = np.where(_protected(head, chain.producer), np.inf, imp)
    for unit in chain.members:
        own = np.where(unit.column_weights() == 0, 0.0, unit.importance())
        imp = np.minimum(imp, own)
    return imp


def _group_partitions(chain: _Chain) -> list[int]:
    """Numbers of equal groups the chain's channels must stay balanced in (1: keep one)."""
    parts = [1]
    if chain.head is not None and chain.head.groups > 1:
        parts.append(chain.head.groups)
    consumer = chain.consumer
    if isinstance(consumer, Unit) and not consumer.depthwise and consumer.groups > 1:
        parts.append(consumer.groups)
    return parts


def _balance(drop: np.ndarray, priority: np.ndarray, partitions: list[int]) -> np.ndarray:
    """Keep channels back until every group of every partition drops as many as the others
    (grouped convolutions keep equal group widths) and keeps at least one."""
    drop = drop.copy()
    changed = True
    while changed:
        changed = False
        for groups in partitions:
            size = len(drop) // groups
            counts = drop.reshape(groups, size).sum(1)
            target = min(int(counts.min()), size - 1)
            for g in range(groups):
                if counts[g] > target:
                    idx = np.flatnonzero(drop[g * size : (g + 1) * size]) + g * size
                    order = idx[np.argsort(priority[idx], kind="stable")]
                    drop[order[target:]] = False
                    changed = True
    return drop


def _validate(threshold, ratio) -> None:
    if (threshold is None) == (ratio is None):
        raise ValueError(
            "give exactly one of `threshold` (drop channels whose BN scale is below it) or "
            f"`ratio` (drop that fraction of them); got threshold={threshold!r}, ratio={ratio!r}"
        )
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.number):
            raise ValueError(f"`threshold` must be a number >= 0; got {threshold!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"`threshold` must be a finite number >= 0; got {threshold!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.number):
            raise ValueError(f"`ratio` must be a number in [0, 1); got {ratio!r}")
        if not (0 <= ratio < 1):
            raise ValueError(f"`ratio` must be in [0, 1); got {ratio!r}")


def threshold_for_ratio(importances: np.ndarray, ratio: float) -> float:
    """The threshold below which the lowest ``ratio`` of ``importances`` lie (global, as
    network slimming's percentile); infinite importances do not count.

    Args:
        importances: channel importances (:func:`channel_importances`).
        ratio: fraction in [0, 1].

    Returns:
        The threshold (infinite when ``ratio`` covers every channel).
    """
    values = np.sort(np.asarray(importances, np.float64)[np.isfinite(importances)])
    if values.size == 0:
        return 0.0
    k = int(math.floor(ratio * values.size))
    return float(values[k]) if k < values.size else float("inf")


def channel_importances(plain_model: keras.Model) -> np.ndarray:
    """The importance of every channel :func:`slim` could drop (before any is dropped).

    Args:
        plain_model: as :func:`slim` takes it.

    Returns:
        A float64 vector, one entry per channel :func:`slim` ranks (infinite: never dropped).
    """
    chains = _chains(_parse_plain(plain_model))
    found = [_priority(c) for c in chains]
    return np.concatenate(found) if found else np.zeros(0)


def _plan_plain(items, threshold: float) -> dict:
    """Decide, chain by chain, which channels go; fold their constants forward. Returns the
    Dense folds ``{layer name: (keep_in, bias delta)}``."""
    dense_folds = {}
    dropped, values = None, None  # of the channels entering the next head
    for chain in _chains(items):
        head = chain.head
        if head is not None:
            n_in = head.kernel.shape[2]
            d = np.zeros(n_in, bool) if dropped is None else dropped
            head.fold_inputs(d, values if values is not None else np.zeros(n_in))
            head.keep_in = ~d
        priority = _priority(chain)
        drop = _balance(priority < threshold, priority, _group_partitions(chain))
        # Constants of the dropped channels along the chain.
        if head is not None:
            exact = head.column_weights() == 0
            vals = np.where(drop, head.dropped_values(exact), np.nan)
            own_small = head.importance() < threshold
            known = drop & (exact | own_small)
            head.keep_out = ~drop
        else:
            vals, known = np.full(len(drop), np.nan), np.zeros(len(drop), bool)
        for unit in chain.members:
            unit.keep_in = ~drop
            unit.keep_out = ~drop
            # Input known constant: exact through this depthwise filter; else its own BN.
            scale, shift = unit.folded_bn()
            z = np.where(known, vals, 0.0) * unit.kernel.sum((0, 1)) + unit.bias
            exact_val = unit.activate(z * scale + shift)
            own_val = unit.activate(unit.beta)
            vals = np.where(drop, np.where(known, exact_val, own_val), np.nan)
            known = drop.copy()
        dropped, values = drop, np.where(drop, vals, 0.0)
        consumer = chain.consumer
        if isinstance(consumer, tuple):  # the Dense classifier
            layer = consumer[1]
            kernel = np.asarray(layer.kernel, np.float64)
            dense_folds[layer.name] = (~drop, values[drop] @ kernel[drop])
    return dense_folds


def _build_unit_layers(unit: Unit, x, fuse_bn: bool):
    keep_in, keep_out = unit.keep_in, unit.keep_out
    scale, shift = unit.folded_bn()
    if unit.depthwise:
        kernel = unit.kernel[:, :, keep_out]
        bias = unit.bias[keep_out]
        if fuse_bn:
            kernel = kernel * scale[keep_out]
            bias = bias * scale[keep_out] + shift[keep_out]
        conv = clone_layer(unit.conv, use_bias=fuse_bn or unit.conv.use_bias)
        weights = [kernel[..., None]]
    else:
        dense = unit.kernel[:, :, keep_in][..., keep_out]
        bias = unit.bias[keep_out]
        if fuse_bn:
            dense = dense * scale[keep_out]
            bias = (bias - unit.mean[keep_out]) * scale[keep_out] + unit.beta[keep_out]
        conv = clone_layer(
            unit.conv, filters=int(keep_out.sum()), use_bias=fuse_bn or unit.conv.use_bias
        )
        weights = [kernels.to_grouped(dense, unit.groups)]
    if fuse_bn or unit.conv.use_bias:
        weights.append(bias)
    x = conv(x)
    conv.set_weights([np.asarray(w, "float32") for w in weights])
    if not fuse_bn:
        bn = clone_layer(unit.bn)
        x = bn(x)
        arrays = []
        if unit.bn.scale:
            arrays.append(unit.gamma[keep_out])
        if unit.bn.center:
            arrays.append(unit.beta[keep_out])
        arrays += [unit.mean[keep_out], unit.var[keep_out]]
        bn.set_weights([np.asarray(a, "float32") for a in arrays])
    if unit.act is not None:
        act = unit.act
        if isinstance(act, ChannelwiseReLU):
            new = clone_layer(
                act,
                negative_slope=list(np.asarray(act.negative_slope)[keep_out]),
                max_value=list(np.asarray(act.max_value)[keep_out]),
            )
            x = new(x)
        elif isinstance(act, keras.layers.PReLU):
            new = clone_layer(act)
            x = new(x)
            alpha = np.asarray(act.alpha)
            new.set_weights([alpha.reshape(-1)[keep_out].reshape(*alpha.shape[:-1], -1)])
        else:
            x = clone_layer(act)(x)
    return x


def _report(source, pruned, threshold, ratio, channels_before, channels_after) -> dict:
    params_before, params_after = int(source.count_params()), int(pruned.count_params())
    return {
        "source": source.name,
        "threshold": threshold,
        "ratio": ratio,
        "channels_before": channels_before,
        "channels_after": channels_after,
        "params_before": params_before,
        "params_after": params_after,
        "pruned_params_ratio": 1 - params_after / params_before,
        "flops_before": macs_or_none(source),
        "flops_after": macs_or_none(pruned),
    }


def slim(
    plain_model: keras.Model,
    threshold: float | None = None,
    ratio: float | None = None,
    fuse_bn: bool = False,
    **deprecated,
) -> keras.Model:
    """Network slimming of a plain model: drop every channel whose BN importance is below
    ``threshold`` (or the lowest ``ratio`` of them, globally), with the next layer's inputs.

    ``plain_model`` is a chain of convolutions each followed by its BatchNormalization (and an
    activation), pooling and a Dense classifier: ``to_plain(model, fuse_bn=False)``. Each
    convolution loses its dropped output filters, its BN and activation their entries (PReLU
    alphas, ChannelwiseReLU slopes and caps), the next convolution or the Dense layer after
    global pooling its input channels; the dropped channels' constants are folded forward (see
    the module docstring). Channels that read nothing any more are dropped too.

    Grouped convolutions stay grouped: channels are dropped only in equal numbers from every
    group (of the convolution's outputs and of the next one's inputs), the least important in
    each; the others are kept. A depthwise convolution keeps or drops each channel together
    with the channel it reads (a pair goes when either of its BN scales is below the threshold).
    Every convolution keeps at least one channel per group, and the last convolution keeps all
    of its channels when it is the model's output. Channels whose BN records no scale of theirs
    -- merged channels of a block converted without ``skip_bn`` -- are never dropped by scale.

    ``threshold=0`` drops nothing. ``fuse_bn=True`` folds the BNs into the convolutions of the
    result (deployment); otherwise they stay, for fine-tuning. The result carries
    ``pruning_report``: the threshold used, channels, parameters and multiply-accumulates before
    and after.

    Args:
        plain_model: the plain model to slim.
        threshold: drop channels whose importance is below it.
        ratio: drop the lowest ``ratio`` (0..1) of channels instead.
        fuse_bn: fold the BNs of the result.

    Returns:
        The slimmed model, with ``pruning_report``.
    """
    fuse_bn = renamed_keyword(deprecated, "fold_bn", "fuse_bn", fuse_bn, "slim")
    _validate(threshold, ratio)
    if not isinstance(fuse_bn, bool):
        raise ValueError(f"`fuse_bn` must be True or False; got {fuse_bn!r}")
    items = _parse_plain(plain_model)
    if ratio is not None:
        threshold = threshold_for_ratio(
            np.concatenate([_priority(c) for c in _chains(items)]), ratio
        )
    dense_folds = _plan_plain(items, float(threshold))
    inputs = input_like(plain_model)
    x = inputs
    channels_before = channels_after = 0
    for item in items:
        if isinstance(item, Unit):
            if item.keep_out is None:  # a unit no chain decides on (nothing dropped)
                item.keep_in = np.ones(item.kernel.shape[2], bool) if not item.depthwise else None
                item.keep_out = np.ones(item.c_out, bool)
                if item.depthwise:
                    item.keep_in = item.keep_out
            channels_before += item.c_out
            channels_after += int(item.keep_out.sum())
            x = _build_unit_layers(item, x, fuse_bn)
            continue
        kind, layer = item
        if kind == "dense" and layer.name in dense_folds:
            keep, delta = dense_folds[layer.name]
            w = layer.get_weights()
            bias = (w[1] if layer.use_bias else np.zeros(layer.units)) + delta
            use_bias = layer.use_bias or bool(np.any(delta != 0))
            new = clone_layer(layer, use_bias=use_bias)
            x = new(x)
            weights = [w[0][keep]] + ([bias] if use_bias else [])
            new.set_weights([np.asarray(a, "float32") for a in weights])
        else:
            new = clone_layer(layer)
            x = new(x)
            if layer.weights:
                new.set_weights(layer.get_weights())
    pruned = keras.Model(inputs, x, name=f"{plain_model.name}_slim")
    pruned.pruning_report = _report(
        plain_model, pruned, float(threshold), ratio, channels_before, channels_after
    )
    return pruned
