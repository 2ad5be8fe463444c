"""Tests for keras_dmr.tuning: search spaces, searches with every Keras Tuner tuner on digits,
the plain-model latency objective, tuning under a strategy, and resuming a killed search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf

from keras_dmr import data, tuning
from keras_dmr.layers.blocks import ParallelBranchBlock
from keras_dmr.recipe import RecipeSGD
from keras_dmr.tuning import HyperDMRNet, HyperRMNet

# Tiny trials: DMRNet-8 at a quarter of the rule's widths, 2 batches per epoch, 1 to validate.
TINY = dict(scale=0.25, depth=8)


def space_of(hypermodel) -> dict:
    hp = kt.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    return {p.name: p.get_config() for p in hp.space}


def choices(space: dict) -> dict:
    return {name: config["values"] for name, config in space.items() if "values" in config}


def ranges(space: dict) -> dict:
    return {
        name: (config["min_value"], config["max_value"], config["sampling"], config["default"])
        for name, config in space.items()
        if "min_value" in config
    }


RECIPE_RANGES = {
    "learning_rate": (0.01, 1.0, "log", 0.1),
    "weight_decay": (1e-5, 1e-3, "log", 1e-4),
}


@pytest.fixture(scope="module")
def digits():
    train = data.load("digits", "train", batch_size=32).take(2)
    val = data.load("digits", "test", batch_size=64).take(1)
    return train, val


# --------------------------------------------------------------------------- search spaces


def test_dmrnet_space_is_the_documented_one():
    space = space_of(HyperDMRNet())
    assert list(space) == ["branches", "mapping", "learning_rate", "weight_decay"]
    assert choices(space) == {"branches": [1, 2, 4, 8], "mapping": ["merge_and_run", "identity"]}
    assert space["branches"]["default"] == 2 and space["mapping"]["default"] == "merge_and_run"
    assert ranges(space) == RECIPE_RANGES


def test_values_given_are_fixed_and_leave_the_space():
    hypermodel = HyperDMRNet(
        branches=4, mapping="identity", learning_rate=0.05, weight_decay=0.0, **TINY
    )
    assert space_of(hypermodel) == {}
    hp = kt.HyperParameters()
    model = hypermodel.build(hp)
    assert hp.space == []
    assert {b.branches for b in model.blocks} == {4} and {b.mapping for b in model.blocks} == {
        "identity"
    }
    assert isinstance(model.optimizer, RecipeSGD)
    assert model.optimizer.initial_learning_rate == 0.05 and model.optimizer.l2 == 0.0


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            "same_params_depth",
            {
                1: (50, (23, 46, 92)),
                2: (50, (16, 32, 64)),
                4: (50, (12, 24, 48)),
                8: (50, (8, 16, 32)),
            },
        ),
        (
            "same_width",
            {
                1: (98, (16, 32, 64)),
                2: (50, (16, 32, 64)),
                4: (26, (16, 32, 64)),
                8: (14, (16, 32, 64)),
            },
        ),
    ],
)
def test_rules_are_section_5(rule, expected):
    hypermodel = HyperDMRNet(rule=rule)
    assert {k: hypermodel.architecture(k) for k in (1, 2, 4, 8)} == expected


@pytest.mark.parametrize("branches", [1, 8])
def test_build_applies_the_rule_widths_scale_and_depth(branches):
    # same_params_depth K=8: (8, 16, 32) per branch; scale 0.5: (4, 8, 16); depth 8: 1 block/stage
    hypermodel = HyperDMRNet(scale=0.5, depth=8)
    hp = kt.HyperParameters()
    hp.values["branches"] = branches
    model = hypermodel.build(hp)
    widths = {1: (12, 23, 46), 8: (4, 8, 16)}[branches]  # round(23·0.5) = 12 (half to even)
    blocks = [b for b in model.layers if isinstance(b, ParallelBranchBlock)]
    assert [b.filters for b in blocks] == list(widths)
    assert {b.branches for b in blocks} == {branches}
    assert model.optimizer.initial_learning_rate == pytest.approx(0.1)  # the hp default


def test_repvgg_spaces():
    paper = space_of(HyperRMNet(family="repvgg"))
    assert list(paper) == ["depth", "reserve_ratio", "learning_rate", "weight_decay"]
    assert choices(paper) == {"depth": [21, 37, 69, 133], "reserve_ratio": [0.0, 0.25, 0.5, 0.75]}
    assert ranges(paper) == RECIPE_RANGES
    continuous = space_of(HyperRMNet(family="repvgg", reserve_ratios="continuous"))
    assert ranges(continuous)["reserve_ratio"] == (0.0, 1.0, "linear", 0.25)
    # blocks_per_stage replaces the depth; a fixed ratio leaves the space
    tiny = HyperRMNet(family="repvgg", blocks_per_stage=(2, 2, 2, 2), reserve_ratio=0.5)
    assert list(space_of(tiny)) == ["learning_rate", "weight_decay"]


def test_rmnext_spaces():
    paper = space_of(HyperRMNet(family="rmnext"))
    assert list(paper) == [
        "depth",
        "expansion",
        "channels_per_group",
        "learning_rate",
        "weight_decay",
    ]
    assert choices(paper) == {
        "depth": [26, 41, 50, 101, 152],
        "expansion": [3, 4, 5, 6],
        "channels_per_group": [8, 16, 32],
    }
    assert paper["channels_per_group"]["default"] == 32
    # scale 1/8: widths 8/16/32/64, C scaled to 1, 2, 4 (2·C divides 8)
    tiny = HyperRMNet(family="rmnext", scale=0.125, blocks_per_stage=(1, 1, 1, 1))
    assert choices(space_of(tiny)) == {"expansion": [3, 4, 5, 6], "channels_per_group": [1, 2, 4]}


def test_continuous_ratio_builds_below_one():
    hypermodel = HyperRMNet(
        family="repvgg",
        reserve_ratios="continuous",
        scale=0.125,
        blocks_per_stage=(2, 2, 2, 2),
    )
    hp = kt.HyperParameters()
    hp.values["reserve_ratio"] = 1.0  # Bayesian optimisation can reach the boundary
    model = hypermodel.build(hp)
    assert model.get_config()["reserve_ratio"] < 1
    reserving = model.get_layer("stage2_block1")  # 16 channels: all but one reserved
    assert reserving.get_config()["reserve_ratio"] < 1


def test_rmnext_build_uses_the_trial_values():
    hypermodel = HyperRMNet(family="rmnext", scale=0.125, blocks_per_stage=(1, 1, 1, 1))
    hp = kt.HyperParameters()
    hp.values.update(expansion=4, channels_per_group=2, learning_rate=0.2)
    model = hypermodel.build(hp)
    config = model.get_config()
    assert (config["expansion"], config["channels_per_group"]) == (4, 2)
    assert config["widths"] == [8, 16, 32, 64]
    assert model.optimizer.initial_learning_rate == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: HyperDMRNet(rule="wide"), "rule"),
        (lambda: HyperDMRNet(branches=3), "branches"),
        (lambda: HyperDMRNet(mapping="vanilla"), "mapping"),
        (lambda: HyperDMRNet(depth=9), "depth"),
        (lambda: HyperDMRNet(scale=0), "scale"),
        (lambda: HyperDMRNet(learning_rate=-1), "learning_rate"),
        (lambda: HyperDMRNet(latency_objective="latency_score"), "latency_objective"),
        (lambda: HyperRMNet(family="resnet"), "family"),
        (lambda: HyperRMNet(reserve_ratio=1.0), "reserve_ratio"),
        (lambda: HyperRMNet(reserve_ratios="some"), "reserve_ratios"),
        (lambda: HyperRMNet(family="rmnext", reserve_ratio=0.5), "reserve_ratio"),
        (lambda: HyperRMNet(family="repvgg", expansion=3), "expansion"),
        (lambda: HyperRMNet(family="rmnext", channels_per_group=3), "channels_per_group"),
        (lambda: HyperRMNet(family="rmnext", scale=0.05), "scale"),
        (lambda: HyperRMNet(depth=26), "depth"),
        (lambda: tuning.plain_latency_objective(0), "budget_ms"),
        (lambda: tuning.plain_latency_objective(1.0, repeats=0), "repeats"),
        (lambda: tuning.make_tuner(HyperDMRNet(), "grid"), "tuner"),
        (lambda: tuning.make_tuner(HyperDMRNet(), "hyperband"), "max_epochs"),
        (lambda: tuning.make_strategy("parameter_server"), "strategy"),
    ],
)
def test_bad_arguments_name_the_argument(make, named):
    with pytest.raises(ValueError, match=named):
        make()


# --------------------------------------------------------------------------- latency objective


def test_latency_score_definition():
    objective = tuning.plain_latency_objective(2.0)
    assert (objective.name, objective.direction) == ("latency_score", "max")
    assert objective.score(0.9, 1.5) == 0.9  # within the budget: the accuracy
    assert objective.score(0.9, 2.0) == 0.9
    assert objective.score(0.9, 4.0) == pytest.approx(0.45)  # twice over: half


# --------------------------------------------------------------------------- searches


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
@pytest.mark.parametrize("tuner_name", ["random", "bayesian", "hyperband"])
def test_tiny_search_on_digits(tuner_name, digits, tmp_path):
    """Two trials of each tuner to completion; random search also scores the plain latency."""
    train, val = digits
    # A budget no model meets (a microsecond per image): every trial is scored over budget, so
    # the penalty accuracy × budget / latency is exercised end to end.
    budget = 1e-3
    objective = tuning.plain_latency_objective(budget, iters=3, repeats=3)
    latency = tuner_name == "random"
    # K is searched by the random search; the others fix it at 2 for cheaper trials
    fixed = {} if latency else {"branches": 2}
    hypermodel = HyperDMRNet(latency_objective=objective if latency else None, **TINY, **fixed)
    tuner = tuning.make_tuner(
        hypermodel,
        tuner_name,
        max_trials=2,
        max_epochs=2,  # Hyperband with max_epochs 2: one bracket of two 2-epoch trials
        seed=3,
        directory=str(tmp_path),
        project_name=tuner_name,
        # the second trial comes from the Gaussian process, not the random start
        **({"num_initial_points": 1} if tuner_name == "bayesian" else {}),
    )
    assert tuner.oracle.objective.name == ("latency_score" if latency else "val_accuracy")
    tuner.search(train, validation_data=val, epochs=1, verbose=0)
    trials = list(tuner.oracle.trials.values())
    assert len(trials) == 2 and all(t.status == "COMPLETED" for t in trials)
    # The summary names the trial with the highest score (earliest on a tie), found here
    # independently of best_trial's own rule.
    summary = tuning.best_summary(tuner)
    top = max(t.score for t in trials)
    expected_best = sorted(t.trial_id for t in trials if t.score == top)[0]
    assert summary["trial_id"] == expected_best and summary["score"] == top
    assert summary["hyperparameters"] == tuner.oracle.trials[expected_best].hyperparameters.values
    if latency:
        for trial in trials:
            metrics = {n: trial.metrics.get_last_value(n) for n in trial.metrics.metrics}
            assert metrics["latency_budget_ms"] == budget
            assert metrics["plain_latency_ms"] > budget and metrics["within_budget"] == 0
            assert metrics["plain_max_relative_error"] <= 1e-4
            penalised = metrics["val_accuracy"] * budget / metrics["plain_latency_ms"]
            assert trial.score == pytest.approx(penalised)
            assert metrics["latency_score"] == pytest.approx(penalised)
            if metrics["val_accuracy"] > 0:
                assert trial.score < metrics["val_accuracy"]
        print(
            "tiny search:",
            json.dumps({k: summary[k] for k in ("hyperparameters", "metrics")}, default=float),
        )
    else:
        assert summary["score"] == summary["metrics"]["val_accuracy"]
    model = tuner.load_model(tuning.best_trial(tuner))
    assert model.evaluate(val, verbose=0, return_dict=True)["accuracy"] == pytest.approx(
        summary["metrics"]["val_accuracy"]
    )


class _RecordingHyperDMRNet(HyperDMRNet):
    """Records the strategy in force while the model is built and compiled."""

    seen: list = []

    def build(self, hp):
        model = super().build(hp)
        self.seen.append((tf.distribute.get_strategy(), model.distribute_strategy))
        return model


@pytest.mark.slow
def test_search_under_a_strategy_builds_and_compiles_in_its_scope(digits, tmp_path):
    train, val = digits
    strategy = tuning.make_strategy("mirrored")
    hypermodel = _RecordingHyperDMRNet(**TINY)
    tuner = tuning.make_tuner(
        hypermodel,
        max_trials=1,
        directory=str(tmp_path),
        project_name="mirrored",
        distribution_strategy=strategy,
    )
    _RecordingHyperDMRNet.seen.clear()
    tuner.search(train, validation_data=val, epochs=1, verbose=0)
    assert [t.status for t in tuner.oracle.trials.values()] == ["COMPLETED"]
    assert _RecordingHyperDMRNet.seen
    assert all(
        current is strategy and own is strategy for current, own in _RecordingHyperDMRNet.seen
    )


# --------------------------------------------------------------------------- resume

SEARCH_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import keras
    from keras_dmr import data, tuning

    class BlockInSecondTrial(keras.callbacks.Callback):
        # KERAS_DMR_TEST_BLOCK=DIR: the second trial announces itself in DIR after its first
        # batch and hangs there, to be killed (a file tells the trials apart: Keras Tuner
        # gives every trial its own copy of the callback)
        def on_train_begin(self, logs=None):
            where = os.environ.get("KERAS_DMR_TEST_BLOCK")
            first = where and os.path.join(where, "first_trial")
            self.block = bool(where) and os.path.exists(first)
            if where and not self.block:
                open(first, "w").close()

        def on_train_batch_end(self, batch, logs=None):
            if self.block:
                open(os.path.join(os.environ["KERAS_DMR_TEST_BLOCK"], "blocked"), "w").close()
                time.sleep(600)

    def search(directory, max_trials):
        hypermodel = tuning.HyperDMRNet(scale=0.25, depth=8, branches=2)
        tuner = tuning.make_tuner(
            hypermodel, "random", max_trials=max_trials, seed=7, directory=directory,
            project_name="resume",
        )
        train = data.load("digits", "train", batch_size=32).take(2)
        val = data.load("digits", "test", batch_size=64).take(1)
        tuner.search(train, validation_data=val, epochs=1, verbose=0,
                     callbacks=[BlockInSecondTrial()])
        return tuner

    if __name__ == "__main__":
        search(sys.argv[1], int(sys.argv[2]))
    """
)


