"""Channel pruning over the whole graph of a functional CNN, by channel groups
(:mod:`keras_dmr.prune.channel_groups`): residual models as they are (keras.applications,
KerasHub, user graphs) and plain models from :func:`keras_dmr.to_plain`.

Importance of a group (``criterion``):

- ``"bn"`` (network slimming, after sparsity training): the largest BN importance of the
  group's BatchNormalizations (:func:`keras_dmr.prune.units.bn_importance`, the one
  :func:`~keras_dmr.prune.slim` ranks by), so a channel tied by shortcuts goes only when it is
  unimportant in every block that writes it. A group without a BN is never dropped by it.
- ``"l2"`` (no sparsity training): each producer's filter L2 norm times the BN scale
  ``|gamma|/sqrt(var + eps)`` that follows it, divided by that layer's mean, averaged over the
  group's producers (filter magnitude, normalised per layer as Torch-Pruning's ``mean``
  normaliser does, so that layers of different widths rank together).

Groups are ranked globally and dropped by ``threshold``, by ``ratio`` (of the prunable output
channels) or by a ``macs`` budget (a fraction of the model's multiply-accumulates to keep; the
least important groups go first, each removal's saving counted exactly, products of input and
output widths included). Every producing layer keeps at least one channel. A grouped
convolution keeps as many input (and output) channels in each of its groups: where the ranking
would leave them uneven, the most important dropped channels of the poorer groups come back
(as network slimming of grouped layers does), and a ``macs`` budget then drops further down the
ranking until it is met. Dropped channels are
removed; nothing is folded into the next layer, so a pruned model is fine-tuned, and
``recalibrate`` re-estimates BN statistics.

Cannot: what :mod:`~keras_dmr.prune.channel_groups` cannot (it raises naming the layer).
"""

from __future__ import annotations

import collections
import math

import keras
import numpy as np

from keras_dmr.analysis.flops import count_flops
from keras_dmr.convert.graph import Node
from keras_dmr.convert.unfold import unfold
from keras_dmr.layers.conv import bn_weights
from keras_dmr.prune.channel_groups import MERGES, ChannelGraph, build_channel_graph
from keras_dmr.prune.units import bn_importance
from keras_dmr.utils.keras_internals import ops_nn, ops_numpy

CRITERIA = ("bn", "l2")
L = keras.layers


# ------------------------------------------------------------------------------- importance
def group_importance(cg: ChannelGraph, criterion: str = "bn") -> np.ndarray:
    """Importance of every group (``inf``: never pruned).

    Args:
        cg: the model's channel graph.
        criterion: one of :data:`CRITERIA`.

    Returns:
        One float64 per group.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"`criterion` must be one of {CRITERIA}; got {criterion!r}")
    score = np.full(len(cg.members), np.inf)
    following_bn = _bn_after(cg) if criterion == "l2" else {}
    per_node: dict[int, np.ndarray] = {}

    def channel_scores(node: Node) -> np.ndarray:
        if node.index not in per_node:
            if criterion == "bn":
                gamma, _, _, var = bn_weights(node.operation)
                per_node[node.index] = bn_importance(gamma, var, node.operation.epsilon)
            else:
                per_node[node.index] = _filter_norms(node, following_bn.get(node.index))
        return per_node[node.index]

    for g, members in enumerate(cg.members):
        if cg.fixed[g]:
            continue
        values = []
        for m in members:
            op = m.node.operation
            if criterion == "bn" and m.role == "param" and isinstance(op, L.BatchNormalization):
                values.append(float(np.max(channel_scores(m.node)[m.indices])))
            elif criterion == "l2" and m.role == "out":
                values.append(float(np.mean(channel_scores(m.node)[m.indices])))
        if values:
            score[g] = max(values) if criterion == "bn" else float(np.mean(values))
    return score


def _bn_after(cg: ChannelGraph) -> dict[int, Node]:
    """Producer node index → the BatchNormalization that is its output's only reader."""
    found = {}
    for node in cg.graph.nodes:
        uses = cg.graph.uses(node.output)
        if len(uses) == 1 and isinstance(uses[0][0].operation, L.BatchNormalization):
            found[node.index] = uses[0][0]
    return found


