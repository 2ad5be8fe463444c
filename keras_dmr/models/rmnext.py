"""RMNeXt: the RMNet paper's "RMNet D×E_C" family (Sec. 5.4, Tables 3 and 4).

Each RMBlock trains as an inverted residual block, ``1×1 → 3×3 grouped → 1×1`` with BN and ReLU,
plus a shortcut (identity, or a 1×1 stride-2 projection + BN where a stage starts), then ReLU:
:class:`~keras_dmr.layers.blocks.ParallelBranchBlock` with one ``"resnext"`` branch. With block
output width ``C_s`` (stage widths 64/128/256/512), the middle width is ``(E−1)·C_s`` and each
group of the 3×3 convolution has ``C·2^s`` channels (``C`` in the first stage, doubling with the
width). The RM operation (:func:`keras_dmr.convert.to_plain`) reserves the block input through
Dirac filters, so the plain network's middle width is ``(E−1)·C_s + C_in``: ``E·C_s`` in every
block but a stage's first, in groups of the same size, which is Table 4 for RMNet 26×3_32.

Depth is named as in the paper, ``3·(blocks) + 2``; the stem is one 3×3 convolution on CIFAR and
two 3×3 stride-2 convolutions on ImageNet ("two sequences of 3×3 Conv, BN, and ReLU"), each a
plain conv + BN + ReLU here.
"""

from __future__ import annotations

import keras

from keras_dmr.layers.blocks import ParallelBranchBlock
from keras_dmr.layers.conv import batch_norm, conv2d
from keras_dmr.models.base import (
    ResidualClassifier,
    check_model_kwargs,
    classifier_head,
    resolve_head,
    resolve_implementation,
)

