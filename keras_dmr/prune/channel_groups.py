"""Which channels of a functional CNN must be pruned together, read from its graph.

Every channel of every tensor of the flattened graph (:func:`keras_dmr.convert.graph.read_graph`)
is one element; each layer or operation says which of its input and output channels are the
same channel (a BatchNormalization, an activation, a pooling or a depthwise convolution with
multiplier 1: input c is output c; an addition: input c of every operand is output c; a
Concatenate: its output's slices are its inputs; a Flatten: output (pixel, c) is input c). The
connected components of that relation are the **channel groups**: removing a channel removes
its whole group, from every tensor it appears in, so an ``Add`` never meets operands of
different widths. A group is prunable when it is produced by convolutions or Dense layers (its
"producers", whose filters go) and neither the model's input nor its output holds it.

Every member of a group is recorded with its role: ``"out"`` (a producer's filter), ``"in"``
(a consumer's input slice: a convolution's or Dense layer's kernel rows), ``"param"`` (a
per-channel weight: BN statistics, a depthwise filter, PReLU slopes).

Cannot (each raises :class:`~keras_dmr.errors.ConversionError` naming the layer): layers the
table below does not know (among them LayerNormalization, attention, squeeze-excitation's
broadcast multiply, this package's residual blocks — convert them with ``to_plain`` first), a
layer called more than once, a Reshape that moves channels. A grouped convolution (not
depthwise; ``to_plain`` writes them where reserved channels ride beside a branch) is listed in
``ChannelGraph.grouped``: its channels may go, in equal numbers from each of its groups
(:mod:`~keras_dmr.prune.graph_prune` balances them). Depthwise multipliers above 1 fix their
channels.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_dmr.convert.graph import Graph, Node, read_graph
from keras_dmr.errors import ConversionError
from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.layers.padding import ConstantPadding2D
from keras_dmr.layers.streams import ChannelScale
from keras_dmr.utils.keras_internals import ops_nn, ops_numpy

L = keras.layers
# Layers whose output channel c is input channel c and that hold no per-channel weight.
PASSTHROUGH = (
    L.ReLU,
    L.Dropout,
    L.SpatialDropout2D,
    L.ZeroPadding2D,
    ConstantPadding2D,
    L.MaxPooling2D,
    L.AveragePooling2D,
    L.GlobalAveragePooling2D,
    L.GlobalMaxPooling2D,
    L.Identity,
    L.LeakyReLU,
    L.ELU,
    L.ActivityRegularization,
)
# Layers whose per-channel weights follow their channels (input c is output c).
CHANNELWISE = (L.BatchNormalization, L.PReLU, ChannelwiseReLU, ChannelScale)
MERGES = (L.Add, L.Average, L.Maximum, L.Minimum, L.Subtract, L.Multiply)
ELEMENTWISE_OPS = (ops_numpy.Add, ops_numpy.Subtract, ops_numpy.Multiply)
ACTIVATION_OPS = (ops_nn.Relu, ops_nn.Relu6, ops_nn.LeakyRelu, ops_nn.Sigmoid, ops_nn.Silu)
# Activations applied to each element alone (softmax and its kin mix channels).
ELEMENTWISE_ACTIVATIONS = {
    "linear",
    "relu",
    "relu6",
    "sigmoid",
    "hard_sigmoid",
    "swish",
    "silu",
    "hard_swish",
    "hard_silu",
    "gelu",
    "elu",
    "selu",
    "tanh",
    "softplus",
    "leaky_relu",
    "mish",
}


@dataclasses.dataclass(eq=False)
class Member:
    """Channels of one layer in one group: ``role`` and their indices along its axis."""

    node: Node
    role: str  # "out", "in" or "param"
    indices: np.ndarray


@dataclasses.dataclass
class ChannelGraph:
    """A model's channel groups, as :func:`build_channel_graph` reads them.

    Args:
        graph: the flattened graph.
        shapes: each value's shape (by value index).
        ids: each value's channel ids (by value index).
        label: the group of every channel id.
        members: per group, the layers' channels in it.
        fixed: per group, whether it may not go (the model's input or output holds it).
        grouped: the grouped convolutions, whose groups must keep equal numbers of channels.
    """

    graph: Graph
    shapes: dict[int, tuple]
    ids: dict[int, np.ndarray]
    label: np.ndarray
    members: list[list[Member]]
    fixed: np.ndarray
    grouped: list[Node] = dataclasses.field(default_factory=list)

    def prunable(self) -> np.ndarray:
        """Groups that may be pruned: produced by a layer's filters, not fixed."""
        has_out = np.array([any(m.role == "out" for m in ms) for ms in self.members], bool)
        return has_out & ~self.fixed

    def group_size(self, group: int) -> int:
        """Output channels of producers in ``group`` (what a report counts as channels)."""
        return sum(len(m.indices) for m in self.members[group] if m.role == "out")


class _Builder:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.shapes: dict[int, tuple] = {}
        self.ids: dict[int, np.ndarray] = {}
        self.count = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.records: list[tuple[Node, str, np.ndarray, np.ndarray]] = []  # node, role, idx, ids
        self.fixed: list[np.ndarray] = []
        self.grouped: list[Node] = []

    def new_ids(self, value, shape) -> np.ndarray:
        self.shapes[value.index] = tuple(shape)
        size = int(shape[-1]) if len(shape) > 1 else 1
        ids = np.arange(self.count, self.count + size)
        self.count += size
        self.ids[value.index] = ids
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        self.edges.append((np.asarray(a), np.asarray(b)))

    def record(self, node: Node, role: str, ids: np.ndarray) -> None:
        self.records.append((node, role, np.arange(len(ids)), ids))


def _refuse(node: Node, why: str) -> ConversionError:
    return ConversionError(f"cannot group the channels of {node.describe()}: {why}")


def _spec(node: Node, shapes: list[tuple]):
    """The output shape of ``node`` on inputs of ``shapes`` (symbolic, no graph change)."""
    specs = [keras.KerasTensor(shape) for shape in shapes]
    op = node.operation
    if isinstance(op, L.Layer) and isinstance(op, (*MERGES, L.Concatenate)):
        out = op.compute_output_spec(specs)
    else:
        out = op.compute_output_spec(*specs, *node.constants)
    return tuple(out.shape)


def build_channel_graph(model: keras.Model) -> ChannelGraph:
    """The channel groups of ``model``'s flattened graph (see the module docstring).

    Args:
        model: a built functional or Sequential Keras model, one input and one output.

    Returns:
        Its :class:`ChannelGraph`.

    Raises:
        ConversionError: a layer or operation whose channels this module cannot follow.
    """
    graph = read_graph(model)
    builder = _Builder(graph)
    source_ids = builder.new_ids(graph.input, tuple(model.inputs[0].shape))
    builder.fixed.append(source_ids)
    seen_layers: dict[int, Node] = {}
    for node in graph.nodes:
        if node.is_layer:
            earlier = seen_layers.setdefault(id(node.operation), node)
            if earlier is not node:
                raise _refuse(node, "the layer is called more than once (shared weights)")
        shape = _spec(node, [builder.shapes[v.index] for v in node.inputs])
        out = builder.new_ids(node.output, shape)
        _connect(builder, node, [builder.ids[v.index] for v in node.inputs], out)
    builder.fixed.append(builder.ids[graph.output.index])
    return _components(builder)


def _connect(b: _Builder, node: Node, ins: list[np.ndarray], out: np.ndarray) -> None:
    op = node.operation
    if isinstance(op, L.DepthwiseConv2D):
        if op.depth_multiplier != 1:
            b.fixed += [ins[0], out]
        else:
            b.tie(ins[0], out)
        b.record(node, "param", out)
    elif isinstance(op, L.SeparableConv2D):
        if op.depth_multiplier != 1:
            b.fixed.append(ins[0])
        b.record(node, "in", ins[0])
        b.record(node, "out", out)
    elif isinstance(op, L.Conv2D):
        if op.groups != 1:
            b.grouped.append(node)
        b.record(node, "in", ins[0])
        b.record(node, "out", out)
    elif isinstance(op, L.Dense):
        b.record(node, "in", ins[0])
        b.record(node, "out", out)
    elif isinstance(op, CHANNELWISE):
        _check_channelwise(node)
        b.tie(ins[0], out)
        b.record(node, "param", out)
    elif isinstance(op, PASSTHROUGH) or _elementwise_activation(op):
        b.tie(ins[0], out)
    elif isinstance(op, L.Rescaling):
        if np.size(op.scale) > 1 or np.size(op.offset) > 1:
            b.record(node, "param", out)
        b.tie(ins[0], out)
    elif isinstance(op, (*MERGES, *ELEMENTWISE_OPS)):
        for x in ins:
            if len(x) != len(out):
                raise _refuse(node, "its operands broadcast along the channels")
            b.tie(x, out)
    elif isinstance(op, L.Concatenate):
        if op.axis not in (-1, len(b.shapes[node.output.index]) - 1):
            raise _refuse(node, f"it concatenates along axis {op.axis}, not the channels")
        b.tie(np.concatenate(ins), out)
    elif isinstance(op, L.Flatten):
        b.tie(np.tile(ins[0], len(out) // max(len(ins[0]), 1)), out)
    elif isinstance(op, L.Reshape):
        if len(ins[0]) != len(out):
            raise _refuse(node, "it moves values into or out of the channel axis")
        b.tie(ins[0], out)
    else:
        raise _refuse(
            node,
            "this kind of layer is not understood (convert the package's residual blocks with "
            "keras_dmr.to_plain first; attention, normalisation across channels and gating "
            "are not pruned)",
        )


def _elementwise_activation(op) -> bool:
    if isinstance(op, ACTIVATION_OPS):
        return True
    if isinstance(op, L.Activation):
        name = keras.activations.serialize(op.activation)
        name = name if isinstance(name, str) else name.get("config", {}).get("name", "")
        return name in ELEMENTWISE_ACTIVATIONS
    return False


def _check_channelwise(node: Node) -> None:
    op = node.operation
    if isinstance(op, L.BatchNormalization) and op.axis not in (-1, 3, [-1], [3]):
        raise _refuse(node, f"a BatchNormalization over axis {op.axis} is not supported")
    if isinstance(op, L.PReLU):
        alpha = op.get_weights()[0]
        if alpha.ndim == 0 or alpha.shape[-1] == 1:
            return  # one slope for every channel: nothing to slice
        if any(s != 1 for s in alpha.shape[:-1]):
            raise _refuse(node, "its slopes vary over the pixels (set shared_axes=[1, 2])")


def _components(b: _Builder) -> ChannelGraph:
    label = _connected_labels(b.count, b.edges)
    groups = int(label.max()) + 1 if len(label) else 0
    fixed = np.zeros(groups, bool)
    for ids in b.fixed:
        fixed[label[ids]] = True
    members: list[list[Member]] = [[] for _ in range(groups)]
    for node, role, idx, ids in b.records:
        labels = label[ids]
        order = np.argsort(labels, kind="stable")
        cuts = np.flatnonzero(np.diff(labels[order])) + 1
        for part in np.split(order, cuts):
            if len(part):
                members[int(labels[part[0]])].append(Member(node, role, idx[part]))
    return ChannelGraph(b.graph, b.shapes, b.ids, label, members, fixed, b.grouped)


def _connected_labels(count: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected components of ``count`` elements joined by ``edges``, numbered 0.. in order of
    their smallest element: every element takes the smallest label among its neighbours' and
    then its label's label (pointer jumping), until nothing changes (vectorised; a few dozen
    rounds for a ResNet-50)."""
    if not edges:
        return np.arange(count)
    a = np.concatenate([np.asarray(x, np.int64).ravel() for x, _ in edges])
    c = np.concatenate([np.asarray(y, np.int64).ravel() for _, y in edges])
    root = np.arange(count)
    while True:
        smaller = np.minimum(root[a], root[c])
        new = root.copy()
        np.minimum.at(new, a, smaller)
        np.minimum.at(new, c, smaller)
        new = new[new]
        if np.array_equal(new, root):
            break
        root = new
    _, label = np.unique(root, return_inverse=True)
    return label
