"""Data-parallel training on the JAX backend (keras.distribution, ``keras-dmr train --strategy
data-parallel``), on two virtual CPU devices in a child process: the same losses as one device
within float tolerance, and the command line's checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TWO_DEVICES = {
    "KERAS_BACKEND": "jax",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
}

# One epoch of DMRNet-8 on the same 256 digits (4 steps of 64 at learning rate 0.01), from the
# same initial weights, on one device and split over two; then the test loss of each (its BN
# moving statistics included).
SCRIPT = textwrap.dedent(
    """
    import json
    import keras
    import keras_dmr
    from keras_dmr import data
    from keras_dmr.recipe import compile_with_recipe
    from keras_dmr.training.parallel import data_parallel_devices, make_strategy

    out = {}
    for parallel in (False, True):
        keras.distribution.set_distribution(None)
        if parallel:
            make_strategy("data-parallel", batch_size=64)
        keras.utils.set_random_seed(0)
        model = keras_dmr.DMRNet(depth=8, compile=False)
        compile_with_recipe(model, learning_rate=0.01)  # small steps: rounding stays small
        train = data.load("digits", "train", batch_size=64, take=256, drop_remainder=True)
        history = model.fit(train, epochs=1, verbose=0).history
        test = data.load("digits", "test", batch_size=120)
        out[str(data_parallel_devices())] = {
            "train": history["loss"][0],
            "test": model.evaluate(test, verbose=0, return_dict=True)["loss"],
        }
    print(json.dumps(out))
    """
)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **TWO_DEVICES}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_two_devices_train_to_the_same_loss_as_one():
    done = _run(["-c", SCRIPT])
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = losses["1"], losses["2"]  # the second run did split over two devices
    # Same batches, same weights, same whole-batch BN statistics: only the order of float
    # reductions differs (measured: 1.2e-6 relative on the training loss, 3.1e-5 on the test).
    assert two["train"] == pytest.approx(one["train"], rel=1e-5)
    assert two["test"] == pytest.approx(one["test"], rel=2e-4)


@pytest.mark.slow  # three child processes, one of them training
def test_the_command_line_refuses_what_does_not_split_or_run_here(tmp_path):
    argv = ["-m", "keras_dmr.cli", "train", "--model", "resnet", "--depth", "8"]
    argv += ["--epochs", "1", "--output", str(tmp_path / "r.keras"), "--train-images", "128"]
    done = _run([*argv, "--strategy", "data-parallel", "--batch-size", "33"])
    assert done.returncode == 2
    assert "argument --batch-size: 33 does not split over the 2 devices" in done.stderr
    done = _run([*argv, "--strategy", "mirrored"])
    assert done.returncode == 2
    assert "mirrored is a tf.distribute strategy and needs the TensorFlow backend" in done.stderr
    done = _run([*argv, "--strategy", "data-parallel", "--batch-size", "64"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Strategy data-parallel: 2 replica(s), global batch 64" in done.stdout


def test_data_parallel_is_refused_under_tensorflow(tmp_path, capsys):
    from keras_dmr import cli

    argv = ["train", "--model", "resnet", "--depth", "8", "--epochs", "1"]
    argv += ["--output", str(tmp_path / "r.keras"), "--strategy", "data-parallel"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data-parallel runs on the JAX backend (keras.distribution); this is tensorflow" in err
    assert not (tmp_path / "r.keras").exists()
