"""Path-length analysis of Sec. 3.2 of the DMRNet paper (Fig. 3)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
import numpy as np

from keras_dmr.layers.blocks import ParallelBranchBlock
from keras_dmr.utils.files import save_figure


def _polynomial(coefficients: Mapping[int, int]) -> np.ndarray:
    p = np.zeros(max(coefficients) + 1, dtype=object)  # exact integers: counts reach 3^48
    for power, count in coefficients.items():
        p[power] += count
    return p


def path_length_distribution(model: keras.Model) -> dict[int, float]:
    """Fraction of all input-to-output paths of each length.

    Counted as in Sec. 3.2: each layer of a residual branch counts 1, conv0 and the classifier 1
    each, identity and projection shortcuts 0. The blocks are read from the model itself.

    Args:
        model: a model of the package's residual blocks.

    Returns:
        ``{path length: fraction of paths}``.
    """
    blocks = [layer for layer in model.layers if isinstance(layer, ParallelBranchBlock)]
    if not blocks:
        raise ValueError(
            f"model {model.name!r} has no ParallelBranchBlock layers: path lengths are defined "
            "for the package's residual, vanilla-assembly and merge-and-run models"
        )
    counts = np.array([1], dtype=object)
    for block in blocks:
        counts = np.convolve(counts, _polynomial(block.path_polynomial()))
    has_classifier = any(isinstance(layer, keras.layers.Dense) for layer in model.layers)
    offset = 1 + int(has_classifier)  # conv0 (+ the classifier)
    total = sum(counts)
    return {length + offset: float(c / total) for length, c in enumerate(counts) if c}


def path_length_stats(distribution: Mapping[int, float]) -> tuple[float, float]:
    """Mean and standard deviation of a path-length distribution.

    Args:
        distribution: ``{path length: fraction}``.

    Returns:
        ``(mean, standard deviation)``.
    """
    mean = sum(length * p for length, p in distribution.items())
    var = sum((length - mean) ** 2 * p for length, p in distribution.items())
    return mean, math.sqrt(var)


def plot_path_lengths(models: Mapping[str, keras.Model], path: str, *, title: str | None = None):
    """Draw Fig. 3: one path-length distribution per model, to a PNG at ``path``.

    Args:
        models: ``{label: model}``.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, model in models.items():
        dist = path_length_distribution(model)
        mean, std = path_length_stats(dist)
        lengths = sorted(dist)
        ax.plot(
            lengths,
            [dist[n] for n in lengths],
            marker="o",
            ms=3,
            label=f"{label}: {mean:.1f}±{std:.2f}",
        )
    ax.set_xlabel("path length")
    ax.set_ylabel("fraction of paths")
    ax.set_title(title or "Path-length distributions (DMRNet paper, Fig. 3)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
