"""``to_plain``: the plain ops of a model (each block's ``plain_ops``, the rest from the graph
walk of :mod:`keras_dmr.convert.walker`) chained, fused and emitted as a Keras model, verified."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_dmr.convert.graph import Graph, read_graph
from keras_dmr.convert.walker import GraphWalker, PlainContext
from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.layers.padding import ConstantPadding2D
from keras_dmr.rm import kernels
from keras_dmr.rm.ops import (
    Act,
    ConversionError,
    ConvOp,
    DenseOp,
    GlobalPoolOp,
    Op,
    PoolOp,
    TapOp,
    iter_fused_linear_pairs,
    iter_ordered_channels,
)
from keras_dmr.utils import keras_internals

__all__ = ["PlainContext", "compare", "output_names", "plain_ops", "to_plain"]

DOWNSAMPLE_METHODS = ("dirac", "prelu")
PLAIN_DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
# The default verification tolerance by the plain model's compute dtype: float32 accumulates
# ~1e-7 per operation; float16 rounds every activation to 11 significant bits (2^-11 ≈ 4.9e-4)
# and bfloat16 to 8 (2^-8 ≈ 3.9e-3), which deep chains compound to a few times that.
DEFAULT_TOLERANCES = {"float32": 1e-4, "mixed_float16": 5e-3, "mixed_bfloat16": 5e-2}
DEFAULT_TOLERANCE = DEFAULT_TOLERANCES["float32"]


def plain_ops(
    model: keras.Model, *, downsample: str = "dirac", relu_only: bool = False
) -> list[Op]:
    """The plain form of ``model`` as float64 ops (before fusing and channel ordering), read
    from its functional graph (:mod:`keras_dmr.convert.walker`).

    Args:
        model: the model to read.
        downsample: ``"dirac"`` or ``"prelu"`` (see :func:`to_plain`).
        relu_only: refuse signed reserved channels.

    Returns:
        The plain ops, input to output.
    """
    return _walk(model, downsample, relu_only)[0]


def residual_shortcuts(model: keras.Model) -> tuple[Graph, dict]:
    """Where the converter finds ``model``'s residual blocks: its flattened graph and, per
    joining addition (by node index), the uses ``(node index, argument position)`` of the
    fork's tensor that start the block's linear shortcuts (identity: the addition itself).

    Args:
        model: a model the converter reads.

    Returns:
        ``(graph, shortcuts)``.

    Raises:
        ConversionError: what :func:`to_plain` would refuse.
    """
    walker = _walk(model, "dirac", False, keep_walker=True, several_outputs=False)
    return walker.graph, walker.report.shortcuts


def _walk(model, downsample: str, relu_only: bool, keep_walker: bool = False, several_outputs=True):
    if downsample not in DOWNSAMPLE_METHODS:
        raise ValueError(f"`downsample` must be one of {DOWNSAMPLE_METHODS}; got {downsample!r}")
    graph = read_graph(model, several_outputs=several_outputs)
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3:
        raise ConversionError(
            f"model {model.name!r}: input shape {shape} is not (height, width, channels)"
        )
    walker = GraphWalker(graph, shape, downsample, relu_only)
    ops = walker.run()
    return walker if keep_walker else (ops, walker.report)


# ------------------------------------------------------------------------------- emission
def _activation_layer(act: Act, name: str, dtype):
    if np.all(act.slope == 0):
        caps = np.unique(act.cap)
        if len(caps) == 1:
            cap = None if np.isinf(caps[0]) else float(caps[0])
            return keras.layers.ReLU(max_value=cap, name=f"{name}_relu", dtype=dtype), None
    if np.all(np.isinf(act.cap)):
        return keras.layers.PReLU(shared_axes=[1, 2], name=f"{name}_prelu", dtype=dtype), [
            act.slope.reshape(1, 1, -1)
        ]
    return ChannelwiseReLU(act.slope, act.cap, name=f"{name}_act", dtype=dtype), None


def _unfold_bn(op: ConvOp) -> tuple[np.ndarray, list[np.ndarray]]:
    """Kernel and BN weights reproducing ``conv(x)·1 + bias`` with BN kept (``fuse_bn=False``).

    Channels that had a BN get it back (kernel scaled by ``σ/γ``, the shortcut's bias in beta);
    the rest (reserved channels, gamma 0, re-parameterised sums) get a BN made identity by Eq. 3.
    """
    gamma, mean, var = op.bn
    has = np.isfinite(gamma) & (gamma != 0)
    sigma = np.sqrt(np.where(has, var, 1.0) + op.epsilon)
    ratio = np.where(has, sigma / np.where(has, gamma, 1.0), 1.0)
    kernel = op.kernel * ratio
    ident = kernels.identity_bn(op.bias, op.epsilon)
    weights = [
        np.where(has, gamma, ident[0]),
        np.where(has, op.bias + np.where(has, gamma, 0) * np.where(has, mean, 0) / sigma, ident[1]),
        np.where(has, mean, ident[2]),
        np.where(has, var, ident[3]),
    ]
    return kernel, weights


def _conv_layer(op: ConvOp, groups: int, use_bias: bool, dtype):
    """Keras' own ``Conv2D`` (or ``DepthwiseConv2D``), so that a plain model without grouped
    convolutions loads with Keras alone; the package's ``GroupedConv2D`` only where groups > 1."""
    padding = "same" if op.padding == "same" else "valid"
    kh, kw = op.kernel_size
    # Zeros, not random, initial values: every weight is set right after (a random initializer
    # costs seconds for the ~100M parameters of a plain ResNet-50).
    common = {"strides": op.strides, "padding": padding, "use_bias": use_bias, "name": op.name}
    if groups > 1 and groups == op.c_in and op.c_out % groups == 0:  # one input per group
        multiplier = op.c_out // groups
        layer = keras.layers.DepthwiseConv2D(
            (kh, kw),
            depth_multiplier=multiplier,
            depthwise_initializer="zeros",
            dtype=dtype,
            **common,
        )
        return layer, lambda k: kernels.to_grouped(k, groups).reshape(kh, kw, groups, multiplier)
    if groups == 1:
        layer = keras.layers.Conv2D(
            op.c_out, (kh, kw), kernel_initializer="zeros", dtype=dtype, **common
        )
        return layer, lambda k: k
    from keras_dmr.layers.conv import GroupedConv2D

    layer = GroupedConv2D(
        op.c_out, (kh, kw), groups=groups, kernel_initializer="zeros", dtype=dtype, **common
    )
    return layer, lambda k: kernels.to_grouped(k, groups)


def build_model(
    ops,
    input_tensor_spec,
    *,
    fuse_bn: bool,
    name: str,
    dtype: str = "float32",
    outputs: tuple | None = None,
) -> keras.Model:
    """Keras layers for a chain of ops (fused, channels ordered) as a functional model, every
    layer in the dtype policy ``dtype`` (weights cast once from float64).

    ``ops`` (a list) is consumed: emptied as the chain is built, each op let go of once its
    layer holds its weights, so that the dense float64 kernels (7 GB for a plain ResNet-152,
    whose grouped float32 layers hold 1.3 GB) and the layers' weights are never all in memory
    at once.

    ``outputs``, for a chain with :class:`TapOp` marks: ``(structure, names)``, the source's
    output structure (``model.output``: a list, a dict, ...) and its output names; each tapped
    tensor passes through an ``Identity`` layer of that name, packed into that structure."""
    shape, input_dtype, input_name = input_tensor_spec
    inputs = keras.Input(shape=shape, dtype=input_dtype, name=input_name)
    x = inputs
    used: set[str] = set(outputs[1]) if outputs else set()
    taps: dict[int, object] = {}

    def unique(base: str) -> str:
        candidate, i = base, 1
        while candidate in used:
            i += 1
            candidate = f"{base}_{i}"
        used.add(candidate)
        return candidate

    def drained():
        ops.reverse()
        while ops:
            yield ops.pop()

    for op, groups in iter_ordered_channels(iter_fused_linear_pairs(drained())):
        if isinstance(op, ConvOp):
            op = dataclasses.replace(op, name=unique(op.name))
            if op.padding != "same" and op.padding != ((0, 0), (0, 0)):
                x = keras.layers.ZeroPadding2D(
                    op.padding, name=unique(f"{op.name}_pad"), dtype=dtype
                )(x)
            if fuse_bn:
                layer, grouped = _conv_layer(op, groups, use_bias=True, dtype=dtype)
                x = layer(x)
                layer.set_weights([grouped(op.kernel), op.bias])
            else:
                kernel, bn_weights = _unfold_bn(op)
                layer, grouped = _conv_layer(op, groups, use_bias=False, dtype=dtype)
                x = layer(x)
                layer.set_weights([grouped(kernel)])
                bn = keras.layers.BatchNormalization(
                    momentum=0.9, epsilon=op.epsilon, name=unique(f"{op.name}_bn"), dtype=dtype
                )
                x = bn(x)
                bn.set_weights(bn_weights)
            if op.act is not None:
                act_layer, act_weights = _activation_layer(op.act, op.name, dtype)
                act_layer.name = unique(act_layer.name)
                x = act_layer(x)
                if act_weights is not None:
                    act_layer.set_weights(act_weights)
        elif isinstance(op, PoolOp):
            padding = "same" if op.padding == "same" else "valid"
            if op.padding != "same" and op.pad_value != 0.0:
                x = ConstantPadding2D(
                    op.padding, op.pad_value, name=unique(f"{op.name}_pad"), dtype=dtype
                )(x)
            elif op.padding != "same":
                x = keras.layers.ZeroPadding2D(
                    op.padding, name=unique(f"{op.name}_pad"), dtype=dtype
                )(x)
            cls = keras.layers.MaxPooling2D if op.kind == "max" else keras.layers.AveragePooling2D
            x = cls(
                op.pool_size, strides=op.strides, padding=padding, name=unique(op.name), dtype=dtype
            )(x)
        elif isinstance(op, GlobalPoolOp):
            cls = (
                keras.layers.GlobalAveragePooling2D
                if op.kind == "avg"
                else keras.layers.GlobalMaxPooling2D
            )
            x = cls(name=unique(op.name), dtype=dtype)(x)
        elif isinstance(op, DenseOp):
            layer = keras.layers.Dense(
                op.kernel.shape[1], activation=op.activation, name=unique(op.name), dtype=dtype
            )
            x = layer(x)
            layer.set_weights([op.kernel, op.bias])
        elif isinstance(op, TapOp):
            taps[op.position] = x
    if outputs is None:
        return keras.Model(inputs, x, name=name)
    structure, names = outputs
    missing = [n for i, n in enumerate(names) if i not in taps]
    if missing:
        raise ConversionError(f"model {name!r}: no tensor of the plain chain for {missing}")
    tensors = [keras.layers.Identity(name=n, dtype=dtype)(taps[i]) for i, n in enumerate(names)]
    return keras.Model(inputs, keras.tree.pack_sequence_as(structure, tensors), name=name)


def output_names(model: keras.Model) -> list[str]:
    """What ``model``'s outputs are called, in ``keras.tree.flatten`` order: the keys of a dict
    output (a feature pyramid's ``"P3"``...), else the output layers' names, repeats suffixed
    ``_2``, ``_3`` (a model may output one tensor twice). The plain model's output layers and
    every exporter's outputs take these names.

    Args:
        model: a built functional model.

    Returns:
        One name per output.
    """
    structure = model.output
    if isinstance(structure, dict) and all(
        not isinstance(v, dict | list | tuple) for v in structure.values()
    ):
        return sorted(structure)
    seen: dict[str, int] = {}
    names = []
    for n in model.output_names:
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return names


# ------------------------------------------------------------------------------ public API
_REDUCED_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def _float32_policies(config):
    """``config`` with every reduced-precision dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and (
            config.get("config", {}).get("name") in _REDUCED_POLICIES
        ):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {k: _float32_policies(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_policies(v) for v in config]
    if isinstance(config, str) and config in _REDUCED_POLICIES:
        return "float32"
    return config


def _computes_in_float32(model: keras.Model) -> bool:
    return all(
        layer.compute_dtype == "float32"
        for layer in keras_internals.all_layers(model)
        if not isinstance(layer, keras.layers.InputLayer)  # its tensor keeps the given dtype
    )


def float32_reference(model: keras.Model) -> keras.Model:
    """``model`` itself when every layer computes in float32, else a float32 copy with the same
    weights (rebuilt from its config): the reference a conversion is verified against."""
    if _computes_in_float32(model):
        return model
    config = _float32_policies(keras.saving.serialize_keras_object(model))
    previous = keras.mixed_precision.global_policy()
    try:  # models whose config is their constructor's arguments build under the global policy
        keras.mixed_precision.set_global_policy("float32")
        twin = keras.saving.deserialize_keras_object(config)
        twin.set_weights(model.get_weights())
    except Exception as err:  # a custom layer without a round-tripping config
        raise ConversionError(
            f"model {model.name!r} computes in reduced precision and no float32 copy of it can "
            f"be built from its config to verify against ({err}); convert it with verify=False "
            "and compare the outputs yourself, or rebuild it under the float32 policy"
        ) from err
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if not _computes_in_float32(twin):
        raise ConversionError(
            f"model {model.name!r}: a float32 copy to verify against could not be built (some "
            "layer keeps a reduced-precision policy); convert with verify=False and compare "
            "the outputs yourself"
        )
    return twin


def compare(
    source: keras.Model,
    plain: keras.Model,
    *,
    batches: int = 2,
    batch_size: int = 2,
    seed: int = 0,
    inputs=None,
    per_output: bool = False,
) -> float | list[float]:
    """Max relative error ``max|a-b| / max|b|`` of ``plain`` against ``source`` over random
    normal batches (or the given ``inputs``), in inference mode; the worst output's, or with
    ``per_output`` one per output (in ``source.outputs`` order).

    Args:
        source: the reference model.
        plain: the model compared with it.
        batches: random batches to run (ignored with ``inputs``).
        batch_size: images per random batch.
        seed: seed of the random batches.
        inputs: a list of input arrays to use instead.
        per_output: return one error per output.

    Returns:
        The maximum relative error over all batches (float64), or the list of them.
    """
    shape = list(source.inputs[0].shape[1:])
    if inputs is None and any(s is None for s in shape):
        raise ConversionError(
            f"model {source.name!r} has an unknown input size {tuple(shape)}; give "
            "`verify_inputs` (to_plain) or `inputs` (compare) to verify it"
        )
    rng = np.random.default_rng(seed)
    if inputs is None:
        inputs = [rng.normal(size=(batch_size, *shape)).astype("float32") for _ in range(batches)]
    if per_output:
        return kernels.relative_errors(source, plain, inputs)
    return kernels.max_relative_error(source, plain, inputs)


def to_plain(
    model: keras.Model,
    *,
    fuse_bn: bool = True,
    verify: bool = True,
    downsample: str = "dirac",
    relu_only: bool = False,
    tolerance: float | None = None,
    verify_inputs=None,
    name: str | None = None,
    dtype: str = "float32",
) -> keras.Model:
    """A plain (single-path, Conv→ReLU) model with the same outputs as ``model``.

    Each residual block rewrites itself by the RM operation (reserving the input through Dirac
    filters, merging it back in the last convolution); BN is folded in float64 and cast once.
    ``fuse_bn=False`` keeps a BatchNormalization after every convolution, for fine-tuning
    (Appendix A.2; see :func:`keras_dmr.convert.recalibrate_bn`). ``downsample`` picks how a
    block with a projection shortcut converts: ``"dirac"`` (Fig. 9b) or ``"prelu"`` (Fig. 9a).
    Reserved signals that may be negative pass through slope-1 PReLU; ``relu_only=True`` refuses
    them instead (for runtimes without PReLU).

    A model with several outputs (a backbone's feature pyramid: ``keras.Model(inputs, [c3, c4,
    c5])`` or a dict such as KerasHub's ``pyramid_outputs``) converts when every output is taken
    between blocks, on the network's main path: the plain chain computes the same tensor there
    and hands it out through an ``Identity`` layer named as the source's output, in the same
    structure (list or dict). Each output is verified; the report lists them. An output inside
    a residual block, or a side head that forks off and never rejoins, is refused.

    The plain model is built in the dtype policy ``dtype`` (``"float32"`` by default, whatever
    the global policy; ``"mixed_float16"`` or ``"mixed_bfloat16"`` on request), from weights
    folded in float64 and cast once. The reference it is verified against is always the float32
    computation of ``model``'s weights (a float32 copy when ``model`` was built under a mixed
    policy), so a model trained with ``mixed_float16`` converts like any other.

    With ``verify=True`` both models run on two random single-image batches (or
    ``verify_inputs``, a list of arrays) and :class:`ConversionError` is raised if the maximum
    relative error exceeds ``tolerance`` (default by ``dtype``: 1e-4 for float32, 5e-3 for
    mixed_float16, 5e-2 for mixed_bfloat16). The result carries ``conversion_report``: the
    error, parameter and multiply-accumulate counts before and after, the options used, each
    residual block found (its addition, branch and shortcut), what passed through unchanged and
    every output (name, shape, its own error).

    Args:
        model: a built functional or builder model (residual or already plain).
        fuse_bn: fold every BN into its convolution; ``False`` keeps one BN per convolution.
        verify: run both models and compare (see above).
        downsample: ``"dirac"`` or ``"prelu"``.
        relu_only: refuse signed reserved channels instead of giving them PReLU.
        tolerance: maximum relative error allowed by ``verify`` (default by ``dtype``).
        verify_inputs: arrays to verify on instead of random batches.
        name: the plain model's name (default: ``<model.name>_plain``).
        dtype: dtype policy of the plain model.

    Returns:
        The plain ``keras.Model``, with ``conversion_report``.

    Raises:
        ConversionError: a layer or structure the converter does not understand (named), or
            a verification error above ``tolerance``.
    """
    from keras_dmr.analysis.flops import count_flops, count_flops_of_layers

    if dtype not in PLAIN_DTYPES:
        raise ValueError(f"`dtype` must be one of {PLAIN_DTYPES}; got {dtype!r}")
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCES[dtype]
    ops, walk = _walk(model, downsample, relu_only)
    spec = (tuple(model.inputs[0].shape[1:]), model.inputs[0].dtype, model.inputs[0].name)
    names = output_names(model)
    several = len(model.outputs) > 1
    try:
        plain = build_model(
            ops,
            spec,
            fuse_bn=fuse_bn,
            name=name or f"{model.name}_plain",
            dtype=dtype,
            outputs=(model.output, names) if several else None,
        )
    except ValueError as err:  # a Keras shape error here is a walker bug or an odd model
        raise ConversionError(
            f"model {model.name!r}: the plain model cannot be built: {err}"
        ) from err
    error, errors = None, [None] * len(names)
    if verify:
        # Two single-image batches: enough to catch a wrong rewrite (every output depends on
        # every weight), cheap for a 224² ResNet-50 (tests compare more batches themselves).
        errors = compare(
            float32_reference(model), plain, batch_size=1, inputs=verify_inputs, per_output=True
        )
        error = max(errors)
        if not error <= tolerance:
            worst = names[errors.index(error)]
            where = f" (output {worst!r})" if several else ""
            raise ConversionError(
                f"model {model.name!r}: the plain model differs from it by a maximum relative "
                f"error of {error:.3g}{where}, above the tolerance {tolerance:g}"
            )
    known_size = all(s is not None for s in model.inputs[0].shape[1:3])
    plain.conversion_report = {
        "source": model.name,
        "max_relative_error": error,
        "tolerance": tolerance,
        "fuse_bn": fuse_bn,
        "downsample": downsample,
        "relu_only": relu_only,
        "dtype": dtype,
        "params_before": int(model.count_params()),
        "params_after": int(plain.count_params()),
        "flops_before": (count_flops_of_layers(model) or count_flops(model))
        if known_size
        else None,
        "flops_after": (count_flops_of_layers(plain) or count_flops(plain)) if known_size else None,
        "blocks": walk.blocks,
        "passed_through": walk.passed,
        "outputs": [
            {"name": n, "shape": list(t.shape[1:]), "max_relative_error": e}
            for n, t, e in zip(names, model.outputs, errors, strict=True)
        ],
    }
    return plain
