"""keras_dmr: merge-and-run networks and the RM operation for Keras 3 — train multi-branch,
deploy plain."""

import importlib as _importlib

from keras_dmr import analysis, convert, layers, models, recipe  # noqa: E402
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
from keras_dmr.version import __version__

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

# Imported on first use: they need TensorFlow (tf.data, SavedModel, tf2onnx) or Keras Tuner,
# while models, conversion and counting run on any Keras backend.
_LAZY = ("data", "export", "prune", "tuning")


def __getattr__(name: str):
    if name in _LAZY:
        module = _importlib.import_module(f"keras_dmr.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'keras_dmr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
