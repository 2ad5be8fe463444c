import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (``make test``: one worker per core), give each worker its own cores
    before TensorFlow, ONNX Runtime or OpenVINO start their thread pools: each sizes its pool
    by the process's affinity, and two pools spinning on the same two cores waste both."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= count:
        os.sched_setaffinity(0, cores[int(worker[2:]) % count :: count])


_pin_xdist_worker()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_dmr.convert.randomize import randomize  # noqa: E402, F401 (tests import it from here)


def max_rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def global_policy(request):
    """Keras' global dtype policy set to the parameter (``indirect=True``), restored after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy(previous)
