"""ONNX export through tf2onnx, with the SavedModel's input and output names."""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from keras_dmr.convert.streams import split_reserved_streams
from keras_dmr.export.calibration import (
    accuracy_record,
    in_batches,
    quantization_inputs,
    quantization_metadata,
)
from keras_dmr.export.serving import (
    INPUT_NAME,
    ExportError,
    check_class_names,
    check_classifier,
    check_exported_outputs,
    check_file_destination,
    metadata,
    prepare,
    resolve_preprocessing,
    serving_function,
)
from keras_dmr.layers.conv import native_grouped_convolutions, split_grouped_convolutions
from keras_dmr.utils.files import atomic_output

QUANTIZE = (None, "int8")
# Weights use 7 of int8's 8 bits (ONNX Runtime's reduce_range): on x86 CPUs without VNNI
# (AVX2 only, as this project's machines) ONNX Runtime runs uint8 × int8 products with an
# instruction whose pairwise sums saturate at 16 bits, and full-range weights cost a trained
# ResNet-8 on digits up to 9.4 points of accuracy (3 seeds: -0.8, -9.4, -0.6); with 7-bit
# weights -0.3 to +0.3 (docs/serving.md, "int8").
QDQ_SETTINGS = {
    "format": "QDQ",
    "per_channel": True,
    "weights": "int8",
    "reduce_range": True,
    "activations": "uint8",
    "calibration_method": "MinMax",
}
# The weight encodings of ``quantize_int8(weights=...)``: "int8" is the default above (7-bit
# signed, U8S8 kernels); "uint8" stores full 8-bit asymmetric weights (U8U8 kernels, which do
# not saturate): RepVGG's fused kernels lose 17 points at 7 bits and 5 at 8 (docs/quantization.md).
WEIGHT_TYPES = {"int8": ("QInt8", True), "uint8": ("QUInt8", False)}


