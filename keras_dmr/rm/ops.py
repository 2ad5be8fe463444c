"""The plain network as data: a chain of float64 operations that blocks rewrite themselves into.

Every convertible layer returns a list of these (``plain_ops``); the converter
(:mod:`keras_dmr.convert.walker` walks the graph, :mod:`keras_dmr.convert.plain` emits) chains
them, fuses adjacent pointwise convolutions (Eq. 5), orders channels so that grouped and
depthwise structure shows, and emits Keras layers. All arithmetic is float64; the cast to float32
happens once, when the Keras layers receive their weights.

The RM operation itself is :func:`reserve_and_merge`: given a residual block as a branch of
convolutions plus a linear skip, it returns plain convolutions with the same output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from keras_dmr.errors import ConversionError
from keras_dmr.rm import kernels

INF = np.inf


# ---------------------------------------------------------------------------------- activations
@dataclasses.dataclass
class Act:
    """Per-channel activation ``y = slope·x`` for ``x < 0``, ``min(x, cap)`` otherwise.

    ReLU is slope 0 / cap ∞, ReLU6 slope 0 / cap 6, the identity (a reserved signed channel, a
    slope-1 PReLU) slope 1 / cap ∞.
    """

    slope: np.ndarray
    cap: np.ndarray

    @classmethod
    def relu(cls, channels: int, cap: float = INF) -> Act:
        return cls(np.zeros(channels), np.full(channels, float(cap)))

    @classmethod
    def identity(cls, channels: int) -> Act:
        return cls(np.ones(channels), np.full(channels, INF))

    @property
    def channels(self) -> int:
        return len(self.slope)

    @property
    def nonnegative(self) -> bool:
        return bool(np.all(self.slope == 0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.where(x < 0, self.slope * x, np.minimum(x, self.cap))

    def tile(self, times: int) -> Act:
        """The same activation for the channels repeated ``times`` times."""
        return Act(np.tile(self.slope, times), np.tile(self.cap, times))

    def concat(self, other: Act) -> Act:
        return Act(np.concatenate([self.slope, other.slope]), np.concatenate([self.cap, other.cap]))

    def take(self, index) -> Act:
        return Act(self.slope[index], self.cap[index])


def passthrough(channels: int, nonnegative: bool) -> Act:
    """Activation of reserved channels: ReLU keeps a non-negative signal, slope 1 a signed one."""
    return Act.relu(channels) if nonnegative else Act.identity(channels)


# ------------------------------------------------------------------------------------- the ops
@dataclasses.dataclass
class ConvOp:
    """``act(conv(x) + bias)``, 'same' padding unless ``padding`` gives explicit pads.

    ``kernel`` is dense ``(kh, kw, c_in, c_out)``; grouped and depthwise structure is found from
    its exact zeros when Keras layers are made. ``bn`` keeps, per output channel, the
    ``(gamma, mean, variance)`` of the BatchNorm that was folded in (NaN where there was none), so
    that ``fuse_bn=False`` can unfold it again; ``epsilon`` is that BN's epsilon.
    """

    kernel: np.ndarray
    bias: np.ndarray
    strides: int = 1
    act: Act | None = None
    padding: str | tuple = "same"
    bn: np.ndarray | None = None  # (3, c_out): gamma, mean, variance; NaN columns = no BN
    epsilon: float = 1e-5
    name: str = "conv"

    def __post_init__(self):
        self.kernel = np.asarray(self.kernel, np.float64)
        self.bias = np.asarray(self.bias, np.float64)
        if self.bn is None:
            self.bn = np.full((3, self.c_out), np.nan)

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.kernel.shape[0], self.kernel.shape[1]

    @property
    def c_in(self) -> int:
        return self.kernel.shape[2]

    @property
    def c_out(self) -> int:
        return self.kernel.shape[3]

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.strides == 1 and self.padding == "same"

    def take_outputs(self, index) -> ConvOp:
        """The op restricted (or permuted) to output channels ``index``."""
        return dataclasses.replace(
            self,
            kernel=self.kernel[..., index],
            bias=self.bias[index],
            act=None if self.act is None else self.act.take(index),
            bn=self.bn[:, index],
        )

    def take_inputs(self, index) -> ConvOp:
        return dataclasses.replace(self, kernel=self.kernel[:, :, index, :])


@dataclasses.dataclass
class PoolOp:
    """A pooling layer; explicit ``padding`` pads with ``pad_value`` first (0, or -inf before a
    max pool), 'same' is Keras' own."""

    kind: str  # "max" | "avg"
    pool_size: int
    strides: int
    padding: str | tuple = "same"
    name: str = "pool"
    pad_value: float = 0.0