def _trials(project: Path) -> dict:
    found = {}
    for path in sorted(project.glob("trial_*/trial.json")):
        trial = json.loads(path.read_text())
        found[trial["trial_id"]] = trial
    return found


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the search exited ({process.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path.name} within {timeout:.0f} s")
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_search_resumes_without_losing_or_repeating_trials(tmp_path):
    script = tmp_path / "search.py"
    script.write_text(SEARCH_SCRIPT)
    markers = tmp_path / "markers"
    markers.mkdir()
    log = tmp_path / "first.log"
    env = {**os.environ, "KERAS_DMR_TEST_BLOCK": str(markers), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [sys.executable, str(script), str(tmp_path / "kt"), "2"]
    with open(log, "w") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(markers / "blocked", process, timeout=150)
        process.send_signal(signal.SIGKILL)  # mid-way: the second trial is training
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    project = tmp_path / "kt" / "resume"
    before = _trials(project)
    completed = {i: t for i, t in before.items() if t["status"] == "COMPLETED"}
    assert len(completed) == 1, log.read_text()[-3000:]
    assert any(t["status"] == "RUNNING" for t in before.values())  # the killed one

    # Resume here, in this process (the same search code, without the block)
    namespace = {"__name__": "resumed_search"}
    exec(compile(SEARCH_SCRIPT, str(script), "exec"), namespace)
    tuner = namespace["search"](str(tmp_path / "kt"), 2)
    assert len(tuner.oracle.trials) == 2
    after = _trials(project)
    assert len(after) == 2 and all(t["status"] == "COMPLETED" for t in after.values())
    for trial_id, trial in completed.items():  # kept as they were: not rerun
        assert after[trial_id]["hyperparameters"]["values"] == trial["hyperparameters"]["values"]
        assert after[trial_id]["metrics"] == trial["metrics"]
        assert after[trial_id]["score"] == trial["score"]
    for trial_id, trial in before.items():  # the interrupted trial reran with its values
        assert after[trial_id]["hyperparameters"]["values"] == trial["hyperparameters"]["values"]
    values = [json.dumps(t["hyperparameters"]["values"], sort_keys=True) for t in after.values()]
    assert len(set(values)) == 2  # no configuration ran twice


def test_strategies_by_name():
    assert tuning.make_strategy(None) is None and tuning.make_strategy("none") is None
    mirrored = tuning.make_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert not tuning.is_multi_worker(mirrored)
    with mirrored.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert model.distribute_strategy is mirrored
    assert np.isfinite(model.predict(np.ones((2, 2)), verbose=0)).all()


def _fake_tuner(direction: str, scores: dict, statuses: dict | None = None):
    """A stand-in with what best_trial reads: the oracle's objective direction and its trials."""
    from types import SimpleNamespace

    statuses = statuses or {}
    trials = {
        trial_id: SimpleNamespace(
            trial_id=trial_id, score=score, status=statuses.get(trial_id, "COMPLETED")
        )
        for trial_id, score in scores.items()
    }
    objective = SimpleNamespace(direction=direction)
    return SimpleNamespace(oracle=SimpleNamespace(objective=objective, trials=trials))


def test_best_trial_follows_the_direction_and_breaks_ties_by_the_earliest_trial():
    scores = {"03": 0.7, "00": 0.5, "01": 0.9, "02": 0.9, "04": 0.2}
    assert tuning.best_trial(_fake_tuner("max", scores)).trial_id == "01"  # tie 01/02: earliest
    assert tuning.best_trial(_fake_tuner("min", scores)).trial_id == "04"
    tie_low = {"05": 0.1, "02": 0.1, "07": 0.4}
    assert tuning.best_trial(_fake_tuner("min", tie_low)).trial_id == "02"
    # Only completed trials count; none completed is a clear error.
    running = _fake_tuner("max", scores, {"01": "RUNNING", "02": "INVALID"})
    assert tuning.best_trial(running).trial_id == "03"
    with pytest.raises(ValueError, match="no completed trial"):
        tuning.best_trial(_fake_tuner("max", {"00": 1.0}, {"00": "RUNNING"}))


def test_the_command_line_offers_the_library_s_tuners():
    """keras-dmr keeps its own tuple of tuners (importing keras_dmr.tuning would load Keras
    Tuner for every command); it must stay the library's."""
    from keras_dmr.cli.tune import TUNERS

    assert TUNERS == tuning.TUNERS
