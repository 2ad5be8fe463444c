"""The models the benchmark times, and the groups they are timed in side by side.

A *group* is one call of :func:`keras_dmr.utils.timing.interleaved`: every candidate in it (a
model, a form — residual or plain — and an engine) is timed A B A B, so ratios inside a group are
measured together. Builders are called lazily, one group at a time, with random weights.

"CIFAR ResNet-34" is the RMNet paper's baseline (Table 3: 21.2M parameters, 1.16 GFLOPs): the
ImageNet-style four-stage network of basic blocks [3, 4, 6, 3] with widths 64–512, a 3×3 stride-1
stem and no max-pool, on 32×32 inputs. ``keras_dmr.ResNet`` cannot express it (its CIFAR variant
has three stages; its ImageNet variant has the 7×7 stride-2 stem and max-pool, which leave 1×1
maps at stage 4 on 32×32). :func:`cifar_resnet34` builds it from standard Keras layers (the
package's post-activation basic block: conv-BN-ReLU-conv-BN, a 1×1 projection + BN where a stage
starts, add, ReLU):
21,299,146 parameters, 1.159G multiply-accumulates, the same network
``keras_dmr.models.base.build_graph`` gives with four stages, made of the layers every Keras user
knows. It is timed residual only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras

FORMS = ("residual", "plain")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to time: ``build()`` returns it (random weights, inference ready).

    ``forms`` says which forms to time: ``"residual"`` is the model as built, ``"plain"`` its
    :func:`keras_dmr.to_plain` form. ``accuracy`` is a published top-1 accuracy (%) on
    ``accuracy_dataset`` for the accuracy-against-throughput chart (plain and residual forms
    compute the same function, so they share it); ``accuracy_source`` says where it comes from.
    """

    label: str
    build: Callable[[], keras.Model]
    forms: tuple[str, ...] = FORMS
    accuracy: float | None = None
    accuracy_dataset: str | None = None
    accuracy_source: str | None = None
    plain_label: str | None = None

    def form_label(self, form: str) -> str:
        if form == "plain":
            return self.plain_label or f"{self.label} plain"
        return self.label


@dataclasses.dataclass(frozen=True)
class InferenceGroup:
    """Models timed together in inference. ``section`` is ``"families"`` (CIFAR-size inputs,
    the main protocol) or ``"peers"`` (ImageNet 224×224, the ``imagenet_*`` protocol);
    ``extra_engines`` are timed here besides the run's engines."""

    name: str
    section: str
    models: tuple[ModelSpec, ...]
    extra_engines: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainingGroup:
    """Models whose training step (and inference, TensorFlow graph) is timed together;
    ``pairs`` maps a model to the baseline its time is divided by."""

    name: str
    models: tuple[ModelSpec, ...]
    pairs: tuple[tuple[str, str], ...]