@dataclasses.dataclass
class GlobalPoolOp:
    kind: str = "avg"
    name: str = "avg_pool"


@dataclasses.dataclass
class DenseOp:
    kernel: np.ndarray  # (c_in, c_out)
    bias: np.ndarray
    activation: str | None = None
    name: str = "predictions"

    def take_inputs(self, index) -> DenseOp:
        return dataclasses.replace(self, kernel=np.asarray(self.kernel)[index, :])

    @property
    def c_in(self) -> int:
        return self.kernel.shape[0]


@dataclasses.dataclass
class TapOp:
    """Not a computation: the tensor at this point of the chain is the model's output number
    ``position`` (a backbone's stage output). Ops on either side of it are never fused into
    one, nor its channels reordered, so the tensor stays what the source computes there."""

    position: int
    name: str = "output"


Op = ConvOp | PoolOp | GlobalPoolOp | DenseOp | TapOp


# ---------------------------------------------------------------------------- building blocks
def conv_bn_op(
    kernel,
    bn_weights: Sequence[np.ndarray] | None,
    *,
    epsilon: float,
    bias=None,
    strides: int = 1,
    groups: int = 1,
    act: Act | None = None,
    padding="same",
    name: str = "conv",
) -> ConvOp:
    """A conv (grouped kernel, optional bias) followed by an inference-mode BN, folded (float64)."""
    dense = kernels.to_dense(np.asarray(kernel, np.float64), groups)
    c_out = dense.shape[-1]
    b = np.zeros(c_out) if bias is None else np.asarray(bias, np.float64)
    bn = np.full((3, c_out), np.nan)
    if bn_weights is not None:
        gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn_weights)
        scale, shift = kernels.fold_bn(gamma, beta, mean, var, epsilon)
        dense = dense * scale
        b = b * scale + shift
        bn = np.stack([gamma, mean, var])
    return ConvOp(dense, b, strides, act, padding, bn, float(epsilon), name)


def depthwise_kernel(kernel) -> np.ndarray:
    """Keras depthwise kernel ``(kh, kw, c, m)`` → the grouped-conv layout ``(kh, kw, 1, c·m)``
    (``c`` groups; output ``c·m + j`` is channel ``c``'s ``j``-th filter, as Keras orders them)."""
    kernel = np.asarray(kernel, np.float64)
    kh, kw, c, m = kernel.shape
    return kernel.reshape(kh, kw, 1, c * m)


def _extended(op: ConvOp, extra_in: int, extra_out: int) -> np.ndarray:
    """``op``'s kernel in a zero kernel with ``extra_in`` more inputs and ``extra_out`` more
    outputs (one allocation: RM's kernels are large and mostly zeros)."""
    kh, kw, c_in, c_out = op.kernel.shape
    kernel = np.zeros((kh, kw, c_in + extra_in, c_out + extra_out))
    kernel[:, :, :c_in, :c_out] = op.kernel
    return kernel


def _taps(op: ConvOp, hw) -> tuple[int, int]:
    kh, kw = op.kernel_size
    if op.padding != "same":
        # Explicit padding: output i reads padded rows i·s .. i·s+kh-1, so the tap at the top
        # pad reads input row i·s, where a strided 1×1 shortcut reads, if the sizes agree.
        (top, bottom), (left, right) = op.padding
        expected = output_hw(dataclasses.replace(op, padding="same"), hw)
        if not (0 <= top < kh and 0 <= left < kw) or (
            hw is not None and hw[0] is not None and output_hw(op, hw) != expected
        ):
            raise ConversionError(
                f"{op.name}: its padding {op.padding} does not keep the pixel a shortcut reads "
                "in its window, so the input cannot be reserved through it"
            )
        return top, left
    try:
        return (
            kernels.dirac_tap(kh, op.strides, hw[0]),
            kernels.dirac_tap(kw, op.strides, hw[1]),
        )
    except ValueError as err:
        raise ConversionError(
            f"{op.name}: a strided residual block needs a known input height and width; build "
            "the model with a fixed `input_shape`"
        ) from err


