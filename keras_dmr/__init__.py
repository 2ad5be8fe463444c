"""keras_dmr: merge-and-run networks and the RM operation for Keras 3 — train multi-branch,
deploy plain."""

__version__ = "0.1.0"

from keras_dmr import analysis, convert, data, export, layers, models, prune, recipe, tuning  # noqa: E402
from keras_dmr.convert import to_plain  # noqa: E402
from keras_dmr.models import (  # noqa: E402
    DMRNet,
    DMRNeXt,
    DVANet,
    MobileNetV2,
    RepVGG,
    ResNet,
    RMNeXt,
)

__all__ = [
    "DMRNeXt",
    "DMRNet",
    "DVANet",
    "MobileNetV2",
    "RMNeXt",
    "RepVGG",
    "ResNet",
    "analysis",
    "convert",
    "data",
    "export",
    "layers",
    "models",
    "prune",
    "recipe",
    "to_plain",
    "tuning",
    "__version__",
]
