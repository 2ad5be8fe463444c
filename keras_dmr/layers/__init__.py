"""Blocks and layers of the merge-and-run family (``keras_dmr.layers``)."""

from keras_dmr.layers.blocks import (
    BRANCH_KINDS,
    IMPLEMENTATIONS,
    MAPPINGS,
    BranchMean,
    ParallelBranchBlock,
    TileBranches,
    branch_units,
)
from keras_dmr.layers.conv import GroupedConv2D
from keras_dmr.layers.kernels import merge_and_run_matrix, stack_branches, unstack_branches

__all__ = [
    "BRANCH_KINDS",
    "IMPLEMENTATIONS",
    "MAPPINGS",
    "BranchMean",
    "GroupedConv2D",
    "ParallelBranchBlock",
    "TileBranches",
    "branch_units",
    "merge_and_run_matrix",
    "stack_branches",
    "unstack_branches",
]