def output_hw(op: ConvOp | PoolOp, hw):
    """Height and width after a convolution or pool (``hw`` unknown or None stays so)."""
    if hw is None or hw[0] is None:
        return hw
    if op.padding == "same":
        return tuple(kernels.same_output_size(n, op.strides) for n in hw)
    (t, b), (left, r) = op.padding
    kh, kw = op.kernel_size if isinstance(op, ConvOp) else (op.pool_size, op.pool_size)
    return ((hw[0] + t + b - kh) // op.strides + 1, (hw[1] + left + r - kw) // op.strides + 1)


def reserve_and_merge(
    branch: Sequence[ConvOp],
    skip: ConvOp,
    *,
    post: Act | None,
    input_nonnegative: bool,
    input_hw,
    method: str = "dirac",
    skip_scale: ConvOp | None = None,
    skip_window: int = 1,
) -> list[ConvOp]:
    """The RM operation: ``post(branch(x) + skip(x))`` as a chain of plain convolutions.

    ``branch`` is a chain of convolutions (activations on all but the last; the last has none);
    ``skip`` a linear 1×1 convolution with bias (identity, the merge-and-run matrix, a projection
    with its BN folded, or a composition of these) with the branch's total stride.

    Reserving: every branch convolution but the last also carries reserved channels, through
    Dirac filters placed at the tap that reads the pixel a strided 1×1 convolution reads, and the
    activation keeps them (ReLU for a non-negative signal, slope 1 for a signed one).
    ``method="dirac"`` (Fig. 9b) reserves the block input itself and applies the skip in the last
    convolution; ``"prelu"`` (Fig. 9a) applies the skip in the first convolution and reserves its
    (signed) result. Merging: the last convolution reads ``[hidden, reserved]``, with the skip (or
    a Dirac filter) on the reserved part, and adds the skip's bias.

    ``skip_scale`` (optional) is a per-channel scale the block applies to its input before the
    skip: a 1×1 op with a diagonal kernel and a BN record (the extra BN on the residual path of
    Sec. 4.2). Reserved copies of the input then carry its output and its BN record, so that a
    ``fuse_bn=False`` plain model has that BN on the reserved channels.

    ``skip_window`` > 1: the shortcut first averages ``skip_window``² windows at stride
    ``skip_window`` (ResNet-vd's average-pool shortcut); the reserved channels take that average
    in the branch's strided convolution, which must have the window in its taps.
    """
    if method not in ("dirac", "prelu"):
        raise ValueError(f"`downsample` must be 'dirac' or 'prelu'; got {method!r}")
    _check_block(branch, skip, skip_window)
    scaled = _ScaledSkip.of(skip, skip_scale, branch[0].epsilon)
    last = branch[-1]
    if len(branch) == 1:  # re-parameterisation: the skip lands in the one convolution
        window = skip_window if last.strides > 1 else 1
        kernel = kernels.add_at_tap(
            last.kernel.copy(), _taps(last, input_hw), scaled.matrix, window, last.name
        )
        return [dataclasses.replace(last, kernel=kernel, bias=last.bias + scaled.bias, act=post)]
    # A projection applied early (Fig. 9a) only where the first convolution has the stride.
    early = method == "prelu" and not _is_identity(skip) and branch[0].strides == skip.strides
    ops, hw = _reserving_ops(
        branch[:-1], skip, scaled, early, input_nonnegative, input_hw, skip_window
    )
    return [*ops, _merging_op(last, ops[-1], skip, early, hw, skip_window, post)]


def _check_block(branch: Sequence[ConvOp], skip: ConvOp, skip_window: int) -> None:
    """Refuse a block :func:`reserve_and_merge` cannot rewrite exactly, naming its layer."""
    last = branch[-1]
    if last.act is not None:
        raise ConversionError(f"{last.name}: the last layer of a residual branch has an activation")
    if skip.kernel_size != (1, 1):
        raise ConversionError(f"{skip.name}: a shortcut must be a 1×1 (linear) convolution")
    total_stride = int(np.prod([op.strides for op in branch]))
    if skip.strides != total_stride:
        raise ConversionError(
            f"{skip.name}: shortcut stride {skip.strides} differs from the branch's {total_stride}"
        )
    if skip_window > 1 and [op.strides for op in branch if op.strides > 1] != [skip_window]:
        raise ConversionError(
            f"{skip.name}: an average-pool shortcut needs exactly one convolution of stride "
            f"{skip_window} in the branch"
        )


@dataclasses.dataclass
class _ScaledSkip:
    """The skip applied to the block's input after its optional per-channel scale ``s·x + b``:
    ``matrix``/``bias`` of the whole shortcut, the scale itself, and its BN record re-expressed
    with the branch's BN epsilon (None without a scale)."""

    matrix: np.ndarray
    bias: np.ndarray
    pre_scale: np.ndarray
    pre_bias: np.ndarray
    pre_bn: np.ndarray | None

    @classmethod
    def of(cls, skip: ConvOp, skip_scale: ConvOp | None, epsilon: float) -> _ScaledSkip:
        skip_matrix = skip.kernel[0, 0]  # (c_in, c_out)
        pre_scale, pre_bias, pre_bn = np.ones(skip.c_in), np.zeros(skip.c_in), None
        if skip_scale is not None:
            pre = skip_scale.kernel[0, 0]
            pre_scale, pre_bias = np.diagonal(pre).copy(), skip_scale.bias
            if (
                skip_scale.kernel_size != (1, 1)
                or skip_scale.strides != 1
                or not np.array_equal(pre, np.diag(pre_scale))
            ):
                raise ConversionError(f"{skip_scale.name}: a skip scale must be a diagonal 1×1 op")
            gamma, mean, var = skip_scale.bn
            gamma = gamma * np.sqrt(var + epsilon) / np.sqrt(var + skip_scale.epsilon)
            pre_bn = np.stack([gamma, mean, var])
        return cls(
            pre_scale[:, None] * skip_matrix,
            skip.bias + pre_bias @ skip_matrix,
            pre_scale,
            pre_bias,
            pre_bn,
        )


def _reserving_ops(
    hidden: Sequence[ConvOp],
    skip: ConvOp,
    scaled: _ScaledSkip,
    early: bool,
    input_nonnegative: bool,
    input_hw,
    skip_window: int,
) -> tuple[list[ConvOp], tuple | None]:
    """Every branch convolution but the last, each widened by the reserved channels (Dirac
    filters; the first one takes the skip instead when it is applied ``early``); the ops and
    the spatial size after them."""
    used = np.any(skip.kernel[0, 0] != 0, axis=1)
    ops: list[ConvOp] = []
    hw = input_hw
    reserved_nonneg = input_nonnegative
    n_hidden = hidden[0].c_in
    carried = None  # BN record of the reserved channels after their first layer (skip_scale)
    for j, op in enumerate(hidden):
        tap = _taps(op, hw)
        window = skip_window if op.strides > 1 else 1
        if j == 0:
            # Reserve only the input channels the shortcut reads (a partial identity, as in a
            # MobileNetV2 with a wide bottleneck, reserves fewer than it receives).
            n_res = skip.c_out if early else int(np.sum(used))
            if early:
                extra, res_bias, res_bn = scaled.matrix, scaled.bias, None
                reserved_nonneg = False
            else:
                extra = np.diag(scaled.pre_scale)[:, used]
                res_bias = scaled.pre_bias[used]
                res_bn = None if scaled.pre_bn is None else scaled.pre_bn[:, used]
                if scaled.pre_bn is not None:  # later Dirac copies: the statistics of s·x
                    _, mean, var = scaled.pre_bn[:, used]
                    scale = scaled.pre_scale[used]
                    carried = np.stack([np.abs(scale) * np.sqrt(var), scale * mean, scale**2 * var])
                reserved_nonneg = reserved_nonneg and bool(
                    np.all(scaled.pre_scale[used] >= 0) and np.all(res_bias >= 0)
                )
            kernel = _extended(op, 0, n_res)
            kernels.add_at_tap(kernel[..., op.c_out :], tap, extra, window, op.name)
        else:
            n_res = ops[-1].c_out - n_hidden
            kernel = _extended(op, n_res, n_res)
            kernels.add_at_tap(kernel[:, :, n_hidden:, op.c_out :], tap, None, window, op.name)
            res_bias, res_bn = np.zeros(n_res), carried
        # A linear layer inside a branch (a separable conv's depthwise half) passes reserved
        # channels linearly too.
        act = None if op.act is None else op.act.concat(passthrough(n_res, reserved_nonneg))
        res_bn = np.full((3, n_res), np.nan) if res_bn is None else res_bn
        bn = np.concatenate([op.bn, res_bn], axis=1)
        ops.append(
            dataclasses.replace(
                op, kernel=kernel, bias=np.concatenate([op.bias, res_bias]), act=act, bn=bn
            )
        )
        n_hidden = op.c_out
        hw = output_hw(op, hw)
    return ops, hw


def _merging_op(
    last: ConvOp, previous: ConvOp, skip: ConvOp, early: bool, hw, skip_window: int, post
) -> ConvOp:
    """The branch's last convolution reading ``[hidden, reserved]``: the skip (or a Dirac
    filter, when it was applied early) on the reserved part, plus the skip's bias."""
    n_res = previous.c_out - last.c_in
    if early:
        merge, merge_bias = None, np.zeros(last.c_out)
    else:
        used = np.any(skip.kernel[0, 0] != 0, axis=1)
        merge, merge_bias = skip.kernel[0, 0][used], skip.bias
    window = skip_window if last.strides > 1 else 1
    kernel = _extended(last, n_res, 0)
    kernels.add_at_tap(kernel[:, :, last.c_in :, :], _taps(last, hw), merge, window, last.name)
    return dataclasses.replace(last, kernel=kernel, bias=last.bias + merge_bias, act=post)


def _is_identity(op: ConvOp) -> bool:
    m = op.kernel[0, 0]
    return m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(m.shape[0])) and op.strides == 1


