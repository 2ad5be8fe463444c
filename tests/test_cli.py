"""Tests for the ``keras-dmr`` command line (keras_dmr.cli), run in-process through ``main``."""

from __future__ import annotations

import json
import math
import zipfile

import keras
import numpy as np
import pytest

from keras_dmr import cli
from keras_dmr.models import MobileNetV2
from keras_dmr.training import checkpoints

TINY = ["--model", "dmrnet", "--depth", "8"]  # 6·1 + 2: one merge-and-run block per stage
STEPS_PER_EPOCH = math.ceil(1437 / 64)  # digits train split, default batch size


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command.name in out and command.help in out


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS])
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: keras-dmr {name}" in out
    where = {"convert": "CHECKPOINT", "export": "CHECKPOINT", "prune": "CHECKPOINT"}
    assert where.get(name, "--base-dir" if name == "demo" else "--output") in out


def test_paths_reproduces_fig3(tmp_path, capsys):
    png = tmp_path / "fig3.png"
    assert cli.main(["paths", "--output", str(png)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "mean 20.00 ±" in lines["ResNet-38"]
    assert "mean 14.00 ±" in lines["DVANet-20"]
    assert "mean 8.00 ±" in lines["DMRNet-20"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paths_one_model_with_options(tmp_path, capsys):
    # DMRNet-8 with K = 3: three blocks of paths {0: 3, 2: 1} → mean 2 + 3·(2/4) = 3.5.
    args = ["paths", "--model", "dmrnet", "--depth", "8", "--branches", "3"]
    assert cli.main([*args, "--output", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "DMRNet-8 (K=3)  mean 3.50 ±" in out


OUTPUT_ARGUMENTS = [  # every argument the commands write to; BAD is the path under test
    (["train", "--output", "BAD/model.keras"], "--output"),
    (["paths", "--output", "BAD/paths.png"], "--output"),
    (["convert", "in.keras", "BAD/out.keras"], "OUT"),
    (["export", "in.keras", "--name", "m", "--base-dir", "BAD"], "--base-dir"),
    (["tune", "--directory", "BAD/tune"], "--directory"),
    (["tune", "--output", "BAD/best.keras"], "--output"),
    (["prune", "in.keras", "--ratio", "0.5", "--output", "BAD/p.keras"], "--output"),
    (["demo", "--runs", "BAD"], "--runs"),
    (["demo", "--base-dir", "BAD/savedmodels"], "--base-dir"),
    (["bench", "--output-dir", "BAD/bench"], "--output-dir"),
]
# Where a file cannot go, and the reason the error must give. As root, permission bits refuse
# nothing, so the unwritable places are pseudo-filesystems: /proc takes no new files, /sys
# refuses them.
BAD_PLACES = {
    "file in the way": ("blocker", "not a directory"),
    "missing parent under /proc": ("/proc/keras-dmr-nope/deeper", "cannot create files in /proc"),
    "/proc": ("/proc", "cannot create files in /proc"),
    "unwritable": ("/sys", "cannot create files in /sys"),
}


def _output_arguments(parser) -> set[tuple[str, str]]:
    """(command, argument) of every argument whose type is ``utils.arguments.output_path``."""
    found = set()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for arg in sub._actions:
            if getattr(arg.type, "output_kind", None):
                found.add((name, arg.option_strings[0] if arg.option_strings else arg.metavar))
    return found


def test_output_argument_table_covers_every_command():
    listed = {(argv[0], named) for argv, named in OUTPUT_ARGUMENTS}
    assert _output_arguments(cli.make_parser()) == listed


@pytest.mark.parametrize("place", BAD_PLACES)
@pytest.mark.parametrize(("argv", "named"), OUTPUT_ARGUMENTS, ids=lambda v: " ".join(v[:1]))
def test_unwritable_outputs_are_refused_before_any_work(
    argv, named, place, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    bad, reason = BAD_PLACES[place]
    assert cli.main([a.replace("BAD", bad) for a in argv]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    err = captured.err.split("keras-dmr: error: ")[1]
    assert err.startswith(f"argument {named}: ")
    assert reason in err, err
    assert len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


@pytest.mark.parametrize("command", ["convert", "export", "prune"])
@pytest.mark.parametrize("checkpoint", ["missing.keras", "/proc/keras-dmr-nope/m.keras", "."])
def test_unreadable_checkpoints_are_refused(command, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = {
        "convert": ["convert", checkpoint, "out.keras"],
        "export": ["export", checkpoint, "--name", "m"],
        "prune": ["prune", checkpoint, "--ratio", "0.5", "--output", "p.keras"],
    }[command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("keras-dmr: error: argument CHECKPOINT: ")
    assert not any(tmp_path.iterdir())


def test_directory_in_the_way_of_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", "in.keras", "."]) == 2
    assert "argument OUT: . is a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_train_checkpoints_and_resumes(tmp_path, capsys):
    ckpt = tmp_path / "tiny.keras"
    state_file = tmp_path / "tiny.keras.state.json"
    base = ["train", *TINY, "--output", str(ckpt)]

    assert cli.main([*base, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy: " in out
    first = json.loads(state_file.read_text())
    assert first["completed_epochs"] == 1 and len(first["history"]) == 1
    assert first["args"]["depth"] == 8 and first["args"]["epochs"] == 1
    with zipfile.ZipFile(ckpt) as zf:  # the state also travels inside the checkpoint
        assert json.loads(zf.read(checkpoints.STATE_MEMBER)) == first

    (tmp_path / ".tiny.keras.x1y2.keras").write_bytes(b"PK")  # a save killed half-way
    assert cli.main([*base, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "Resuming" in out and "Epoch 2/2" in out and "Epoch 1/2" not in out
    second = json.loads(state_file.read_text())
    assert second["completed_epochs"] == 2 and second["args"]["epochs"] == 2
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]
    model = keras.saving.load_model(ckpt)  # optimizer state restored, then one more epoch
    assert int(model.optimizer.iterations) == 2 * STEPS_PER_EPOCH
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name, state_file.name]

    assert cli.main([*base, "--epochs", "2"]) == 0  # complete: evaluate only
    out = capsys.readouterr().out
    assert "already trained for 2 epochs" in out and "Epoch" not in out

    assert cli.main(["train", "--model", "dmrnet", "--depth", "14", "--output", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "--depth 8" in err and "--fresh" in err


@pytest.mark.slow
def test_train_builds_the_cifar_mobilenet_v2_with_width_as_alpha(tmp_path, capsys):
    """``--model mobilenetv2``: the RMNet paper's CIFAR MobileNetV2 (one depth); ``--width`` is
    its alpha, a resume key; the default checkpoint name has no depth."""
    ckpt = tmp_path / "mbv2.keras"
    base = ["train", "--model", "mobilenetv2", "--width", "0.25", "--epochs", "1"]
    assert cli.main([*base, "--train-images", "64", "--output", str(ckpt)]) == 0
    model = keras.saving.load_model(ckpt, safe_mode=True)
    reference = MobileNetV2(variant="cifar", alpha=0.25, compile=False)
    assert model.get_config()["alpha"] == 0.25
    assert model.count_params() == reference.count_params()
    capsys.readouterr()
    argv = ["train", "--model", "mobilenetv2", "--width", "0.5", "--epochs", "1"]
    assert cli.main([*argv, "--train-images", "64", "--output", str(ckpt)]) == 2
    assert "--width 0.25" in capsys.readouterr().err


@pytest.mark.slow
def test_train_on_the_first_images_only_and_resume_only_alike(tmp_path, capsys):
    """``--train-images N``: N images per epoch (steps counted by the optimizer); a resume key."""
    ckpt = tmp_path / "subset.keras"
    base = ["train", *TINY, "--output", str(ckpt), "--epochs", "1"]
    assert cli.main([*base, "--train-images", "130"]) == 0
    model = keras.saving.load_model(ckpt, safe_mode=True)
    assert int(model.optimizer.iterations) == math.ceil(130 / 64)
    capsys.readouterr()
    assert cli.main([*base[:-1], "2"]) == 2  # all images now: not the same run
    assert "--train-images 130" in capsys.readouterr().err


@pytest.mark.slow
def test_train_for_slimming_shrinks_the_scales_and_resumes_only_alike(tmp_path, capsys):
    """``--sparsity``: skip_bn blocks and proximal BNSparsity; the factor is a resume key."""
    from keras_dmr.layers import ParallelBranchBlock
    from keras_dmr.prune import bn_scales

    ckpt = tmp_path / "slim.keras"
    base = ["train", *TINY, "--output", str(ckpt), "--epochs", "2"]
    assert cli.main([*base, "--sparsity", "0.5"]) == 0
    model = keras.saving.load_model(ckpt, safe_mode=True)
    blocks = [lyr for lyr in model.layers if isinstance(lyr, ParallelBranchBlock)]
    assert blocks and all(b.skip_bn for b in blocks)
    # 23 steps × lr 0.1 × 0.5 shrink every scale by up to 1.1 on top of training: most reach 0.
    scales = bn_scales(model)
    assert np.mean(scales == 0) > 0.5, np.quantile(scales, [0.1, 0.5, 0.9])
    # The recipe's schedule ran (the functional copy has no `fit` of its own that adds it).
    assert float(model.optimizer.learning_rate) < 0.1
    capsys.readouterr()
    assert cli.main([*base[:-1], "3", "--sparsity", "0.1"]) == 2
    assert "--sparsity 0.5" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# train --strategy, tune
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_under_mirrored_strategy_and_resume(tmp_path, capsys):
    ckpt = tmp_path / "mirrored.keras"
    base = ["train", "--model", "resnet", "--depth", "8", "--strategy", "mirrored"]
    base += ["--output", str(ckpt)]
    assert cli.main([*base, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "Strategy mirrored: 1 replica(s), global batch 64" in out and "test accuracy" in out
    assert cli.main([*base, "--epochs", "2"]) == 0  # reloaded under the strategy's scope
    out = capsys.readouterr().out
    assert "Resuming" in out and "Epoch 2/2" in out
    state = json.loads((tmp_path / "mirrored.keras.state.json").read_text())
    assert state["completed_epochs"] == 2 and "strategy" not in state["args"]


TUNE_TINY = [
    "tune",
    "--scale",
    "0.25",
    "--depth",
    "8",
    "--epochs",
    "1",
    "--steps-per-epoch",
    "2",
    "--validation-steps",
    "1",
]


@pytest.mark.slow
def test_tune_end_to_end_and_resume(tmp_path, capsys):
    argv = [
        *TUNE_TINY,
        "--max-trials",
        "2",
        "--latency-budget",
        "100",
        "--directory",
        str(tmp_path),
        "--project-name",
        "tiny",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "objective latency_score (plain-model latency budget 100 ms)" in out
    assert "2 trial(s):" in out and out.count("COMPLETED") == 2
    assert "best trial " in out and "plain model: " in out
    best = tmp_path / "tiny" / "best.keras"
    summary = json.loads((tmp_path / "tiny" / "best.keras.json").read_text())
    assert summary["objective"] == "latency_score" and summary["family"] == "dmrnet"
    values = summary["hyperparameters"]
    assert set(values) == {"branches", "mapping", "learning_rate", "weight_decay"}
    assert values["branches"] in (1, 2, 4, 8)
    assert summary["metrics"]["latency_budget_ms"] == 100
    assert summary["metrics"]["plain_latency_ms"] > 0 and summary["machine"]["cores"] >= 1
    model = keras.saving.load_model(best, safe_mode=True)
    assert {b.branches for b in model.blocks} == {values["branches"]}

    table = out[out.index("2 trial(s):") : out.index("best trial ")]
    assert cli.main(argv) == 0  # the same project again: resumed, nothing left to run
    out = capsys.readouterr().out
    assert "resuming after 2 completed trial(s)" in out and "Search: Running" not in out
    assert out[out.index("2 trial(s):") : out.index("best trial ")] == table
    assert json.loads((tmp_path / "tiny" / "best.keras.json").read_text()) == summary


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["tune", "--family", "dmrnet", "--blocks-per-stage", "2,2,2,2"], "--blocks-per-stage"),
        (["tune", "--family", "rmnet", "--branches", "2"], "--branches"),
        (["tune", "--family", "rmnet", "--depth", "50"], "depth"),
        (["tune", "--depth", "9"], "depth"),
        (["tune", "--blocks-per-stage", "2,2"], "--blocks-per-stage"),
        (["tune", "--tuner", "grid"], "--tuner"),
        (["tune", "--output", "best.h5"], "--output"),
        (["train", "--strategy", "tpu"], "--strategy"),
    ],
)
def test_tune_bad_arguments_exit_2(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "keras-dmr: error: " in err and named in err.split("keras-dmr: error: ")[1]
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())
