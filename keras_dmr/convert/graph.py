"""A Keras model's functional graph as data: one node per layer or operation call.

``read_graph`` runs the model's graph symbolically (Keras' own ``_run_through_graph``, the walk
``Functional.call`` does) with placeholders instead of tensors, so that every call is recorded:
layers, Keras operations that are not layers (``x + y``, ``keras.ops.relu``, ``keras.ops.pad``)
and, recursively, the nodes inside nested Functional and Sequential models, which are flattened
into the outer graph. ``model.layers`` and its order play no part.

Cannot: models with several inputs, layers called with several tensors other than merges,
subclassed models whose ``call`` is their own code (their graph is not data; they are leaves,
converted only if they answer ``plain_ops``).
"""

from __future__ import annotations

import dataclasses

import keras

from keras_dmr.errors import ConversionError
from keras_dmr.utils import keras_internals

IGNORED_KWARGS = ("training", "mask")


@dataclasses.dataclass(eq=False)
class Value:
    """A tensor of the flattened graph: produced by ``producer`` (None for the model input)."""

    index: int
    producer: Node | None = None

    def __repr__(self) -> str:
        return f"Value({self.index})"


@dataclasses.dataclass(eq=False)
class Node:
    """One call of a layer or operation: its tensor inputs (in argument order), the non-tensor
    positional arguments, and where it stands (``path``: enclosing models; ``index``: position
    in the topological order of the whole flattened graph)."""

    operation: object
    inputs: list[Value]
    constants: list
    output: Value
    path: str
    index: int

    @property
    def name(self) -> str:
        return getattr(self.operation, "name", type(self.operation).__name__)

    @property
    def is_layer(self) -> bool:
        return isinstance(self.operation, keras.layers.Layer)

    def describe(self) -> str:
        kind = "layer" if self.is_layer else "operation"
        return (
            f"{kind} {self.name!r} ({type(self.operation).__name__}) at node {self.index} of "
            f"{self.path!r}"
        )


@dataclasses.dataclass
class Graph:
    """Nodes in topological order, the input and output values, and each value's consumers
    (``(node, argument position)`` pairs, one per use). ``outputs`` are the model's outputs in
    the order of ``model.outputs`` (a backbone's stage outputs); ``output`` is the one the
    graph computes last."""

    model_name: str
    input: Value
    output: Value
    nodes: list[Node]
    consumers: dict[int, list[tuple[Node, int]]]
    outputs: list[Value] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.outputs:
            self.outputs = [self.output]

    def output_positions(self, value: Value) -> list[int]:
        """Which of ``outputs`` ``value`` is (none, one, or several that are the same tensor)."""
        return [i for i, out in enumerate(self.outputs) if out is value]

    def uses(self, value: Value) -> list[tuple[Node, int]]:
        return self.consumers.get(value.index, [])

    def is_chain(self) -> bool:
        """Single-path: every tensor used once, no node with several inputs, and no layer that
        rewrites itself (``plain_ops``: a residual block inside one layer). With several
        outputs, a tensor may also be read by ``Identity`` layers that are outputs (how
        ``to_plain`` names a backbone's stage outputs)."""

        def used_once(value: Value) -> bool:
            return sum(not self._output_tap(node) for node, _ in self.uses(value)) <= 1

        return (
            all(
                len(node.inputs) == 1
                and used_once(node.output)
                and not hasattr(node.operation, "plain_ops")
                for node in self.nodes
            )
            and len(self.uses(self.input)) == 1
        )

    def _output_tap(self, node: Node) -> bool:
        return (
            len(self.outputs) > 1
            and isinstance(node.operation, keras.layers.Identity)
            and bool(self.output_positions(node.output))
        )


