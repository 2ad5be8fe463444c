"""RepVGG and RM+RepVGG with a reserving ratio (RMNet paper, Sec. 4.3 and 5.2, Fig. 5 and 8).

Stages are made of pairs of :class:`~keras_dmr.layers.RepVGGBlock`: the first block of a pair
reserves ``floor(r·C)`` channels, the second (an ordinary block) merges them back, so each pair is
a residual connection across one non-linear layer. ``reserve_ratio=0`` is RepVGG; ``1`` is RepVGG
of half depth. For every r < 1 ``keras_dmr.convert.to_plain`` gives the same plain network: one
3×3 convolution + ReLU per block, then global average pooling and the classifier.

Depth counts like the paper's Fig. 8: ``depth = sum(blocks_per_stage) + 5``; RepVGG-21/37/69/133
have [4,4,4,4]/[8,8,8,8]/[16,16,16,16]/[32,32,32,32] blocks in their stages. The five are:

* ``variant="imagenet"``: five stride-2 blocks, two in the stem (3→w, w→w) and one entering
  each of stages 2-4; depth = the number of 3×3 convolution layers (the classifier is not
  counted, as in the paper).
* ``variant="cifar"``: one stride-1 stem block (3→w) and three stride-2 blocks entering stages
  2-4; the fifth is the classifier, so depth = 3×3 convolution layers + the Dense layer
  (the ResNet way of counting). RepVGG-21 on CIFAR has 20 convolutions and one Dense layer.

Stage widths are ``base_width·(1, 2, 4, 8)``; the stem blocks have ``base_width`` channels.
"""

from __future__ import annotations

import keras

from keras_dmr.layers.repvgg import RepVGGBlock, check_reserve_ratio
from keras_dmr.models.base import (
    ResidualClassifier,
    check_model_kwargs,
    classifier_head,
    resolve_head,
)

REPVGG_STAGES = {
    21: (4, 4, 4, 4),
    37: (8, 8, 8, 8),
    69: (16, 16, 16, 16),
    133: (32, 32, 32, 32),
}
EXTRA_LAYERS = 5  # Fig. 8: "additional five RepBlocks" (CIFAR: four blocks and the classifier)
STAGE_MULTIPLIERS = (1, 2, 4, 8)
STRIDE_TWO_BLOCKS = {"cifar": 3, "imagenet": 5}


def _check_blocks(blocks_per_stage) -> tuple[int, ...]:
    blocks = tuple(blocks_per_stage) if isinstance(blocks_per_stage, list | tuple) else None
    if (
        blocks is None
        or len(blocks) != 4
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 2 or b % 2 for b in blocks)
    ):
        raise ValueError(
            "`blocks_per_stage` must be 4 even integers >= 2 (pairs of blocks per stage), e.g. "
            f"(4, 4, 4, 4); got {blocks_per_stage!r}"
        )
    return blocks


def repvgg_plan(depth, blocks_per_stage=None) -> tuple[int, tuple[int, ...]]:
    """``(depth, blocks per stage)`` from a paper depth or an explicit ``blocks_per_stage``."""
    if blocks_per_stage is not None:
        blocks = _check_blocks(blocks_per_stage)
        return sum(blocks) + EXTRA_LAYERS, blocks
    if isinstance(depth, bool) or depth not in REPVGG_STAGES:
        raise ValueError(
            f"`depth` must be one of {tuple(REPVGG_STAGES)} (or give `blocks_per_stage`); "
            f"got {depth!r}"
        )
    return depth, REPVGG_STAGES[depth]


@keras.saving.register_keras_serializable(package="keras_dmr")
class RepVGG(ResidualClassifier):
    """RepVGG (r = 0) and RM+RepVGG with a reserving ratio r (RMNet paper, Fig. 5 and 8).

    Args:
        depth: 21, 37, 69 or 133 (see the module docstring for the counting rule).
        reserve_ratio: r in [0, 1], the fraction of channels the first block of each pair
            passes through (the paper finds 0.25 best at depth 21/37, 0.5 at 69, 0.75 at 133).
        base_width: channels of the stem and the first stage (stages: ×1, ×2, ×4, ×8).
        variant: ``"cifar"`` (stride-1 stem block, three stride-2 blocks) or ``"imagenet"``
            (two stride-2 stem blocks, five stride-2 blocks in all).
        blocks_per_stage: 4 even integers replacing the plan of ``depth`` (for small tests and
            tuning); the model's depth is then ``sum(blocks_per_stage) + 5``.
        input_shape, classes, include_top, pooling, classifier_activation, weights: as in
            ``keras.applications``; ``classifier_activation=None`` (default) outputs logits.
        compile: compile with the package recipe (:mod:`keras_dmr.recipe`) so ``fit`` works.

    Cannot: change the stage widths individually or the stem width separately from
    ``base_width``; convert to plain without a fixed input size (stride-2 blocks need it).
    """

    def __init__(
        self,
        depth: int = 21,
        *,
        reserve_ratio: float = 0.0,
        base_width: int = 64,
        variant: str = "cifar",
        blocks_per_stage: tuple[int, ...] | None = None,
        input_shape: tuple | None = None,
        classes: int | None = None,
        include_top: bool = True,
        pooling: str | None = None,
        classifier_activation: str | None = None,
        weights: str | None = None,
        compile: bool = True,
        name: str | None = None,
        **kwargs,
    ):
        input_shape, classes = resolve_head(
            variant,
            input_shape,
            classes,
            pooling=pooling,
            classifier_activation=classifier_activation,
            weights=weights,
            family="RepVGG's",
            downsamples=STRIDE_TWO_BLOCKS,
        )
        depth, blocks = repvgg_plan(depth, blocks_per_stage)
        reserve_ratio = check_reserve_ratio(reserve_ratio)
        if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"`base_width` must be an integer >= 1; got {base_width!r}")

        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        if variant == "cifar":
            x = RepVGGBlock(base_width, name="stem")(x)
        else:
            x = RepVGGBlock(base_width, strides=2, name="stem1")(x)
            x = RepVGGBlock(base_width, strides=2, name="stem2")(x)
        for s, (n, mult) in enumerate(zip(blocks, STAGE_MULTIPLIERS, strict=True)):
            width = base_width * mult
            if s > 0:
                x = RepVGGBlock(width, strides=2, name=f"stage{s + 1}_down")(x)
            for b in range(n):
                ratio = reserve_ratio if b % 2 == 0 else 0.0
                x = RepVGGBlock(width, reserve_ratio=ratio, name=f"stage{s + 1}_block{b + 1}")(x)
        x = classifier_head(
            x,
            include_top=include_top,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
        )
        percent = round(100 * reserve_ratio)
        default = f"rm_repvgg{depth}_r{percent}" if reserve_ratio else f"repvgg{depth}"
        check_model_kwargs(type(self).__name__, kwargs)
        super().__init__(inputs=inputs, outputs=x, name=name or default, **kwargs)
        self.depth = depth
        self._finish(
            dict(
                depth=depth,
                reserve_ratio=reserve_ratio,
                base_width=base_width,
                variant=variant,
                blocks_per_stage=list(blocks),
                input_shape=list(input_shape),
                classes=classes,
                include_top=include_top,
                pooling=pooling,
                classifier_activation=classifier_activation,
                compile=compile,
            ),
            weights,
        )
