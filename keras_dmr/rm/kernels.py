"""The package's kernel math, in one place: merge-and-run matrices, branch stacking, Dirac placement
and BatchNorm folding. Everything here is NumPy and runs in float64 unless told otherwise, so that
conversions cast to float32 once, at the end."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keras_dmr.errors import ConversionError


def merge_and_run_matrix(branches: int, channels: int, projection=None) -> np.ndarray:
    """The (K·d)×(K·d) skip matrix of a merge-and-run block: K×K blocks of ``I/K`` (idempotent).

    With a ``projection`` (a ``(d, d_out)`` matrix, the shortcut's 1×1 convolution shared by the
    streams), K×K blocks of ``projection/K``: the streams' average, projected.
    """
    if branches < 1 or channels < 1:
        raise ValueError(
            f"branches and channels must be >= 1; got branches={branches}, channels={channels}"
        )
    block = np.eye(channels) if projection is None else np.asarray(projection, np.float64)
    if block.shape[0] != channels:
        raise ValueError(
            f"a projection of {channels} channels needs {channels} rows; got {block.shape}"
        )
    return np.kron(np.full((branches, branches), 1.0 / branches), block)


def stack_axis(kind: str, ndim: int) -> int:
    """Axis along which per-branch weights of a layer kind concatenate into the grouped form.

    Conv2D kernels ``(kh, kw, c_in/groups, c_out)`` stack along the output axis; DepthwiseConv2D
    kernels ``(kh, kw, c, multiplier)`` along the channel axis; every 1-D weight along axis 0.
    """
    if ndim == 1:
        return 0
    if kind == "DepthwiseConv2D":
        return -2
    return -1


def stack_branches(kind: str, per_branch: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate K branches' weight lists of one layer into the weights of its grouped form."""
    return [
        np.concatenate(ws, axis=stack_axis(kind, ws[0].ndim))
        for ws in zip(*per_branch, strict=True)
    ]


def unstack_branches(
    kind: str, weights: Sequence[np.ndarray], branches: int
) -> list[list[np.ndarray]]:
    """Inverse of :func:`stack_branches`: split a grouped layer's weights into K branch lists."""
    split = [np.split(w, branches, axis=stack_axis(kind, w.ndim)) for w in weights]
    return [[parts[k] for parts in split] for k in range(branches)]


def fold_bn(gamma, beta, mean, variance, epsilon) -> tuple[np.ndarray, np.ndarray]:
    """Scale and shift of an inference-mode BatchNorm, ``BN(z) = scale·z + shift`` (float64).

    Every BN folding in the package goes through here: a conv kernel folds as ``kernel·scale``
    (scale along the output axis) with bias ``bias·scale + shift``.
    """
    gamma, beta, mean, variance = (np.asarray(a, np.float64) for a in (gamma, beta, mean, variance))
    scale = gamma / np.sqrt(variance + float(epsilon))
    return scale, beta - mean * scale


def identity_bn(bias, epsilon, mean=None, variance=None) -> list[np.ndarray]:
    """Weights ``[gamma, beta, mean, variance]`` of a BN that is the identity plus ``bias``:
    Eq. 3 of the RMNet paper, ``gamma = sqrt(var + eps)`` and ``beta = mean + bias``."""
    bias = np.asarray(bias, np.float64)
    mean = np.zeros_like(bias) if mean is None else np.asarray(mean, np.float64)
    variance = np.ones_like(bias) if variance is None else np.asarray(variance, np.float64)
    return [np.sqrt(variance + float(epsilon)), mean + bias, mean, variance]


def _flatten(outputs) -> list:
    """A model's outputs as a list, in ``keras.tree.flatten``'s order (dicts by sorted key)."""
    if isinstance(outputs, dict):
        return [leaf for key in sorted(outputs) for leaf in _flatten(outputs[key])]
    if isinstance(outputs, list | tuple):
        return [leaf for item in outputs for leaf in _flatten(item)]
    return [outputs]


def relative_error(expected, got) -> float:
    """``max|got - expected| / max|expected|`` of two arrays, in float64: the one error measure
    every verification of the package reports."""
    expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
    return float(np.max(np.abs(got - expected))) / max(float(np.max(np.abs(expected))), 1e-12)


def relative_errors(reference, candidate, inputs) -> list[float]:
    """Per output of ``reference`` (in the order ``keras.tree.flatten`` gives), ``max|b - a| /
    max|a|`` over ``inputs`` (float64), ``a`` its outputs and ``b`` those of ``candidate``, both
    called in inference mode; the two must return the same structure of outputs."""
    worst: list[float] | None = None
    for batch in inputs:
        expected = _flatten(reference(batch, training=False))
        got = _flatten(candidate(batch, training=False))
        if len(expected) != len(got):
            raise ValueError(f"{len(expected)} outputs to compare with {len(got)}")
        errors = [relative_error(a, b) for a, b in zip(expected, got, strict=True)]
        worst = errors if worst is None else [max(w, e) for w, e in zip(worst, errors, strict=True)]
    return worst or []


def max_relative_error(reference, candidate, inputs) -> float:
    """``max|b - a| / max|a|`` over ``inputs`` (float64), ``a`` the outputs of ``reference`` and
    ``b`` those of ``candidate``, both called in inference mode: the one error measure every
    verification of the package reports (the worst output's, where there are several)."""
    return max(relative_errors(reference, candidate, inputs), default=0.0)


