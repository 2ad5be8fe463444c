"""CI's TensorFlow-free job, in the venv of ``keras-dmr[jax]`` alone (``.ci/tf_free``), under
KERAS_BACKEND=jax: TensorFlow must be absent; every builder builds and predicts; a DMRNet trains
one epoch through ``keras-dmr train`` on the bundled digits and on a Fashion-MNIST fixture (IDX
files written here), converts with ``to_plain`` (verified), and both forms reload from ``.keras``
in safe mode with the same outputs."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def main() -> int:
    assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed here"
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import keras_dmr
    from keras_dmr.data import fashion_mnist

    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    for name in ("DMRNet", "DVANet", "ResNet", "MobileNetV2", "RepVGG", "RMNeXt"):
        model = getattr(keras_dmr, name)() if name != "DMRNet" else keras_dmr.DMRNet(depth=8)
        assert np.isfinite(np.asarray(model(x))).all(), name
        print(f"built {name}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(1)
        for split, n in (("train", 256), ("test", 64)):
            images_name, labels_name = fashion_mnist.FILES[split]
            write_idx(tmp / images_name, rng.integers(0, 256, (n, 28, 28)))
            write_idx(tmp / labels_name, np.arange(n) % 10)
        for dataset in (["--dataset", "digits"], ["--dataset", "fashion_mnist", "--data-dir",
                                                 str(tmp)]):  # fmt: skip
            checkpoint = tmp / f"{dataset[1]}.keras"
            argv = ["train", "--model", "dmrnet", "--depth", "8", "--epochs", "1"]
            argv += [*dataset, "--output", str(checkpoint)]
            subprocess.run([sys.executable, "-m", "keras_dmr.cli", *argv], check=True)
            residual = keras.saving.load_model(checkpoint, safe_mode=True)
            plain = keras_dmr.to_plain(residual)
            error = plain.conversion_report["max_relative_error"]
            assert error <= 1e-5, error
            plain.save(tmp / "plain.keras")
            again = keras.saving.load_model(tmp / "plain.keras", safe_mode=True)
            np.testing.assert_allclose(
                np.asarray(again(x)), np.asarray(residual(x)), rtol=1e-4, atol=1e-5
            )
            print(f"{dataset[1]}: trained, converted (max relative error {error:.1e}), reloaded")
        # What needs TensorFlow says so in one line.
        argv = ["export", str(checkpoint), "--name", "m", "--base-dir", str(tmp)]
        done = subprocess.run(
            [sys.executable, "-m", "keras_dmr.cli", *argv], capture_output=True, text=True
        )
        assert done.returncode == 2 and "export needs TensorFlow" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
