"""Model builders (``keras_dmr.models``); the public ones are also at the package top level."""

from keras_dmr.models.base import IMAGENET_STAGES, ResidualClassifier
from keras_dmr.models.mobilenet import MobileNetV2, from_keras_mobilenet_v2
from keras_dmr.models.networks import DMRNet, DMRNeXt, DVANet, ResNet
from keras_dmr.models.repvgg import REPVGG_STAGES, RepVGG
from keras_dmr.models.rmnext import RMNEXT_DEPTHS, RMNeXt

__all__ = [
    "IMAGENET_STAGES",
    "REPVGG_STAGES",
    "RMNEXT_DEPTHS",
    "DMRNeXt",
    "DMRNet",
    "DVANet",
    "MobileNetV2",
    "RMNeXt",
    "RepVGG",
    "ResNet",
    "ResidualClassifier",
    "from_keras_mobilenet_v2",
]
