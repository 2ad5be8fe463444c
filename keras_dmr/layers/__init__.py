"""Blocks and layers of the merge-and-run family (``keras_dmr.layers``)."""

from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.layers.blocks import (
    BRANCH_KINDS,
    IMPLEMENTATIONS,
    MAPPINGS,
    ParallelBranchBlock,
    branch_units,
)
from keras_dmr.layers.conv import GroupedConv2D
from keras_dmr.layers.fake_quant import (
    FakeQuantConv2D,
    FakeQuantDense,
    FakeQuantDepthwiseConv2D,
    FakeQuantGroupedConv2D,
)
from keras_dmr.layers.inverted import InvertedResidualBlock
from keras_dmr.layers.padding import ConstantPadding2D
from keras_dmr.layers.repvgg import RepVGGBlock
from keras_dmr.layers.streams import BranchMean, ChannelScale, TileBranches
from keras_dmr.rm.kernels import merge_and_run_matrix, stack_branches, unstack_branches

# The blocks that rewrite themselves by RM (every layer answering ``plain_ops`` but the stream
# layers TileBranches and BranchMean).
RESIDUAL_BLOCKS = (ParallelBranchBlock, RepVGGBlock, InvertedResidualBlock)

__all__ = [
    "RESIDUAL_BLOCKS",
    "BRANCH_KINDS",
    "IMPLEMENTATIONS",
    "MAPPINGS",
    "BranchMean",
    "ChannelScale",
    "ChannelwiseReLU",
    "ConstantPadding2D",
    "FakeQuantConv2D",
    "FakeQuantDense",
    "FakeQuantDepthwiseConv2D",
    "FakeQuantGroupedConv2D",
    "GroupedConv2D",
    "InvertedResidualBlock",
    "ParallelBranchBlock",
    "RepVGGBlock",
    "TileBranches",
    "branch_units",
    "merge_and_run_matrix",
    "stack_branches",
    "unstack_branches",
]