# ------------------------------------------------------------------------------------ builders
def cifar_resnet34(classes: int = 10) -> keras.Model:
    """The RMNet paper's CIFAR ResNet-34 (see the module docstring), from standard Keras layers."""
    from keras_dmr.layers.conv import batch_norm, conv2d

    inputs = keras.Input(shape=(32, 32, 3), name="images")
    x = conv2d(64, 3, name="stem_conv")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(batch_norm(name="stem_bn")(x))
    for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            name = f"stage{s + 1}_block{b + 1}"
            strides = 2 if b == 0 and s > 0 else 1
            y = conv2d(width, 3, strides=strides, name=f"{name}_conv1")(x)
            y = keras.layers.ReLU(name=f"{name}_relu1")(batch_norm(name=f"{name}_bn1")(y))
            y = batch_norm(name=f"{name}_bn2")(conv2d(width, 3, name=f"{name}_conv2")(y))
            shortcut = x
            if strides != 1 or x.shape[-1] != width:
                shortcut = conv2d(width, 1, strides=strides, name=f"{name}_proj")(x)
                shortcut = batch_norm(name=f"{name}_proj_bn")(shortcut)
            x = keras.layers.Add(name=f"{name}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{name}_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name="resnet34_cifar")


def _builder(
    cls_name: str, *args, compile: bool = False, jit_compile: bool = False, **kw
) -> Callable[[], keras.Model]:
    """A call that builds ``keras_dmr.<cls_name>(*args, **kw)`` with random weights; with
    ``compile`` the package's recipe (a training step needs an optimizer), with ``jit_compile``
    its training step compiled by XLA."""

    def build():
        from keras_dmr import models

        model = getattr(models, cls_name)(*args, compile=compile, **kw)
        if jit_compile:
            model.jit_compile = True
        return model

    return build


def _trainable(cls_name: str, depth: int, **kw) -> Callable[[], keras.Model]:
    return _builder(cls_name, depth, compile=True, **kw)


def _keras_resnet50() -> keras.Model:
    return keras.applications.ResNet50(weights=None, classifier_activation=None)


def _keras_mobilenet_v2() -> keras.Model:
    return keras.applications.MobileNetV2(weights=None, classifier_activation=None)


# ---------------------------------------------------------------- published accuracies (%)
# CIFAR-10 top-1 = 100 − the mean error of the DMRNet paper's Table 2 (1.5M-parameter row) and
# the RMNet paper's Tables 2 and 3. They were not measured here.
DMRNET_T2 = "DMRNet paper, Table 2 (CIFAR-10)"
RMNET_T2 = "RMNet paper, Table 2 (CIFAR-10; its MobileNetV2's bottleneck width is not stated)"
RMNET_T3 = "RMNet paper, Table 3 (CIFAR-10)"


def _spec(label, build, forms=FORMS, acc=None, source=None, plain_label=None, dataset=None):
    return ModelSpec(
        label,
        build,
        forms=forms,
        accuracy=acc,
        accuracy_dataset=dataset or ("CIFAR-10" if acc is not None else None),
        accuracy_source=source,
        plain_label=plain_label,
    )


def inference_groups() -> list[InferenceGroup]:
    """Every family (residual against plain, CIFAR 32×32) and the ImageNet peers (224×224)."""
    resnet34 = _spec(
        "CIFAR ResNet-34", cifar_resnet34, forms=("residual",), acc=95.64, source=RMNET_T3
    )
    return [
        InferenceGroup(
            "ResNet-98",
            "families",
            (_spec("ResNet-98", _builder("ResNet", 98), acc=100 - 5.26, source=DMRNET_T2),),
        ),
        InferenceGroup(
            "DMRNet-50",
            "families",
            (_spec("DMRNet-50", _builder("DMRNet", 50), acc=100 - 4.99, source=DMRNET_T2),),
        ),
        InferenceGroup(
            "DVANet-50",
            "families",
            (_spec("DVANet-50", _builder("DVANet", 50), acc=100 - 5.05, source=DMRNET_T2),),
        ),
        InferenceGroup(
            "RepVGG-21",
            "families",
            (
                _spec(
                    "RepVGG-21",
                    _builder("RepVGG", 21, reserve_ratio=0.0),
                    plain_label="RepVGG-21 deploy",
                ),
            ),
        ),
        InferenceGroup(
            "RM+RepVGG-21 (r=0.25)",
            "families",
            (
                _spec(
                    "RM+RepVGG-21 (r=0.25)",
                    _builder("RepVGG", 21, reserve_ratio=0.25),
                    plain_label="RM+RepVGG-21 (r=0.25) deploy",
                ),
            ),
        ),
        InferenceGroup(
            "RMNet 26×3_32 against CIFAR ResNet-34",
            "families",
            (
                _spec(
                    "RMNet 26×3_32",
                    _builder("RMNeXt", 26, expansion=3, channels_per_group=32),
                    acc=95.81,
                    source=RMNET_T3,
                    plain_label="RMNet 26×3_32 plain",
                ),
                resnet34,
            ),
            extra_engines=("saved_model",),
        ),
        InferenceGroup(
            "MobileNetV2 → RMNetV1",
            "families",
            (
                _spec(
                    "MobileNetV2 (CIFAR, f=8)",
                    _builder("MobileNetV2", variant="cifar"),
                    acc=92.07,
                    source=RMNET_T2,
                    plain_label="RMNetV1",
                ),
            ),
        ),
        InferenceGroup(
            "ImageNet peers",
            "peers",
            (
                _spec("keras.applications.ResNet50", _keras_resnet50, forms=("residual",)),
                _spec("keras.applications.MobileNetV2", _keras_mobilenet_v2, forms=("residual",)),
                _spec(
                    "ResNet-50 (keras_dmr)",
                    _builder("ResNet", 50, variant="imagenet"),
                    plain_label="ResNet-50 (keras_dmr) plain",
                ),
                _spec(
                    "RMNetV1 (CIFAR design at 224²)",
                    _builder(
                        "MobileNetV2", variant="cifar", input_shape=(224, 224, 3), classes=1000
                    ),
                    forms=("plain",),
                    plain_label="RMNetV1 (CIFAR design at 224²)",
                ),
            ),
        ),
    ]


# DMRNet paper, Table 2: DMRNet-d and the ResNet with the same parameters and branch layers.
TABLE2_PAIRS = ((14, 26), (20, 38), (38, 74), (50, 98))


def training_groups() -> list[TrainingGroup]:
    """Table 2's DMRNet/ResNet pairs, DVANet-50, grouped against split DMRNet, and the
    DMRNet-50/ResNet-98 pair with XLA-compiled training steps."""
    models, pairs = [], []
    for d, r in TABLE2_PAIRS:
        models.append(_spec(f"DMRNet-{d}", _trainable("DMRNet", d, implementation="split")))
        models.append(_spec(f"ResNet-{r}", _trainable("ResNet", r)))
        pairs.append((f"DMRNet-{d}", f"ResNet-{r}"))
    models.append(_spec("DVANet-50", _trainable("DVANet", 50, implementation="split")))
    pairs.append(("DVANet-50", "ResNet-98"))
    for d, r in ((14, 26), (50, 98)):
        label = f"DMRNet-{d} grouped"
        models.append(_spec(label, _trainable("DMRNet", d, implementation="grouped")))
        pairs.append((label, f"ResNet-{r}"))
        pairs.append((label, f"DMRNet-{d}"))
    # Whether XLA's fusion of the split/mean/concatenate around each block closes the gap.
    models.append(
        _spec("DMRNet-50 XLA", _trainable("DMRNet", 50, implementation="split", jit_compile=True))
    )
    models.append(_spec("ResNet-98 XLA", _trainable("ResNet", 98, jit_compile=True)))
    pairs += [("DMRNet-50 XLA", "ResNet-98 XLA"), ("DMRNet-50 XLA", "DMRNet-50")]
    return [TrainingGroup("Table 2 pairs", tuple(models), tuple(pairs))]


# --------------------------------------------------------------------------------- --quick
def quick_inference_groups() -> list[InferenceGroup]:
    """Small stand-ins that exercise every code path in seconds (their figures mean little)."""
    return [
        InferenceGroup(
            "ResNet-26 (quick)",
            "families",
            (_spec("ResNet-26", _builder("ResNet", 26), acc=100 - 6.62, source=DMRNET_T2),),
            extra_engines=("saved_model",),
        ),
        InferenceGroup(
            "ImageNet peers (quick)",
            "peers",
            (_spec("keras.applications.MobileNetV2", _keras_mobilenet_v2, forms=("residual",)),),
        ),
    ]


def quick_training_groups() -> list[TrainingGroup]:
    models = (
        _spec("DMRNet-14", _trainable("DMRNet", 14, implementation="split")),
        _spec("ResNet-26", _trainable("ResNet", 26)),
    )
    return [TrainingGroup("Table 2 pairs (quick)", models, (("DMRNet-14", "ResNet-26"),))]