def identity_bn_channels(gamma, variance, epsilon, rtol: float = 1e-6) -> np.ndarray:
    """Channels whose BN is the identity plus a constant (Eq. 3, ``|gamma| = sqrt(var + eps)``):
    the form :func:`identity_bn` writes, so their statistics carry no learned scale."""
    gamma, variance = np.asarray(gamma, np.float64), np.asarray(variance, np.float64)
    return np.isclose(np.abs(gamma), np.sqrt(variance + float(epsilon)), rtol=rtol, atol=0)


def same_output_size(size: int | None, strides: int) -> int | None:
    """Output rows (or columns) of a 'same'-padded layer: ``ceil(size / strides)``; None stays
    None (an unknown size)."""
    return None if size is None else -(-int(size) // int(strides))


def same_padding_before(kernel_size: int, strides: int, size: int) -> int:
    """Rows (or columns) TensorFlow's ``padding='same'`` adds before the input."""
    out = same_output_size(size, strides)
    return max((out - 1) * strides + kernel_size - size, 0) // 2


def dirac_tap(kernel_size: int, strides: int, size: int | None) -> int:
    """Tap of a k×k 'same' convolution that reads input pixel ``i·strides`` at output ``i``.

    That is where a 1×1 strided convolution (the projection shortcut) reads, so a Dirac filter
    placed there carries the shortcut's input through the layer. With stride 1 it is the centre;
    with stride 2 it depends on the parity of ``size`` (top-left for even sizes, centre for odd).
    """
    if strides == 1 or kernel_size == 1:
        return same_padding_before(kernel_size, 1, 1)
    if size is None:
        raise ValueError("a strided Dirac kernel needs the input's spatial size; got None")
    return same_padding_before(kernel_size, strides, size)


def partial_identity(c_in: int, c_out: int, channels: int) -> np.ndarray:
    """A ``(c_in, c_out)`` matrix copying the first ``channels`` inputs to the first
    ``channels`` outputs (zeros elsewhere): the skip of a block that passes part of its input."""
    if not 0 <= channels <= min(c_in, c_out):
        raise ValueError(f"cannot copy {channels} channels from {c_in} to {c_out}")
    matrix = np.zeros((c_in, c_out))
    matrix[np.arange(channels), np.arange(channels)] = 1.0
    return matrix


def add_at_tap(
    target: np.ndarray, taps, matrix=None, window: int = 1, name: str = ""
) -> np.ndarray:
    """Add ``matrix`` (``(c_in, c_out)``; the identity, a Dirac filter, when None) into the
    ``(kh, kw, c_in, c_out)`` kernel ``target`` at one tap, in place: every Dirac placement in
    the package goes through here. With ``window`` > 1, ``matrix / window²`` at each tap of
    the ``window × window`` square from that tap on (an average pool at the layer's stride, as
    a "vd" shortcut averages). Returns ``target``.

    Raises:
        ConversionError: the square does not fit in the kernel (``name`` names the layer).
    """
    kh, kw = target.shape[:2]
    if taps[0] + window > kh or taps[1] + window > kw:
        raise ConversionError(
            f"{name}: its {kh}×{kw} window does not cover the {window}×{window} average the "
            "shortcut takes, so the input cannot be carried through it"
        )
    diagonal = np.arange(target.shape[2])
    values = 1.0 if matrix is None else _diagonal_of(matrix)  # the usual case: no dense add
    for a in range(window):
        for b in range(window):
            if values is not False:
                target[taps[0] + a, taps[1] + b, diagonal, diagonal] += values / window**2
            else:
                target[taps[0] + a, taps[1] + b] += matrix / window**2
    return target


def _diagonal_of(matrix: np.ndarray):
    """The diagonal of a square diagonal matrix, else False."""
    if matrix.shape[0] != matrix.shape[1]:
        return False
    diagonal = np.diagonal(matrix)
    return diagonal.copy() if np.count_nonzero(matrix) == np.count_nonzero(diagonal) else False


def to_dense(kernel: np.ndarray, groups: int) -> np.ndarray:
    """Grouped kernel ``(kh, kw, c_in/g, c_out)`` → block-diagonal ``(kh, kw, c_in, c_out)``."""
    kh, kw, per_in, c_out = kernel.shape
    if groups == 1:
        return kernel
    per_out = c_out // groups
    dense = np.zeros((kh, kw, per_in * groups, c_out), kernel.dtype)
    for g in range(groups):
        dense[:, :, g * per_in : (g + 1) * per_in, g * per_out : (g + 1) * per_out] = kernel[
            :, :, :, g * per_out : (g + 1) * per_out
        ]
    return dense


def to_grouped(dense: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of :func:`to_dense`: keep the diagonal blocks of a block-diagonal dense kernel."""
    if groups == 1:
        return dense
    c_in, c_out = dense.shape[2], dense.shape[3]
    per_in, per_out = c_in // groups, c_out // groups
    return np.concatenate(
        [
            dense[:, :, g * per_in : (g + 1) * per_in, g * per_out : (g + 1) * per_out]
            for g in range(groups)
        ],
        axis=-1,
    )
