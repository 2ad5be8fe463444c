"""Blocks of K parallel residual branches: residual (K=1), vanilla assembly and merge-and-run.

The state entering and leaving a merge-and-run (or identity-mapping) block is the K branch states
stacked on the channel axis (K·d channels), as in Fig. 5 of the DMRNet paper; a vanilla-assembly
block reads and writes d channels. "+" sits between BN and ReLU: ``x' = ReLU(BN(...) + skip)``.

Downsampling (stride 2 or a change of width) uses a projection shortcut, 1×1 conv + BN. The paper
leaves open where it goes in a merge-and-run block; here the branch inputs are merged first (their
mean, d_in channels), that one tensor is projected once, and the projection is added to every
branch: ``x_k' = ReLU(H_k(x_k) + P(mean_j x_j))``. The skip stays linear (``P·M``), costs one
projection rather than K, and is what the RM conversion merges like any residual.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from keras_dmr.layers import kernels
from keras_dmr.layers.conv import batch_norm, conv2d, depthwise_conv2d

BRANCH_KINDS = ("basic", "bottleneck", "resnext", "xception")
MAPPINGS = ("merge_and_run", "identity", "vanilla")
IMPLEMENTATIONS = ("split", "grouped")
LAYERS_PER_BRANCH = {"basic": 2, "bottleneck": 3, "resnext": 3, "xception": 2}


def check_choice(argument: str, value, valid) -> None:
    """Raise the package's standard ValueError for an argument outside a fixed set."""
    if value not in valid:
        raise ValueError(f"`{argument}` must be one of {tuple(valid)}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One layer of a branch: a convolution (or separable pair) and BN; ReLU follows every unit
    but the last (the block adds the skip before that ReLU)."""

    kernel_size: int
    filters_in: int
    filters: int
    strides: int = 1
    groups: int = 1
    separable: bool = False


def branch_units(kind, filters_in, filters, *, strides=1, bottleneck_width=None, groups=1):
    """The layer sequence of one branch of ``kind`` (per branch, before any stacking)."""
    check_choice("branch", kind, BRANCH_KINDS)
    if kind == "basic":
        return [
            Unit(3, filters_in, filters, strides),
            Unit(3, filters, filters),
        ]
    if kind == "xception":
        return [
            Unit(3, filters_in, filters, strides, separable=True),
            Unit(3, filters, filters, separable=True),
        ]
    width = bottleneck_width or filters // 4
    return [
        Unit(1, filters_in, width),
        Unit(3, width, width, strides, groups=groups if kind == "resnext" else 1),
        Unit(1, width, filters),
    ]


@keras.saving.register_keras_serializable(package="keras_dmr")
class ParallelBranchBlock(keras.layers.Layer):
    """K residual branches joined by one skip mapping, then ReLU.

    Args:
        filters: output channels of each branch (d).
        branches: K. With K=1 every mapping is a plain residual block.
        mapping: ``"merge_and_run"`` (skip = the K×K block matrix of I/K, Eq. 3),
            ``"identity"`` (K separate residual streams, Table 7's ablation) or ``"vanilla"``
            (all branches read one input, outputs summed with it, Eq. 2).
        branch: ``"basic"``, ``"bottleneck"``, ``"resnext"`` or ``"xception"``.
        strides: stride of the branch's spatial convolution and of the projection.
        bottleneck_width: inner width of bottleneck/resnext branches (default ``filters // 4``).
        groups: groups of a resnext branch's 3×3 convolution (per branch).
        implementation: ``"split"`` runs K separate convolutions; ``"grouped"`` one grouped
            convolution over the stacked K·d channels (Fig. 5). Same function; weights convert
            with :meth:`branch_weights` / :meth:`set_branch_weights`.
    """

    def __init__(
        self,
        filters,
        *,
        branches=1,
        mapping="merge_and_run",
        branch="basic",
        strides=1,
        bottleneck_width=None,
        groups=1,
        implementation="split",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("mapping", mapping, MAPPINGS)
        check_choice("branch", branch, BRANCH_KINDS)
        check_choice("implementation", implementation, IMPLEMENTATIONS)
        if int(branches) != branches or branches < 1:
            raise ValueError(f"`branches` must be an integer >= 1; got {branches!r}")
        self.filters = int(filters)
        self.branches = int(branches)
        self.mapping = mapping
        self.branch = branch
        self.strides = int(strides)
        self.bottleneck_width = bottleneck_width
        self.groups = int(groups)
        self.implementation = implementation

    # ----------------------------------------------------------------------------------- build
    @property
    def stacked_input(self) -> bool:
        """Whether the input holds K stacked branch states (else one shared state)."""
        return self.mapping != "vanilla"

    def filters_in(self, input_shape) -> int:
        channels = int(input_shape[-1])
        if self.stacked_input:
            if channels % self.branches:
                raise ValueError(
                    f"{self.name}: input channels ({channels}) must be a multiple of "
                    f"`branches` ({self.branches}) for mapping={self.mapping!r}"
                )
            return channels // self.branches
        return channels

    def units(self, filters_in: int) -> list[Unit]:
        return branch_units(
            self.branch,
            filters_in,
            self.filters,
            strides=self.strides,
            bottleneck_width=self.bottleneck_width,
            groups=self.groups,
        )

    def _make_unit_layers(self, unit: Unit, copies: int, prefix: str) -> list:
        """Layers of one unit for ``copies`` stacked branches (1 = split form)."""
        if unit.separable:
            convs = [
                depthwise_conv2d(unit.kernel_size, strides=unit.strides, name=f"{prefix}_dw"),
                conv2d(unit.filters * copies, 1, groups=copies, name=f"{prefix}_pw"),
            ]
        else:
            convs = [
                conv2d(
                    unit.filters * copies,
                    unit.kernel_size,
                    strides=unit.strides,
                    groups=unit.groups * copies,
                    name=f"{prefix}_conv",
                )
            ]
        return [*convs, batch_norm(name=f"{prefix}_bn")]

    def build(self, input_shape):
        d_in = self.filters_in(input_shape)
        self.needs_projection = self.strides != 1 or d_in != self.filters
        units = self.units(d_in)
        k = self.branches
        if self.implementation == "split":
            self.paths = [
                [self._make_unit_layers(u, 1, f"b{b}_{i}") for i, u in enumerate(units)]
                for b in range(k)
            ]
        else:
            self.paths = [[self._make_unit_layers(u, k, f"{i}") for i, u in enumerate(units)]]
        self.projection = []
        if self.needs_projection:
            proj = Unit(1, d_in, self.filters, self.strides)
            if self.mapping == "identity":  # K separate streams: one projection per stream
                copies = 1 if self.implementation == "split" else k
                count = k if self.implementation == "split" else 1
                self.projection = [
                    self._make_unit_layers(proj, copies, f"proj{b}") for b in range(count)
                ]
            else:
                self.projection = [self._make_unit_layers(proj, 1, "proj")]
        # Sublayers build on the first (symbolic) call, from the shapes they actually receive.
        self.built = True

    # ------------------------------------------------------------------------------------ call
    @staticmethod
    def _run(path, x, training):
        for layers in path:
            for layer in layers[:-1]:
                x = layer(x)
            x = layers[-1](x, training=training)
            if layers is not path[-1]:
                x = ops.relu(x)
        return x

    def _branch_outputs(self, x, training):
        k = self.branches
        if self.implementation == "split":
            inputs = ops.split(x, k, axis=-1) if self.stacked_input and k > 1 else [x] * k
            outs = [
                self._run(path, xi, training) for path, xi in zip(self.paths, inputs, strict=True)
            ]
            return outs[0] if k == 1 else ops.concatenate(outs, axis=-1)
        stacked = x if self.stacked_input or k == 1 else ops.concatenate([x] * k, axis=-1)
        return self._run(self.paths[0], stacked, training)

    def _skip(self, x, training):
        k = self.branches
        if self.mapping == "vanilla":
            return self._run(self.projection, x, training) if self.projection else x
        if self.mapping == "identity":
            if not self.projection:
                return x
            if len(self.projection) == 1:  # grouped (or K = 1)
                return self._run(self.projection, x, training)
            parts = ops.split(x, k, axis=-1)
            outs = [
                self._run([p], xi, training) for p, xi in zip(self.projection, parts, strict=True)
            ]
            return ops.concatenate(outs, axis=-1)
        merged = x if k == 1 else sum(ops.split(x, k, axis=-1)) / k
        if self.projection:
            merged = self._run(self.projection, merged, training)
        return merged if k == 1 else ops.concatenate([merged] * k, axis=-1)

    def call(self, x, training=None):
        h = self._branch_outputs(x, training)
        if self.mapping == "vanilla" and self.branches > 1:
            h = sum(ops.split(h, self.branches, axis=-1))
        return ops.relu(h + self._skip(x, training))

    # ------------------------------------------------------------------------- introspection
    @property
    def layers_per_branch(self) -> int:
        return LAYERS_PER_BRANCH[self.branch]

    def path_polynomial(self) -> dict[int, int]:
        """Paths through the block by length (Sec. 3.2), per stream of the stacked state.

        A merge-and-run block maps stream j to stream k through the merge for every j (length 0)
        and through branch k itself (length B); its transfer matrix ``z^B·I + J`` has the
        all-ones eigenvector with eigenvalue ``z^B + K``, so a stack of blocks multiplies these
        polynomials. Identity mapping gives ``z^B + 1``, vanilla assembly ``1 + K·z^B``.
        """
        b, k = self.layers_per_branch, self.branches
        if self.mapping == "merge_and_run":
            return {0: k, b: 1}
        if self.mapping == "identity":
            return {0: 1, b: 1}
        return {0: 1, b: k}

    def branch_weights(self) -> dict[str, list]:
        """Weights in the split (per-branch) layout, whatever the implementation."""
        k = self.branches
        if self.implementation == "split":
            branches = [[[lyr.get_weights() for lyr in unit] for unit in p] for p in self.paths]
        else:
            per_unit = [
                [kernels.unstack_branches(type(lyr).__name__, lyr.get_weights(), k) for lyr in u]
                for u in self.paths[0]
            ]
            branches = [
                [[layer_w[b] for layer_w in unit_w] for unit_w in per_unit] for b in range(k)
            ]
        projection = [[lyr.get_weights() for lyr in unit] for unit in self.projection]
        if self.mapping == "identity" and len(self.projection) == 1 and k > 1:
            projection = [
                [
                    kernels.unstack_branches(type(lyr).__name__, lyr.get_weights(), k)[b]
                    for lyr in self.projection[0]
                ]
                for b in range(k)
            ]
        return {"branches": branches, "projection": projection}

    def set_branch_weights(self, weights: dict[str, list]) -> None:
        """Load weights given in the split layout (see :meth:`branch_weights`)."""
        k = self.branches
        if self.implementation == "split":
            for path, branch in zip(self.paths, weights["branches"], strict=True):
                for unit, unit_w in zip(path, branch, strict=True):
                    for lyr, w in zip(unit, unit_w, strict=True):
                        lyr.set_weights(w)
        else:
            for u, unit in enumerate(self.paths[0]):
                for j, lyr in enumerate(unit):
                    per_branch = [weights["branches"][b][u][j] for b in range(k)]
                    lyr.set_weights(kernels.stack_branches(type(lyr).__name__, per_branch))
        projection = weights["projection"]
        if self.mapping == "identity" and len(self.projection) == 1 and k > 1:
            projection = [
                [
                    kernels.stack_branches(type(lyr).__name__, [projection[b][j] for b in range(k)])
                    for j, lyr in enumerate(self.projection[0])
                ]
            ]
        for unit, unit_w in zip(self.projection, projection, strict=True):
            for lyr, w in zip(unit, unit_w, strict=True):
                lyr.set_weights(w)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "branches": self.branches,
            "mapping": self.mapping,
            "branch": self.branch,
            "strides": self.strides,
            "bottleneck_width": self.bottleneck_width,
            "groups": self.groups,
            "implementation": self.implementation,
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

    def get_config(self):
        return {**super().get_config(), "branches": self.branches}