def identity_skip(channels: int, name: str = "identity") -> ConvOp:
    return ConvOp(np.eye(channels)[None, None], np.zeros(channels), name=name)


def compose_pointwise(first: ConvOp, second: ConvOp) -> ConvOp:
    """Eq. 5: two convolutions with no activation between them, the second pointwise, as one
    (``W'W`` and ``W'B + B'``). Exact with 'same' padding because the second is 1×1 stride 1."""
    if not second.pointwise or first.act is not None:
        raise ValueError("compose_pointwise needs a linear first op and a pointwise second op")
    w2 = second.kernel[0, 0]
    return dataclasses.replace(
        second,
        kernel=np.einsum("hwio,oc->hwic", first.kernel, w2),
        bias=first.bias @ w2 + second.bias,
        strides=first.strides,
        padding=first.padding,
        name=second.name,
    )


def fuse_linear_pairs(ops: Iterable[Op]) -> list[Op]:
    """Fuse a linear convolution and the pointwise convolution after it (Eq. 5): after RM, a
    MobileNetV2 block's projection and the next block's expansion become one (Sec. 4.4), and a
    pre-activation block's BN (a per-channel 1×1 map) joins the convolution that ends the block
    before it.

    Only where the fused convolution costs no more multiply-accumulates than the pair, each of
    the pair counted with the groups its kernel has and the fused one as dense. For two dense
    pointwise convolutions that is ``c_in·c_out ≤ mid·(c_in + c_out)``: true for Sec. 5.3's
    wide-bottleneck MobileNetV2 (whose plain form is then MobileNetV1), false for the standard
    MobileNetV2, whose narrow bottleneck is cheaper to keep; false for a BN's per-channel map
    (with its reserved copies, a depthwise 1×1), which costs next to nothing on its own.
    """
    return list(iter_fused_linear_pairs(ops))