def _filter_norms(node: Node, bn: Node | None) -> np.ndarray:
    op = node.operation
    kernel = np.asarray(
        op.pointwise_kernel if isinstance(op, L.SeparableConv2D) else op.kernel, np.float64
    )
    norms = np.sqrt(np.sum(kernel.reshape(-1, kernel.shape[-1]) ** 2, axis=0))
    if bn is not None:
        gamma, _, _, var = bn_weights(bn.operation)
        norms = norms * np.abs(gamma) / np.sqrt(var + bn.operation.epsilon)
    mean = float(np.mean(norms))
    return norms / mean if mean > 0 else norms


# -------------------------------------------------------------------------------- selection
class _Macs:
    """Multiply-accumulates of the counted layers as a function of the channels kept."""

    def __init__(self, cg: ChannelGraph):
        self.cg = cg
        self.nodes: dict[int, Node] = {}
        self.layers = {}  # node index -> [cost unit, kept in, kept out, kind, groups]
        for node in cg.graph.nodes:
            op = node.operation
            out_shape = cg.shapes[node.output.index]
            pixels = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
            c_in = len(cg.ids[node.inputs[0].index]) if node.inputs else 0
            c_out = len(cg.ids[node.output.index])
            if isinstance(op, L.DepthwiseConv2D):
                k = int(np.prod(op.kernel_size))
                entry = [pixels * k, c_out, c_out, "depthwise", 1]
            elif isinstance(op, L.SeparableConv2D):
                k = int(np.prod(op.kernel_size))
                entry = [pixels, c_in, c_out, ("separable", k), 1]
            elif isinstance(op, L.Conv2D):
                entry = [pixels * int(np.prod(op.kernel_size)), c_in, c_out, "conv", op.groups]
            elif isinstance(op, L.Dense):
                entry = [pixels, c_in, c_out, "dense", 1]
            else:
                continue
            self.layers[node.index] = entry
            self.nodes[node.index] = node

    @staticmethod
    def cost(entry) -> float:
        unit, c_in, c_out, kind, groups = entry
        if kind == "depthwise":
            return unit * c_out
        if isinstance(kind, tuple):  # separable: depthwise on the inputs, then pointwise
            return unit * (kind[1] * c_in + c_in * c_out)
        return unit * c_in * c_out / groups

    def total(self) -> float:
        return sum(self.cost(e) for e in self.layers.values())

    def of(self, drop: np.ndarray) -> float:
        """The MACs left with ``drop``'s groups gone (counted afresh)."""
        total = 0.0
        for index, (unit, _, _, kind, groups) in self.layers.items():
            node = self.nodes[index]
            c_out = int(np.count_nonzero(_kept(self.cg, drop, node.output.index)))
            c_in = c_out if kind == "depthwise" else 0
            if node.inputs and kind != "depthwise":
                c_in = int(np.count_nonzero(_kept(self.cg, drop, node.inputs[0].index)))
            total += self.cost([unit, c_in, c_out, kind, groups])
        return total

    def remove(self, group: int) -> bool:
        """Drop ``group``'s channels from the counts, or refuse (False, counts unchanged) when
        a producer would keep no channel."""
        changes = collections.Counter()
        for m in self.cg.members[group]:
            if m.node.index in self.layers:
                changes[(m.node.index, m.role)] += len(m.indices)
        trial = {}
        for (index, role), n in changes.items():
            entry = trial.get(index, list(self.layers[index]))
            if role == "out" or (role == "param" and entry[3] == "depthwise"):
                entry[2] -= n
                if entry[3] == "depthwise":
                    entry[1] -= n
                if entry[2] < 1:
                    return False
            elif role == "in":
                entry[1] -= n
                if entry[1] < 1:
                    return False
            trial[index] = entry
        self.layers.update(trial)
        return True


