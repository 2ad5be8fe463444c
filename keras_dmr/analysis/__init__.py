"""Model analysis: path lengths (DMRNet Sec. 3.2)."""

from keras_dmr.analysis.paths import path_length_distribution, path_length_stats, plot_path_lengths

__all__ = ["path_length_distribution", "path_length_stats", "plot_path_lengths"]
