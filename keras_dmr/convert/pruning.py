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

import argparse
import dataclasses
import math
import os
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
from keras import ops

from keras_dmr.arguments import int_at_least as _count_arg
from keras_dmr.arguments import output_path
from keras_dmr.layers import kernels
from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.layers.blocks import ChannelScale, ParallelBranchBlock

SPARSITY_METHODS = ("proximal", "subgradient")
ACTIVATIONS = (
    keras.layers.ReLU,
    keras.layers.PReLU,
    keras.layers.LeakyReLU,
    keras.layers.Activation,
    ChannelwiseReLU,
)
SPATIAL_PASSTHROUGH = (
    keras.layers.ZeroPadding2D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.Dropout,
)
GLOBAL_POOLS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


# ------------------------------------------------------------------------------ sparsity
def scale_variables(model: keras.Model) -> list:
    """The scale factors network slimming penalises: every BatchNormalization's ``gamma`` and
    every :class:`ChannelScale`'s (the extra BN on the residual path), nested layers included."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        var = None
        if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
            var = layer.gamma
        elif isinstance(layer, ChannelScale) and layer.scale:
            var = layer.gamma
        if var is not None and id(var) not in seen:
            seen.add(id(var))
            found.append(var)
    return found


def bn_scales(model: keras.Model) -> np.ndarray:
    """All penalised scale factors of ``model`` as one vector of ``|gamma|``."""
    variables = scale_variables(model)
    if not variables:
        return np.zeros(0)
    return np.concatenate([np.abs(np.asarray(v, np.float64)) for v in variables])


class BNSparsity(keras.callbacks.Callback):
    """Sparsity training: an L1 penalty ``factor·Σ|gamma|`` on every BN scale (and every
    :class:`ChannelScale`), applied after each training batch with the optimizer's current
    learning rate ``lr``.

    ``method="proximal"`` (default) soft-thresholds, ``gamma ← sign(gamma)·max(|gamma| −
    lr·factor, 0)``, so unimportant scales reach exactly 0; ``"subgradient"`` steps
    ``gamma −= lr·factor·sign(gamma)`` as Network slimming does (scales hover around 0). The
    paper picks ``factor`` in [1e-4, 1e-3] for 200 CIFAR epochs; the penalty applied is
    proportional to ``factor`` times the number of steps, so short runs need a larger one. The
    step bypasses momentum and weight decay (it is not part of the loss).
    """

    def __init__(self, factor: float = 1e-4, method: str = "proximal"):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ValueError(f"`factor` must be a number > 0; got {factor!r}")
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"`factor` must be a number > 0; got {factor!r}")
        if method not in SPARSITY_METHODS:
            raise ValueError(f"`method` must be one of {SPARSITY_METHODS}; got {method!r}")
        self.factor = float(factor)
        self.method = method
        self._variables = []

    def on_train_begin(self, logs=None):
        self._variables = scale_variables(self.model)
        if not self._variables:
            raise ValueError(
                f"model {self.model.name!r} has no BatchNormalization (or ChannelScale) scale "
                "for BNSparsity to penalise"
            )

    def on_train_batch_end(self, batch, logs=None):
        lr = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        step = lr * self.factor
        for var in self._variables:
            g = var.value
            if self.method == "proximal":
                var.assign(ops.sign(g) * ops.maximum(ops.abs(g) - step, 0.0))
            else:
                var.assign(g - step * ops.sign(g))

    def get_config(self):
        return {"factor": self.factor, "method": self.method}


# ----------------------------------------------------------------------------- chains
def _describe(layer) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _chain(model: keras.Model, what: str) -> list:
    """``model.layers`` without the input, checked to form one chain (each reads the last)."""
    if not isinstance(model, keras.Model) or not getattr(model, "built", False):
        raise ValueError(f"`{what}` must be a built keras.Model; got {model!r}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r}: one input and one output are required")
    layers = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        try:
            inp = layer.input
        except (AttributeError, ValueError):
            inp = None
        if isinstance(inp, list | tuple) or inp is not previous:
            raise ValueError(
                f"model {model.name!r}: {_describe(layer)} does not simply follow the layer "
                "before it; slim needs a plain (single-path) model: convert a residual model "
                "with keras_dmr.to_plain(model, fuse_bn=False), or prune it with slim_residual"
            )
        previous = layer.output
    return layers


def _input_model(model: keras.Model):
    spec = model.inputs[0]
    return keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name=spec.name)


def _clone(layer, **changes):
    config = layer.get_config()
    config.update(changes)
    return type(layer).from_config(config)


def with_skip_bn(model: keras.Model) -> keras.Model:
    """A copy of ``model`` (a chain of layers, as the package's builders make) whose residual
    blocks have the extra BN on the residual path (``ParallelBranchBlock(skip_bn=True)``).

    Same weights and, with the new scales at 1, the same function. The copy is a functional
    ``keras.Model`` (it no longer rebuilds from builder arguments), compiled with the paper's
    recipe when ``model`` was compiled; add :class:`keras_dmr.recipe.StepDecay` to its ``fit``
    for the recipe's schedule. Blocks of other kinds are copied as they are.
    """
    from keras_dmr.recipe import compile_with_recipe

    layers = _chain(model, "model")
    inputs = _input_model(model)
    x = inputs
    for layer in layers:
        if isinstance(layer, ParallelBranchBlock):
            new = _clone(layer, skip_bn=True)
            x = new(x)
            new.set_branch_weights(layer.branch_weights())
        else:
            new = _clone(layer)
            x = new(x)
            new.set_weights(layer.get_weights())
    copy = keras.Model(inputs, x, name=model.name)
    if getattr(model, "optimizer", None) is not None:
        last = layers[-1]
        linear = getattr(last, "activation", None) in (None, keras.activations.linear)
        compile_with_recipe(copy, from_logits=linear)
    return copy


# ------------------------------------------------------------------------ the plain model
@dataclasses.dataclass
class _Unit:
    """A convolution, its BatchNormalization and its activation, as float64 arrays."""

    conv: keras.layers.Layer
    bn: keras.layers.BatchNormalization
    act: keras.layers.Layer | None
    depthwise: bool
    groups: int
    kernel: np.ndarray  # dense (kh, kw, c_in, c_out); depthwise: (kh, kw, c)
    bias: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    keep_in: np.ndarray | None = None
    keep_out: np.ndarray | None = None

    @property
    def c_out(self) -> int:
        return self.kernel.shape[-1]

    def column_weights(self) -> np.ndarray:
        """Per output channel, the number of non-zero weights it reads (kept inputs only)."""
        if self.depthwise:
            counts = np.count_nonzero(self.kernel, axis=(0, 1))
            return counts if self.keep_in is None else np.where(self.keep_in, counts, 0)
        k = self.kernel if self.keep_in is None else self.kernel[:, :, self.keep_in]
        return np.count_nonzero(k, axis=(0, 1, 2))

    def importance(self) -> np.ndarray:
        var = np.maximum(self.var, 0.0)
        return np.abs(self.gamma) * np.sqrt(var / (var + self.eps))

    def identity(self) -> np.ndarray:
        """Channels whose BN is the identity plus a constant (Eq. 3): no recorded scale."""
        return np.isclose(np.abs(self.gamma), np.sqrt(self.var + self.eps), rtol=1e-6, atol=0)

    def fold_inputs(self, dropped: np.ndarray, values: np.ndarray) -> None:
        """Fold the constant value of each dropped input into this unit's BN moving mean."""
        if not dropped.any():
            return
        if self.depthwise:
            delta = np.where(dropped, values, 0.0) * self.kernel.sum((0, 1))
        else:
            taps = self.kernel[:, :, dropped, :].sum((0, 1))  # (n_dropped, c_out)
            delta = values[dropped] @ taps
        self.mean = self.mean - delta

    def activate(self, z: np.ndarray) -> np.ndarray:
        if self.act is None:
            return z
        x = np.asarray(z, "float32").reshape(1, 1, 1, -1)
        return np.asarray(self.act(x), np.float64).reshape(-1)

    def dropped_values(self, exact: np.ndarray) -> np.ndarray:
        """Value of each channel if dropped: exact where ``exact`` (it reads nothing), else
        with its normalised input at its mean (``act(beta)``)."""
        sigma = np.sqrt(self.var + self.eps)
        at_zero = self.gamma * (self.bias - self.mean) / sigma + self.beta
        return self.activate(np.where(exact, at_zero, self.beta))


def _bn_arrays(bn) -> tuple[np.ndarray, ...]:
    c = int(bn.moving_mean.shape[0])
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones(c)
    beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros(c)
    return (
        gamma,
        beta,
        np.asarray(bn.moving_mean, np.float64),
        np.asarray(bn.moving_variance, np.float64),
    )


def _make_unit(conv, bn, act) -> _Unit:
    if not isinstance(bn, keras.layers.BatchNormalization):
        raise ValueError(
            f"{_describe(conv)} is not followed by a BatchNormalization: slimming ranks channels "
            "by their BN scale; convert with keras_dmr.to_plain(model, fuse_bn=False)"
        )
    if bn.axis not in (-1, 3, [-1], [3]):
        raise ValueError(f"{_describe(bn)}: only channels-last BN (axis -1) is supported")
    if getattr(conv, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"{_describe(conv)}: only channels_last convolutions are supported")
    activation = keras.activations.serialize(conv.activation)
    if activation not in ("linear", None):
        raise ValueError(f"{_describe(conv)} has activation {activation!r} before its BN")
    w = conv.get_weights()
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    if depthwise:
        if w[0].shape[-1] != 1:
            raise ValueError(f"{_describe(conv)}: depth multiplier {w[0].shape[-1]} (only 1)")
        kernel, groups = np.asarray(w[0][..., 0], np.float64), w[0].shape[2]
    else:
        groups = conv.groups
        kernel = kernels.to_dense(np.asarray(w[0], np.float64), groups)
    c_out = kernel.shape[-1]
    bias = np.asarray(w[1], np.float64) if conv.use_bias else np.zeros(c_out)
    if act is not None and isinstance(act, keras.layers.PReLU):
        if np.asarray(act.alpha).size != c_out:
            raise ValueError(f"{_describe(act)}: only per-channel alphas (shared_axes=[1, 2])")
    gamma, beta, mean, var = _bn_arrays(bn)
    return _Unit(
        conv, bn, act, depthwise, groups, kernel, bias, gamma, beta, mean, var, float(bn.epsilon)
    )


def _parse_plain(model: keras.Model) -> list:
    """Items of the chain: :class:`_Unit`, ``("dense", layer)`` or ``("layer", layer)``."""
    layers = _chain(model, "plain_model")
    items, i, pooled, dense_seen = [], 0, False, False
    while i < len(layers):
        layer = layers[i]
        if dense_seen:  # after the classifier: copied as they are
            items.append(("layer", layer))
        elif hasattr(layer, "plain_ops"):
            raise ValueError(
                f"{_describe(layer)} is a residual block: slim prunes the plain model; convert "
                "with keras_dmr.to_plain(model, fuse_bn=False), or use slim_residual"
            )
        elif isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
            if isinstance(layer, keras.layers.SeparableConv2D | keras.layers.Conv2DTranspose):
                raise ValueError(f"{_describe(layer)} is not supported by slim")
            if pooled:
                raise ValueError(f"{_describe(layer)}: a convolution after global pooling")
            bn = layers[i + 1] if i + 1 < len(layers) else None
            act = layers[i + 2] if i + 2 < len(layers) else None
            act = act if isinstance(act, ACTIVATIONS) else None
            items.append(_make_unit(layer, bn, act))
            i += 2 if act is None else 3
            continue
        elif isinstance(layer, keras.layers.BatchNormalization):
            raise ValueError(f"{_describe(layer)} does not follow a convolution")
        elif isinstance(layer, ACTIVATIONS):
            raise ValueError(f"{_describe(layer)}: an activation must follow a convolution's BN")
        elif isinstance(layer, keras.layers.Dense):
            if not pooled:
                raise ValueError(f"{_describe(layer)}: a Dense layer must follow global pooling")
            items.append(("dense", layer))
            dense_seen = True
        elif isinstance(layer, GLOBAL_POOLS):
            if getattr(layer, "keepdims", False):
                raise ValueError(f"{_describe(layer)}: keepdims=True is not supported")
            items.append(("layer", layer))
            pooled = True
        elif isinstance(layer, SPATIAL_PASSTHROUGH) or (
            isinstance(layer, keras.layers.Flatten) and pooled
        ):
            items.append(("layer", layer))
        else:
            raise ValueError(
                f"{_describe(layer)} is not supported by slim: a plain model is convolutions, "
                "each with its BN and activation, pooling and a Dense classifier"
            )
        i += 1
    units = [item for item in items if isinstance(item, _Unit)]
    if not units:
        raise ValueError(f"model {model.name!r} has no convolution followed by BatchNormalization")
    return items


def _passthrough_columns(unit: _Unit) -> np.ndarray:
    """Channels that copy one input pixel of one channel (a reserved channel's Dirac filter)."""
    if unit.depthwise:
        return np.count_nonzero(unit.kernel, axis=(0, 1)) == 1
    return np.count_nonzero(unit.kernel, axis=(0, 1, 2)) == 1


def _protected(unit: _Unit, producer: _Unit | None) -> np.ndarray:
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

    head: _Unit | None  # None: the model input (nothing dropped there)
    members: list  # depthwise units after the head
    consumer: object  # the next non-depthwise unit, ("dense", layer), or None (model output)
    producer: _Unit | None = None


def _chains(items) -> list[_Chain]:
    units_or_dense = [it for it in items if isinstance(it, _Unit) or it[0] == "dense"]
    chains, current, previous = [], None, None
    for item in units_or_dense:
        if isinstance(item, _Unit) and item.depthwise:
            if current is None:
                current = _Chain(None, [], None, producer=previous)
            current.members.append(item)
        else:
            if current is not None:
                current.consumer = item
                chains.append(current)
            if isinstance(item, _Unit):
                current = _Chain(item, [], None, producer=previous)
            else:
                current = None
        if isinstance(item, _Unit):
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
    if isinstance(consumer, _Unit) and not consumer.depthwise and consumer.groups > 1:
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
    network slimming's percentile); infinite importances do not count."""
    values = np.sort(np.asarray(importances, np.float64)[np.isfinite(importances)])
    if values.size == 0:
        return 0.0
    k = int(math.floor(ratio * values.size))
    return float(values[k]) if k < values.size else float("inf")


def channel_importances(plain_model: keras.Model) -> np.ndarray:
    """The importance of every channel :func:`slim` could drop (before any is dropped)."""
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
            sigma = np.sqrt(unit.var + unit.eps)
            z = np.where(known, vals, 0.0) * unit.kernel.sum((0, 1)) + unit.bias
            exact_val = unit.activate(unit.gamma * (z - unit.mean) / sigma + unit.beta)
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


def _build_unit_layers(unit: _Unit, x, fold_bn: bool):
    keep_in, keep_out = unit.keep_in, unit.keep_out
    sigma = np.sqrt(unit.var + unit.eps)
    scale = unit.gamma / sigma
    if unit.depthwise:
        kernel = unit.kernel[:, :, keep_out]
        bias = unit.bias[keep_out]
        if fold_bn:
            kernel = kernel * scale[keep_out]
            bias = (bias - unit.mean[keep_out]) * scale[keep_out] + unit.beta[keep_out]
        conv = _clone(unit.conv, use_bias=fold_bn or unit.conv.use_bias)
        weights = [kernel[..., None]]
    else:
        dense = unit.kernel[:, :, keep_in][..., keep_out]
        bias = unit.bias[keep_out]
        if fold_bn:
            dense = dense * scale[keep_out]
            bias = (bias - unit.mean[keep_out]) * scale[keep_out] + unit.beta[keep_out]
        conv = _clone(
            unit.conv, filters=int(keep_out.sum()), use_bias=fold_bn or unit.conv.use_bias
        )
        weights = [kernels.to_grouped(dense, unit.groups)]
    if fold_bn or unit.conv.use_bias:
        weights.append(bias)
    x = conv(x)
    conv.set_weights([np.asarray(w, "float32") for w in weights])
    if not fold_bn:
        bn = _clone(unit.bn)
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
            new = _clone(
                act,
                negative_slope=list(np.asarray(act.negative_slope)[keep_out]),
                max_value=list(np.asarray(act.max_value)[keep_out]),
            )
            x = new(x)
        elif isinstance(act, keras.layers.PReLU):
            new = _clone(act)
            x = new(x)
            alpha = np.asarray(act.alpha)
            new.set_weights([alpha.reshape(-1)[keep_out].reshape(*alpha.shape[:-1], -1)])
        else:
            x = _clone(act)(x)
    return x


def _count_flops(model):
    from keras_dmr.analysis.flops import count_flops

    try:
        return count_flops(model)
    except ValueError:
        return None


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
        "flops_before": _count_flops(source),
        "flops_after": _count_flops(pruned),
    }


