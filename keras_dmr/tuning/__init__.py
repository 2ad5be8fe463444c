"""Keras Tuner hypermodels (DMRNet, RepVGG/RMNeXt), a latency objective on the converted plain
model, tuners by name, and tf.distribute strategies for training and tuning."""

from keras_dmr.training.distribute import (
    AverageBatchNormStatistics,
    MultiWorkerStrategy,
    is_multi_worker,
)
from keras_dmr.training.parallel import TF_STRATEGIES as STRATEGIES
from keras_dmr.training.parallel import make_strategy
from keras_dmr.tuning.hypermodels import (
    BRANCHES,
    DMRNET_MAPPINGS,
    PAPER_RESERVE_RATIOS,
    REPVGG_DEPTHS,
    RMNEXT_CHANNELS_PER_GROUP,
    RMNEXT_DEPTH_CHOICES,
    RMNEXT_EXPANSIONS,
    RULES,
    HyperDMRNet,
    HyperRMNet,
)
from keras_dmr.tuning.latency import PlainLatencyObjective, plain_latency_objective
from keras_dmr.tuning.search import (
    TUNERS,
    best_summary,
    best_trial,
    make_tuner,
    serve_oracle,
    tuner_role,
)

__all__ = [
    "BRANCHES",
    "DMRNET_MAPPINGS",
    "PAPER_RESERVE_RATIOS",
    "REPVGG_DEPTHS",
    "RMNEXT_CHANNELS_PER_GROUP",
    "RMNEXT_DEPTH_CHOICES",
    "RMNEXT_EXPANSIONS",
    "RULES",
    "STRATEGIES",
    "TUNERS",
    "AverageBatchNormStatistics",
    "HyperDMRNet",
    "HyperRMNet",
    "MultiWorkerStrategy",
    "PlainLatencyObjective",
    "best_summary",
    "best_trial",
    "is_multi_worker",
    "make_strategy",
    "make_tuner",
    "plain_latency_objective",
    "serve_oracle",
    "tuner_role",
]