def iter_fused_linear_pairs(ops: Iterable[Op]) -> Iterator[Op]:
    """:func:`fuse_linear_pairs` one op at a time, holding one op back (the next may fuse into
    it): fed from an iterator that lets go of what it yields, the chain's dense float64 kernels
    (7 GB for a plain ResNet-152) are never all held twice."""
    prev: Op | None = None
    for op in ops:
        if prev is not None:
            fused = _fused_pair(prev, op)
            if fused is not None:
                prev = fused
                continue
            yield prev
        prev = op
    if prev is not None:
        yield prev


def _fused_pair(prev: Op, op: Op) -> ConvOp | None:
    if not (
        isinstance(op, ConvOp) and isinstance(prev, ConvOp) and prev.act is None and op.pointwise
    ):
        return None
    # The fused kernel counted dense: fuse only where that surely pays.
    taps = prev.kernel_size[0] * prev.kernel_size[1]
    pair = taps * prev.c_in * prev.c_out / group_layout(prev.kernel)[0]
    pair += prev.c_out * op.c_out / group_layout(op.kernel)[0]
    return compose_pointwise(prev, op) if taps * prev.c_in * op.c_out <= pair else None


# ------------------------------------------------------------------------- channel grouping
def group_layout(dense: np.ndarray) -> tuple[int, np.ndarray]:
    """Most groups a dense kernel splits into after reordering its outputs, and that order.

    Inputs keep their order (the previous op fixes it); an output belongs to the input block its
    non-zero weights read. Outputs that read nothing fill whichever block needs them.
    """
    c_in, c_out = dense.shape[2], dense.shape[3]
    reads = np.any(dense != 0, axis=(0, 1))  # (c_in, c_out)
    first = np.where(reads.any(0), reads.argmax(0), -1)
    last = np.where(reads.any(0), c_in - 1 - reads[::-1].argmax(0), -1)
    divisors = [g for g in range(1, min(c_in, c_out) + 1) if c_in % g == 0 and c_out % g == 0]
    for groups in reversed(divisors):
        size_in, size_out = c_in // groups, c_out // groups
        block = np.where(first >= 0, first // size_in, -1)
        if np.any((first >= 0) & (block != last // size_in)):
            continue
        counts = np.bincount(block[block >= 0], minlength=groups)
        if np.any(counts > size_out):
            continue
        free = list(np.flatnonzero(block < 0))
        order = []
        for g in range(groups):
            members = list(np.flatnonzero(block == g))
            need = size_out - len(members)
            order += members + free[:need]
            free = free[need:]
        return groups, np.asarray(order)
    return 1, np.arange(c_out)


def order_channels(ops: Iterable[Op]) -> list[tuple[Op, int]]:
    """Reorder each conv's outputs (and the next op's inputs) to expose groups: ``(op, groups)``.

    A conv whose outputs an output of the model (:class:`TapOp`) reads before the next
    convolution or dense layer does keeps its order and is left dense."""
    return list(iter_ordered_channels(ops))


def iter_ordered_channels(ops: Iterable[Op]) -> Iterator[tuple[Op, int]]:
    """:func:`order_channels` one segment at a time (a conv or dense layer and the ops up to the
    next one), so that an iterator that lets go of what it yields streams the chain."""
    segment: list[Op] = []
    order = None  # the permutation the previous segment's conv applied to its outputs
    for op in ops:
        if isinstance(op, ConvOp | DenseOp):
            if segment:
                emitted, order = _ordered_segment(segment)
                segment = []
                yield from emitted
                del emitted
            if order is not None:
                op, order = op.take_inputs(order), None
        segment.append(op)
    if segment:
        yield from _ordered_segment(segment)[0]


def _ordered_segment(segment: list[Op]) -> tuple[list[tuple[Op, int]], np.ndarray | None]:
    head, rest = segment[0], segment[1:]
    if not isinstance(head, ConvOp):
        return [(op, 1) for op in segment], None
    groups, order = group_layout(head.kernel)
    if groups > 1 and np.array_equal(order, np.arange(head.c_out)):
        return [(head, groups), *((op, 1) for op in rest)], None
    if groups == 1 or any(isinstance(op, TapOp) for op in rest):
        # Dense, or an output reads these channels in their own order (then kept dense).
        return [(head, 1), *((op, 1) for op in rest)], None
    return [(head.take_outputs(order), groups), *((op, 1) for op in rest)], order
