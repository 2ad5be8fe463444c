"""Keras Tuner hypermodels: DMRNet with the paper's Sec. 5 rules, RepVGG/RMNeXt for the RM paper.

Every hyperparameter is searched unless the caller passes a value for it, which then stays out of
the search space (``get_best_hyperparameters`` does not list it). Models are compiled with the
package recipe (:func:`keras_dmr.recipe.compile_with_recipe`: SGD + Nesterov, step decay, L2) at
the trial's learning rate and weight decay, and trained by their own ``fit``, which adds the
recipe's learning-rate schedule. ``scale`` (a width multiplier) and the depth overrides make the
tiny networks of tests and quick experiments; the paper's values are the defaults.

Cannot: search the depth/width rule itself (one hypermodel per rule), or the branch kind
(basic branches only: the Sec. 5 depths are 6n + 2).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import keras
import keras_tuner as kt
import tensorflow as tf

from keras_dmr.layers.blocks import check_choice
from keras_dmr.models import DMRNet, RepVGG, RMNeXt
from keras_dmr.models.repvgg import STAGE_MULTIPLIERS
from keras_dmr.models.rmnext import _groups_fit, block_plan
from keras_dmr.recipe import compile_with_recipe
from keras_dmr.tuning.latency import PlainLatencyObjective

BRANCHES = (1, 2, 4, 8)
DMRNET_MAPPINGS = ("merge_and_run", "identity")
# DMRNet paper Sec. 5: (depth, per-branch stage widths) for each number of branches K.
RULES = {
    # About the same parameters as DMRNet-50 (K = 2) at depth 50: narrower branches for larger K.
    "same_params_depth": {
        1: (50, (23, 46, 92)),
        2: (50, (16, 32, 64)),
        4: (50, (12, 24, 48)),
        8: (50, (8, 16, 32)),
    },
    # The same branch widths; depth shrinks as K grows (the same number of branch layers).
    "same_width": {
        1: (98, (16, 32, 64)),
        2: (50, (16, 32, 64)),
        4: (26, (16, 32, 64)),
        8: (14, (16, 32, 64)),
    },
}
# Log-uniform ranges, a decade either side of the recipe's 0.1 and 1e-4 (the defaults).
LEARNING_RATE = (0.01, 1.0, 0.1)
WEIGHT_DECAY = (1e-5, 1e-3, 1e-4)
FAMILIES = ("repvgg", "rmnext")
REPVGG_DEPTHS = (21, 37, 69, 133)
RESERVE_RATIO_SPACES = ("paper", "continuous")
PAPER_RESERVE_RATIOS = (0.0, 0.25, 0.5, 0.75)
# A continuous ratio of exactly 1 (Bayesian optimisation can reach the boundary) is built as
# this, all channels but one reserved, so every trial converts to the same plain network.
MAX_RESERVE_RATIO = 1.0 - 1e-6
RMNEXT_DEPTH_CHOICES = (26, 41, 50, 101, 152)
RMNEXT_EXPANSIONS = (3, 4, 5, 6)  # E of the RMNet paper's Table 3 rows
RMNEXT_CHANNELS_PER_GROUP = (8, 16, 32)  # C of Table 3 (first stage; doubles per stage)
RMNEXT_BASE_WIDTH = 64  # stage widths 64/128/256/512


def _positive_number(
    argument: str, value, *, allow_zero: bool = False, optional: bool = True
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"`{argument}` must be a number {bound}{' or None' if optional else ''}; got {value!r}"
        )
    return float(value)


class _RecipeHyperModel(kt.HyperModel):
    """Shared by the hypermodels: input, classes, recipe hyperparameters and ``fit``."""

    def __init__(
        self,
        input_shape,
        classes,
        *,
        learning_rate,
        weight_decay,
        latency_objective,
        name,
        tunable,
    ):
        super().__init__(name=name, tunable=tunable)
        if keras.backend.backend() == "tensorflow" and not importlib.util.find_spec("tensorboard"):
            raise ImportError(
                "Keras Tuner imports tensorboard in every trial on the TensorFlow backend (for its "
                "TensorBoard callback support): pip install tensorboard"
            )
        if not isinstance(input_shape, Sequence) or len(input_shape) != 3:
            raise ValueError(
                f"`input_shape` must be (height, width, channels); got {input_shape!r}"
            )
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"`classes` must be an integer >= 2; got {classes!r}")
        if learning_rate is not None:
            learning_rate = _positive_number("learning_rate", learning_rate)
        if weight_decay is not None:
            weight_decay = _positive_number("weight_decay", weight_decay, allow_zero=True)
        if latency_objective is not None and not isinstance(
            latency_objective, PlainLatencyObjective
        ):
            raise ValueError(
                "`latency_objective` must be None or a PlainLatencyObjective "
                f"(keras_dmr.tuning.plain_latency_objective); got {latency_objective!r}"
            )
        self.input_shape = tuple(input_shape)
        self.classes = classes
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.latency_objective = latency_objective

    @property
    def objective(self) -> kt.Objective:
        """The objective to give the tuner: the latency objective, else max ``val_accuracy``."""
        return self.latency_objective or kt.Objective("val_accuracy", "max")

    def _declare_recipe(self, hp: kt.HyperParameters) -> dict:
        values = {}
        for arg, (low, high, default) in (
            ("learning_rate", LEARNING_RATE),
            ("weight_decay", WEIGHT_DECAY),
        ):
            fixed = getattr(self, arg)
            values[arg] = (
                hp.Float(arg, low, high, sampling="log", default=default)
                if fixed is None
                else fixed
            )
        return values

    def declare_hyperparameters(self, hp: kt.HyperParameters) -> None:
        """Declare the whole search space in ``hp`` without building a model."""
        self._declare(hp)

    def _declare(self, hp: kt.HyperParameters) -> dict:
        raise NotImplementedError

    def _compile(self, model: keras.Model, values: dict) -> keras.Model:
        return compile_with_recipe(
            model, learning_rate=values["learning_rate"], weight_decay=values["weight_decay"]
        )

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, **kwargs):
        """``model.fit`` (the recipe's schedule included); with a latency objective, the last
        epoch's logs plus the plain model's latency metrics and the score, else the History."""
        if args and isinstance(args[0], tf.data.Dataset):
            kwargs.setdefault("shuffle", False)  # the dataset shuffles itself (or not)
        history = model.fit(*args, **kwargs)
        if self.latency_objective is None:
            return history
        logs = {name: values[-1] for name, values in history.history.items() if values}
        return self.latency_objective.trial_metrics(model, logs)


class HyperDMRNet(_RecipeHyperModel):
    """DMRNet (CIFAR variant, basic branches) with K and depth/width from a Sec. 5 rule.

    Search space (each argument given a value is fixed instead):

    * ``branches``: Choice K ∈ {1, 2, 4, 8} (default 2); ``rule`` gives depth and per-branch
      widths: ``"same_params_depth"`` depth 50, widths (23,46,92)/(16,32,64)/(12,24,48)/
      (8,16,32) for K = 1/2/4/8; ``"same_width"`` widths (16,32,64), depth 98/50/26/14.
    * ``mapping``: Choice ``"merge_and_run"`` (default) or ``"identity"`` (K separate ResNets,
      Table 7). With K = 1 both are the same network.
    * ``learning_rate``: Float in [0.01, 1], log sampling, default 0.1.
    * ``weight_decay``: Float in [1e-5, 1e-3], log sampling, default 1e-4.

    Args:
        input_shape, classes: of the data (default CIFAR: (32, 32, 3), 10).
        rule: ``"same_params_depth"`` or ``"same_width"``.
        branches, mapping, learning_rate, weight_decay: fix that hyperparameter.
        scale: width multiplier on the rule's widths (``DMRNet(width=scale)``), e.g. 0.25 for
            tiny test networks; 1 is the paper.
        depth: replaces the rule's depth for every K (6n + 2, e.g. 8 for tests).
        latency_objective: a :class:`~keras_dmr.tuning.PlainLatencyObjective`; then ``fit``
            also converts and times each trial's plain model (give the tuner the same object).
        name, tunable: as ``keras_tuner.HyperModel``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        classes: int = 10,
        *,
        rule: str = "same_params_depth",
        branches: int | None = None,
        mapping: str | None = None,
        learning_rate: float | None = None,
        weight_decay: float | None = None,
        scale: float = 1.0,
        depth: int | None = None,
        latency_objective: PlainLatencyObjective | None = None,
        name: str | None = None,
        tunable: bool = True,
    ):
        super().__init__(
            input_shape,
            classes,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            latency_objective=latency_objective,
            name=name,
            tunable=tunable,
        )
        check_choice("rule", rule, tuple(RULES))
        if branches is not None:
            check_choice("branches", branches, BRANCHES)
        if mapping is not None:
            check_choice("mapping", mapping, DMRNET_MAPPINGS)
        if depth is not None and (
            isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6
        ):
            raise ValueError(f"`depth` must be None or 6n + 2 (8, 14, 20, ...); got {depth!r}")
        self.rule = rule
        self.branches = branches
        self.mapping = mapping
        self.scale = _positive_number("scale", scale, optional=False)
        self.depth = depth

    def _declare(self, hp: kt.HyperParameters) -> dict:
        values = {
            "branches": self.branches
            if self.branches is not None
            else hp.Choice("branches", list(BRANCHES), default=2),
            "mapping": self.mapping
            if self.mapping is not None
            else hp.Choice("mapping", list(DMRNET_MAPPINGS), default="merge_and_run"),
        }
        values.update(self._declare_recipe(hp))
        return values

    def architecture(self, branches: int) -> tuple[int, tuple[int, ...]]:
        """``(depth, per-branch widths before scale)`` that the rule (and ``depth``) give K."""
        depth, widths = RULES[self.rule][branches]
        return self.depth or depth, widths

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        values = self._declare(hp)
        depth, widths = self.architecture(values["branches"])
        model = DMRNet(
            depth,
            branches=values["branches"],
            mapping=values["mapping"],
            widths=widths,
            width=self.scale,
            input_shape=self.input_shape,
            classes=self.classes,
            compile=False,
        )
        return self._compile(model, values)


