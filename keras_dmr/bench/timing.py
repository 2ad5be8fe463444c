"""Side-by-side timing: candidates run interleaved (A B A B …) so a noisy machine slows all alike.

Ratios come from medians over repeats taken in the same run; no timing belongs in unit tests.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import keras
import numpy as np


def machine_description() -> dict:
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def interleaved(
    candidates: Mapping[str, Callable[[], object]], *, warmup: int, iters: int, repeats: int
) -> dict[str, dict]:
    """Time each candidate ``iters`` calls per repeat, candidates interleaved within a repeat.

    Returns per candidate the median and spread (min, max) of seconds per call over repeats.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - start) / iters)
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "samples": s}
        for name, s in samples.items()
    }


def train_step_fn(model: keras.Model, batch_size: int, seed: int = 0) -> Callable[[], object]:
    """One compiled training step of ``model`` on a fixed random batch (TensorFlow backend)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shape = (batch_size, *model.input_shape[1:])
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    y = tf.constant(rng.integers(0, model.output_shape[-1], batch_size))
    model.make_train_function()
    data = iter(lambda: (x, y), None)
    return lambda: model.train_function(data)


def inference_fn(model: keras.Model, batch_size: int, seed: int = 0) -> Callable[[], object]:
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(batch_size, *model.input_shape[1:])).astype("float32"))
    fn = tf.function(lambda t: model(t, training=False))
    return lambda: fn(x).numpy()
