"""Training and tuning on more than one process, all on 127.0.0.1: two workers training with
MultiWorkerMirroredStrategy (``keras-dmr train --strategy multiworker``) and Keras Tuner's
distributed mode (a chief oracle and two worker tuners running ``keras-dmr tune``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

CLI = [sys.executable, "-m", "keras_dmr.cli"]
TIMEOUT = 240  # seconds for a group of processes; they take ~30-60 s on 2 busy cores


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on the loopback now (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def run_together(commands: list[tuple[list[str], dict]], logs: list[Path]) -> list[int]:
    """Start every ``(argv, extra environment)`` at once, wait for all (killing all on timeout or
    on the first failure) and return the exit codes."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    processes = []
    try:
        for (argv, extra), log in zip(commands, logs, strict=True):
            with open(log, "w") as out:
                processes.append(
                    subprocess.Popen(
                        argv, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT
                    )
                )
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in processes):
            if time.monotonic() > deadline:
                raise AssertionError(f"not finished within {TIMEOUT} s:\n" + tails(logs))
            if any(p.returncode not in (None, 0) for p in processes):
                break  # one failed: the others would wait for it forever
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [p.returncode for p in processes]


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in logs)


@pytest.mark.slow
def test_two_workers_train_one_model(tmp_path):
    """DMRNet-8 (16/32/64 per branch), one epoch of digits, two workers: identical weights.

    The workers get different seeds, so they agree only through the strategy: initial values
    broadcast from worker 0, gradients all-reduced, BN statistics averaged after the epoch."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    commands, logs, outputs = [], [], []
    for index in range(2):
        output = tmp_path / f"worker{index}.keras"
        argv = [
            *CLI,
            "train",
            "--model",
            "dmrnet",
            "--depth",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "128",  # global: 64 per worker
            "--seed",
            str(index),
            "--strategy",
            "multiworker",
            "--output",
            str(output),
        ]
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        commands.append((argv, {"TF_CONFIG": json.dumps(tf_config)}))
        logs.append(tmp_path / f"worker{index}.log")
        outputs.append(output)
    codes = run_together(commands, logs)
    assert codes == [0, 0], tails(logs)
    for log in logs:
        text = log.read_text()
        assert "Strategy multiworker: 2 replica(s), global batch 128" in text
        assert "test accuracy:" in text
    models = [keras.saving.load_model(path, compile=False, safe_mode=True) for path in outputs]
    weights = [{v.path: np.asarray(v) for v in m.weights} for m in models]
    assert weights[0].keys() == weights[1].keys()
    assert any("moving_variance" in name for name in weights[0])
    differ = [n for n in weights[0] if not np.array_equal(weights[0][n], weights[1][n])]
    assert not differ, differ
    for path in outputs:  # one epoch, recorded in the checkpoint's state
        state = json.loads(Path(str(path) + ".state.json").read_text())
        assert state["completed_epochs"] == 1


@pytest.mark.slow
def test_keras_tuner_chief_and_two_workers(tmp_path):
    """A chief oracle and two worker tuners (``keras-dmr tune`` each) share a 3-trial search."""
    (port,) = free_ports(1)
    directory = tmp_path / "kt"
    argv = [
        *CLI,
        "tune",
        "--family",
        "dmrnet",
        "--scale",
        "0.25",
        "--depth",
        "8",
        "--branches",  # K fixed at 2: cheaper trials than K = 8 would be
        "2",
        "--max-trials",
        "3",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--validation-steps",
        "1",
        "--directory",
        str(directory),
        "--project-name",
        "shared",
    ]
    base = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port)}
    ids = ["chief", "tuner0", "tuner1"]
    commands = [(argv, {**base, "KERASTUNER_TUNER_ID": tuner_id}) for tuner_id in ids]
    logs = [tmp_path / f"{tuner_id}.log" for tuner_id in ids]
    codes = run_together(commands, logs)
    assert codes == [0, 0, 0], tails(logs)

    project = directory / "shared"
    trials = [json.loads(p.read_text()) for p in sorted(project.glob("trial_*/trial.json"))]
    assert len(trials) == 3 and all(t["status"] == "COMPLETED" for t in trials), tails(logs)
    # Each worker trained some of them: one Keras progress line per trial (one epoch each).
    epoch_line = re.compile(r"^\d+/\d+ - .*val_accuracy", re.MULTILINE)
    ran = [len(epoch_line.findall(log.read_text())) for log in logs]
    assert ran[0] == 0 and ran[1] >= 1 and ran[2] >= 1 and sum(ran) == 3, ran
    for log in logs[1:]:
        assert "no trials left" in log.read_text()
    chief = logs[0].read_text()
    assert "3 trial(s):" in chief and "best trial" in chief
    best = json.loads((project / "best.keras.json").read_text())
    assert best["trial_id"] in {t["trial_id"] for t in trials}
    model = keras.saving.load_model(project / "best.keras", compile=False, safe_mode=True)
    assert model.output_shape == (None, 10)
