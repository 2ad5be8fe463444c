"""The RM operation's math, NumPy only and float64 (``keras_dmr.rm``): BatchNorm folding and the
identity BN, Dirac kernels, grouped <-> dense kernels, the merge-and-run matrix, 'same'-padding
geometry (:mod:`keras_dmr.rm.kernels`), and the plain network as data -- activations, convolution,
pooling and dense ops, reserve-and-merge, fusing and channel ordering (:mod:`keras_dmr.rm.ops`).
Blocks rewrite themselves with it; nothing here imports Keras layers or the converter."""

from keras_dmr.errors import ConversionError
from keras_dmr.rm.kernels import (
    fold_bn,
    identity_bn,
    max_relative_error,
    merge_and_run_matrix,
    same_output_size,
    stack_branches,
    unstack_branches,
)
from keras_dmr.rm.ops import (
    Act,
    ConvOp,
    DenseOp,
    GlobalPoolOp,
    Op,
    PoolOp,
    TapOp,
    conv_bn_op,
    depthwise_kernel,
    fuse_linear_pairs,
    order_channels,
    passthrough,
    reserve_and_merge,
)

__all__ = [
    "Act",
    "ConversionError",
    "ConvOp",
    "DenseOp",
    "GlobalPoolOp",
    "Op",
    "PoolOp",
    "TapOp",
    "conv_bn_op",
    "depthwise_kernel",
    "fold_bn",
    "fuse_linear_pairs",
    "identity_bn",
    "max_relative_error",
    "merge_and_run_matrix",
    "same_output_size",
    "order_channels",
    "passthrough",
    "reserve_and_merge",
    "stack_branches",
    "unstack_branches",
]