class HyperRMNet(_RecipeHyperModel):
    """RepVGG with the RM reserving ratio, or RMNeXt (RMNet paper), for Keras Tuner.

    Search space for ``family="repvgg"`` (each argument given a value is fixed instead):

    * ``depth``: Choice {21, 37, 69, 133} (default 21); left out with ``blocks_per_stage``.
    * ``reserve_ratio``: with ``reserve_ratios="paper"`` (default) Choice {0, 0.25, 0.5, 0.75}
      (default 0.25); with ``"continuous"`` Float in [0, 1] sampled uniformly (default 0.25),
      built as ``min(r, 1 - 1e-6)`` so every trial has r < 1 (1 itself is drawn only by
      Bayesian optimisation at the boundary).

    For ``family="rmnext"``:

    * ``depth``: Choice {26, 41, 50, 101, 152} (default 26); left out with ``blocks_per_stage``.
    * ``expansion``: Choice E ∈ {3, 4, 5, 6} (default 3).
    * ``channels_per_group``: Choice C ∈ {8, 16, 32}·``scale`` (rounded), keeping the values
      whose groups fit the scaled widths (2·C must divide the first stage width); default the
      largest, 32 at scale 1.

    Both: ``learning_rate`` Float in [0.01, 1] and ``weight_decay`` Float in [1e-5, 1e-3], log
    sampling, defaults 0.1 and 1e-4.

    Args:
        input_shape, classes: of the data (default CIFAR: (32, 32, 3), 10).
        family: ``"repvgg"`` or ``"rmnext"``.
        depth, reserve_ratio, expansion, channels_per_group, learning_rate, weight_decay: fix
            that hyperparameter.
        reserve_ratios: ``"paper"`` or ``"continuous"`` (repvgg).
        scale: width multiplier: RepVGG ``base_width`` and RMNeXt's stage widths are
            ``round(64·scale)·(1, 2, 4, 8)``.
        blocks_per_stage: four block counts replacing the depth (RepVGG: even numbers), for
            tiny networks; the depth is then not searched.
        variant: ``"cifar"`` or ``"imagenet"`` (the builders' variants).
        latency_objective, name, tunable: as :class:`HyperDMRNet`.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        classes: int = 10,
        *,
        family: str = "repvgg",
        depth: int | None = None,
        reserve_ratio: float | None = None,
        reserve_ratios: str = "paper",
        expansion: int | None = None,
        channels_per_group: int | None = None,
        learning_rate: float | None = None,
        weight_decay: float | None = None,
        scale: float = 1.0,
        blocks_per_stage: Sequence[int] | None = None,
        variant: str = "cifar",
        latency_objective: PlainLatencyObjective | None = None,
        name: str | None = None,
        tunable: bool = True,
    ):
        super().__init__(
            input_shape,
            classes,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            latency_objective=latency_objective,
            name=name,
            tunable=tunable,
        )
        check_choice("family", family, FAMILIES)
        check_choice("reserve_ratios", reserve_ratios, RESERVE_RATIO_SPACES)
        check_choice("variant", variant, ("cifar", "imagenet"))
        self.family = family
        self.scale = _positive_number("scale", scale, optional=False)
        self.base_width = max(1, round(RMNEXT_BASE_WIDTH * self.scale))
        depths = REPVGG_DEPTHS if family == "repvgg" else RMNEXT_DEPTH_CHOICES
        if depth is not None:
            check_choice("depth", depth, depths)
        if blocks_per_stage is not None:
            if depth is not None:
                raise ValueError("give `depth` or `blocks_per_stage`, not both")
            blocks_per_stage = tuple(blocks_per_stage)
        if family == "rmnext":
            if reserve_ratio is not None:
                raise ValueError(
                    f"`reserve_ratio` is for family='repvgg' only; got {reserve_ratio!r}"
                )
            if expansion is not None:
                check_choice("expansion", expansion, RMNEXT_EXPANSIONS)
            self.channels_per_group_values = self._fitting_channels_per_group(
                (expansion,) if expansion is not None else RMNEXT_EXPANSIONS, blocks_per_stage
            )
            if channels_per_group is not None:
                check_choice(
                    "channels_per_group", channels_per_group, self.channels_per_group_values
                )
        else:
            for arg, value in (
                ("expansion", expansion),
                ("channels_per_group", channels_per_group),
            ):
                if value is not None:
                    raise ValueError(f"`{arg}` is for family='rmnext' only; got {value!r}")
            if reserve_ratio is not None and not (
                isinstance(reserve_ratio, int | float)
                and not isinstance(reserve_ratio, bool)
                and 0 <= reserve_ratio < 1
            ):
                raise ValueError(
                    f"`reserve_ratio` must be in [0, 1) or None; got {reserve_ratio!r}"
                )
            self.channels_per_group_values = ()
        self.depth = depth
        self.reserve_ratio = reserve_ratio
        self.reserve_ratios = reserve_ratios
        self.expansion = expansion
        self.channels_per_group = channels_per_group
        self.blocks_per_stage = blocks_per_stage
        self.variant = variant

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in STAGE_MULTIPLIERS)

    def _fitting_channels_per_group(self, expansions, blocks_per_stage) -> tuple[int, ...]:
        blocks = blocks_per_stage or (1, 1, 1, 1)  # the fit only depends on stage transitions
        candidates = sorted({max(1, round(c * self.scale)) for c in RMNEXT_CHANNELS_PER_GROUP})
        valid = tuple(
            c
            for c in candidates
            if all(_groups_fit(block_plan(blocks, self.widths, e, c)) for e in expansions)
        )
        if not valid:
            raise ValueError(
                f"`scale` {self.scale:g} gives first-stage width {self.base_width}, which no "
                f"channels_per_group of {candidates} fits (2·C must divide it); use a scale "
                "that makes round(64·scale) a multiple of 16"
            )
        return valid

    def _declare(self, hp: kt.HyperParameters) -> dict:
        values = {}
        if self.blocks_per_stage is None:
            depths = REPVGG_DEPTHS if self.family == "repvgg" else RMNEXT_DEPTH_CHOICES
            values["depth"] = (
                self.depth
                if self.depth is not None
                else hp.Choice("depth", list(depths), default=depths[0])
            )
        if self.family == "repvgg":
            if self.reserve_ratio is not None:
                ratio = self.reserve_ratio
            elif self.reserve_ratios == "paper":
                ratio = hp.Choice("reserve_ratio", list(PAPER_RESERVE_RATIOS), default=0.25)
            else:
                ratio = hp.Float("reserve_ratio", 0.0, 1.0, default=0.25)
            values["reserve_ratio"] = min(float(ratio), MAX_RESERVE_RATIO)
        else:
            values["expansion"] = (
                self.expansion
                if self.expansion is not None
                else hp.Choice("expansion", list(RMNEXT_EXPANSIONS), default=3)
            )
            cpg = self.channels_per_group_values
            values["channels_per_group"] = (
                self.channels_per_group
                if self.channels_per_group is not None
                else hp.Choice("channels_per_group", list(cpg), default=cpg[-1])
            )
        values.update(self._declare_recipe(hp))
        return values

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        values = self._declare(hp)
        common = dict(
            variant=self.variant,
            blocks_per_stage=self.blocks_per_stage,
            input_shape=self.input_shape,
            classes=self.classes,
            compile=False,
        )
        if self.family == "repvgg":
            model = RepVGG(
                values.get("depth", REPVGG_DEPTHS[0]),
                reserve_ratio=values["reserve_ratio"],
                base_width=self.base_width,
                **common,
            )
        else:
            model = RMNeXt(
                values.get("depth"),
                expansion=values["expansion"],
                channels_per_group=values["channels_per_group"],
                widths=self.widths,
                **common,
            )
        return self._compile(model, values)