class _Recorder:
    def __init__(self):
        self.nodes: list[Node] = []
        self.values = 0

    def value(self, producer=None) -> Value:
        self.values += 1
        return Value(self.values - 1, producer)

    def record(self, operation, args, kwargs, path: str) -> Value:
        inputs, constants = [], []
        for arg in args:
            flat = keras.tree.flatten(arg)
            tensors = [a for a in flat if isinstance(a, Value)]
            if tensors:
                if len(tensors) != len(flat):
                    raise self._refuse(operation, path, "mixes tensors and constants in a list")
                inputs.extend(tensors)
            else:
                constants.append(arg)
        for key, arg in kwargs.items():
            if any(isinstance(a, Value) for a in keras.tree.flatten(arg)):
                raise self._refuse(operation, path, f"receives a tensor through {key!r}")
            if key not in IGNORED_KWARGS and key != "constant_values":
                raise self._refuse(operation, path, f"is called with {key}={arg!r}")
            if key == "constant_values":
                constants.append(arg)
        if not inputs:
            raise self._refuse(operation, path, "has no tensor input")
        node = Node(operation, inputs, constants, None, path, len(self.nodes))
        node.output = self.value(node)
        self.nodes.append(node)
        return node.output

    def _refuse(self, operation, path, why) -> ConversionError:
        name = getattr(operation, "name", type(operation).__name__)
        return ConversionError(
            f"{name!r} ({type(operation).__name__}) in {path!r} {why}; the converter reads "
            "graphs of one-tensor layers and operations joined by additions"
        )

    def call(self, operation, args, kwargs, path: str):
        """Record one call; nested Functional and Sequential models are walked, not recorded."""
        if isinstance(operation, keras.layers.InputLayer):
            return args[0] if args else None
        if kwargs.get("training") is True:
            raise self._refuse(
                operation,
                path,
                "is called with training=True, so its BatchNormalization and Dropout run in "
                "training mode even at inference; call it with training=False (or without)",
            )
        tensors = [a for a in keras.tree.flatten(args) if isinstance(a, Value)]
        if isinstance(operation, keras.Sequential):
            if len(tensors) != 1:
                raise self._refuse(operation, path, "is called on several tensors")
            x, inner = tensors[0], _join(path, operation.name)
            for layer in operation.layers:
                x = self.call(layer, (x,), {}, inner)
            return x
        if _is_graph_model(operation):
            return self.trace(operation, tensors, _join(path, operation.name))
        return self.record(operation, args, kwargs, path)

    def trace(self, model, inputs: list, path: str):
        """Record a Functional ``model``'s graph on ``inputs`` (placeholders); return its
        output(s)."""
        if len(model.inputs) != len(inputs):
            raise ConversionError(
                f"model {path!r} takes {len(model.inputs)} inputs; the converter handles models "
                "with one image input"
            )
        return keras_internals.run_through_graph(
            model, inputs, lambda op, *args, **kwargs: self.call(op, args, kwargs, path)
        )


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _is_graph_model(operation) -> bool:
    """A Functional model whose call is Keras' own graph walk (so its graph is what it does)."""
    functional = keras_internals.Functional
    return isinstance(operation, functional) and type(operation).call is functional.call


def read_graph(model, *, several_outputs: bool = False) -> Graph:
    """The flattened graph of a built single-input Keras model; one output unless
    ``several_outputs`` (what ``to_plain`` reads; the graph rewriters take one)."""
    if not isinstance(model, keras.Model):
        raise ConversionError(
            f"{getattr(model, 'name', model)!r} ({type(model).__name__}) is not a keras.Model"
        )
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ConversionError(
            f"model {model.name!r} is not a built functional model (a subclassed model, or a "
            "Sequential model without an input shape); build it from keras.Input, or give "
            "`input_shape`"
        )
    if len(inputs) != 1:
        raise ConversionError(
            f"model {model.name!r} has {len(inputs)} inputs; the converter handles one image input"
        )
    if len(outputs) != 1 and not several_outputs:
        raise ConversionError(
            f"model {model.name!r} has {len(outputs)} outputs; this operation handles models "
            "with one output (to_plain converts several)"
        )
    if not isinstance(model, keras.Sequential) and not _is_graph_model(model):
        raise ConversionError(
            f"model {model.name!r} ({type(model).__name__}) overrides `call`, so its graph does "
            "not say what it computes; convert a functional model built from its layers"
        )
    recorder = _Recorder()
    source = recorder.value()
    output = keras.tree.flatten(recorder.call(model, (source,), {}, ""))
    if len(output) != len(outputs) or not all(isinstance(v, Value) for v in output):
        raise ConversionError(f"model {model.name!r}: its outputs are not tensors of the graph")
    if any(v is source for v in output):
        raise ConversionError(f"model {model.name!r}: its input is also one of its outputs")
    consumers: dict[int, list[tuple[Node, int]]] = {}
    for node in recorder.nodes:
        for position, value in enumerate(node.inputs):
            consumers.setdefault(value.index, []).append((node, position))
    last = max(output, key=lambda v: v.producer.index)
    return Graph(model.name, source, last, recorder.nodes, consumers, outputs=output)


def copy_call(node: Node, args: list, name: str | None = None, *, weights: bool = True, **changes):
    """Call ``node``'s operation again on ``args`` (Keras tensors): a fresh copy of its layer,
    same config (with ``changes``) and, with ``weights``, the same weights, named ``name``
    (default: its own), or the same operation. What graph rewriters
    (:mod:`keras_dmr.convert.unfold`, :func:`keras_dmr.prune.with_skip_bn`) replay a node with."""
    op = node.operation
    if not node.is_layer:
        return op(*args, *node.constants)
    layer = type(op).from_config({**op.get_config(), "name": name or op.name, **changes})
    out = layer(args if len(args) > 1 else args[0])
    if weights and op.get_weights():
        layer.set_weights(op.get_weights())
    return out
