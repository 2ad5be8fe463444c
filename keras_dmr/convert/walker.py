"""The converter's walk over a model's graph: a chain of plain ops, residual blocks found where
the graph forks and joins again.

From the input, a tensor used once by a one-input node extends the chain (a convolution, a BN
folded into it, an activation, padding, pooling, a dense head, or a layer that rewrites itself
through ``plain_ops``). A tensor used more than once opens a residual block: every use is
followed along one-input nodes until all meet at one addition. Paths that are linear 1×1 maps (the
identity, a projection convolution with its BN, a strided 1×1 max pool) are summed into the
shortcut; at most one path may be anything else (the branch), and :func:`reserve_and_merge`
rewrites the pair. Anything else raises :class:`ConversionError` naming the node.

Cannot: a branch that forks again (a block inside a branch), two branches with convolutions
(only the package's own blocks have those), concatenations, gating (squeeze-excitation),
anything after the global pooling but a dense head (a 1×1 convolution on a keepdims pooling and
reshapes of the pooled channels count as one), a Flatten of a spatial map followed by anything but
a Dense layer, an output of the model inside a residual block or on a side path (outputs taken
between blocks are marked in the chain with :class:`~keras_dmr.rm.ops.TapOp`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_dmr.convert import elements as el
from keras_dmr.convert.graph import Graph, Node, Value
from keras_dmr.errors import ConversionError
from keras_dmr.layers import RESIDUAL_BLOCKS
from keras_dmr.rm.ops import (
    Act,
    ConvOp,
    DenseOp,
    GlobalPoolOp,
    Op,
    PoolOp,
    TapOp,
    identity_skip,
    output_hw,
    reserve_and_merge,
)


@dataclasses.dataclass
class PlainContext:
    """What a layer needs to know to rewrite itself (the walker protocol): its input's height and
    width and sign, the conversion options, whether global pooling came before, and the plain
    chain built so far (``chain``: a layer may rewrite its last op in place, as
    ``TileBranches`` does). ``plain_ops(ctx)`` returns the ops to append."""

    input_hw: tuple | None
    input_nonnegative: bool
    downsample: str = "dirac"
    pooled: bool = False
    chain: list = dataclasses.field(default_factory=list)


def _compose_acts(first: Act, second: Act) -> Act | None:
    """``second ∘ first`` as one Act where it is one (``first`` keeps signs: slopes ≥ 0)."""
    if np.any(first.slope < 0) or np.any(first.cap < 0):
        return None
    return Act(first.slope * second.slope, np.minimum(first.cap, second.cap))


class Chain:
    """The plain ops along one path of the graph and the state of the tensor at its end."""

    def __init__(self, hw, nonnegative: bool, options: dict, channels: int, pooled: bool = False):
        self.ops: list[Op] = []
        self.hw = hw
        self.c = channels  # channels of the tensor at the end of the chain
        self.nonnegative = nonnegative
        self.pooled = pooled
        self.options = options
        self.pending: tuple[Node, el.Padding] | None = None
        self.keepdims = False  # pooled, and the tensor is still a 1×1 map (a conv head reads it)
        self.flattened: Node | None = None  # a Flatten of a spatial map, awaiting its Dense
        self.skip_scale: ConvOp | None = None  # a ChannelScale that starts this path

    # -- helpers
    def last(self):
        return self.ops[-1] if self.ops else None

    def append(self, op: Op) -> None:
        if isinstance(op, ConvOp):
            self.c = op.c_out
            self.hw = output_hw(op, self.hw)
            self.nonnegative = op.act is not None and op.act.nonnegative
        elif isinstance(op, PoolOp):
            self.hw = output_hw(op, self.hw)
        self.ops.append(op)

    def _take_padding(self, node: Node, layer_padding, what: str) -> tuple:
        """``(padding, value)`` for a layer: 'same', or explicit pads (a 'valid' layer's zeros,
        or the pads of the padding node just before it and the value it pads with)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return ("same" if layer_padding == "same" else ((0, 0), (0, 0))), 0.0
        pad_node, padding = pending
        if layer_padding == "same":
            raise el.refuse(node, f"{what} with 'same' padding after {pad_node.describe()}")
        return padding.pads, padding.value

    def _no_pending(self, node: Node) -> None:
        if self.pending is not None:
            raise el.refuse(
                self.pending[0],
                f"padding must be followed by a convolution or a pool, not by {node.describe()}",
            )

    # -- elements
    def apply(self, node: Node, element, report) -> None:
        if isinstance(element, el.Identity):
            report.passed.append(node.name)
            return
        if self.flattened is not None and not isinstance(element, el.Dense):
            raise el.refuse(
                node,
                f"follows {self.flattened.describe()}, which flattens a spatial map; only a "
                "Dense layer is understood there",
            )
        if isinstance(element, el.Padding):
            if self.pooled:
                raise el.refuse(node, "padding after global pooling")
            if self.pending is not None:
                raise el.refuse(node, "two paddings in a row are not supported")
            self.pending = (node, element)
            return
        if isinstance(element, el.Linear):
            return self._linear(node, element)
        if isinstance(element, el.Pool):
            return self._pool(node, element)
        self._no_pending(node)
        if isinstance(element, el.Affine):
            return self._affine(node, element)
        if isinstance(element, el.SkipScale):
            return self._skip_scale(node, element)
        if isinstance(element, el.Activation):
            return self._activation(node, element.make)
        if isinstance(element, el.OutputActivation):
            last = self.last()
            if not isinstance(last, DenseOp) or last.activation is not None:
                raise el.refuse(node, f"{element.name} must directly follow a linear Dense layer")
            last.activation = element.name
            return
        if isinstance(element, el.GlobalPool):
            if self.pooled:
                raise el.refuse(node, "global pooling twice")
            self.ops.append(GlobalPoolOp(element.kind, node.name))
            self.pooled, self.keepdims = True, element.keepdims
            return
        if isinstance(element, el.Reshape):
            return self._reshape(node, element, report)
        if isinstance(element, el.Flatten):
            return self._flatten(node, report)
        if isinstance(element, el.Dense):
            return self._dense(node, element)
        if isinstance(element, el.Block):
            return self._block(node, element.layer, report)
        raise el.refuse(node, "an addition here does not close a residual block")  # el.Add

    def _reshape(self, node: Node, element: el.Reshape, report) -> None:
        last = self.last()
        c = last.kernel.shape[1] if isinstance(last, DenseOp) else self.c
        if not self.pooled or element.target not in ((c,), (1, 1, c)):
            raise el.refuse(
                node,
                f"a Reshape to {element.target} is only understood on pooled channels, to "
                f"({c},) or (1, 1, {c})",
            )
        self.keepdims = len(element.target) == 3
        report.passed.append(node.name)

    def _flatten(self, node: Node, report) -> None:
        if self.pooled:
            self.keepdims = False
            report.passed.append(node.name)
            return
        if self.hw == (1, 1):  # one pixel: the flattening is a pooling
            self.ops.append(GlobalPoolOp("avg", node.name))
            self.pooled = True
            return
        if self.hw is None or None in self.hw:
            raise el.refuse(
                node,
                "flattens a map of unknown height and width",
                "Build the model with a fixed input size",
            )
        self.flattened = node  # the Dense after it reads the whole map: a convolution
        report.passed.append(node.name)

    def _linear(self, node: Node, element: el.Linear) -> None:
        if self.pooled:
            return self._head_conv(node, element)
        first = element.pre or element.op  # the convolution that meets the input
        padding, value = self._take_padding(node, first.padding, "a convolution")
        if value != 0.0:
            raise el.refuse(node, f"a convolution after padding with {value}")
        op = element.op
        if element.pre is not None:  # SeparableConv2D: depthwise with the layer's geometry
            self.append(dataclasses.replace(element.pre, padding=self._unpad(element.pre, padding)))
            padding = "same"
        op = dataclasses.replace(op, padding=self._unpad(op, padding))
        if element.act is not None:
            op.act = element.act(op.c_out)
        self.append(op)

    @staticmethod
    def _unpad(op: ConvOp, padding):
        # a 1×1 convolution pads nothing either way
        return "same" if padding == ((0, 0), (0, 0)) and op.kernel_size == (1, 1) else padding

    def _head_conv(self, node: Node, element: el.Linear) -> None:
        """A convolution on the 1×1 map of a keepdims pooling (keras.applications.MobileNet's
        head) is a Dense layer: the one tap that reads the pixel."""
        if not self.keepdims:
            raise el.refuse(node, "a convolution after global pooling")
        op = element.op
        if element.pre is not None or op.padding != "same" and op.kernel_size != (1, 1):
            raise el.refuse(node, "only a 1×1 or 'same' convolution is understood after pooling")
        top, left = ((k - 1) // 2 for k in op.kernel_size)  # the tap 'same' padding centres
        activation = None
        if element.act is not None:
            act = element.act(op.c_out)
            if not (np.all(act.slope == 0) and np.all(np.isinf(act.cap))):
                raise el.refuse(node, "only ReLU is understood after a convolution on pooled data")
            activation = "relu"
        self._dense(node, el.Dense(op.kernel[top, left], op.bias, activation))

    def _pool(self, node: Node, element: el.Pool) -> None:
        if self.pooled:
            raise el.refuse(node, "pooling after global pooling")
        padding, value = self._take_padding(node, element.padding, "a pool")
        if element.kind == "avg" and value != 0.0:
            raise el.refuse(node, f"average pooling after padding with {value}")
        self.append(PoolOp(element.kind, element.size, element.strides, padding, node.name, value))

    def _affine(self, node: Node, element: el.Affine) -> None:
        for values in (element.scale, element.shift):
            if len(values) not in (1, self.c):
                raise el.refuse(node, f"{len(values)} scales or offsets for {self.c} channels")
        # A scalar scale or offset (Rescaling's usual form) is the same on every channel.
        element = dataclasses.replace(
            element,
            scale=np.broadcast_to(element.scale, (self.c,)).copy(),
            shift=np.broadcast_to(element.shift, (self.c,)).copy(),
        )
        last = self.last()
        if self.pooled:
            raise el.refuse(node, "a BatchNormalization or rescaling after global pooling")
        if isinstance(last, ConvOp) and last.act is None:
            fresh = np.all(np.isnan(last.bn)) and element.bn is not None
            last.kernel = last.kernel * element.scale
            last.bias = last.bias * element.scale + element.shift
            if fresh:
                last.bn, last.epsilon = element.bn.copy(), element.epsilon
            else:  # a second affine map: the record no longer describes the op
                last.bn = np.full_like(last.bn, np.nan)
            return
        self.append(el.affine_op(element, node.name))

    def _skip_scale(self, node: Node, element: el.SkipScale) -> None:
        """A ChannelScale. With a scale, at the start of a path: kept apart as that path's
        ``skip_scale`` (a shortcut's, whose BN record the reserved channels take); elsewhere
        a per-channel scale. Statistics only, after a linear convolution (a block's sum): that
        convolution's BN record becomes the statistics, as a ``skip_bn`` block's merged
        channels have; elsewhere it computes the identity and adds nothing."""
        if self.pooled:
            raise el.refuse(node, "a ChannelScale after global pooling")
        if element.gamma is not None:
            if not self.ops:
                self.skip_scale = element.scale_op(node.name)
                self.ops.append(self.skip_scale)
                return
            return self._affine(node, el.Affine(element.gamma, np.zeros_like(element.gamma)))
        last = self.last()
        if isinstance(last, ConvOp) and last.act is None:
            mean, var = element.mean, element.var
            last.bn, last.epsilon = np.stack([np.sqrt(var), mean - last.bias, var]), element.epsilon

    def _activation(self, node: Node, make) -> None:
        last = self.last()
        if isinstance(last, DenseOp):
            if last.activation is not None:
                raise el.refuse(node, "an activation after an activated Dense layer")
            act = make(last.kernel.shape[1])
            if not (np.all(act.slope == 0) and np.all(np.isinf(act.cap))):
                raise el.refuse(node, "only ReLU is understood after a Dense layer")
            last.activation = "relu"
            return
        if self.pooled:
            raise el.refuse(node, "an activation after global pooling")
        if isinstance(last, ConvOp) and last.act is None:
            last.act = make(last.c_out)
            self.nonnegative = last.act.nonnegative
            return
        if isinstance(last, ConvOp):
            composed = _compose_acts(last.act, make(last.c_out))
            if composed is not None:
                last.act = composed
                self.nonnegative = composed.nonnegative
                return
        op = identity_skip(self.c, node.name)
        op.act = make(self.c)
        self.append(op)

    def _dense(self, node: Node, element: el.Dense) -> None:
        if self.flattened is not None:
            return self._flattened_dense(node, element)
        if not self.pooled:
            raise el.refuse(node, "a Dense layer must follow global pooling (or Flatten after it)")
        op = DenseOp(element.kernel, element.bias, element.activation, node.name)
        last = self.last()
        if isinstance(last, DenseOp) and last.activation is None:  # two linear maps: one
            op = DenseOp(
                last.kernel @ op.kernel, last.bias @ op.kernel + op.bias, op.activation, op.name
            )
            self.ops.pop()
        self.ops.append(op)

    def _flattened_dense(self, node: Node, element: el.Dense) -> None:
        """Flatten of an H×W×C map, then Dense: a 'valid' H×W convolution to a 1×1 map (Keras
        flattens channels-last row-major, so the kernel is the Dense kernel reshaped), pooled."""
        h, w = self.hw
        self.flattened = None
        if element.kernel.shape[0] != h * w * self.c:
            raise el.refuse(node, f"reads {element.kernel.shape[0]} features, not {h}×{w}×{self.c}")
        kernel = element.kernel.reshape(h, w, self.c, -1)
        act = None
        if element.activation == "relu":
            act = Act(np.zeros(kernel.shape[-1]), np.full(kernel.shape[-1], np.inf))
        self.append(ConvOp(kernel, element.bias, act=act, padding=((0, 0), (0, 0)), name=node.name))
        self.ops.append(GlobalPoolOp("avg", f"{node.name}_pixel"))
        self.pooled = True
        if act is None and element.activation is not None:  # softmax & co.: on an identity Dense
            identity = np.eye(kernel.shape[-1])
            self.ops.append(
                DenseOp(identity, np.zeros(len(identity)), element.activation, f"{node.name}_out")
            )

    def _block(self, node: Node, layer, report) -> None:
        ctx = PlainContext(
            self.hw, self.nonnegative, self.options["downsample"], self.pooled, self.ops
        )
        ops = layer.plain_ops(ctx)
        if self.pooled and any(isinstance(op, ConvOp | PoolOp) for op in ops):
            raise el.refuse(node, "a block after global pooling")
        signed = [op for op in ops if getattr(op, "act", None) and not op.act.nonnegative]
        if self.options["relu_only"] and signed:
            raise el.refuse(
                node,
                "the input it reserves may be negative (the layer before it does not end in "
                "ReLU, or a projection is reserved) and a ReLU would clip it",
                "Convert with relu_only=False to carry it through slope-1 PReLU",
            )
        for op in ops:
            if isinstance(op, DenseOp) and not self.pooled:
                raise el.refuse(node, "a dense layer before global pooling")
            self.append(op)
        convs = [op for op in self.ops if isinstance(op, ConvOp)]
        if convs:  # a layer may have rewritten the last op in place (TileBranches)
            self.c = convs[-1].c_out
        if isinstance(layer, RESIDUAL_BLOCKS):
            report.blocks.append({"node": node.name, "kind": type(layer).__name__})

    def tap(self, value: Value, positions: list[int]) -> None:
        """The tensor at the end of the chain is the model's output(s) ``positions``."""
        where = value.producer.describe() if value.producer else "the model input"
        if self.pending is not None or self.flattened is not None:
            node = self.pending[0] if self.pending is not None else self.flattened
            raise el.refuse(
                node,
                f"is pending (it waits for the layer that reads it) where {where} is an output",
            )
        for position in positions:
            self.ops.append(TapOp(position, value.producer.name if value.producer else "input"))

    def finish(self) -> None:
        if self.pending is not None:
            raise el.refuse(self.pending[0], "padding at the end of a path")
        if self.flattened is not None:
            raise el.refuse(
                self.flattened, "flattens a spatial map that no Dense layer reads before the output"
            )


@dataclasses.dataclass
class Report:
    blocks: list = dataclasses.field(default_factory=list)
    passed: list = dataclasses.field(default_factory=list)
    # join node index → the uses (node index, argument position) of the fork's value that
    # start its linear shortcuts (where with_skip_bn puts the extra BN of the residual path)
    shortcuts: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------- the walk
class GraphWalker:
    def __init__(self, graph: Graph, input_shape, downsample: str, relu_only: bool):
        self.graph = graph
        self.options = {
            "downsample": downsample,
            "relu_only": relu_only,
            "input_channels": input_shape[-1],
        }
        self.hw = (input_shape[0], input_shape[1])
        self.report = Report()
        self._elements: dict[int, object] = {}

    def element(self, node: Node):
        if node.index not in self._elements:
            self._elements[node.index] = el.element(node)
        return self._elements[node.index]

    def run(self) -> list[Op]:
        """The plain ops from the input to the (last) output; with several outputs a
        :class:`TapOp` marks where each one is read off the chain."""
        chain = Chain(self.hw, False, self.options, self.options["input_channels"])
        value = self.graph.input
        several = len(self.graph.outputs) > 1
        reached: set[int] = set()
        while True:
            positions = self.graph.output_positions(value)
            if several and positions:
                chain.tap(value, positions)
                reached.update(positions)
            if value is self.graph.output:
                break
            uses = self.graph.uses(value)
            if not uses:  # cannot happen for a value on the way to the output
                raise ConversionError(f"model {self.graph.model_name!r}: a dangling tensor")
            node = uses[0][0]
            if len(uses) == 1 and len(node.inputs) == 1:
                chain.apply(node, self.element(node), self.report)
                value = node.output
            else:
                value = self.residual(chain, value, uses)
        chain.finish()
        missed = sorted(set(range(len(self.graph.outputs))) - reached)
        if several and missed:  # an output on a side path: caught in residual(), kept as a net
            raise ConversionError(
                f"model {self.graph.model_name!r}: outputs {missed} are not on the network's "
                "main path; the converter reads outputs taken between blocks"
            )
        return chain.ops

    # -- residual blocks
    def _follow(self, node: Node) -> tuple[list[Node], Node]:
        """The one-input nodes from ``node`` on, up to the first node with several inputs."""
        path = []
        while len(node.inputs) == 1:
            path.append(node)
            if node.output is self.graph.output:
                raise el.refuse(
                    node,
                    "a path from a fork reaches the output without meeting an addition",
                    "Only residual blocks (a fork joined again by an addition) are understood",
                )
            if self.graph.output_positions(node.output):
                raise el.refuse(
                    node,
                    "is an output of the model inside a residual block (a fork not yet joined "
                    "again)",
                    "Take outputs between blocks, where the plain network computes the same tensor",
                )
            uses = self.graph.uses(node.output)
            if len(uses) != 1:
                raise el.refuse(
                    node,
                    "its output is used again inside a residual branch (a block within a "
                    "branch, or a gate); only chains of layers are understood inside a block",
                )
            node = uses[0][0]
        return path, node

    def residual(self, chain: Chain, fork: Value, uses) -> Value:
        chain._no_pending(uses[0][0])
        where = fork.producer.describe() if fork.producer else "the model input"
        if chain.pooled:
            raise ConversionError(f"the output of {where} forks after global pooling")
        paths = [self._follow(node) for node, _ in uses]
        joins = {id(end) for _, end in paths}
        join = paths[0][1]
        if len(joins) != 1 or len(join.inputs) != len(paths):
            raise ConversionError(
                f"the output of {where} is used by {len(uses)} paths that do not all end in one "
                f"addition ({join.describe()} joins {len(join.inputs)} tensors); only residual "
                "blocks (a fork joined by one addition) are understood"
            )
        if not isinstance(self.element(join), el.Add):
            raise el.refuse(join, "joins a fork, and only additions are understood there")
        built = []
        for nodes, _ in paths:
            sub = Chain(chain.hw, chain.nonnegative, self.options, chain.c)
            for node in nodes:
                element = self.element(node)
                if isinstance(
                    element, el.Block | el.GlobalPool | el.Dense | el.Flatten | el.Reshape
                ):
                    raise el.refuse(node, "is not understood inside a residual branch")
                sub.apply(node, element, self.report)
            sub.finish()
            built.append((nodes, sub))
        ops, kinds, shortcut_paths = self._merge(join, built, chain)
        self.report.shortcuts[join.index] = [(uses[i][0].index, uses[i][1]) for i in shortcut_paths]
        for op in ops:
            chain.append(op)
        self.report.blocks.append(
            {
                "node": join.name,
                "where": join.path,
                "kind": "residual",
                "branch": kinds["branch"],
                "shortcut": kinds["shortcut"],
            }
        )
        return join.output

    def _merge(self, join: Node, built, chain: Chain):
        channels = chain.c
        skips, branches, kinds, windows, scales, shortcut_paths = [], [], [], set(), [], []
        for i, (nodes, sub) in enumerate(built):
            scale = sub.skip_scale if sub.ops and sub.ops[0] is sub.skip_scale else None
            linear = sub.ops[1:] if scale is not None else sub.ops
            skip, window, kind = _as_skip(linear, channels, chain.hw)
            if skip is not None:
                skips.append(skip)
                kinds.append(f"{kind} (scaled)" if scale is not None else kind)
                windows.add(window)
                scales.append(scale)
                shortcut_paths.append(i)
            else:
                branches.append((nodes, sub))
        branches = _sum_linear(branches)
        if len(branches) > 1:
            names = [[n.name for n in nodes] for nodes, _ in branches]
            pooled = [sub for _, sub in branches if sub.ops and isinstance(sub.ops[0], PoolOp)]
            why = ""
            if pooled and pooled[0].ops[0].kind == "avg" and chain.hw is not None:
                why = (
                    f" (the average-pool shortcut's windows do not tile the {chain.hw[0]}×"
                    f"{chain.hw[1]} input exactly, so no convolution can carry it: build the "
                    "model with an input size its strides divide)"
                )
            raise el.refuse(
                join,
                f"adds {len(branches)} paths that are not linear 1×1 shortcuts ({names}){why}; "
                "RM needs one branch beside linear shortcuts",
            )
        strides = {s.strides for s in skips}
        if len(strides) > 1 or len(windows) > 1:
            raise el.refuse(join, f"adds shortcuts with different strides {sorted(strides)}")
        window = windows.pop() if windows else 1
        if not branches and window > 1:
            raise el.refuse(join, "adds an average-pooled shortcut to no convolution")
        if len(skips) > 1 or not branches:  # no extra BN to keep apart: scales fold in
            skips = [_scaled(s, scale) for s, scale in zip(skips, scales, strict=True)]
            scales = [None] * len(skips)
        if not branches:  # every path is linear and 1×1: their sum is one convolution
            total = skips[0]
            for s in skips[1:]:
                total = dataclasses.replace(
                    total, kernel=total.kernel + s.kernel, bias=total.bias + s.bias
                )
            total.name = join.name
            return [total], {"branch": [], "shortcut": " + ".join(kinds)}, shortcut_paths
        nodes, sub = branches[0]
        branch_ops = list(sub.ops)
        for op in branch_ops:
            if not isinstance(op, ConvOp):
                raise el.refuse(
                    join,
                    f"its branch contains pooling ({op.name}); only convolutions, "
                    "BatchNormalization and activations are understood in a branch",
                )
        if branch_ops[-1].act is not None:  # the branch ends in an activation: a linear 1×1
            branch_ops.append(identity_skip(branch_ops[-1].c_out, f"{join.name}_linear"))
        skip = skips[0]
        for s in skips[1:]:
            skip = dataclasses.replace(skip, kernel=skip.kernel + s.kernel, bias=skip.bias + s.bias)
        if skip.c_in != branch_ops[0].c_in or skip.c_out != branch_ops[-1].c_out:
            raise el.refuse(join, "its branch and shortcut do not have the same channels")
        if self.options["relu_only"] and not chain.nonnegative and len(branch_ops) > 1:
            raise el.refuse(
                join,
                "the input its branch must reserve may be negative and a ReLU would clip it",
                "Convert with relu_only=False to carry it through slope-1 PReLU",
            )
        try:
            ops = reserve_and_merge(
                branch_ops,
                skip,
                post=None,
                input_nonnegative=chain.nonnegative,
                input_hw=chain.hw,
                method=self.options["downsample"],
                skip_scale=scales[0],
                skip_window=window,
            )
        except ConversionError as err:
            raise el.refuse(join, str(err)) from None
        kinds = {"branch": [n.name for n in nodes], "shortcut": " + ".join(kinds)}
        return ops, kinds, shortcut_paths


def _as_skip(ops: list, channels: int, hw) -> tuple[ConvOp | None, int, str]:
    """A path as one linear 1×1 convolution (the shortcut) and the average-pool window it
    starts with (1: none), or None if it is not one."""
    op = identity_skip(channels)
    kinds, window = [], 1
    for i, step in enumerate(ops):
        if (
            i == 0
            and isinstance(step, PoolOp)
            and step.kind == "avg"
            and step.pool_size == step.strides > 1
            and step.padding in ("same", ((0, 0), (0, 0)))
            and hw is not None
            and hw[0] is not None
            and hw[0] % step.strides == 0
            and hw[1] % step.strides == 0
        ):  # ResNet-vd: an average over windows that tile the input exactly
            window = step.strides
            op = dataclasses.replace(op, strides=window)
            kinds.append(f"avg pool {window}×{window}")
            continue
        if isinstance(step, PoolOp):
            if step.pool_size != 1 or step.padding not in ("same", ((0, 0), (0, 0))):
                return None, 1, ""
            step = dataclasses.replace(identity_skip(op.c_out), strides=step.strides)
            kinds.append(f"subsample/{step.strides}")
        elif not (
            isinstance(step, ConvOp)
            and step.act is None
            and step.kernel_size == (1, 1)
            and step.padding in ("same", ((0, 0), (0, 0)))
        ):
            return None, 1, ""
        else:
            stride = f"/{step.strides}" if step.strides > 1 else ""
            kinds.append(("1×1 conv" if not _diagonal(step) else "scale") + stride)
        if step.c_in != op.c_out:
            return None, 1, ""
        matrix = step.kernel[0, 0]
        op = ConvOp(
            (op.kernel[0, 0] @ matrix)[None, None],
            op.bias @ matrix + step.bias,
            strides=op.strides * step.strides,
            name=step.name,
        )
    return op, window, " → ".join(kinds) if kinds else "identity"


def _scaled(skip: ConvOp, scale: ConvOp | None) -> ConvOp:
    """``skip`` applied after the diagonal ``scale`` (the record of the scale is dropped)."""
    if scale is None:
        return skip
    matrix = np.diagonal(scale.kernel[0, 0])[:, None] * skip.kernel[0, 0]
    return dataclasses.replace(skip, kernel=matrix[None, None])


def _sum_linear(branches: list) -> list:
    """Paths that are each one linear convolution of the same geometry (RepVGG's 3×3 beside
    another 3×3) are one convolution: their sum, kept as one path."""
    single = [
        (nodes, sub)
        for nodes, sub in branches
        if len(sub.ops) == 1 and isinstance(sub.ops[0], ConvOp) and sub.ops[0].act is None
    ]
    if len(single) < 2:
        return branches
    first = single[0][1].ops[0]
    geometry = (first.kernel_size, first.strides, first.padding, first.c_in, first.c_out)
    if any(
        (op.kernel_size, op.strides, op.padding, op.c_in, op.c_out) != geometry
        for op in (sub.ops[0] for _, sub in single)
    ):
        return branches
    total = dataclasses.replace(
        first,
        kernel=sum(sub.ops[0].kernel for _, sub in single),
        bias=sum(sub.ops[0].bias for _, sub in single),
        bn=np.full_like(first.bn, np.nan),
    )
    merged = single[0][1]
    merged.ops = [total]
    nodes = [n for group, _ in single for n in group]
    rest = [b for b in branches if all(b is not s for s in single)]
    return [(nodes, merged), *rest]


def _diagonal(op: ConvOp) -> bool:
    m = op.kernel[0, 0]
    return m.shape[0] == m.shape[1] and np.array_equal(m, np.diag(np.diagonal(m)))
