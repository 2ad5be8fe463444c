"""Network slimming of RMNet's plain form and of the residual baseline (``keras_dmr.prune``).

See :mod:`keras_dmr.convert.pruning` and ``docs/pruning.md``.
"""

from keras_dmr.convert.pruning import (
    BNSparsity,
    accuracy,
    bn_scales,
    channel_importances,
    describe,
    fold_batchnorm,
    format_table,
    scale_variables,
    slim,
    slim_residual,
    threshold_for_ratio,
    throughput,
    with_skip_bn,
)
from keras_dmr.layers.blocks import ChannelScale

__all__ = [
    "BNSparsity",
    "ChannelScale",
    "accuracy",
    "bn_scales",
    "channel_importances",
    "describe",
    "fold_batchnorm",
    "format_table",
    "scale_variables",
    "slim",
    "slim_residual",
    "threshold_for_ratio",
    "throughput",
    "with_skip_bn",
]
