"""Model analysis: path lengths (DMRNet Sec. 3.2) and multiply-accumulate counts."""

from keras_dmr.analysis.flops import count_flops
from keras_dmr.analysis.paths import path_length_distribution, path_length_stats, plot_path_lengths

__all__ = ["count_flops", "path_length_distribution", "path_length_stats", "plot_path_lengths"]
