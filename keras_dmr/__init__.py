"""keras_dmr: merge-and-run networks and the RM operation for Keras 3 — train multi-branch,
deploy plain."""

__version__ = "0.1.0"

from keras_dmr import analysis, data, layers, models, recipe  # noqa: E402
from keras_dmr.models import DMRNet, DMRNeXt, DVANet, ResNet  # noqa: E402

__all__ = [
    "DMRNeXt",
    "DMRNet",
    "DVANet",
    "ResNet",
    "analysis",
    "data",
    "layers",
    "models",
    "recipe",
    "__version__",
]
