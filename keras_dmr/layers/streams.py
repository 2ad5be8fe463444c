"""Layers around the stacked branch states of a merge-and-run network: the shared conv0 copied
to every branch (:class:`TileBranches`), the branches' mean before a shared classifier
(:class:`BranchMean`), and the extra BN on the residual path that pruning needs
(:class:`ChannelScale`). Each answers the walker protocol or is folded by the block it serves."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_dmr import rm
from keras_dmr.layers.conv import BN_EPSILON
from keras_dmr.rm import kernels


@keras.saving.register_keras_serializable(package="keras_dmr")
class ChannelScale(keras.layers.Layer):
    """``y = gamma·x`` per channel (``gamma >= 0``, initially 1), tracking the moving mean and
    variance of ``x`` as BatchNormalization does but never normalising with them.

    The extra BN on the residual path (RMNet Sec. 4.2): the block stays a normal ResNet, with a
    learnable per-channel shortcut scale, and after RM the reserved channels get a BN with these
    statistics and ``gamma = scale·sqrt(var)`` (their standard deviation), which computes exactly
    ``scale·x`` (the kernel makes up for the epsilon) and normalises like a real BN when
    fine-tuned. ``scale=False`` keeps the statistics only (the identity): the block's record of
    the sum before its ReLU, which becomes the merged channels' BN the same way.

    Args:
        scale: learn the per-channel scale (``False``: statistics only).
        momentum: momentum of the moving statistics, as BatchNormalization's.
        epsilon: the epsilon of the BN the statistics become after RM.
    """

    def __init__(self, scale: bool = True, momentum: float = 0.9, epsilon=BN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.scale = bool(scale)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        c = (int(input_shape[-1]),)
        if self.scale:
            self.gamma = self.add_weight(
                shape=c, initializer="ones", constraint="non_neg", name="gamma"
            )
        self.moving_mean = self.add_weight(
            shape=c, initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=c, initializer="ones", trainable=False, name="moving_variance"
        )
        self.built = True

    def call(self, x, training=None):
        if training and self.trainable:
            axes = list(range(len(x.shape) - 1))
            mean, var = ops.moments(ops.cast(x, self.moving_mean.dtype), axes)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1 - m))
            self.moving_variance.assign(self.moving_variance * m + var * (1 - m))
        return x * ops.cast(self.gamma, x.dtype) if self.scale else x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "scale": self.scale,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="keras_dmr")
class BranchMean(keras.layers.Layer):
    """Average of the K branch states stacked on the last axis (the shared classifier's input)."""

    def __init__(self, branches: int, **kwargs):
        super().__init__(**kwargs)
        self.branches = int(branches)

    def call(self, x):
        if self.branches == 1:
            return x
        return sum(ops.split(x, self.branches, axis=-1)) / self.branches

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // self.branches)

    def plain_ops(self, ctx):
        """The mean as a linear map of the pooled features (the walker folds it into the
        classifier that follows); refused before global pooling, where it would be a 1×1
        convolution the RM chain does not need."""
        if not ctx.pooled:
            raise rm.ConversionError(f"layer {self.name!r} (BranchMean) must follow global pooling")
        convs = [op for op in ctx.chain if isinstance(op, rm.ConvOp)]
        channels = convs[-1].c_out // self.branches
        mean = kernels.merge_and_run_matrix(self.branches, channels)[:, :channels]
        return [rm.DenseOp(mean, np.zeros(channels), None, self.name)]

    def get_config(self):
        return {**super().get_config(), "branches": self.branches}


@keras.saving.register_keras_serializable(package="keras_dmr")
class TileBranches(keras.layers.Layer):
    """K copies of one state stacked on the last axis: a shared conv0 feeding every branch."""

    def __init__(self, branches: int, **kwargs):
        super().__init__(**kwargs)
        self.branches = int(branches)

    def call(self, x):
        return x if self.branches == 1 else ops.concatenate([x] * self.branches, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] * self.branches)

    def plain_ops(self, ctx):
        """Rewrites the convolution before it (the shared conv0) to write its output K times:
        the tile commutes with its per-channel activation and BN record. Adds no op."""
        previous = ctx.chain[-1] if ctx.chain else None
        if not isinstance(previous, rm.ConvOp):
            raise rm.ConversionError(
                f"layer {self.name!r} (TileBranches) must follow a convolution"
            )
        k = self.branches
        ctx.chain[-1] = dataclasses.replace(
            previous,
            kernel=np.concatenate([previous.kernel] * k, axis=-1),
            bias=np.tile(previous.bias, k),
            act=previous.act
            and rm.Act(np.tile(previous.act.slope, k), np.tile(previous.act.cap, k)),
            bn=np.tile(previous.bn, (1, k)),
        )
        return []

    def get_config(self):
        return {**super().get_config(), "branches": self.branches}