def _bring_back(drop: np.ndarray, labels: np.ndarray, missing: int, importance) -> bool:
    """Un-drop the most important dropped groups among ``labels`` until ``missing`` more of
    its positions are kept; whether anything came back."""
    dropped = np.unique(labels[drop[labels]])
    changed = False
    for g in dropped[np.argsort(-importance[dropped], kind="stable")]:
        if missing <= 0:
            break
        drop[g] = False
        missing -= int(np.count_nonzero(labels == g))
        changed = True
    return changed


def balance_groups(
    cg: ChannelGraph, drop: np.ndarray, importance: np.ndarray, round_to: int = 1
) -> np.ndarray:
    """``drop`` with every grouped convolution keeping as many input and as many output
    channels in each of its groups, and (``round_to`` > 1) every convolution and Dense layer
    keeping a multiple of ``round_to`` filters (or all): where a layer or group keeps too few,
    its most important dropped channel groups come back, until nothing changes.

    Args:
        cg: the channel graph.
        drop: a boolean per group.
        importance: :func:`group_importance`'s result.
        round_to: the multiple of filters every producing layer keeps (1: any number).

    Returns:
        A new boolean per group (``drop`` minus what came back).
    """
    drop = drop.copy()
    # Each grouped convolution's groups keep the same count, a multiple of `step` so that the
    # layer's total is a multiple of `round_to` too: equalising and rounding then agree (else
    # each would bring channels back for the other, up to the whole layer).
    parts = [
        (
            cg.label[cg.ids[value.index]].reshape(node.operation.groups, -1),
            round_to // math.gcd(node.operation.groups, round_to),
        )
        for node in cg.grouped
        for value in (node.inputs[0], node.output)
    ]
    produced = []
    if round_to > 1:
        produced = [
            cg.label[cg.ids[node.output.index]]
            for node in cg.graph.nodes
            if isinstance(node.operation, L.Conv2D | L.SeparableConv2D | L.Dense)
        ]
    changed = bool(parts or produced)
    while changed:
        changed = False
        for labels, step in parts:
            counts = np.count_nonzero(~drop[labels], axis=1)
            target = min(-(-counts.max() // step) * step, labels.shape[1])
            for j in np.flatnonzero(counts < target):
                changed |= _bring_back(drop, labels[j], target - counts[j], importance)
        for labels in produced:
            kept = int(np.count_nonzero(~drop[labels]))
            if kept % round_to and kept < len(labels):
                missing = min(round_to - kept % round_to, len(labels) - kept)
                changed |= _bring_back(drop, labels, missing, importance)
    return drop


def select_groups(
    cg: ChannelGraph,
    importance: np.ndarray,
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    macs: float | None = None,
    round_to: int = 1,
) -> np.ndarray:
    """The groups to drop (a boolean per group).

    Args:
        cg: the channel graph.
        importance: :func:`group_importance`'s result.
        threshold: drop groups whose importance is below it.
        ratio: drop the least important groups up to this fraction of the prunable output
            channels.
        macs: drop the least important groups until at most this fraction of the model's
            multiply-accumulates is left (or none can go).
        round_to: every convolution and Dense layer keeps a multiple of this many filters
            (or all of them; see :func:`balance_groups`).

    Returns:
        A boolean per group.
    """
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"`round_to` must be an integer >= 1; got {round_to!r}")
    chosen = {"threshold": threshold, "ratio": ratio, "macs": macs}
    given = [name for name, value in chosen.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of `threshold`, `ratio` and `macs`; got {given}")
    for name, value in (("ratio", ratio), ("macs", macs)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"`{name}` must be a number in [0, 1]; got {value!r}")
    candidates = cg.prunable() & np.isfinite(importance)
    order = [g for g in np.argsort(importance, kind="stable") if candidates[g]]
    counter = _Macs(cg)
    budget = None if macs is None else macs * counter.total()
    total_channels = sum(cg.group_size(g) for g in order)
    accepted, within_budget, dropped_channels = [], None, 0
    settles = bool(cg.grouped) or round_to > 1  # balancing may bring channels back
    for g in order:
        if threshold is not None and importance[g] >= threshold:
            break
        size = cg.group_size(g)
        if ratio is not None and dropped_channels + size > ratio * total_channels:
            break
        if budget is not None and within_budget is None and counter.total() <= budget:
            within_budget = len(accepted)
            if not settles:
                break
        if counter.remove(g):
            accepted.append(g)
            dropped_channels += size
    if budget is not None and within_budget is None and counter.total() <= budget:
        within_budget = len(accepted)

    def dropping(n: int) -> np.ndarray:
        drop = np.zeros(len(importance), bool)
        drop[accepted[:n]] = True
        return balance_groups(cg, drop, importance, round_to)

    if budget is None or not settles:
        return dropping(len(accepted) if within_budget is None else within_budget)
    # Balancing and rounding bring channels back: the smallest prefix of the ranking that,
    # settled, meets the budget (the MACs fall as the prefix grows, up to their steps).
    low = len(accepted) if within_budget is None else within_budget
    high = len(accepted)
    while low < high:
        middle = (low + high) // 2
        if counter.of(dropping(middle)) <= budget:
            high = middle
        else:
            low = middle + 1
    return dropping(low)


# -------------------------------------------------------------------------------- rebuilding
def _kept(cg: ChannelGraph, drop: np.ndarray, value_index: int) -> np.ndarray:
    return ~drop[cg.label[cg.ids[value_index]]]


def rebuild(
    cg: ChannelGraph, drop: np.ndarray, name: str, input_name: str = "images"
) -> keras.Model:
    """The model without the dropped groups' channels (weights sliced, nothing else changed).

    Args:
        cg: the channel graph of the source model.
        drop: a boolean per group.
        name: the new model's name.
        input_name: its input's name.

    Returns:
        A functional ``keras.Model`` of fresh layers.
    """
    graph = cg.graph
    spec = cg.shapes[graph.input.index]
    inputs = keras.Input(shape=spec[1:], name=input_name)
    tensors = {graph.input.index: inputs}
    names = collections.Counter()
    for node in graph.nodes:
        args = [tensors[v.index] for v in node.inputs]
        keep_in = _kept(cg, drop, node.inputs[0].index)
        keep_out = _kept(cg, drop, node.output.index)
        op = node.operation
        if not node.is_layer:
            tensors[node.output.index] = _call_operation(node, args)
            continue
        names[op.name] += 1  # flattened nested models may repeat a name
        unique = op.name if names[op.name] == 1 else f"{op.name}_{names[op.name] - 1}"
        layer, weights = _pruned_layer(op, keep_in, keep_out, unique)
        out = layer(args if isinstance(op, (*MERGES, L.Concatenate)) else args[0])
        if weights is not None:
            layer.set_weights(weights)
        tensors[node.output.index] = out
    return keras.Model(inputs, tensors[graph.output.index], name=name)


def _call_operation(node: Node, args):
    op = node.operation
    if isinstance(op, (ops_numpy.Add, ops_numpy.Subtract, ops_numpy.Multiply)):
        return op(*args)
    if isinstance(op, (ops_nn.Relu, ops_nn.Relu6, ops_nn.LeakyRelu, ops_nn.Sigmoid, ops_nn.Silu)):
        return op(args[0])
    raise ValueError(f"cannot rebuild {node.describe()}")  # channel_groups refused it first


def _pruned_layer(op, keep_in: np.ndarray, keep_out: np.ndarray, name: str):
    config = {**op.get_config(), "name": name}
    weights = [np.asarray(w) for w in op.get_weights()]
    if isinstance(op, L.DepthwiseConv2D):
        new_weights = [weights[0][:, :, keep_out]] + [w[keep_out] for w in weights[1:]]
    elif isinstance(op, L.SeparableConv2D):
        config["filters"] = int(keep_out.sum())
        depthwise, pointwise, *bias = weights
        new_weights = [depthwise[:, :, keep_in], pointwise[:, :, keep_in][..., keep_out]]
        new_weights += [b[keep_out] for b in bias]
    elif isinstance(op, L.Conv2D):
        config["filters"] = int(keep_out.sum())
        kernel, *bias = weights
        new_weights = [_grouped_kernel(kernel, keep_in, keep_out, op.groups)]
        new_weights += [b[keep_out] for b in bias]
    elif isinstance(op, L.Dense):
        config["units"] = int(keep_out.sum())
        kernel, *bias = weights
        new_weights = [kernel[keep_in][:, keep_out]] + [b[keep_out] for b in bias]
    elif isinstance(op, L.Rescaling):
        for key in ("scale", "offset"):
            if np.size(config[key]) > 1:
                config[key] = [float(v) for v in np.ravel(config[key])[keep_out]]
        new_weights = weights
    elif isinstance(op, L.Reshape):
        config["target_shape"] = (*tuple(config["target_shape"])[:-1], int(keep_out.sum()))
        new_weights = weights
    else:  # channel-wise weights and weightless layers
        new_weights = [
            w[..., keep_out] if w.ndim and w.shape[-1] == len(keep_out) else w for w in weights
        ]
    layer = type(op).from_config(config)
    return layer, new_weights if weights else None


def _grouped_kernel(kernel, keep_in, keep_out, groups: int) -> np.ndarray:
    """A (grouped) convolution's kernel ``(kh, kw, in / groups, out)`` without the dropped
    channels; every group keeps as many (:func:`balance_groups` made it so)."""
    if groups == 1:
        return kernel[:, :, keep_in][..., keep_out]
    ins, outs = keep_in.reshape(groups, -1), keep_out.reshape(groups, -1)
    if len(set(ins.sum(1))) != 1 or len(set(outs.sum(1))) != 1:
        raise ValueError("a grouped convolution must keep as many channels in every group")
    per_group = kernel.shape[-1] // groups
    parts = [
        kernel[:, :, ins[j]][..., j * per_group : (j + 1) * per_group][..., outs[j]]
        for j in range(groups)
    ]
    return np.concatenate(parts, axis=-1)


# ---------------------------------------------------------------------------------- public
def prune_channels(
    model: keras.Model,
    *,
    criterion: str = "bn",
    threshold: float | None = None,
    ratio: float | None = None,
    macs: float | None = None,
    round_to: int = 1,
) -> keras.Model:
    """Prune channel groups of any functional CNN (see the module docstring). This package's
    DMRNet, DVANet and ResNet models are first spelled out in standard layers
    (:func:`keras_dmr.convert.unfold`), so the pruned model is a functional model of those.

    Args:
        model: a built functional or Sequential model, one image input and one output.
        criterion: ``"bn"`` or ``"l2"``.
        threshold: drop groups whose importance is below it.
        ratio: drop the least important groups up to this fraction of the prunable channels.
        macs: keep at most this fraction of the multiply-accumulates (``macs=0.4``: 40%).
        round_to: every convolution and Dense layer keeps a multiple of this many filters (or
            all): int8 and float kernels run channel counts that are multiples of 8 or 16
            faster than the odd counts a free ranking leaves.

    Returns:
        The pruned model (not compiled), with ``pruning_report``: channels, parameters and
        multiply-accumulates before and after, the groups found, prunable and dropped.

    Raises:
        ConversionError: a layer whose channels cannot be followed (named).
    """
    cg = build_channel_graph(unfold(model))
    importance = group_importance(cg, criterion)
    drop = select_groups(
        cg, importance, threshold=threshold, ratio=ratio, macs=macs, round_to=round_to
    )
    pruned = rebuild(cg, drop, f"{model.name}_pruned", model.inputs[0].name)
    prunable = cg.prunable()
    sizes = np.array([cg.group_size(g) for g in range(len(drop))])
    pruned.pruning_report = {
        "source": model.name,
        "criterion": criterion,
        "threshold": threshold,
        "ratio": ratio,
        "macs_target": macs,
        "round_to": round_to,
        "groups": int(len(drop)),
        "groups_prunable": int(prunable.sum()),
        "groups_dropped": int(drop.sum()),
        "channels_before": int(sizes[prunable].sum()),
        "channels_after": int(sizes[prunable & ~drop].sum()),
        "params_before": int(model.count_params()),
        "params_after": int(pruned.count_params()),
        "macs_before": count_flops(model),
        "macs_after": count_flops(pruned),
    }
    return pruned
