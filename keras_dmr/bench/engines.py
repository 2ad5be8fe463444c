"""Ways of running a model's inference, each as a no-argument call on a fixed float32 batch.

* ``keras``: the in-process Keras model as one TensorFlow graph (``tf.function``); on the JAX
  backend, ``jax.jit`` of its stateless call (the only engine there: exports need TensorFlow).
* ``xla``: the same graph compiled by XLA (``jit_compile=True``).
* ``saved_model``: :func:`keras_dmr.export.saved_model` (``preprocessing="none"``), loaded back
  with ``tf.saved_model.load`` and called through ``serving_default``: what TF Serving runs.
* ``onnx``: :func:`keras_dmr.export.onnx` (``preprocessing="none"``) run by ONNX Runtime with
  its best available execution provider (CUDA where installed, else CPU).

Exports run in a separate process (:mod:`keras_dmr.bench.export_worker`).

Exported forms carry the serving function's extra outputs (softmax and argmax of the logits:
128×10 values, negligible). TensorFlow's input sits on its default device; ONNX Runtime's is a
host array, so on a GPU its figure includes the copy of the batch to the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import keras

from keras_dmr.utils.timing import inference_fn, random_batch

ENGINES = ("keras", "xla", "saved_model", "onnx")
ENGINE_LABELS = {
    "keras": "TF graph",
    "xla": "TF + XLA",
    "saved_model": "SavedModel",
    "onnx": "ONNX Runtime",
}


def engine_label(engine: str, backend: str = "tensorflow") -> str:
    """What a table calls ``engine``; on JAX the ``keras`` engine is a jitted (XLA) call."""
    if engine == "keras" and backend == "jax":
        return "JAX (XLA)"
    return ENGINE_LABELS[engine]


# What each engine needs besides Keras: every exported form is written through TensorFlow
# (the deploy section's OpenVINO row runs the ONNX file, so it needs tf2onnx too).
_ENGINE_NEEDS = {
    "keras": (),
    "xla": ("tensorflow",),
    "saved_model": ("tensorflow",),
    "onnx": ("tensorflow", "tf2onnx", "onnxruntime"),
    "litert": ("tensorflow",),  # ai_edge_litert's interpreter, else TensorFlow's
    "openvino": ("tensorflow", "tf2onnx", "openvino"),
    "openvino_ir": ("tensorflow", "openvino", "nncf"),  # NNCF: the IR's int8
}


def available_engines(engines: Sequence[str] = ENGINES) -> tuple[str, ...]:
    """The engines among ``engines`` that this process can run, in their order: the benchmark's
    (:data:`ENGINES`) by default, or the deploy section's.

    Args:
        engines: names among ``keras``, ``xla``, ``saved_model``, ``onnx``, ``litert``,
            ``openvino`` and ``openvino_ir``.

    Returns:
        Those whose packages are installed; on a backend other than TensorFlow only ``keras``
        (its compiled call), since every other engine runs a TensorFlow export.
    """
    import importlib.util

    unknown = [e for e in engines if e not in _ENGINE_NEEDS]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; valid: {sorted(_ENGINE_NEEDS)}")
    on_tensorflow = keras.backend.backend() == "tensorflow"
    return tuple(
        e
        for e in engines
        if all(
            on_tensorflow if m == "tensorflow" else importlib.util.find_spec(m) is not None
            for m in _ENGINE_NEEDS[e]
        )
    )


class EngineError(RuntimeError):
    """An engine that cannot run a model here (recorded by the benchmark, which goes on)."""


# tf2onnx 1.17's peak memory, measured here: 7.7 GB for keras.applications.ResNet50 (25.6M
# parameters), 23.8 GB for the plain ResNet-50 (95.0M): its graph optimisers deep-copy the
# constants pass after pass.
ONNX_BASE_BYTES = 1.5e9
ONNX_BYTES_PER_PARAM = 260


def available_memory() -> float | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def export_in_subprocess(
    model: keras.Model, engine: str, workdir: Path, stem: str, *, timeout: float = 3600
) -> str:
    """Save ``model`` and export it by :mod:`keras_dmr.bench.export_worker` in a new process;
    the exported path. Raises :class:`EngineError` with the worker's last error line."""
    import os
    import subprocess
    import sys

    source = workdir / f"{stem}.keras"
    model.save(source)
    out = workdir / (f"{stem}.onnx" if engine == "onnx" else f"{stem}_savedmodel")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "keras_dmr.bench.export_worker", engine, str(source), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        raise EngineError(f"{engine} export took over {timeout:.0f} s") from err
    finally:
        source.unlink(missing_ok=True)
    if proc.returncode != 0:
        if proc.returncode < 0:
            why = f"export process killed by signal {-proc.returncode}"
            if proc.returncode == -9:
                why += " (out of memory?)"
            raise EngineError(why)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line.split(":", 1)[0]]
        raise EngineError((errors or lines or ["export failed"])[-1][:300])
    return proc.stdout.strip().splitlines()[-1]


def runner(
    engine: str,
    model: keras.Model,
    batch_size: int,
    workdir: str | Path,
    *,
    seed: int = 0,
    stem: str | None = None,
) -> Callable[[], object]:
    """A call that runs ``model`` on one batch of ``batch_size`` random images with ``engine``.

    Exports (``saved_model`` and ``onnx``) go to ``workdir`` as ``stem`` (default: the model's
    name), made in a separate process, and keep the model's form: a residual model is exported
    residual. An ONNX export that tf2onnx could not fit in the available memory is refused with
    :class:`EngineError` instead of being tried.
    """
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}; got {engine!r}")
    if engine in ("keras", "xla"):
        return inference_fn(model, batch_size, seed, jit_compile=engine == "xla")
    batch = random_batch(model, batch_size, seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stem = stem or model.name
    if engine == "onnx":
        need = ONNX_BASE_BYTES + ONNX_BYTES_PER_PARAM * model.count_params()
        have = available_memory()
        if have is not None and need > 0.85 * have:
            raise EngineError(
                f"not exported: tf2onnx would need about {need / 1e9:.0f} GB for "
                f"{model.count_params() / 1e6:.0f}M parameters; {have / 1e9:.0f} GB available"
            )
        from keras_dmr.export.onnx import onnx_session  # here: keras_dmr.export loads TensorFlow

        session = onnx_session(export_in_subprocess(model, engine, workdir, stem))
        return lambda: session.run(["logits"], {"images": batch})[0]
    import tensorflow as tf

    from keras_dmr.utils.timing import default_device

    loaded = tf.saved_model.load(export_in_subprocess(model, engine, workdir, stem))
    serve = loaded.signatures["serving_default"]
    with tf.device(default_device()):
        x = tf.identity(batch)

    def call():
        # ``loaded`` must stay alive: the signature refers to its variables.
        return serve(images=x)["logits"].numpy() if loaded is not None else None

    return call
