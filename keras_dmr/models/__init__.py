"""Model builders (``keras_dmr.models``); the public ones are also at the package top level."""

from keras_dmr.models.base import IMAGENET_STAGES, ResidualClassifier
from keras_dmr.models.networks import DMRNet, DMRNeXt, DVANet, ResNet

__all__ = ["IMAGENET_STAGES", "DMRNeXt", "DMRNet", "DVANet", "ResNet", "ResidualClassifier"]
