"""Side-by-side timing: candidates run interleaved (A B A B …) so a noisy machine slows all alike.

Ratios come from medians over repeats taken in the same run; no timing belongs in unit tests.
Every timed call ends by copying a small result to the host, so work queued on a GPU is counted.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import keras
import numpy as np


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages of ``/proc/loadavg`` (None where there is none)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def gpu_description() -> list[dict]:
    """Name and compute capability of every GPU TensorFlow sees (empty on a CPU-only machine)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except (ValueError, RuntimeError):
            details = {}
        capability = details.get("compute_capability")
        gpus.append(
            {
                "device": device.name,
                "name": details.get("device_name", device.name),
                "compute_capability": ".".join(map(str, capability)) if capability else None,
            }
        )
    return gpus


def machine_description() -> dict:
    """CPU model, cores, GPUs and the versions of the frameworks timed."""
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
        ort_providers = onnxruntime.get_available_providers()
    except ImportError:
        ort_version, ort_providers = None, []
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "gpu_details": gpu_description(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onnxruntime": ort_version,
        "onnxruntime_providers": ort_providers,
        "python": platform.python_version(),
        "platform": platform.platform(),
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


def to_host(value) -> object:
    """Wait for ``value`` (a tensor or a structure of them) by copying its first leaf to the host.

    One leaf suffices: the outputs of one TensorFlow function call are ready together."""
    leaves = keras.tree.flatten(value)
    return np.asarray(leaves[0]) if leaves else None


def train_step_fn(model: keras.Model, batch_size: int, seed: int = 0) -> Callable[[], object]:
    """One compiled training step of ``model`` on a fixed random batch (TensorFlow backend)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shape = (batch_size, *model.input_shape[1:])
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    y = tf.constant(rng.integers(0, model.output_shape[-1], batch_size))
    model.make_train_function()
    data = iter(lambda: (x, y), None)
    return lambda: to_host(model.train_function(data))


def inference_fn(
    model: keras.Model, batch_size: int, seed: int = 0, *, jit_compile: bool = False
) -> Callable[[], object]:
    """``model`` in inference mode as one TensorFlow graph (``tf.function``; XLA-compiled with
    ``jit_compile=True``) on a fixed random batch held on TensorFlow's default device."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    with tf.device(default_device()):
        x = tf.identity(rng.normal(size=(batch_size, *model.input_shape[1:])).astype("float32"))

    def forward(t):
        return model(t, training=False)

    fn = tf.function(forward, jit_compile=jit_compile, autograph=False)
    return lambda: fn(x).numpy()


def default_device() -> str:
    """``/GPU:0`` where TensorFlow sees a GPU, else ``/CPU:0``."""
    import tensorflow as tf

    return "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"
