"""An objective that scores accuracy under a latency budget of the converted plain model.

Each trial's trained model is converted with :func:`keras_dmr.to_plain` (verified), and the plain
model's inference is timed on the machine that runs the trial: the median over ``repeats`` of the
mean time of ``iters`` calls on one fixed batch of ``batch_size`` images, after ``warmup`` calls
(:func:`keras_dmr.utils.timing.interleaved`). The score is::

    score = accuracy                              if latency <= budget
    score = accuracy * budget / latency           otherwise

so a model twice over budget counts half its accuracy: the search may still pick a slightly slow
model that is much more accurate. The trial records ``plain_latency_ms``, ``latency_budget_ms``,
``within_budget`` (1 or 0), the plain model's parameters and MACs per image and the conversion's
maximum relative error next to Keras' own metrics.

Cannot: compare latencies measured on different machines or under different loads (a loaded
machine inflates every trial alike only if the load is steady); time anything but the plain
model's forward pass (no input pipeline, no batching of requests).
"""

from __future__ import annotations

import math

import keras
import keras_tuner as kt

SCORE = "latency_score"


class PlainLatencyObjective(kt.Objective):
    """A Keras Tuner objective (``"latency_score"``, maximised) that also knows how to measure.

    Give the same object to the hypermodel (``latency_objective=``) and to the tuner
    (``objective=``): the hypermodel's ``fit`` trains, converts, times and returns the trial's
    metrics, the tuner ranks trials by the score.

    Args:
        budget_ms: the latency budget, ms per batch.
        accuracy: the metric scored.
        batch_size: images per timed batch.
        warmup: untimed batches first.
        iters: batches per timed repeat.
        repeats: timed repeats (the median counts).
        name: the objective's name.
    """

    def __init__(
        self,
        budget_ms: float,
        *,
        accuracy: str = "val_accuracy",
        batch_size: int = 1,
        warmup: int = 3,
        iters: int = 10,
        repeats: int = 5,
        name: str = SCORE,
    ):
        if isinstance(budget_ms, bool) or not isinstance(budget_ms, int | float):
            raise ValueError(f"`budget_ms` must be a number > 0; got {budget_ms!r}")
        if not 0 < budget_ms < math.inf:
            raise ValueError(f"`budget_ms` must be a number > 0; got {budget_ms!r}")
        for arg, value, low in (
            ("batch_size", batch_size, 1),
            ("warmup", warmup, 0),
            ("iters", iters, 1),
            ("repeats", repeats, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{arg}` must be an integer >= {low}; got {value!r}")
        super().__init__(name, "max")
        self.budget_ms = float(budget_ms)
        self.accuracy = accuracy
        self.batch_size = batch_size
        self.warmup, self.iters, self.repeats = warmup, iters, repeats

    def score(self, accuracy: float, latency_ms: float) -> float:
        """``accuracy`` within the budget, ``accuracy · budget / latency`` beyond it."""
        if latency_ms <= self.budget_ms:
            return float(accuracy)
        return float(accuracy) * self.budget_ms / float(latency_ms)

    def measure(self, model: keras.Model) -> dict[str, float]:
        """Convert ``model`` to plain (verified) and time it here; the latency metrics."""
        from keras_dmr.convert import to_plain
        from keras_dmr.utils.timing import inference_fn, interleaved

        plain = to_plain(model)
        report = plain.conversion_report
        timing = interleaved(
            {"plain": inference_fn(plain, self.batch_size)},
            warmup=self.warmup,
            iters=self.iters,
            repeats=self.repeats,
        )["plain"]
        latency = 1000.0 * timing["median_s"]
        metrics = {
            "plain_latency_ms": latency,
            "latency_budget_ms": self.budget_ms,
            "within_budget": float(latency <= self.budget_ms),
            "plain_params": float(report["params_after"]),
            "plain_max_relative_error": float(report["max_relative_error"]),
        }
        if report["flops_after"] is not None:
            metrics["plain_macs"] = float(report["flops_after"])
        return metrics

    def trial_metrics(self, model: keras.Model, logs: dict) -> dict[str, float]:
        """``logs`` (the last epoch's) plus the latency metrics and the score."""
        if self.accuracy not in logs:
            raise ValueError(
                f"the latency objective scores {self.accuracy!r}, which the training logs lack "
                f"(they have {sorted(logs)}); pass `validation_data` to the search"
            )
        metrics = {k: float(v) for k, v in logs.items()}
        metrics.update(self.measure(model))
        metrics[self.name] = self.score(metrics[self.accuracy], metrics["plain_latency_ms"])
        return metrics

    def __str__(self):
        return (
            f'PlainLatencyObjective(name="{self.name}", budget_ms={self.budget_ms:g}, '
            f'accuracy="{self.accuracy}", batch_size={self.batch_size})'
        )


def plain_latency_objective(
    budget_ms: float,
    *,
    accuracy: str = "val_accuracy",
    batch_size: int = 1,
    warmup: int = 3,
    iters: int = 10,
    repeats: int = 5,
) -> PlainLatencyObjective:
    """An objective scoring ``accuracy`` under a latency budget (ms per batch of ``batch_size``)
    of the converted plain model; see the module docstring for the score and what is timed.

    Args:
        budget_ms: the latency budget, ms per batch.
        accuracy: the metric scored.
        batch_size: images per timed batch.
        warmup: untimed batches first.
        iters: batches per timed repeat.
        repeats: timed repeats (the median counts).

    Returns:
        A :class:`PlainLatencyObjective`.
    """
    return PlainLatencyObjective(
        budget_ms,
        accuracy=accuracy,
        batch_size=batch_size,
        warmup=warmup,
        iters=iters,
        repeats=repeats,
    )