def slim(
    plain_model: keras.Model,
    threshold: float | None = None,
    ratio: float | None = None,
    fold_bn: bool = False,
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

    ``threshold=0`` drops nothing. ``fold_bn=True`` folds the BNs into the convolutions of the
    result (deployment); otherwise they stay, for fine-tuning. The result carries
    ``pruning_report``: the threshold used, channels, parameters and multiply-accumulates before
    and after.
    """
    _validate(threshold, ratio)
    if not isinstance(fold_bn, bool):
        raise ValueError(f"`fold_bn` must be True or False; got {fold_bn!r}")
    items = _parse_plain(plain_model)
    if ratio is not None:
        threshold = threshold_for_ratio(
            np.concatenate([_priority(c) for c in _chains(items)]), ratio
        )
    dense_folds = _plan_plain(items, float(threshold))
    inputs = _input_model(plain_model)
    x = inputs
    channels_before = channels_after = 0
    for item in items:
        if isinstance(item, _Unit):
            if item.keep_out is None:  # a unit no chain decides on (nothing dropped)
                item.keep_in = np.ones(item.kernel.shape[2], bool) if not item.depthwise else None
                item.keep_out = np.ones(item.c_out, bool)
                if item.depthwise:
                    item.keep_in = item.keep_out
            channels_before += item.c_out
            channels_after += int(item.keep_out.sum())
            x = _build_unit_layers(item, x, fold_bn)
            continue
        kind, layer = item
        if kind == "dense" and layer.name in dense_folds:
            keep, delta = dense_folds[layer.name]
            w = layer.get_weights()
            bias = (w[1] if layer.use_bias else np.zeros(layer.units)) + delta
            use_bias = layer.use_bias or bool(np.any(delta != 0))
            new = _clone(layer, use_bias=use_bias)
            x = new(x)
            weights = [w[0][keep]] + ([bias] if use_bias else [])
            new.set_weights([np.asarray(a, "float32") for a in weights])
        else:
            new = _clone(layer)
            x = new(x)
            if layer.weights:
                new.set_weights(layer.get_weights())
    pruned = keras.Model(inputs, x, name=f"{plain_model.name}_slim")
    pruned.pruning_report = _report(
        plain_model, pruned, float(threshold), ratio, channels_before, channels_after
    )
    return pruned


# ----------------------------------------------------------------- the residual baseline
def _block_units(block: ParallelBranchBlock) -> list[_Unit]:
    units = []
    for i, (conv, bn) in enumerate(block.paths[0]):
        act = keras.layers.ReLU() if i < len(block.paths[0]) - 1 else None
        units.append(_make_unit(conv, bn, act))
    return units


def _check_block(block) -> None:
    if not isinstance(block, ParallelBranchBlock):
        raise ValueError(f"{_describe(block)} is not a residual block slim_residual can prune")
    if block.branches != 1:
        raise ValueError(
            f"{_describe(block)} has {block.branches} branches: slim_residual prunes ResNets "
            "(branches=1); prune a multi-branch network's plain form with slim"
        )
    if block.branch not in ("basic", "bottleneck") or block.groups != 1:
        raise ValueError(
            f"{_describe(block)}: slim_residual supports basic and bottleneck branches without "
            f"groups; got branch={block.branch!r}, groups={block.groups}"
        )


@dataclasses.dataclass
class _Block:
    layer: ParallelBranchBlock
    units: list
    projection: _Unit | None
    scale: np.ndarray  # the skip scale s (ones without skip_bn)
    scale_stats: tuple | None  # (mean, var) of the block input, with skip_bn
    sum_stats: tuple | None  # (mean, var) of the sum before the ReLU, with skip_bn
    space: int = 0  # index of the stream (channel space tied by the shortcuts) it writes


def _parse_residual(model):
    layers = _chain(model, "model")
    for layer in layers:
        if hasattr(layer, "plain_ops"):
            _check_block(layer)
    stem, blocks, head, i = [], [], [], 0
    while i < len(layers) and not hasattr(layers[i], "plain_ops"):
        layer = layers[i]
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(
            layer, keras.layers.SeparableConv2D
        ):
            if layer.groups != 1:
                raise ValueError(f"{_describe(layer)}: grouped stem convolutions are unsupported")
            bn = layers[i + 1] if i + 1 < len(layers) else None
            act = layers[i + 2] if i + 2 < len(layers) else None
            act = act if isinstance(act, ACTIVATIONS) else None
            stem.append(_make_unit(layer, bn, act))
            i += 2 if act is None else 3
            continue
        if isinstance(layer, keras.layers.ZeroPadding2D | keras.layers.MaxPooling2D):
            stem.append(("layer", layer))
        else:
            raise ValueError(f"{_describe(layer)} is not supported in a ResNet's stem")
        i += 1
    while i < len(layers) and hasattr(layers[i], "plain_ops"):
        block = layers[i]
        _check_block(block)
        units = _block_units(block)
        projection = None
        if block.projection:
            conv, bn = block.projection[0]
            projection = _make_unit(conv, bn, None)
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
        elif isinstance(layer, (*GLOBAL_POOLS, keras.layers.Flatten, keras.layers.Dropout)):
            head.append(("layer", layer))
        else:
            raise ValueError(f"{_describe(layer)} is not supported in a ResNet's head")
    if not blocks or not any(isinstance(item, _Unit) for item in stem):
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
    stem_units = [u for u in stem if isinstance(u, _Unit)]
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


def _as_importance(unit: _Unit) -> np.ndarray:
    return np.where(unit.column_weights() == 0, 0.0, unit.importance())


def _keep_best(drop: np.ndarray, priority: np.ndarray) -> np.ndarray:
    return _balance(drop, priority, [1])


def _relu(x):
    return np.maximum(x, 0.0)


def slim_residual(
    model: keras.Model,
    threshold: float | None = None,
    ratio: float | None = None,
    fold_bn: bool = False,
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
    ``fold_bn=True``), ReLU and Add layers (a skip scale as :class:`ChannelScale` where the
    block had ``skip_bn``, a fixed ``Rescaling`` with ``fold_bn=True``, folded into the
    projection where there is one), with
    ``pruning_report`` as :func:`slim`'s.
    """
    _validate(threshold, ratio)
    if not isinstance(fold_bn, bool):
        raise ValueError(f"`fold_bn` must be True or False; got {fold_bn!r}")
    stem, blocks, head = _parse_residual(model)
    streams, hidden = _residual_decisions(stem, blocks)
    if ratio is not None:
        threshold = threshold_for_ratio(np.concatenate(streams + hidden), ratio)
    t = float(threshold)
    stream_drop = [_keep_best(imp < t, imp) for imp in streams]

    # Plan: walk the units in order, folding constants forward.
    def decide(unit, dropped, values, force=None):
        unit.fold_inputs(dropped, values)
        unit.keep_in = ~dropped
        imp = _as_importance(unit)
        drop = force if force is not None else _keep_best(imp < t, imp)
        unit.keep_out = ~drop
        exact = unit.column_weights() == 0
        return drop, np.where(drop, unit.dropped_values(exact), 0.0)

    stem_units = [u for u in stem if isinstance(u, _Unit)]
    dropped, values = np.zeros(stem_units[0].kernel.shape[2], bool), None
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

    # Build.
    inputs = _input_model(model)
    x = inputs
    channels_before = channels_after = 0

    def count(unit):
        nonlocal channels_before, channels_after
        channels_before += unit.c_out
        channels_after += int(unit.keep_out.sum())

    for item in stem:
        if isinstance(item, _Unit):
            count(item)
            x = _build_unit_layers(item, x, fold_bn)
        else:
            new = _clone(item[1])
            x = new(x)
    for block in blocks:
        name = block.layer.name
        keep_x = block.units[0].keep_in
        h = x
        for unit in block.units:
            count(unit)
            h = _build_residual_unit(unit, h, fold_bn, name)
        if block.projection is not None:
            unit = block.projection
            count(unit)
            unit.kernel = unit.kernel * block.scale[:, None][None, None]  # s folded in
            skip = _build_residual_unit(unit, x, fold_bn, name)
        elif block.scale_stats is not None and fold_bn:  # deployment: a fixed scale
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
        x = keras.layers.ReLU(name=f"{name}_out")(x)
    for kind, layer in head:
        if kind == "dense":
            w = layer.get_weights()
            kernel = np.asarray(w[0], np.float64)
            delta = values[dropped] @ kernel[dropped]
            bias = (w[1] if layer.use_bias else np.zeros(layer.units)) + delta
            new = _clone(layer, use_bias=True)
            x = new(x)
            new.set_weights([np.asarray(kernel[~dropped], "float32"), bias.astype("float32")])
            dropped = np.zeros(layer.units, bool)
        else:
            new = _clone(layer)
            x = new(x)
    pruned = keras.Model(inputs, x, name=f"{model.name}_slim")
    pruned.pruning_report = _report(model, pruned, t, ratio, channels_before, channels_after)
    return pruned


def _build_residual_unit(unit: _Unit, x, fold_bn: bool, block_name: str):
    conv, bn = unit.conv, unit.bn
    sigma = np.sqrt(unit.var + unit.eps)
    scale = unit.gamma / sigma
    keep_in, keep_out = unit.keep_in, unit.keep_out
    kernel = unit.kernel[:, :, keep_in][..., keep_out]
    bias = unit.bias[keep_out]
    if fold_bn:
        kernel = kernel * scale[keep_out]
        bias = (bias - unit.mean[keep_out]) * scale[keep_out] + unit.beta[keep_out]
    use_bias = fold_bn or conv.use_bias
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
    if not fold_bn:
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
    """A copy of a functional ``model`` with every convolution whose only reader is a
    BatchNormalization folded with it into one convolution with bias, and every
    :class:`ChannelScale` a fixed ``Rescaling`` (deployment; inference outputs unchanged to
    float rounding). Other layers are copied with their weights. Layers called more than once
    (shared) are not supported."""
    layers = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    for layer in layers:
        if len(layer._inbound_nodes) != 1:
            raise ValueError(f"{_describe(layer)} is called more than once; not supported")
    readers: dict[int, int] = {}
    for layer in layers:
        for t in layer._inbound_nodes[0].input_tensors:
            readers[id(t)] = readers.get(id(t), 0) + 1
    fold = {}  # conv name → its BN
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            source = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
            if (
                isinstance(source, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)
                and readers.get(id(source.output)) == 1
                and keras.activations.serialize(source.activation) in ("linear", None)
                and layer.axis in (-1, 3, [-1], [3])
            ):
                fold[source.name] = layer
    inputs = _input_model(model)
    tensors = {id(model.inputs[0]): inputs}
    for layer in layers:
        args = [tensors[id(t)] for t in layer._inbound_nodes[0].input_tensors]
        if isinstance(layer, keras.layers.BatchNormalization) and any(
            bn is layer for bn in fold.values()
        ):
            tensors[id(layer.output)] = args[0]  # folded into its convolution
            continue
        if layer.name in fold:
            gamma, beta, mean, var = _bn_arrays(fold[layer.name])
            scale = gamma / np.sqrt(var + fold[layer.name].epsilon)
            w = layer.get_weights()
            bias = (w[1] if layer.use_bias else 0.0) - mean
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kernel = w[0] * scale.reshape(-1, 1)
            else:
                kernel = w[0] * scale
            new = _clone(layer, use_bias=True)
            out = new(args[0])
            new.set_weights([kernel.astype("float32"), (bias * scale + beta).astype("float32")])
            tensors[id(layer.output)] = out
            tensors[id(fold[layer.name].output)] = out
            continue
        if isinstance(layer, ChannelScale):  # deployment: a fixed scale, or nothing
            scale = [float(v) for v in np.asarray(layer.gamma)] if layer.scale else None
            out = keras.layers.Rescaling(scale, name=layer.name)(args[0]) if scale else args[0]
            tensors[id(layer.output)] = out
            continue
        new = _clone(layer)
        out = new(args if len(args) > 1 else args[0])
        if layer.weights:
            new.set_weights(layer.get_weights())
        tensors[id(layer.output)] = out
    return keras.Model(inputs, tensors[id(model.outputs[0])], name=model.name)


# ------------------------------------------------------------------------------ reports
def accuracy(model: keras.Model, data, steps: int | None = None) -> float:
    """Top-1 accuracy of ``model`` (inference mode) on ``(images, labels)`` batches."""
    correct = total = 0
    for i, (images, labels) in enumerate(data):
        if steps is not None and i >= steps:
            break
        logits = np.asarray(model(images, training=False))
        correct += int(np.sum(np.argmax(logits, -1) == np.asarray(labels).reshape(-1)))
        total += len(logits)
    if total == 0:
        raise ValueError("`data` yielded no batches")
    return correct / total


def throughput(
    models: dict[str, keras.Model],
    *,
    batch_size: int = 64,
    warmup: int = 3,
    iters: int = 5,
    repeats: int = 5,
    spread: bool = False,
) -> dict:
    """Measured images per second of each model in inference mode (one TensorFlow graph per
    model, a fixed random batch), the median over ``repeats`` with the models interleaved;
    ``spread=True`` gives ``(median, slowest, fastest)`` repeat instead."""
    from keras_dmr.bench.timing import inference_fn, interleaved

    fns = {name: inference_fn(m, batch_size) for name, m in models.items()}
    timed = interleaved(fns, warmup=warmup, iters=iters, repeats=repeats)
    if spread:
        return {
            name: (batch_size / t["median_s"], batch_size / t["max_s"], batch_size / t["min_s"])
            for name, t in timed.items()
        }
    return {name: batch_size / t["median_s"] for name, t in timed.items()}


def describe(models: dict[str, keras.Model], *, data=None, speed: dict | None = None) -> dict:
    """Parameters, multiply-accumulates, accuracy on ``data`` and the measured ``speed``
    (images/s, from :func:`throughput`) of each model, side by side."""
    out = {}
    for name, model in models.items():
        out[name] = {
            "params": int(model.count_params()),
            "flops": _count_flops(model),
            "accuracy": None if data is None else accuracy(model, data),
            "images_per_s": None if speed is None else speed.get(name),
        }
    return out


def format_table(rows: dict[str, dict]) -> str:
    """The :func:`describe` dictionary as an aligned text table."""
    width = max(len(n) for n in rows)
    lines = [f"{'model':<{width}}  {'params':>10}  {'MACs':>12}  {'accuracy':>8}  {'images/s':>9}"]
    for name, r in rows.items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        flops = "-" if r["flops"] is None else f"{r['flops']:,}"
        lines.append(f"{name:<{width}}  {r['params']:>10,}  {flops:>12}  {acc:>8}  {ips:>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
PRUNE_HELP = "prune a checkpoint by network slimming (Sec. 4.2)"
PRUNE_DESCRIPTION = (
    "Convert the model in CHECKPOINT (.keras) to its plain form with BN kept, drop the channels "
    "whose BN scale is below --threshold (or the lowest --ratio of them), fine-tune for "
    "--finetune-epochs, print parameters, MACs, accuracy and measured throughput before and "
    "after, and save the pruned model atomically. --residual prunes the residual network "
    "itself instead (channels tied by a shortcut go together): the baseline of Fig. 7. Train "
    "with keras_dmr.prune.BNSparsity (and skip_bn) first for channels worth dropping."
)


def _threshold_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0; got {text!r}")
    return value


def _ratio_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1); got {text!r}")
    return value


def _lr_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text!r}")
    return value


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``keras-dmr prune``."""
    from keras_dmr import data

    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .keras model")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--threshold",
        type=_threshold_arg,
        metavar="T",
        help="drop channels whose BN scale is below T (the paper: 5e-4 to 5e-3)",
    )
    how.add_argument(
        "--ratio", type=_ratio_arg, metavar="R", help="drop the lowest fraction R of channels"
    )
    parser.add_argument(
        "--residual",
        action="store_true",
        help="prune the residual network itself (the baseline) instead of its plain form",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=_count_arg(0),
        default=2,
        metavar="N",
        help="fine-tuning epochs after pruning (default: 2)",
    )
    parser.add_argument(
        "--learning-rate",
        type=_lr_arg,
        default=0.01,
        metavar="LR",
        help="fine-tuning learning rate, recipe schedule (default: 0.01)",
    )
    parser.add_argument(
        "--batch-size", type=_count_arg(1), default=64, metavar="N", help="(default: 64)"
    )
    parser.add_argument(
        "--dataset",
        choices=data.SUPPORTED,
        default="digits",
        help="data for fine-tuning and accuracy (default: digits, bundled)",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data directory")
    parser.add_argument(
        "--downsample",
        choices=("dirac", "prelu"),
        default="dirac",
        help="RM of downsampling blocks (default: dirac)",
    )
    parser.add_argument(
        "--fold-bn", action="store_true", help="save with BN folded into the convolutions"
    )
    parser.add_argument(
        "--output",
        type=output_path("file"),
        metavar="PATH",
        help="pruned model (default: CHECKPOINT's name with _pruned)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def _save_atomically(model: keras.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".keras", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_prune(args: argparse.Namespace) -> int:
    """``keras-dmr prune``: returns the exit code; bad arguments raise ``UsageError``."""
    from keras_dmr import data
    from keras_dmr.cli import UsageError, load_checkpoint
    from keras_dmr.convert import ConversionError, to_plain
    from keras_dmr.recipe import StepDecay, compile_with_recipe

    output = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}_pruned.keras")
    if output.suffix != ".keras":
        raise UsageError(f"argument --output: must end in .keras; got {str(output)!r}")
    if output.exists() and not args.overwrite:
        raise UsageError(f"argument --output: {output} exists; pass --overwrite to replace it")
    model = load_checkpoint(args.checkpoint)
    residual = any(hasattr(layer, "plain_ops") for layer in model.layers)
    if args.residual and not residual:
        raise UsageError(f"argument --residual: {args.checkpoint} holds no residual blocks")
    info = data.dataset_info(args.dataset)
    if model.outputs[0].shape[-1] != info.num_classes:
        raise UsageError(
            f"argument --dataset: {args.dataset} has {info.num_classes} classes, the model "
            f"{model.outputs[0].shape[-1]} outputs"
        )
    how = {"threshold": args.threshold, "ratio": args.ratio}
    source = model
    try:
        if args.residual:
            pruned = slim_residual(model, **how)
        else:
            if residual:
                source = to_plain(model, fuse_bn=False, downsample=args.downsample)
            pruned = slim(source, **how)
    except (ConversionError, ValueError) as e:
        raise UsageError(f"cannot prune {args.checkpoint}: {e}") from None
    report = pruned.pruning_report
    test = data.load(args.dataset, "test", batch_size=args.batch_size, data_dir=args.data_dir)
    print(
        f"{model.name}: kept {report['channels_after']:,} of {report['channels_before']:,} "
        f"channels (BN scale threshold {report['threshold']:.3g}); "
        f"{report['pruned_params_ratio']:.1%} of the parameters pruned",
        flush=True,
    )
    pruned_accuracy = accuracy(pruned, test)
    if args.finetune_epochs:
        # Whole batches: TensorFlow 2.21's oneDNN CPU kernels can crash training a pruned
        # functional ResNet on a short last batch.
        train = data.load(
            args.dataset,
            "train",
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            drop_remainder=True,
        )
        last = model.layers[-1]
        linear = getattr(last, "activation", None) in (None, keras.activations.linear)
        compile_with_recipe(pruned, learning_rate=args.learning_rate, from_logits=linear)
        n = args.finetune_epochs
        print(f"fine-tuning for {n} epoch{'s' if n > 1 else ''}", flush=True)
        pruned.fit(
            train,
            validation_data=test,
            epochs=args.finetune_epochs,
            shuffle=False,
            verbose=1 if sys.stdout.isatty() else 2,
            callbacks=[StepDecay()],
        )
    final = fold_batchnorm(pruned) if args.fold_bn else pruned
    models = {f"{model.name} (checkpoint)": model}
    if source is not model:  # the plain form before pruning, in the form saved
        models["plain, before pruning"] = fold_batchnorm(source) if args.fold_bn else source
    models["pruned" + (" (fine-tuned)" if args.finetune_epochs else "")] = final
    speed = throughput(models, batch_size=args.batch_size)
    rows = describe(models, data=test, speed=speed)
    print(format_table(rows))
    print(f"accuracy right after pruning, before fine-tuning: {pruned_accuracy:.4f}")
    _save_atomically(final, output)
    print(f"wrote {output}")
    return 0


def prune_command():
    """The ``Command`` entry of ``keras-dmr prune`` for :data:`keras_dmr.cli.COMMANDS`."""
    from keras_dmr.cli import Command

    return Command(
        "prune",
        help=PRUNE_HELP,
        description=PRUNE_DESCRIPTION,
        add_arguments=add_prune_arguments,
        run=run_prune,
    )