# Table 3's caption: RMBlocks per stage for each depth.
RMNEXT_DEPTHS = {
    26: (2, 2, 2, 2),
    41: (2, 3, 5, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
RMNEXT_WIDTHS = (64, 128, 256, 512)
# Stride-2 operations: 3 stage transitions, plus the two strided stem convolutions on ImageNet.
_STRIDE_TWO_OPS = {"cifar": 3, "imagenet": 5}


def _positive_ints(argument: str, value, length: int) -> tuple[int, ...]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != length
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"`{argument}` must be {length} integers >= 1; got {value!r}")
    return tuple(value)


def block_plan(
    blocks_per_stage: tuple[int, ...],
    widths: tuple[int, ...],
    expansion: int,
    channels_per_group: int,
) -> list[dict]:
    """Per block: input and output channels, stride, middle width and groups (training form)."""
    plan = []
    c_in = widths[0]
    for s, (n, c_out) in enumerate(zip(blocks_per_stage, widths, strict=True)):
        group_width = channels_per_group * 2**s
        mid = (expansion - 1) * c_out
        for b in range(n):
            plan.append(
                dict(
                    stage=s,
                    block=b,
                    c_in=c_in,
                    c_out=c_out,
                    strides=2 if b == 0 and s > 0 else 1,
                    mid=mid,
                    group_width=group_width,
                    groups=mid // group_width,
                )
            )
            c_in = c_out
    return plan


def _groups_fit(plan: list[dict]) -> bool:
    """Whether every group width divides the block's middle width and its reserved input."""
    return all(p["mid"] % p["group_width"] == 0 and p["c_in"] % p["group_width"] == 0 for p in plan)


def _check_channels_per_group(blocks, widths, expansion, channels_per_group) -> None:
    if (
        isinstance(channels_per_group, bool)
        or not isinstance(channels_per_group, int)
        or channels_per_group < 1
        or not _groups_fit(block_plan(blocks, widths, expansion, channels_per_group))
    ):
        valid = [
            c
            for c in range(1, widths[0] + 1)
            if _groups_fit(block_plan(blocks, widths, expansion, c))
        ]
        raise ValueError(
            "`channels_per_group` (C, doubled in each later stage) must divide every stage's "
            "middle width (expansion−1)·width and the channels each block reserves (its input "
            f"width); for expansion={expansion} and widths={list(widths)} the valid values are "
            f"{valid}; got {channels_per_group!r}"
        )


@keras.saving.register_keras_serializable(package="keras_dmr")
class RMNeXt(ResidualClassifier):
    """RMNet D×E_C of the RMNet paper (Table 3): inverted residual blocks that RM makes plain.

    Args:
        depth: D, one of 26, 41, 50, 101, 152 (blocks per stage from Table 3's caption).
        expansion: E, the multiple of the stage widths the plain network's grouped 3×3
            convolutions have; the training form's middle width is ``(E−1)·width``.
        channels_per_group: C, channels per group of the 3×3 convolutions in the first stage
            (doubling with the stage width). The paper's rows use 8, 16 and 32.
        variant: ``"cifar"`` (one 3×3 stem conv, 32×32, 10 classes) or ``"imagenet"`` (two 3×3
            stride-2 stem convs, 224×224, 1000 classes).
        blocks_per_stage: four block counts replacing ``depth``'s (then ``depth`` must be None
            or ``3·sum + 2``); for small experiments.
        widths: the four stage widths (default 64, 128, 256, 512); the stem has ``widths[0]``.
        implementation: ``"split"``, ``"grouped"`` or ``"auto"`` (one branch: the same layers).
        input_shape, classes, include_top, pooling, classifier_activation, weights: as in
            ``keras.applications``; ``classifier_activation=None`` (default) outputs logits.
        compile: compile with the package's recipe so ``fit`` works.

    The authors' released code trains each stem convolution as a RepVGG block (3×3 and 1×1
    branches), which deploys as one 3×3 convolution; here it is that convolution from the start.
    """

    def __init__(
        self,
        depth: int | None = 26,
        *,
        expansion: int = 3,
        channels_per_group: int = 32,
        variant: str = "cifar",
        blocks_per_stage: tuple[int, ...] | None = None,
        widths: tuple[int, ...] = RMNEXT_WIDTHS,
        implementation: str = "auto",
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
            branch="resnext",
            family="RMNeXt's",
            downsamples=_STRIDE_TWO_OPS,
        )
        if blocks_per_stage is None:
            if not isinstance(depth, int) or depth not in RMNEXT_DEPTHS:
                raise ValueError(
                    f"`depth` must be one of {tuple(RMNEXT_DEPTHS)} (or give `blocks_per_stage`); "
                    f"got {depth!r}"
                )
            blocks = RMNEXT_DEPTHS[depth]
        else:
            blocks = _positive_ints("blocks_per_stage", blocks_per_stage, 4)
            implied = 3 * sum(blocks) + 2
            if depth is not None and depth != implied:
                raise ValueError(
                    f"`depth` must be None or {implied} (3·sum + 2) with "
                    f"blocks_per_stage={list(blocks)}; got {depth!r}"
                )
            depth = implied
        widths = _positive_ints("widths", widths, 4)
        if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 2:
            raise ValueError(f"`expansion` must be an integer >= 2; got {expansion!r}")
        _check_channels_per_group(blocks, widths, expansion, channels_per_group)
        implementation = resolve_implementation(implementation)

        inputs = keras.Input(shape=input_shape, name="images")
        if variant == "cifar":
            stem = [("stem", 1)]
        else:
            stem = [("stem1", 2), ("stem2", 2)]
        x = inputs
        for prefix, strides in stem:
            x = conv2d(widths[0], 3, strides=strides, name=f"{prefix}_conv")(x)
            x = batch_norm(name=f"{prefix}_bn")(x)
            x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
        for p in block_plan(blocks, widths, expansion, channels_per_group):
            x = ParallelBranchBlock(
                p["c_out"],
                branches=1,
                branch="resnext",
                strides=p["strides"],
                bottleneck_width=p["mid"],
                groups=p["groups"],
                implementation=implementation,
                name=f"stage{p['stage'] + 1}_block{p['block'] + 1}",
            )(x)
        x = classifier_head(
            x,
            include_top=include_top,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
        )
        default_name = f"rmnext{depth}x{expansion}_{channels_per_group}"
        check_model_kwargs(type(self).__name__, kwargs)
        super().__init__(inputs=inputs, outputs=x, name=name or default_name, **kwargs)
        self._finish(
            dict(
                depth=depth,
                expansion=expansion,
                channels_per_group=channels_per_group,
                variant=variant,
                blocks_per_stage=None if blocks_per_stage is None else list(blocks),
                widths=list(widths),
                implementation=implementation,
                input_shape=list(input_shape),
                classes=classes,
                include_top=include_top,
                pooling=pooling,
                classifier_activation=classifier_activation,
                compile=compile,
            ),
            weights,
        )
