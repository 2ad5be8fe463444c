"""Public builders: DMRNet, DVANet, ResNet and DMRNeXt (DMRNet paper, Tables 1-6).

Depth counts the layers on the longest path: conv0 + B layers per block + the classifier. On the
CIFAR variant (3 stages, 32×32) ``depth = 3·B·n + 2`` with n blocks per stage (6n + 2 for
``basic``/``xception`` branches, 9n + 2 for ``bottleneck``/``resnext``), for every assembly, so
``DMRNet(depth=50)`` has 24 merge-and-run blocks and ``ResNet(depth=98)`` 48 residual blocks.
The ImageNet variant (4 stages, 224×224, 7×7 stem) takes the depths of ``IMAGENET_STAGES``.
"""

from __future__ import annotations

import keras

from keras_dmr.layers.blocks import check_choice
from keras_dmr.models.base import (
    DEFAULT_SHAPES,
    ResidualClassifier,
    Stage,
    build_graph,
    check_common,
    check_model_kwargs,
    cifar_blocks_per_stage,
    imagenet_plan,
    resolve_head,
    resolve_implementation,
    scaled,
)

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4


def _plan(variant, depth, branch, widths, width):
    """Branch kind and stages for the basic/bottleneck/xception families."""
    if variant == "cifar":
        kind = branch or "basic"
        n = cifar_blocks_per_stage(depth, kind)
        blocks = (n,) * 3
        widths = widths or CIFAR_WIDTHS
    else:
        kind, blocks = imagenet_plan(depth, branch)
        widths = widths or IMAGENET_WIDTHS
    if kind == "resnext":
        raise ValueError("`branch='resnext'` is DMRNeXt's: use keras_dmr.DMRNeXt")
    if len(widths) != len(blocks):
        raise ValueError(
            f"`widths` must have {len(blocks)} entries for the {variant} variant; got {widths!r}"
        )
    stages = []
    for n, w in zip(blocks, widths, strict=True):
        inner = scaled(w, width)
        if kind == "bottleneck":
            stages.append(Stage(n, inner * BOTTLENECK_EXPANSION, bottleneck_width=inner))
        else:
            stages.append(Stage(n, inner))
    return kind, stages, scaled(widths[0], width) if variant == "cifar" else 64


class _AssemblyNet(ResidualClassifier):
    """Shared constructor of DMRNet, DVANet and ResNet (they differ in mapping and K)."""

    def __init__(
        self,
        depth: int,
        *,
        branches: int,
        mapping: str,
        width: float = 1,
        branch: str | None = None,
        widths: tuple[int, ...] | None = None,
        share_stem_and_head: bool = True,
        implementation: str = "auto",
        variant: str = "cifar",
        input_shape: tuple | None = None,
        classes: int | None = None,
        include_top: bool = True,
        pooling: str | None = None,
        classifier_activation: str | None = None,
        weights: str | None = None,
        compile: bool = True,
        feature_outputs: bool = False,
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
            branches=branches,
            width=width,
            branch=branch,
        )
        check_choice("mapping", mapping, ("merge_and_run", "identity", "vanilla"))
        implementation = resolve_implementation(implementation)
        kind, stages, stem = _plan(variant, depth, branch, widths and tuple(widths), width)
        inputs, outputs, pyramid = build_graph(
            variant=variant,
            stem_filters=stem,
            stages=stages,
            branch=kind,
            branches=branches,
            mapping=mapping,
            implementation=implementation,
            share_stem_and_head=share_stem_and_head,
            input_shape=input_shape,
            classes=classes,
            include_top=include_top,
            pooling=pooling,
            classifier_activation=classifier_activation,
            feature_outputs=feature_outputs,
        )
        check_model_kwargs(type(self).__name__, kwargs)
        super().__init__(
            inputs=inputs, outputs=outputs, name=name or self.default_name(depth), **kwargs
        )
        self._finish(
            dict(
                depth=depth,
                branches=branches,
                mapping=mapping,
                width=width,
                branch=kind,
                widths=list(widths) if widths else None,
                share_stem_and_head=share_stem_and_head,
                implementation=implementation,
                variant=variant,
                input_shape=list(input_shape),
                classes=classes,
                include_top=include_top,
                pooling=pooling,
                classifier_activation=classifier_activation,
                compile=compile,
                feature_outputs=feature_outputs,
            ),
            weights,
            pyramid,
        )

    def default_name(self, depth):
        return f"{type(self).__name__.lower()}{depth}"


