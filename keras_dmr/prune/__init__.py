"""Network slimming of RMNet's plain form and of the residual baseline (``keras_dmr.prune``):
sparsity training (:mod:`~keras_dmr.prune.sparsity`), slimming the plain model
(:mod:`~keras_dmr.prune.slim`, whose docstring explains the method), the residual baseline and BN
folding (:mod:`~keras_dmr.prune.residual`), reports (:mod:`~keras_dmr.prune.report`), and pruning
over the whole graph of any functional CNN by channel groups (:func:`prune_channels`,
:mod:`~keras_dmr.prune.channel_groups`, :mod:`~keras_dmr.prune.graph_prune`). See
``docs/pruning.md``.
"""

from keras_dmr.layers.streams import ChannelScale
from keras_dmr.prune.channel_groups import ChannelGraph, build_channel_graph
from keras_dmr.prune.graph_prune import CRITERIA, group_importance, prune_channels
from keras_dmr.prune.progressive import prune_to_budget
from keras_dmr.prune.report import accuracy, describe, format_table, throughput
from keras_dmr.prune.residual import fold_batchnorm, fuse_batchnorm, slim_residual
from keras_dmr.prune.skip_bn import with_skip_bn
from keras_dmr.prune.slim import channel_importances, slim, threshold_for_ratio
from keras_dmr.prune.sparsity import BNSparsity, bn_scales, scale_variables, sparsity_factor

__all__ = [
    "BNSparsity",
    "CRITERIA",
    "ChannelGraph",
    "ChannelScale",
    "accuracy",
    "bn_scales",
    "build_channel_graph",
    "channel_importances",
    "describe",
    "fold_batchnorm",
    "fuse_batchnorm",
    "format_table",
    "group_importance",
    "prune_channels",
    "prune_to_budget",
    "scale_variables",
    "slim",
    "slim_residual",
    "sparsity_factor",
    "threshold_for_ratio",
    "throughput",
    "with_skip_bn",
]
