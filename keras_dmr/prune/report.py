"""Accuracy, measured throughput and a table of parameters and MACs for pruned models."""

from __future__ import annotations

import keras
import numpy as np

from keras_dmr.prune.units import macs_or_none


# ------------------------------------------------------------------------------ reports
def accuracy(model: keras.Model, data, steps: int | None = None) -> float:
    """Top-1 accuracy of ``model`` (inference mode) on ``(images, labels)`` batches.

    Args:
        model: the model to evaluate.
        data: an iterable of ``(images, labels)`` batches.
        steps: at most this many batches (``None``: all).

    Returns:
        The fraction of labels predicted (0..1).
    """
    correct = total = 0
    for i, (images, labels) in enumerate(data):
        if steps is not None and i >= steps:
            break
        logits = np.asarray(model(images, training=False))
        correct += int(np.sum(np.argmax(logits, -1) == np.asarray(labels).reshape(-1)))
        total += len(logits)
    if total == 0:
        raise ValueError("`data` yielded no batches")
    return correct / total


def throughput(
    models: dict[str, keras.Model],
    *,
    batch_size: int = 64,
    warmup: int = 3,
    iters: int = 5,
    repeats: int = 5,
    spread: bool = False,
) -> dict:
    """Measured images per second of each model in inference mode (one TensorFlow graph per
    model, a fixed random batch), the median over ``repeats`` with the models interleaved;
    ``spread=True`` gives ``(median, slowest, fastest)`` repeat instead.

    Args:
        models: ``{label: model}``.
        batch_size: images per batch.
        warmup: untimed batches first.
        iters: batches per timed repeat.
        repeats: timed repeats (the median is reported).
        spread: report ``(median, slowest, fastest)``.

    Returns:
        ``{label: images/s}`` (or the triples).
    """
    from keras_dmr.utils.timing import inference_fn, interleaved

    fns = {name: inference_fn(m, batch_size) for name, m in models.items()}
    timed = interleaved(fns, warmup=warmup, iters=iters, repeats=repeats)
    if spread:
        return {
            name: (batch_size / t["median_s"], batch_size / t["max_s"], batch_size / t["min_s"])
            for name, t in timed.items()
        }
    return {name: batch_size / t["median_s"] for name, t in timed.items()}


def describe(models: dict[str, keras.Model], *, data=None, speed: dict | None = None) -> dict:
    """Parameters, multiply-accumulates, accuracy on ``data`` and the measured ``speed``
    (images/s, from :func:`throughput`) of each model, side by side.

    Args:
        models: ``{label: model}``.
        data: ``(images, labels)`` batches for accuracy (``None``: not measured).
        speed: ``{label: images/s}`` from :func:`throughput` (``None``: not shown).

    Returns:
        ``{label: {"params", "flops", "accuracy", "images_per_s"}}`` (``flops``: multiply-
        accumulates; None where not measured).
    """
    out = {}
    for name, model in models.items():
        out[name] = {
            "params": int(model.count_params()),
            "flops": macs_or_none(model),
            "accuracy": None if data is None else accuracy(model, data),
            "images_per_s": None if speed is None else speed.get(name),
        }
    return out


def format_table(rows: dict[str, dict]) -> str:
    """The :func:`describe` dictionary as an aligned text table.

    Args:
        rows: :func:`describe`'s result.

    Returns:
        The table, one line per model.
    """
    width = max(len(n) for n in rows)
    lines = [f"{'model':<{width}}  {'params':>10}  {'MACs':>12}  {'accuracy':>8}  {'images/s':>9}"]
    for name, r in rows.items():
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        flops = "-" if r["flops"] is None else f"{r['flops']:,}"
        lines.append(f"{name:<{width}}  {r['params']:>10,}  {flops:>12}  {acc:>8}  {ips:>9}")
    return "\n".join(lines)
