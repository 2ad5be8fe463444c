"""One Keras backend's training steps, timed on request (the ``train`` section's worker).

``KERAS_BACKEND=jax python -m keras_dmr.bench.train_worker`` answers JSON lines on stdin, one
JSON line each on stdout (everything else it prints goes to stderr):

- ``{"op": "build", "key": K, "model": M, "policy": P, "batch_size": B, "seed": S}`` builds
  model ``M`` of :data:`TRAIN_MODELS` under dtype policy ``P``, compiled with the package's
  recipe, and runs its first training step (tracing and compilation, timed as ``compile_s``);
- ``{"op": "steps", "key": K, "steps": N}`` runs N training steps and answers their mean time;
- ``{"op": "quit"}``.

A backend is chosen once per process, so the section runs one worker per backend and
interleaves its candidates across them (:mod:`keras_dmr.bench.train_throughput`). Training
steps are :func:`keras_dmr.utils.timing.train_step_fn`'s: a fixed random batch already on the
device, so the input pipeline is not timed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# label → (builder in keras_dmr.models, positional arguments, keyword arguments)
TRAIN_MODELS = {
    "DMRNet-14": ("DMRNet", (14,), {"implementation": "split"}),
    "ResNet-26": ("ResNet", (26,), {}),
    "MobileNetV2": ("MobileNetV2", (), {}),
    "ResNet-8": ("ResNet", (8,), {}),  # the quick run's stand-in
}


def build_model(label: str, policy: str):
    """``TRAIN_MODELS[label]`` under dtype ``policy``, compiled with the package's recipe."""
    import keras

    from keras_dmr import models

    name, args, kwargs = TRAIN_MODELS[label]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return getattr(models, name)(*args, **kwargs)
    finally:
        keras.config.set_dtype_policy(previous)


class Worker:
    def __init__(self):
        self.steps = {}

    def build(self, key, model, policy, batch_size, seed=0):
        from keras_dmr.analysis.flops import count_flops
        from keras_dmr.utils.timing import train_step_fn

        start = time.perf_counter()
        m = build_model(model, policy)
        built = time.perf_counter()
        step = train_step_fn(m, batch_size, seed)
        step()
        self.steps[key] = step
        return {
            "params": int(m.count_params()),
            "macs": int(count_flops(m)),
            "build_s": built - start,
            "compile_s": time.perf_counter() - built,
            "compute_dtype": m.dtype_policy.compute_dtype,
        }

    def run_steps(self, key, steps):
        fn = self.steps[key]
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return {"step_s": (time.perf_counter() - start) / steps}


def hello() -> dict:
    from keras_dmr.utils.timing import default_device, machine_description

    info = machine_description()
    return {
        "backend": info["backend"],
        "device": default_device(),
        "versions": {k: info.get(k) for k in ("keras", "tensorflow", "jax")},
    }


def main() -> int:
    # The protocol owns stdout; whatever a library prints goes to stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def answer(value: dict) -> None:
        channel.write(json.dumps(value) + "\n")
        channel.flush()

    try:
        answer({"ok": True, **hello()})
    except Exception as err:
        answer({"ok": False, "error": f"{type(err).__name__}: {err}"})
        return 1
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            if op == "build":
                reply = worker.build(**request)
            elif op == "steps":
                reply = worker.run_steps(**request)
            else:
                raise ValueError(f"unknown op {op!r}: build, steps or quit")
            answer({"ok": True, **reply})
        except Exception as err:  # the coordinator records it and goes on with the others
            traceback.print_exc()
            first = (str(err).splitlines() or [""])[0][:300]
            answer({"ok": False, "error": f"{type(err).__name__}: {first}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