@keras.saving.register_keras_serializable(package="keras_dmr")
class DMRNet(_AssemblyNet):
    """Deep merge-and-run network: K residual branches per block, merged by the I/K matrix.

    Args:
        depth: layers on the longest path (CIFAR: 6n + 2 for basic branches; ImageNet: 50, ...).
        branches: K, the parallel branches per block (the paper's default 2).
        width: multiplier of the per-branch widths (``width=4`` is DMRNet-Wide: 64/128/256).
        branch: ``"basic"`` (default on CIFAR), ``"bottleneck"`` or ``"xception"``.
        mapping: ``"merge_and_run"`` or ``"identity"`` (Table 7's ablation: K separate ResNets).
        widths: per-branch widths of the stages before ``width`` (CIFAR default (16, 32, 64)).
        share_stem_and_head: with ``mapping="identity"``, ``False`` gives every stream its own
            conv0 and classifier (Table 7, "w/o sharing"; the logits are summed).
        implementation: ``"split"``, ``"grouped"`` or ``"auto"`` (always ``"split"``: the
            faster form on CPU; pass ``"grouped"`` on a GPU, see ``resolve_implementation``).
        variant: ``"cifar"`` (3 stages, 32×32) or ``"imagenet"`` (4 stages, 224×224).
        input_shape, classes, include_top, pooling, classifier_activation, weights: as in
            ``keras.applications``; ``classifier_activation=None`` (default) outputs logits.
        compile: compile with the paper's recipe (:mod:`keras_dmr.recipe`) so ``fit`` works.
        feature_outputs: with ``include_top=False``, output every stage's feature map, a dict
            keyed ``"P<level>"`` (KerasHub's ``pyramid_outputs`` naming; CIFAR: P0, P1, P2;
            ImageNet: P2 to P5) for a detector or segmenter; the maps of a multi-branch
            network hold its K branches stacked on the channel axis. The same dict is the
            model's ``pyramid_outputs`` attribute either way.
    """

    def __init__(self, depth: int = 50, *, branches: int = 2, mapping: str = "merge_and_run", **kw):
        if mapping == "vanilla":
            raise ValueError(
                "`mapping` must be 'merge_and_run' or 'identity'; use DVANet for 'vanilla'"
            )
        super().__init__(depth, branches=branches, mapping=mapping, **kw)


@keras.saving.register_keras_serializable(package="keras_dmr")
class DVANet(_AssemblyNet):
    """Deep vanilla-assembly network (Eq. 2): K branches read one input; outputs summed with it.

    Arguments as :class:`DMRNet`; ``mapping`` can only be ``"vanilla"`` (what the saved config
    holds): anything else is an error, never silently ignored.

    Args:
        depth: as :class:`DMRNet`.
        branches: K, the branches that read the block's input.
        mapping: ``"vanilla"`` only.
        **kw: the other arguments of :class:`DMRNet`.
    """

    def __init__(self, depth: int = 50, *, branches: int = 2, mapping: str = "vanilla", **kw):
        if mapping != "vanilla":
            raise ValueError(
                f"`mapping` of a DVANet is 'vanilla' (vanilla assembly, Eq. 2); use DMRNet for "
                f"'merge_and_run' or 'identity'; got {mapping!r}"
            )
        super().__init__(depth, branches=branches, mapping="vanilla", **kw)


@keras.saving.register_keras_serializable(package="keras_dmr")
class ResNet(_AssemblyNet):
    """Post-activation ResNet with projection shortcuts (the K = 1 case of both assemblies).

    CIFAR: ``ResNet(depth=98)`` is DMRNet-50's Table 2 partner; ``widths=(23, 46, 92)`` gives
    the "wide ResNet" of the same table. ImageNet: depths 18, 34, 50, 98, 101, 152.
    Arguments as :class:`DMRNet`; ``branches`` can only be 1 and ``mapping`` only
    ``"merge_and_run"`` (what the saved config holds; with one branch every mapping is the plain
    residual): anything else is an error, never silently ignored.

    Args:
        depth: CIFAR 6n + 2, or an ImageNet depth (18, 34, 50, 98, 101, 152).
        widths: output channels per stage (default: the depth's standard widths).
        branches: 1 only.
        mapping: ``"merge_and_run"`` only.
        **kw: the other arguments of :class:`DMRNet`.
    """

    def __init__(
        self,
        depth: int = 98,
        widths: tuple[int, ...] | None = None,
        *,
        branches: int = 1,
        mapping: str = "merge_and_run",
        **kw,
    ):
        if branches != 1:
            raise ValueError(
                f"`branches` of a ResNet is 1; use DMRNet or DVANet for K > 1; got {branches!r}"
            )
        if mapping != "merge_and_run":
            raise ValueError(
                f"`mapping` of a ResNet is 'merge_and_run' (one branch: the plain residual); use "
                f"DMRNet or DVANet for other mappings; got {mapping!r}"
            )
        super().__init__(depth, branches=1, mapping="merge_and_run", widths=widths, **kw)