def onnx(
    model: keras.Model,
    path: str | Path,
    *,
    preprocessing,
    opset: int = 17,
    plain: bool = True,
    class_names: Sequence[str] | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    quantize: str | None = None,
    calibration=None,
    evaluation=None,
    keep_float: Sequence[str] = (),
    calibration_method: str = "MinMax",
    weights: str = "int8",
) -> str:
    """Export ``model`` as an ONNX file (dynamic batch) and return its path.

    The graph is the SavedModel's serving function, so input ``images`` and the outputs
    (``logits``, ``probabilities`` and ``classes`` of a classifier, a backbone's named feature
    maps) mean the same (see :func:`keras_dmr.export.saved_model` for
    ``preprocessing`` and ``plain``); the metadata JSON is stored in the model's
    ``metadata_props`` under ``keras_dmr``. The float32 graph runs in ONNX Runtime on random
    images and must match the Keras model within ``tolerance``, else :class:`ExportError` and
    no file. Written to a temporary file and renamed at the end.

    A plain model's activations that are ReLU on its own channels and identity on the reserved
    ones (slope-1 PReLU, ``ChannelwiseReLU``) are split into two convolutions first
    (:func:`keras_dmr.convert.streams.split_reserved_streams`, same outputs; the count is the
    metadata's ``reserved_streams_split``): tf2onnx writes such an activation as four float
    elementwise operators, which ONNX Runtime runs unfused (a third of the plain MobileNetV1's
    time in float32) and which in int8 leave a dequantize–float–quantize round trip after every
    convolution (ONNX Runtime and OpenVINO profiles, docs/quantization.md); split, each
    convolution ends in a ReLU that both runtimes fuse into it.

    ``quantize="int8"``: ONNX Runtime's static quantization (QDQ format, per-channel int8
    weights in a 7-bit range, see :data:`QDQ_SETTINGS`, uint8 activations, MinMax ranges
    from ``calibration``: up to 512 images in the export's input form, see
    :mod:`keras_dmr.export.calibration`); the input stays the same.
    ``evaluation`` (``(images, labels)`` batches in that form) measures the float32 and the
    int8 file's accuracy with ONNX Runtime; both go into the metadata's ``quantization``.
    ``keep_float`` (Keras layer names), ``calibration_method`` and ``weights``
    are the fixes of ``docs/quantization.md`` for a model that loses accuracy in int8: see
    :func:`quantize_int8`.

    Args:
        model: the Keras model to export (converted first with ``plain=True``).
        path: the ``.onnx`` file to write.
        preprocessing: a dataset name, a ``(mean, std)`` pair or ``"none"``.
        opset: the ONNX opset.
        plain: convert a residual model with :func:`keras_dmr.to_plain` first.
        class_names: names of the classes, stored in the metadata.
        tolerance: maximum relative error of the conversion and of the file's float32 outputs.
        overwrite: replace an existing file.
        quantize: ``None`` or ``"int8"``.
        calibration: images for int8 ranges.
        evaluation: ``(images, labels)`` batches to measure accuracy on.
        keep_float: Keras layer names whose operators stay float32 in int8.
        calibration_method: one of :data:`CALIBRATION_METHODS`.
        weights: one of :data:`WEIGHT_TYPES`.

    Returns:
        The path written.
    """
    import onnx as onnx_lib
    import tensorflow as tf

    path = Path(path)
    check_file_destination(path, ".onnx", overwrite)
    if not isinstance(opset, int) or not 13 <= opset <= 18:
        raise ExportError(f"`opset` must be an integer in 13..18 (tf2onnx 1.17); got {opset!r}")
    source, exported, head, conversion = prepare(model, plain=plain, tolerance=tolerance)
    check_class_names(class_names, head)
    if evaluation is not None:
        check_classifier(head, "`evaluation` (accuracy)")
    norm = resolve_preprocessing(preprocessing)
    shape = tuple(head.model.inputs[0].shape[1:])
    images, held_out = quantization_inputs(
        quantize, QUANTIZE, calibration, evaluation, shape, uint8=norm is not None
    )
    if quantize != "int8" and (keep_float or calibration_method != "MinMax" or weights != "int8"):
        raise ExportError(
            "`keep_float`, `calibration_method` and `weights` are only used with quantize='int8'"
        )
    proto, head, streams, _ = float_graph(head, preprocessing, opset, tolerance)
    info = metadata(source, exported, conversion, norm, class_names, fmt="onnx", head=head)
    info["opset"] = opset
    info["reserved_streams_split"] = streams
    if quantize == "int8":
        float_proto = proto
        proto = quantize_int8(
            proto,
            images,
            keep_float=keep_float,
            calibration_method=calibration_method,
            weights=weights,
        )
        runs = (None, None)
        if held_out is not None:
            runs = tuple(
                accuracy_record(session_predict(p.SerializeToString()), held_out)
                for p in (float_proto, proto)
            )
        info["quantization"] = quantization_metadata(
            mode="int8",
            engine="onnxruntime",
            calibration=len(images),
            details={
                **QDQ_SETTINGS,
                "calibration_method": calibration_method,
                "weights": weights,
                "reduce_range": WEIGHT_TYPES[weights][1],
                "float32_layers": list(keep_float),
            },
            float_run=runs[0],
            quant_run=runs[1],
        )
    elif held_out is not None:
        acc, _ = accuracy_record(session_predict(proto.SerializeToString()), held_out)
        info["accuracy"] = {"float32": acc, "images": sum(len(y) for _, y in held_out)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "keras_dmr", json.dumps(info)
    onnx_lib.checker.check_model(proto)
    with atomic_output(path) as tmp:  # a plain file's permissions, as SavedModel files get
        onnx_lib.save(proto, str(tmp))
    del tf
    return str(path)


def float_graph(head, preprocessing, opset: int, tolerance: float):
    """The float32 ONNX graph of ``head``'s serving function, as :func:`onnx` writes it (and
    :func:`keras_dmr.export.openvino` converts it): reserved streams split, grouped
    convolutions as one ``Conv`` with ``group`` each, inputs and outputs named, the normalisation
    after the transpose; run in ONNX Runtime and checked against TensorFlow
    (:func:`keras_dmr.export.serving.check_exported_outputs`). Returns the graph, the head whose
    model it traced, the number of activations split and the serving function traced."""
    import tf2onnx

    split, streams = split_reserved_streams(head.model)
    head = dataclasses.replace(head, model=split)
    # Two traces of one function: with TensorFlow's own grouped convolutions for tf2onnx (one
    # ONNX Conv with `group` each, never run here), split into standard ops for TensorFlow to
    # run the check on, whatever this machine's kernels.
    converted, norm = serving_function(head, preprocessing)
    with native_grouped_convolutions():
        proto, _ = tf2onnx.convert.from_function(
            converted, input_signature=converted.input_signature, opset=opset
        )
    serve, _ = serving_function(head, preprocessing)
    with split_grouped_convolutions():
        serve.get_concrete_function()
    _rename_io(proto, head.names)
    normalize_after_transpose(proto)
    blob = proto.SerializeToString()
    check_exported_outputs(
        lambda name: session_predict(blob, name),
        serve,
        head,
        tolerance,
        norm is not None,
        "the ONNX graph",
    )
    return proto, head, streams, serve


def _rename_io(proto, names: Sequence[str]) -> None:
    """tf2onnx names tensors after graph ops (``images:0``, ``Identity:0``, ``Identity_1:0``
    ...); give the graph's inputs and outputs the serving names, in the order the serving
    function returns them (its dict flattened: sorted keys)."""
    graph = proto.graph
    renames = {graph.input[0].name: INPUT_NAME}
    outputs = sorted(graph.output, key=lambda o: _op_order(o.name))
    for out, name in zip(outputs, sorted(names), strict=True):
        renames[out.name] = name
    for value in [*graph.input, *graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


NCHW = [0, 3, 1, 2]


def normalize_after_transpose(proto) -> bool:
    """Move the input's normalisation after tf2onnx's NHWC → NCHW transpose and fold its
    ``1/std`` into the convolutions that read it, in place; True when the graph had the
    pattern.

    tf2onnx writes ``images → Cast → Sub(mean) → Mul(1/std) → Transpose → convolution``, the
    per-channel constants broadcast over a last axis of three, which ONNX Runtime runs element
    by element (measured on an AMD EPYC: a tenth of a plain MobileNetV1's float32 time, and
    quantized as a ``QLinearMul``, an eighth of its int8 time). Rewritten as ``images →
    Transpose (uint8) → Cast → Sub(mean)`` with the constant reshaped to ``[1, C, 1, 1]``, and
    each reading convolution's kernel scaled by ``1/std`` along its input channels (exact: a
    convolution is linear in each input channel, and its zero padding stays zero under a
    scale), the same values come out. Where a reader is not a convolution with its own kernel
    initializer, the ``Mul`` stays, after the transpose. Any other graph (an intermediate read
    twice, constants that are not initializers of 1 or ``C`` values) is left as it is."""
    from onnx import numpy_helper

    graph = proto.graph
    nodes = list(graph.node)
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    initializers = {i.name: i for i in graph.initializer}

    def only_consumer(tensor: str, op_type: str):
        found = consumers.get(tensor, [])
        if tensor in outputs or len(found) != 1 or found[0].op_type != op_type:
            return None
        return found[0]

    cast = only_consumer(graph.input[0].name, "Cast")
    sub = cast and only_consumer(cast.output[0], "Sub")
    mul = sub and only_consumer(sub.output[0], "Mul")
    transpose = mul and only_consumer(mul.output[0], "Transpose")
    if transpose is None or list(transpose.attribute[0].ints) != NCHW:
        return False
    channels = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    values = []
    for node, source in ((sub, cast), (mul, sub)):
        value = initializers.get(node.input[1])
        if node.input[0] != source.output[0] or value is None:
            return False
        array = numpy_helper.to_array(value).reshape(-1)
        if array.size not in (1, channels):
            return False
        values.append(np.broadcast_to(array, (channels,)).astype(array.dtype))
    mean, inv_std = values
    replaced = (sub.input[1], mul.input[1])
    nchw = transpose.output[0]
    readers = consumers.get(nchw, [])
    kernels = [initializers.get(r.input[1]) if r.op_type == "Conv" else None for r in readers]
    foldable = nchw not in outputs and all(
        k is not None
        and len(consumers.get(k.name, [])) == 1
        and len(k.dims) == 4
        and _group(r) == 1  # a grouped kernel reads channels/groups inputs, not all of them
        for r, k in zip(readers, kernels, strict=True)
    )
    # images → Transpose (uint8) → Cast → Sub(mean) [→ Mul(1/std)] → the old readers
    transpose.input[0], transpose.output[0] = graph.input[0].name, f"{nchw}_uint8"
    cast.input[0] = transpose.output[0]
    chain = [transpose, cast, sub]
    sub.input[1] = _initializer(graph, f"{sub.input[1]}_nchw", mean.reshape(1, -1, 1, 1))
    if foldable:
        for kernel in kernels:  # [out, in, h, w]: scale each input channel
            array = numpy_helper.to_array(kernel) * inv_std.reshape(1, -1, 1, 1)
            kernel.CopyFrom(numpy_helper.from_array(array.astype(np.float32), kernel.name))
        last = sub.output[0]
    else:
        mul.input[1] = _initializer(graph, f"{mul.input[1]}_nchw", inv_std.reshape(1, -1, 1, 1))
        chain.append(mul)
        last = mul.output[0]
    for node in readers:
        node.input[:] = [last if n == nchw else n for n in node.input]
    ids = {id(n) for n in (transpose, cast, sub, mul)}
    del graph.node[:]
    graph.node.extend([*chain, *(n for n in nodes if id(n) not in ids)])
    used = {name for n in graph.node for name in n.input} | outputs
    for name in set(replaced) - used:  # the NHWC constants, unless something else reads them
        graph.initializer.remove(initializers[name])
    return True


def _group(conv) -> int:
    """A ``Conv`` node's ``group`` attribute (1 when absent)."""
    return next((a.i for a in conv.attribute if a.name == "group"), 1)


def _initializer(graph, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def _op_order(name: str) -> tuple:
    """``Identity:0`` < ``Identity_1:0`` < ... < ``Identity_10:0`` (numerically, not as text)."""
    match = re.fullmatch(r"(.*?)(?:_(\d+))?:(\d+)", name)
    if not match:
        return (name, 0, 0)
    return (match.group(1), int(match.group(2) or 0), int(match.group(3)))


CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")


def quantize_int8(
    proto,
    images: np.ndarray,
    *,
    keep_float: Sequence[str] = (),
    calibration_method: str = "MinMax",
    weights: str = "int8",
):
    """ONNX Runtime's static QDQ quantization of ``proto`` calibrated on ``images``.

    ``keep_float``: Keras layer names whose weighted nodes stay float32 (ONNX Runtime's
    ``nodes_to_exclude``); it needs node names that carry the layer's (a plain model's
    convolutions, whose bias tf2onnx names ``…/layer/BiasAdd``), see :func:`node_layer`;
    ``calibration_method``: one of :data:`CALIBRATION_METHODS` (ONNX Runtime's defaults for
    each: Percentile keeps 99.999% of the values, Entropy minimises the KL divergence);
    ``weights``: one of :data:`WEIGHT_TYPES` ("int8": 7-bit signed, the default; "uint8": full
    8-bit asymmetric)."""
    import onnx as onnx_lib
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if weights not in WEIGHT_TYPES:
        raise ExportError(f"`weights` must be one of {tuple(WEIGHT_TYPES)}; got {weights!r}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ExportError(
            f"`calibration_method` must be one of {CALIBRATION_METHODS}; got {calibration_method!r}"
        )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(in_batches(images, 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as scratch:
        source, prepared, target = (Path(scratch) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        onnx_lib.save(proto, str(source))
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        excluded = _prepared_names(keep_float, quantizable_nodes(onnx_lib.load(str(prepared))))
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=getattr(QuantType, WEIGHT_TYPES[weights][0]),
            activation_type=QuantType.QUInt8,
            reduce_range=WEIGHT_TYPES[weights][1],
            calibrate_method=getattr(CalibrationMethod, calibration_method),
            nodes_to_exclude=excluded,
        )
        quantized = onnx_lib.load(str(target))
    del quantized.metadata_props[:]
    for entry in proto.metadata_props:
        quantized.metadata_props.add().CopyFrom(entry)
    return quantized


def quantizable_nodes(proto) -> list[str]:
    """The names of the nodes that carry weights (Conv, MatMul, Gemm), in graph order."""
    return [n.name for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]


def node_layer(node: str) -> str | None:
    """The Keras layer a tf2onnx node name comes from (``model_1/stage3_block3_conv2_1/BiasAdd``
    → ``stage3_block3_conv2``: TensorFlow's name scopes add the ``_1``), or None when the name
    carries none (``Conv__46``: a convolution without bias, as residual blocks have)."""
    parts = node.split("/")
    return re.sub(r"_\d+$", "", parts[1]) if len(parts) >= 3 else None


def _prepared_names(keep_float: Sequence[str], prepared: list[str]) -> list[str]:
    """The weighted nodes of the pre-processed graph that come from the layers ``keep_float``
    names (every node whose name scope is the layer's, with or without a ``_N`` suffix, and
    both halves of a layer split by :func:`split_reserved_streams`)."""
    out = []
    for layer in keep_float:
        # a layer split into its own and reserved streams keeps both halves in float32
        pattern = re.compile(rf"{re.escape(layer)}(_own|_reserved)?(_\d+)?")
        found = [n for n in prepared if any(pattern.fullmatch(p) for p in n.split("/")[:-1])]
        if not found:
            layers = sorted({node_layer(n) for n in prepared} - {None})
            raise ExportError(
                f"`keep_float`: no weighted node of the graph comes from layer {layer!r}; "
                + (
                    f"layers it can keep in float32: {layers}"
                    if layers
                    else "this graph's node names carry no layer names"
                )
            )
        out += found
    return out


def read_onnx_metadata(path: Path) -> dict:
    """The ``keras_dmr`` entry of an ONNX file's ``metadata_props``."""
    import onnx as onnx_lib

    proto = onnx_lib.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if "keras_dmr" not in props:
        raise ExportError(f"{path} carries no keras_dmr metadata")
    return json.loads(props["keras_dmr"])


def onnx_providers() -> list[str]:
    """ONNX Runtime's execution providers in the order we prefer them: CUDA, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    preferred = ("CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in preferred if p in available] or available


def onnx_session(
    model: str | Path | bytes,
    threads: int | None = None,
    *,
    cpu_only: bool = False,
    profile_prefix: str | None = None,
):
    """The one ONNX Runtime session every part of the package opens (the exporter's accuracy
    checks, ``bench`` and its deploy section), so they all time and score the same settings.

    Args:
        model: an ``.onnx`` file or its bytes.
        threads: intra-op threads (``None``: ONNX Runtime's default).
        cpu_only: the CPU provider only (``False``: CUDA first where it is installed).
        profile_prefix: turn ONNX Runtime's profiler on, its JSON written under this prefix
            (``end_profiling()`` returns the file).

    Returns:
        An ``onnxruntime.InferenceSession`` with every graph optimisation on and denormals
        flushed to zero, as TensorFlow does on a CPU. ONNX Runtime sets that on the calling
        thread and leaves it set: later float code in the same process sees denormals as zero.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CPUExecutionProvider"] if cpu_only else onnx_providers()
    source = bytes(model) if isinstance(model, bytes | bytearray) else str(model)
    return ort.InferenceSession(source, options, providers=providers)


def session_predict(model_bytes: bytes, output: str = "logits", threads: int | None = None):
    """``predict(images) -> outputs[output]`` through :func:`onnx_session` on the CPU."""
    session = onnx_session(model_bytes, threads, cpu_only=True)

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run([output], {INPUT_NAME: images})[0]

    return predict
