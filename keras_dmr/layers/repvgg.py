"""RepVGG blocks, with the RMNet paper's reserving ratio (Sec. 4.3, Fig. 5).

Training form of a block with ``n`` reserved channels (``n = floor(r·C)``; ``n = 0`` is RepVGG)::

    y[..., :n] = x[..., :n]                                        (the residual path)
    y[..., n:] = ReLU(BN3(conv3x3(x)) + BN1(conv1x1(x)) + BNid(x[..., n:]))

The identity BN exists only with stride 1 and as many input as output channels. The reserved
channels pass unchanged: in a network they are a previous block's ReLU output, so the ReLU of the
plain form keeps them. A pair (reserving block, ordinary block) is a residual connection across
one non-linear layer: the second block's identity BN merges the reserved channels back.

``plain_ops`` re-parameterises the block into ONE 3×3 convolution + ReLU through
:func:`keras_dmr.rm.ops.reserve_and_merge`: the 1×1 branch, the identity BN and the
reserved channels form a linear 1×1 skip that lands in the 3×3 kernel at the tap TensorFlow's
'same' padding reads (reserved channels become Dirac filters with zero bias).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_dmr import rm
from keras_dmr.layers.conv import batch_norm, bn_weights, conv2d
from keras_dmr.rm import kernels


def reserved_channels(filters: int, reserve_ratio: float) -> int:
    """``floor(reserve_ratio·filters)``, the channels a block passes through (exact for r=1)."""
    return min(int(filters), int(math.floor(float(reserve_ratio) * int(filters) + 1e-9)))


def check_reserve_ratio(reserve_ratio) -> float:
    if (
        isinstance(reserve_ratio, bool)
        or not isinstance(reserve_ratio, int | float)
        or not 0 <= reserve_ratio <= 1
    ):
        raise ValueError(f"`reserve_ratio` must be a number in [0, 1]; got {reserve_ratio!r}")
    return float(reserve_ratio)


@keras.saving.register_keras_serializable(package="keras_dmr")
class RepVGGBlock(keras.layers.Layer):
    """A RepVGG block (3×3 conv-BN + 1×1 conv-BN + identity BN, then ReLU) that may reserve
    its first ``floor(reserve_ratio·filters)`` input channels as a pure pass-through.

    Args:
        filters: output channels C.
        strides: 1 or 2 (both convolutions; a stride-2 block has no identity branch).
        reserve_ratio: r in [0, 1]. r > 0 needs stride 1 and C input channels (a reserved
            channel passes a stride-1 layer only); r = 1 makes the block the identity.

    Each branch's BN starts at γ = 1/√k for the k branches summed (2 or 3): the sum then has
    unit variance in training, and a model used after a few steps, whose BN moving statistics
    are still near their initial values, keeps bounded activations (with γ = 1 a RepVGG-21
    predicts logits ~1e5 at initialisation, past float16's range).

    Cannot: reserve in a strided block or one that changes the width; convert a strided block
    without a known input height and width ('same' padding of a stride-2 3×3 convolution
    depends on their parity). The pass-through is exact in the plain form for any input, but a
    signed input then needs a slope-1 (PReLU) activation on the reserved channels.
    """

    def __init__(self, filters: int, *, strides: int = 1, reserve_ratio: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int | np.integer) or filters < 1:
            raise ValueError(f"`filters` must be an integer >= 1; got {filters!r}")
        if strides not in (1, 2):
            raise ValueError(f"`strides` must be one of (1, 2); got {strides!r}")
        reserve_ratio = check_reserve_ratio(reserve_ratio)
        if strides != 1 and reserve_ratio > 0:
            raise ValueError(
                f"`reserve_ratio` must be 0 for a block with strides={strides}: reserved "
                f"channels pass stride-1 blocks only; got {reserve_ratio!r}"
            )
        self.filters = int(filters)
        self.strides = int(strides)
        self.reserve_ratio = reserve_ratio
        self.reserved = reserved_channels(self.filters, reserve_ratio)

    @property
    def learned(self) -> int:
        """Output channels computed by the RepVGG unit (the rest are reserved)."""
        return self.filters - self.reserved

    def build(self, input_shape):
        c_in = int(input_shape[-1])
        if self.reserved and c_in != self.filters:
            raise ValueError(
                f"{self.name}: `reserve_ratio` > 0 needs as many input channels as `filters` "
                f"({self.filters}); got {c_in}"
            )
        self.c_in = c_in
        self.has_identity = self.strides == 1 and c_in == self.filters
        self.conv3 = self.bn3 = self.conv1 = self.bn1 = self.bn_id = None
        m = self.learned
        if m:
            out_shape = (*input_shape[:-1], m)
            dtype = self.dtype_policy
            # k normalised branches summed have variance k: each BN starts at γ = 1/√k.
            gamma = 1.0 / math.sqrt(3 if self.has_identity else 2)
            self.conv3 = conv2d(m, 3, strides=self.strides, name="conv3x3", dtype=dtype)
            self.bn3 = batch_norm(name="bn3x3", dtype=dtype, gamma=gamma)
            self.conv1 = conv2d(m, 1, strides=self.strides, name="conv1x1", dtype=dtype)
            self.bn1 = batch_norm(name="bn1x1", dtype=dtype, gamma=gamma)
            for conv, bn in ((self.conv3, self.bn3), (self.conv1, self.bn1)):
                conv.build(input_shape)
                bn.build(out_shape)
            if self.has_identity:
                self.bn_id = batch_norm(name="bn_identity", dtype=dtype, gamma=gamma)
                self.bn_id.build(out_shape)
        self.built = True

    def call(self, x, training=None):
        n = self.reserved
        if not self.learned:
            return x
        y = self.bn3(self.conv3(x), training=training) + self.bn1(self.conv1(x), training=training)
        if self.has_identity:
            y = y + self.bn_id(x[..., n:] if n else x, training=training)
        y = ops.relu(y)
        return ops.concatenate([x[..., :n], y], axis=-1) if n else y

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1:3]
        if self.strides != 1:
            h, w = (rm.same_output_size(n, self.strides) for n in (h, w))
        return (input_shape[0], h, w, self.filters)

    # --------------------------------------------------------------------------- RM operation
    def plain_ops(self, ctx):
        """One 3×3 convolution + ReLU with this block's output (float64); none for r = 1.

        The merged convolution carries no BN record: ``fuse_bn=False`` puts an identity BN
        (Eq. 3) after it, holding the bias.
        """

        n, m, c_in, c = self.reserved, self.learned, self.c_in, self.filters
        if not m:  # all channels pass through: the block is the identity
            return []
        eps = self.bn3.epsilon
        k3 = rm.conv_bn_op(
            self.conv3.get_weights()[0], bn_weights(self.bn3), epsilon=eps, strides=self.strides
        )
        k1 = rm.conv_bn_op(
            self.conv1.get_weights()[0], bn_weights(self.bn1), epsilon=eps, strides=self.strides
        )
        # The branch: the 3×3 unit, with zero columns where the reserved channels will sit.
        branch = rm.ConvOp(
            np.concatenate([np.zeros((3, 3, c_in, n)), k3.kernel], axis=-1),
            np.concatenate([np.zeros(n), k3.bias]),
            strides=self.strides,
            name=self.name,
        )
        # The linear skip: reserved channels (identity), the 1×1 unit and the identity BN.
        matrix = kernels.partial_identity(c_in, c, n)
        bias = np.zeros(c)
        matrix[:, n:] = k1.kernel[0, 0]
        bias[n:] = k1.bias
        if self.has_identity:
            scale, shift = kernels.fold_bn(*bn_weights(self.bn_id), eps)
            matrix[n:, n:] += np.diag(scale)
            bias[n:] += shift
        skip = rm.ConvOp(matrix[None, None], bias, strides=self.strides, name=f"{self.name}_1x1")
        post = rm.passthrough(n, ctx.input_nonnegative).concat(rm.Act.relu(m))
        (op,) = rm.reserve_and_merge(
            [branch],
            skip,
            post=post,
            input_nonnegative=ctx.input_nonnegative,
            input_hw=ctx.input_hw,
            method=ctx.downsample,
        )
        op.bn = np.full((3, c), np.nan)  # a sum of three BNs is no one BN
        return [op]

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "reserve_ratio": self.reserve_ratio,
        }
