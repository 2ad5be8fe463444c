"""Side-by-side timing: candidates run interleaved (A B A B …) so a noisy machine slows all alike.

Ratios come from medians over repeats taken in the same run; no timing belongs in unit tests.
Every timed call ends by copying a small result to the host, so work queued on a GPU is counted.
"""

from __future__ import annotations

import importlib
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
    """Name (and, on TensorFlow, compute capability) of every GPU the backend sees; empty on a
    CPU-only machine."""
    if backend() == "jax":
        import jax

        return [
            {"device": f"{d.platform}:{d.id}", "name": d.device_kind, "compute_capability": None}
            for d in jax.devices()
            if d.platform == "gpu"
        ]
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


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


# The instruction sets that decide which float32, bfloat16 and int8 kernels a CPU runs.
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` the CPU has, from ``/proc/cpuinfo`` (empty where there is
    none, as on macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [flag for flag in CPU_FLAGS if flag in flags]


def machine_description() -> dict:
    """CPU model, cores, GPUs, the Keras backend and the versions of the frameworks timed."""
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
    gpus = gpu_description()
    info = {
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else os.cpu_count(),
        "gpus": [g["device"] for g in gpus],
        "gpu_details": gpus,
        "backend": backend(),
        "tensorflow": _version("tensorflow") if backend() == "tensorflow" else None,
        "keras": keras.__version__,
        "onnxruntime": ort_version,
        "onnxruntime_providers": ort_providers,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if backend() == "jax":
        import jax

        info["jax"] = jax.__version__
        # On GPUs XLA may run float32 products in TF32 unless told otherwise: say which.
        info["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    return info


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


def backend() -> str:
    return keras.backend.backend()


def random_batch(model: keras.Model, batch_size: int, seed: int = 0) -> np.ndarray:
    """A fixed float32 batch of standard-normal images of ``model``'s input size."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch_size, *model.input_shape[1:])).astype("float32")


def train_step_fn(model: keras.Model, batch_size: int, seed: int = 0) -> Callable[[], object]:
    """One compiled training step of ``model`` (its optimizer and loss) on a fixed random batch:
    Keras' own train function on TensorFlow, a jitted stateless step on JAX."""
    x = random_batch(model, batch_size, seed)
    y = np.random.default_rng(seed + 1).integers(0, model.output_shape[-1], batch_size)
    if backend() == "jax":
        return _jax_train_step(model, x, y)
    if backend() != "tensorflow":
        raise NotImplementedError(f"training steps are timed on TensorFlow or JAX, not {backend()}")
    import tensorflow as tf

    with tf.device(default_device()):
        x, y = tf.identity(x), tf.identity(y)
    model.make_train_function()
    data = iter(lambda: (x, y), None)
    return lambda: to_host(model.train_function(data))


def _jax_train_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
    """Keras' stateless JAX training step (loss + regularisation losses, gradients, optimizer
    update), jitted; the state is carried from call to call as a training loop does."""
    import jax

    if model.optimizer is None or model.loss is None:
        raise ValueError(f"model {model.name!r} must be compiled (an optimizer and a loss)")
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    loss_object = keras.losses.get(model.loss)

    def loss_fn(trainable, non_trainable, x, y):
        y_pred, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        loss = loss_object(y, y_pred)
        for extra in losses:
            loss = loss + extra
        return loss, non_trainable

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def step(state, x, y):
        trainable, non_trainable, opt = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt = optimizer.stateless_apply(opt, grads, trainable)
        return loss, (trainable, non_trainable, opt)

    device = jax.devices()[0]
    x, y = jax.device_put(x, device), jax.device_put(y, device)
    state = [
        (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in optimizer.variables],
        )
    ]

    def call():
        loss, state[0] = step(state[0], x, y)
        return to_host(loss)

    return call


def inference_fn(
    model: keras.Model, batch_size: int, seed: int = 0, *, jit_compile: bool = False
) -> Callable[[], object]:
    """``model`` in inference mode as one compiled graph on a fixed random batch held on the
    default device: a ``tf.function`` on TensorFlow (XLA-compiled with ``jit_compile=True``),
    ``jax.jit`` of the stateless call on JAX (always XLA)."""
    batch = random_batch(model, batch_size, seed)
    if backend() == "jax":
        import jax

        @jax.jit
        def forward_jax(trainable, non_trainable, x):
            return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        x = jax.device_put(batch, jax.devices()[0])
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return lambda: to_host(forward_jax(trainable, non_trainable, x))
    if backend() != "tensorflow":
        raise NotImplementedError(f"inference is timed on TensorFlow or JAX, not {backend()}")
    import tensorflow as tf

    with tf.device(default_device()):
        x = tf.identity(batch)

    def forward(t):
        return model(t, training=False)

    fn = tf.function(forward, jit_compile=jit_compile, autograph=False)
    return lambda: fn(x).numpy()


def default_device() -> str:
    """The device the backend computes on: ``/GPU:0`` or ``/CPU:0`` on TensorFlow, the first
    JAX device (for example ``cuda:0``) on JAX."""
    if backend() == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}:{d.id}"
    import tensorflow as tf

    return "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"