@keras.saving.register_keras_serializable(package="keras_dmr")
class DMRNeXt(ResidualClassifier):
    """Merge-and-run blocks whose branches are ResNeXt blocks (DMRNet paper Sec. 4.3, Table 5).

    From ResNeXt-29 (C×64d): the C transformed bottlenecks of a ResNeXt block are split over K
    merge-and-run branches, each a ResNeXt block of cardinality C/K. Stage widths (256, 512,
    1024) per branch; bottleneck width ``bottleneck_width·2^stage`` per group. Depth 9n + 2.

    Args:
        depth: 9n + 2 (29: ResNeXt-29).
        branches: K, the merge-and-run branches; must divide ``cardinality``.
        cardinality: C, the groups of the ResNeXt block the K branches share.
        bottleneck_width: channels per group in the first stage (doubling per stage).
        widths: output channels of each stage, per branch.
        stem_filters: channels of the first convolution.
        implementation: ``"auto"``, ``"split"`` or ``"grouped"`` (as :class:`DMRNet`).
        input_shape, classes, include_top, pooling, classifier_activation, weights, compile,
            feature_outputs, name: as keras.applications and :class:`DMRNet`.
    """

    def __init__(
        self,
        depth: int = 29,
        *,
        branches: int = 2,
        cardinality: int = 6,
        bottleneck_width: int = 64,
        widths: tuple[int, ...] = (256, 512, 1024),
        stem_filters: int = 64,
        implementation: str = "auto",
        input_shape: tuple | None = None,
        classes: int = 10,
        include_top: bool = True,
        pooling: str | None = None,
        classifier_activation: str | None = None,
        weights: str | None = None,
        compile: bool = True,
        feature_outputs: bool = False,
        name: str | None = None,
        **kwargs,
    ):
        input_shape = tuple(input_shape or DEFAULT_SHAPES["cifar"])
        check_common(
            variant="cifar",
            branches=branches,
            width=1,
            classes=classes,
            input_shape=input_shape,
            pooling=pooling,
            branch="resnext",
            classifier_activation=classifier_activation,
            weights=weights,
        )
        if not isinstance(cardinality, int) or cardinality < branches or cardinality % branches:
            raise ValueError(
                f"`cardinality` must be a positive multiple of `branches` ({branches}); "
                f"got {cardinality!r}"
            )
        if len(widths) != 3:
            raise ValueError(f"`widths` must have 3 entries; got {widths!r}")
        implementation = resolve_implementation(implementation)
        n = cifar_blocks_per_stage(depth, "resnext")
        groups = cardinality // branches
        stages = [
            Stage(n, w, bottleneck_width=groups * bottleneck_width * 2**s, groups=groups)
            for s, w in enumerate(widths)
        ]
        inputs, outputs, pyramid = build_graph(
            variant="cifar",
            stem_filters=stem_filters,
            stages=stages,
            branch="resnext",
            branches=branches,
            mapping="merge_and_run",
            implementation=implementation,
            share_stem_and_head=True,
            input_shape=input_shape,
            classes=classes,
            include_top=include_top,
            pooling=pooling,
            classifier_activation=classifier_activation,
            feature_outputs=feature_outputs,
        )
        check_model_kwargs(type(self).__name__, kwargs)
        super().__init__(inputs=inputs, outputs=outputs, name=name or f"dmrnext{depth}", **kwargs)
        self._finish(
            dict(
                depth=depth,
                branches=branches,
                cardinality=cardinality,
                bottleneck_width=bottleneck_width,
                widths=list(widths),
                stem_filters=stem_filters,
                implementation=implementation,
                input_shape=list(input_shape),
                classes=classes,
                include_top=include_top,
                pooling=pooling,
                classifier_activation=classifier_activation,
                compile=compile,
                feature_outputs=feature_outputs,
            ),
            weights,
            pyramid,
        )
