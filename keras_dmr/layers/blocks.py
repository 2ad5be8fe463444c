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
import numpy as np
from keras import ops

from keras_dmr import rm
from keras_dmr.layers.conv import BN_EPSILON, batch_norm, conv2d, depthwise_conv2d
from keras_dmr.layers.streams import ChannelScale
from keras_dmr.rm import kernels

BRANCH_KINDS = ("basic", "bottleneck", "resnext", "xception")
MAPPINGS = ("merge_and_run", "identity", "vanilla")
IMPLEMENTATIONS = ("split", "grouped")
STRIDE_POSITIONS = ("spatial", "first")
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


def branch_units(
    kind, filters_in, filters, *, strides=1, bottleneck_width=None, groups=1, stride_on="spatial"
):
    """The layer sequence of one branch of ``kind`` (per branch, before any stacking).

    ``stride_on="spatial"`` strides the 3×3 convolution of a bottleneck/resnext branch (ResNet
    v1.5); ``"first"`` strides its first 1×1 (the original ResNet, Keras' ``ResNet50``). Basic and
    xception branches start with their spatial convolution, so both place the stride there.
    """
    check_choice("branch", kind, BRANCH_KINDS)
    check_choice("stride_on", stride_on, STRIDE_POSITIONS)
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
    first, spatial = (strides, 1) if stride_on == "first" else (1, strides)
    return [
        Unit(1, filters_in, width, first),
        Unit(3, width, width, spatial, groups=groups if kind == "resnext" else 1),
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
        stride_on: ``"spatial"`` (default) strides a bottleneck/resnext branch's 3×3
            convolution; ``"first"`` its first 1×1 convolution, as the original ResNet and
            ``keras.applications.ResNet50`` do. No effect on basic and xception branches.
        use_bias: give every convolution of the block (branches and projection) a bias, as
            Keras' ResNet v1 does; the bias sits before BN, so it only matters for imported
            weights. Default False.
        bn_epsilon: epsilon of every BatchNormalization in the block (default 1e-5; Keras'
            ResNet uses 1.001e-5).
        skip_bn: add the extra BN on the residual path of RMNet's pruning (Sec. 4.2), a
            :class:`ChannelScale` ``s`` on the block input before the shortcut
            (``ReLU(branch(x) + skip(s·x))``, a normal ResNet at ``s = 1``), and track the
            statistics of the sum before the ReLU. After RM, ``s`` (with the input's statistics)
            is the BN of the reserved channels and the sum's statistics the BN of the merged
            ones, so network slimming can rank every channel of the plain model. Default False.
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
        stride_on="spatial",
        use_bias=False,
        bn_epsilon=BN_EPSILON,
        skip_bn=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("mapping", mapping, MAPPINGS)
        check_choice("branch", branch, BRANCH_KINDS)
        check_choice("implementation", implementation, IMPLEMENTATIONS)
        check_choice("stride_on", stride_on, STRIDE_POSITIONS)
        if not float(bn_epsilon) > 0:
            raise ValueError(f"`bn_epsilon` must be a positive number; got {bn_epsilon!r}")
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
        self.stride_on = stride_on
        self.use_bias = bool(use_bias)
        self.bn_epsilon = float(bn_epsilon)
        self.skip_bn = bool(skip_bn)

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
            stride_on=self.stride_on,
        )

    def unit_layers(self, unit: Unit, copies: int, prefix: str) -> list:
        """Layers of one unit for ``copies`` stacked branches (1 = split form), computing in the
        block's dtype policy."""
        bias, dtype = self.use_bias, self.dtype_policy
        if unit.separable:
            dw = depthwise_conv2d(
                unit.kernel_size,
                strides=unit.strides,
                use_bias=bias,
                name=f"{prefix}_dw",
                dtype=dtype,
            )
            convs = [
                dw,
                conv2d(
                    unit.filters * copies,
                    1,
                    groups=copies,
                    use_bias=bias,
                    name=f"{prefix}_pw",
                    dtype=dtype,
                ),
            ]
        else:
            convs = [
                conv2d(
                    unit.filters * copies,
                    unit.kernel_size,
                    strides=unit.strides,
                    groups=unit.groups * copies,
                    use_bias=bias,
                    name=f"{prefix}_conv",
                    dtype=dtype,
                )
            ]
        bn = batch_norm(name=f"{prefix}_bn", epsilon=self.bn_epsilon, dtype=dtype)
        return [*convs, bn]

    @staticmethod
    def _build_path(path, shape) -> tuple:
        """Build the layers of ``path`` in order from ``shape``; return the output shape."""
        for layers in path:
            for layer in layers:
                layer.build(shape)
                shape = layer.compute_output_shape(shape)
        return tuple(shape)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        d_in = self._d_in = self.filters_in(input_shape)
        self.needs_projection = self.strides != 1 or d_in != self.filters
        units = self.units(d_in)
        k = self.branches
        per_branch = (*input_shape[:-1], d_in)
        stacked = (*input_shape[:-1], k * d_in)
        if self.implementation == "split":
            self.paths = [
                [self.unit_layers(u, 1, f"b{b}_{i}") for i, u in enumerate(units)] for b in range(k)
            ]
            for path in self.paths:
                self._build_path(path, per_branch)
        else:
            self.paths = [[self.unit_layers(u, k, f"{i}") for i, u in enumerate(units)]]
            self._build_path(self.paths[0], stacked)
        self.projection = []
        if self.needs_projection:
            proj = Unit(1, d_in, self.filters, self.strides)
            if self.mapping == "identity":  # K separate streams: one projection per stream
                copies = 1 if self.implementation == "split" else k
                count = k if self.implementation == "split" else 1
                self.projection = [self.unit_layers(proj, copies, f"proj{b}") for b in range(count)]
                shape = per_branch if copies == 1 else stacked
            else:
                self.projection = [self.unit_layers(proj, 1, "proj")]
                shape = per_branch
            for unit in self.projection:
                self._build_path([unit], shape)
        if self.skip_bn:
            dtype = self.dtype_policy
            self.skip_scale = ChannelScale(epsilon=self.bn_epsilon, name="skip_bn", dtype=dtype)
            self.sum_stats = ChannelScale(
                scale=False, epsilon=self.bn_epsilon, name="sum_stats", dtype=dtype
            )
            self.skip_scale.build(input_shape)
            self.sum_stats.build(self.compute_output_shape(input_shape))
        self.built = True

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1:3]
        if self.strides != 1:
            h, w = (rm.same_output_size(n, self.strides) for n in (h, w))
        channels = self.filters * (self.branches if self.stacked_input else 1)
        return (input_shape[0], h, w, channels)

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
        if not self.skip_bn:
            return ops.relu(h + self._skip(x, training))
        z = h + self._skip(self.skip_scale(x, training=training), training)
        return ops.relu(self.sum_stats(z, training=training))

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

    # --------------------------------------------------------------------------- RM operation
    def plain_ops(self, ctx):
        """This block as plain convolutions with the same output (RM operation, float64)."""

        k, vanilla = self.branches, self.mapping == "vanilla"
        weights = self.branch_weights()
        d_in = self._d_in
        units = self.units(d_in)
        eps = self.paths[0][0][-1].epsilon
        branch_ops = []
        for u, unit in enumerate(units):
            # Per branch: the unit's convs as dense float64 kernels, BN folded into the last.
            per_branch = []
            for b in range(k):
                layer_w = weights["branches"][b][u]
                if unit.separable:
                    dw = rm.conv_bn_op(
                        rm.depthwise_kernel(layer_w[0][0]),
                        None,
                        epsilon=eps,
                        bias=_conv_bias(layer_w[0]),
                        strides=unit.strides,
                        groups=unit.filters_in,
                    )
                    pw = rm.conv_bn_op(
                        layer_w[1][0], layer_w[2], epsilon=eps, bias=_conv_bias(layer_w[1])
                    )
                    per_branch.append([dw, pw])
                else:
                    per_branch.append(
                        [
                            rm.conv_bn_op(
                                layer_w[0][0],
                                layer_w[1],
                                epsilon=eps,
                                bias=_conv_bias(layer_w[0]),
                                strides=unit.strides,
                                groups=unit.groups,
                            )
                        ]
                    )
            for j in range(len(per_branch[0])):
                convs = [per_branch[b][j] for b in range(k)]
                shared_input = vanilla and u == 0 and j == 0  # all branches read x
                summed_output = vanilla and u == len(units) - 1 and j == len(per_branch[0]) - 1
                op = _assemble(convs, shared_input, summed_output)
                op.name = f"{self.name}_conv{len(branch_ops) + 1}"
                last = u == len(units) - 1 and j == len(per_branch[0]) - 1
                linear = unit.separable and j == 0
                op.act = None if last or linear else rm.Act.relu(op.c_out)
                branch_ops.append(op)
        skip = self._plain_skip(weights, d_in, eps)
        result = rm.reserve_and_merge(
            branch_ops,
            skip,
            post=rm.Act.relu(skip.c_out),
            input_nonnegative=ctx.input_nonnegative,
            input_hw=ctx.input_hw,
            method=ctx.downsample,
            skip_scale=self._plain_skip_scale(eps) if self.skip_bn else None,
        )
        if self.skip_bn:  # the merged channels' BN: the statistics of the whole sum
            merged = result[-1]
            mean, var = (np.asarray(w, np.float64) for w in self.sum_stats.get_weights())
            merged.bn = np.stack([np.sqrt(var), mean - merged.bias, var])
        return result

    def _plain_skip_scale(self, eps):
        """The extra BN on the residual path as a diagonal 1×1 op with a BN record: over the
        block input, ``gamma = s·sqrt(var)`` (the reserved channel's standard deviation), the
        input's moving mean and variance, and the kernel scaled so that it computes ``s·x``."""
        s, mean, var = (np.asarray(w, np.float64) for w in self.skip_scale.get_weights())
        return rm.ConvOp(
            np.diag(s)[None, None],
            np.zeros_like(s),
            bn=np.stack([s * np.sqrt(var), mean, var]),
            epsilon=eps,
            name=f"{self.name}_skip_bn",
        )

    def _plain_skip(self, weights, d_in, eps):
        """The shortcut as one linear 1×1 op over the block's whole input (float64)."""
        k = self.branches
        if self.projection:
            projs = [
                rm.conv_bn_op(
                    w[0][0], w[1], epsilon=eps, bias=_conv_bias(w[0]), strides=self.strides
                )
                for w in weights["projection"]
            ]
            w_p, b_p = [p.kernel[0, 0] for p in projs], [p.bias for p in projs]
        else:
            w_p, b_p = [np.eye(d_in)] * len(weights["projection"] or [0]), [np.zeros(d_in)]
        d_out = w_p[0].shape[1]
        if self.mapping == "merge_and_run":
            matrix = kernels.merge_and_run_matrix(k, d_in, w_p[0])
            bias = np.tile(b_p[0], k)
        elif self.mapping == "identity" and k > 1:
            blocks = w_p if len(w_p) == k else w_p * k
            matrix = np.zeros((k * d_in, k * d_out))
            for b in range(k):
                matrix[b * d_in : (b + 1) * d_in, b * d_out : (b + 1) * d_out] = blocks[b]
            bias = np.concatenate(b_p if len(b_p) == k else b_p * k)
        else:
            matrix, bias = w_p[0], b_p[0]
        return rm.ConvOp(
            matrix[None, None], bias, strides=self.strides, name=f"{self.name}_shortcut"
        )

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
            "stride_on": self.stride_on,
            "use_bias": self.use_bias,
            "bn_epsilon": self.bn_epsilon,
            "skip_bn": self.skip_bn,
        }


