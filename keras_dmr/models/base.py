"""What every builder shares: argument checks, stem, stages of blocks, head, recipe compile."""

from __future__ import annotations

import dataclasses
import os

import keras

from keras_dmr.layers import RESIDUAL_BLOCKS
from keras_dmr.layers.blocks import (
    BRANCH_KINDS,
    IMPLEMENTATIONS,
    LAYERS_PER_BRANCH,
    ParallelBranchBlock,
    check_choice,
)
from keras_dmr.layers.conv import batch_norm, conv2d
from keras_dmr.layers.streams import BranchMean, TileBranches
from keras_dmr.recipe import compile_with_recipe, with_recipe_callbacks

VARIANTS = ("cifar", "imagenet")
POOLINGS = (None, "avg", "max")
# ImageNet depths: (branch kind, blocks per stage). 98 is the DMRNet paper's ResNet partner of
# DMRNet-50 (Table 6): two residual blocks for each merge-and-run block.
IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    98: ("bottleneck", (6, 8, 12, 6)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
DEFAULT_SHAPES = {"cifar": (32, 32, 3), "imagenet": (224, 224, 3)}
DEFAULT_CLASSES = {"cifar": 10, "imagenet": 1000}
STRIDE_TWO_OPS = {"cifar": 2, "imagenet": 5}


def resolve_implementation(implementation: str) -> str:
    """``"auto"`` → ``"split"``. Measured (docs/benchmarks.md): on a 2-core CPU ``"split"``
    trains 1.0–1.2× faster than ``"grouped"``; on an H100 (JAX) ``"grouped"`` takes 0.64× the
    split form's time, so pass it there. ``"auto"`` does not look at the device: the two forms
    hold their weights differently, and a model built the same way everywhere loads everywhere."""
    if implementation == "auto":
        return "split"
    check_choice("implementation", implementation, (*IMPLEMENTATIONS, "auto"))
    return implementation


@dataclasses.dataclass(frozen=True)
class Stage:
    blocks: int
    filters: int
    bottleneck_width: int | None = None
    groups: int = 1


def cifar_blocks_per_stage(depth, branch: str) -> int:
    """n in depth = 3·B·n + 2, with B layers per branch."""
    b = LAYERS_PER_BRANCH[branch]
    if not isinstance(depth, int) or depth < 3 * b + 2 or (depth - 2) % (3 * b):
        valid = ", ".join(str(3 * b * n + 2) for n in range(1, 6))
        raise ValueError(
            f"`depth` must be 3·{b}·n + 2 for branch={branch!r} on the CIFAR variant "
            f"({valid}, ...); got {depth!r}"
        )
    return (depth - 2) // (3 * b)


def imagenet_plan(depth, branch: str | None) -> tuple[str, tuple[int, ...]]:
    if depth not in IMAGENET_STAGES:
        raise ValueError(
            f"`depth` must be one of {tuple(IMAGENET_STAGES)} on the ImageNet variant; "
            f"got {depth!r}"
        )
    kind, blocks = IMAGENET_STAGES[depth]
    if branch is not None and branch != kind:
        raise ValueError(
            f"`branch` must be {kind!r} (or None) for depth={depth} on the ImageNet variant; "
            f"got {branch!r}"
        )
    return kind, blocks


def check_common(
    *,
    variant,
    branches,
    width,
    classes,
    input_shape,
    pooling,
    branch,
    classifier_activation=None,
    weights=None,
    family: str = "the",
    downsamples: int | None = None,
):
    """The checks every builder shares: one home for each argument's rule and message.
    ``downsamples`` (default: the variant's stride-2 operations of the merge-and-run family)
    sets the smallest input size, named after ``family`` ("RepVGG's") in the message."""
    check_choice("variant", variant, VARIANTS)
    check_head_and_weights(classifier_activation, weights)
    if branch is not None:
        check_choice("branch", branch, BRANCH_KINDS)
    check_choice("pooling", pooling, POOLINGS)
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"`branches` must be an integer >= 1; got {branches!r}")
    if not isinstance(width, int | float) or width <= 0:
        raise ValueError(f"`width` must be a number > 0; got {width!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"`classes` must be an integer >= 1; got {classes!r}")
    if len(input_shape) != 3 or (input_shape[-1] is not None and input_shape[-1] < 1):
        raise ValueError(f"`input_shape` must be (height, width, channels); got {input_shape!r}")
    times = STRIDE_TWO_OPS[variant] if downsamples is None else downsamples
    smallest = 2**times
    if any(s is not None and s < smallest for s in input_shape[:2]):
        raise ValueError(
            f"`input_shape` {tuple(input_shape)} is too small for {family} {variant} variant, "
            f"which downsamples {times} times: height and width must be >= {smallest}"
        )


def resolve_head(
    variant: str,
    input_shape,
    classes,
    *,
    pooling,
    classifier_activation,
    weights,
    branches: int = 1,
    width: float = 1,
    branch: str | None = None,
    family: str = "the",
    downsamples: dict[str, int] | None = None,
) -> tuple[tuple, int]:
    """Every builder's first step: the variant checked, ``input_shape`` and ``classes``
    defaulted from it, then :func:`check_common` (``downsamples``: the family's stride-2
    operations per variant). Returns ``(input_shape, classes)``."""
    check_choice("variant", variant, DEFAULT_SHAPES)
    input_shape = tuple(input_shape or DEFAULT_SHAPES[variant])
    classes = DEFAULT_CLASSES[variant] if classes is None else classes
    check_common(
        variant=variant,
        branches=branches,
        width=width,
        classes=classes,
        input_shape=input_shape,
        pooling=pooling,
        branch=branch,
        classifier_activation=classifier_activation,
        weights=weights,
        family=family,
        downsamples=None if downsamples is None else downsamples[variant],
    )
    return input_shape, classes


def check_head_and_weights(classifier_activation, weights) -> None:
    if classifier_activation is not None:
        try:
            keras.activations.get(classifier_activation)
        except ValueError:
            raise ValueError(
                "`classifier_activation` must be None (logits), a callable or the name of a Keras "
                f"activation such as 'softmax'; got {classifier_activation!r}"
            ) from None
    if weights is None:
        return
    if weights == "imagenet":
        raise ValueError(
            "`weights` must be None or the path of a weights file (`model.save_weights`): "
            "keras_dmr ships no pretrained weights; keras.applications' ImageNet ResNet50/101/152 "
            "and MobileNetV2 (and any residual Keras model) convert with keras_dmr.to_plain"
        )
    if not isinstance(weights, str | os.PathLike) or not os.path.isfile(weights):
        raise ValueError(f"`weights` must be None or the path of a weights file; got {weights!r}")


def scaled(value: int, width: float) -> int:
    return max(1, int(round(value * width)))


def build_graph(
    *,
    variant: str,
    stem_filters: int,
    stages: list[Stage],
    branch: str,
    branches: int,
    mapping: str,
    implementation: str,
    share_stem_and_head: bool,
    input_shape,
    classes: int,
    include_top: bool,
    pooling,
    classifier_activation,
    feature_outputs: bool = False,
):
    """Inputs, outputs and pyramid of a network: stem → stages of blocks → pooling →
    classifier. The pyramid is every stage's output keyed ``"P<level>"`` as KerasHub's
    ``pyramid_outputs`` are (level: log2 of the stage's stride from the input); with
    ``feature_outputs`` it is the outputs (no head)."""
    check_feature_outputs(feature_outputs, include_top, pooling)
    inputs = keras.Input(shape=input_shape, name="images")
    stacked = mapping != "vanilla"
    copies = branches if stacked and not share_stem_and_head else 1
    if variant == "cifar":
        x = conv2d(stem_filters * copies, 3, name="stem_conv")(inputs)
    else:
        x = conv2d(stem_filters * copies, 7, strides=2, name="stem_conv")(inputs)
    x = batch_norm(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    if variant == "imagenet":
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    if stacked and share_stem_and_head and branches > 1:
        x = TileBranches(branches, name="stem_tile")(x)
    level = 0 if variant == "cifar" else 2
    pyramid = {}
    for s, stage in enumerate(stages):
        level += 1 if s > 0 else 0
        for b in range(stage.blocks):
            x = ParallelBranchBlock(
                stage.filters,
                branches=branches,
                mapping=mapping,
                branch=branch,
                strides=2 if b == 0 and (s > 0) else 1,
                bottleneck_width=stage.bottleneck_width,
                groups=stage.groups,
                implementation=implementation,
                name=f"stage{s + 1}_block{b + 1}",
            )(x)
        pyramid[f"P{level}"] = x
    if feature_outputs:
        return inputs, dict(pyramid), pyramid
    shared_head = stacked and share_stem_and_head and branches > 1
    x = classifier_head(
        x,
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        merge=BranchMean(branches, name="branch_mean") if shared_head else None,
    )
    return inputs, x, pyramid


def check_feature_outputs(feature_outputs, include_top, pooling) -> None:
    if not isinstance(feature_outputs, bool):
        raise ValueError(f"`feature_outputs` must be True or False; got {feature_outputs!r}")
    if feature_outputs and (include_top or pooling is not None):
        raise ValueError(
            "`feature_outputs=True` returns the stages' feature maps, so it needs "
            f"`include_top=False` and `pooling=None`; got include_top={include_top!r}, "
            f"pooling={pooling!r}"
        )


def classifier_head(x, *, include_top, pooling, classes, classifier_activation, merge=None):
    """keras.applications' head: global average pooling and the Dense ``predictions`` layer, or
    with ``include_top=False`` the optional ``pooling``. ``merge`` runs between the two."""
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if merge is not None:
            x = merge(x)
        return keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer="he_normal",
            name="predictions",
        )(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


MODEL_KWARGS = ("trainable", "dtype")  # what the builders pass on to keras.Model


def check_model_kwargs(builder: str, kwargs: dict) -> None:
    """Refuse keyword arguments a builder would otherwise hand to ``keras.Model``, which drops
    unknown ones silently (``DMRNeXt(width=2)`` used to build a DMRNeXt of width 1)."""
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise ValueError(
            f"{builder}() does not take {', '.join(repr(k) for k in unknown)}; see its docstring "
            "for the arguments it has"
        )


class ResidualClassifier(keras.Model):
    """Base of the package's builders: a functional model that trains with the paper's recipe.

    Subclasses build their graph in ``__init__`` and return their constructor arguments from
    ``get_config``, so ``from_config`` rebuilds them and ``.keras`` files load in safe mode.
    """

    def _finish(self, config: dict, weights: str | None, pyramid: dict | None = None) -> None:
        """Keep the constructor arguments for ``get_config``, load weights, compile.
        ``pyramid``: the stages' outputs by level, kept as ``pyramid_outputs`` (KerasHub's
        attribute: ``keras.Model(model.inputs, model.pyramid_outputs)`` is a backbone)."""
        self._config = config
        if pyramid is not None:
            self.pyramid_outputs = pyramid
        if weights is not None:
            self.load_weights(weights)
        if config["compile"] and config["include_top"]:
            compile_with_recipe(self, from_logits=config["classifier_activation"] is None)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self._config}

    def fit(self, x=None, *args, callbacks=None, **kwargs):
        if "shuffle" not in kwargs and type(x).__module__.startswith("tensorflow"):
            kwargs["shuffle"] = False  # a tf.data pipeline shuffles itself; Keras would warn
        return super().fit(x, *args, callbacks=with_recipe_callbacks(self, callbacks), **kwargs)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

    @property
    def blocks(self) -> list[keras.layers.Layer]:
        """The residual blocks, in order: the layers that rewrite themselves (``plain_ops``)."""
        return [layer for layer in self.layers if isinstance(layer, RESIDUAL_BLOCKS)]
