"""The package's kernel math, in one place: merge-and-run matrices, branch stacking, Dirac kernels
and BatchNorm folding. Everything here is NumPy and runs in float64 unless told otherwise, so that
conversions cast to float32 once, at the end."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def merge_and_run_matrix(branches: int, channels: int) -> np.ndarray:
    """The (K·d)×(K·d) skip matrix of a merge-and-run block: K×K blocks of ``I/K`` (idempotent)."""
    if branches < 1 or channels < 1:
        raise ValueError(
            f"branches and channels must be >= 1; got branches={branches}, channels={channels}"
        )
    return np.kron(np.full((branches, branches), 1.0 / branches), np.eye(channels))


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