def _conv_bias(conv_weights):
    """A convolution's bias from its weight list ``[kernel]`` or ``[kernel, bias]``."""
    return conv_weights[1] if len(conv_weights) > 1 else None


def _assemble(convs, shared_input: bool, summed_output: bool):
    """K branches' versions of one conv as one dense op over the stacked state.

    Block-diagonal normally; side by side (one input) for the first layer of a vanilla assembly;
    stacked along the input (outputs summed) for its last. A sum of K BNs is no one BN, so the
    BN record is dropped there.
    """
    k = len(convs)
    if k == 1:
        return convs[0]
    kh, kw, c_in, c_out = convs[0].kernel.shape
    if summed_output:
        kernel = np.concatenate([c.kernel for c in convs], axis=2)
        bias = sum(c.bias for c in convs)
        bn = np.full((3, c_out), np.nan)
    else:
        rows = 1 if shared_input else k
        kernel = np.zeros((kh, kw, c_in * rows, c_out * k))
        for b, c in enumerate(convs):
            r = 0 if shared_input else b
            kernel[:, :, r * c_in : (r + 1) * c_in, b * c_out : (b + 1) * c_out] = c.kernel
        bias = np.concatenate([c.bias for c in convs])
        bn = np.concatenate([c.bn for c in convs], axis=1)
    return dataclasses.replace(convs[0], kernel=kernel, bias=bias, bn=bn)
