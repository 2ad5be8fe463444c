"""Resumable training with the paper's recipe: the loop behind ``keras-dmr train`` and the demo.

A run writes its checkpoint after every epoch (:class:`~keras_dmr.training.checkpoints.
EpochCheckpoint`) with a state file recording its settings; the same run started again resumes
it (optimizer state included) or, complete, only evaluates it. A checkpoint whose recorded
settings differ is never resumed silently.

Cannot: resume a run whose model cannot be loaded in safe mode (a custom layer not registered),
or change the dataset, batch size or model between the epochs of one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import keras

from keras_dmr import data
from keras_dmr.errors import UsageError
from keras_dmr.recipe import with_recipe_callbacks
from keras_dmr.training.checkpoints import EpochCheckpoint, read_state
from keras_dmr.training.parallel import data_parallel_devices


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One run: its data, its length and its checkpoint.

    Args:
        output: the ``.keras`` checkpoint (its state beside it, ``PATH.state.json``).
        dataset: a name of :data:`keras_dmr.data.SUPPORTED`.
        epochs: total epochs of the run.
        batch_size: images per (global) batch.
        seed: seeds the weights, shuffling and augmentation.
        data_dir: where the dataset's files are (``None``: their default places).
        train_images: train on the first N images of the training split (``None``: all).
        settings: what the checkpoint records and a resume must match (model, options, ...),
            each key named as its command-line argument.
    """

    output: Path
    dataset: str
    epochs: int
    batch_size: int = 64
    seed: int = 0
    data_dir: str | None = None
    train_images: int | None = None
    settings: Mapping = dataclasses.field(default_factory=dict)


def resume_or_build(
    run: TrainingRun, build: Callable[[], keras.Model], *, fresh: bool = False
) -> tuple[keras.Model, dict, int]:
    """The run's checkpoint loaded, or a new model from ``build``.

    Args:
        run: the run.
        build: returns a new compiled model (called only when nothing is resumed).
        fresh: ignore an existing checkpoint.

    Returns:
        ``(model, state, completed epochs)``.

    Raises:
        UsageError: the checkpoint was trained with other settings, or cannot be loaded.
    """
    state = None if fresh else read_state(run.output)
    if state is None:
        return build(), {"args": dict(run.settings), "completed_epochs": 0, "history": []}, 0
    stored = state.get("args", {})
    differ = [k for k in run.settings if stored.get(k) != run.settings[k]]
    if differ:
        was = ", ".join(
            f"--{k.replace('_', '-')} {'(default)' if stored.get(k) is None else stored[k]}"
            for k in differ
        )
        raise UsageError(
            f"{run.output} was trained with {was}; pass the same arguments to resume it, "
            "--fresh to overwrite it, or --output to write elsewhere"
        )
    try:
        model = keras.saving.load_model(run.output)
    except Exception as e:  # not ours to diagnose: any unreadable file
        raise UsageError(f"cannot load {run.output} ({e}); pass --fresh to overwrite it") from None
    return model, state, int(state["completed_epochs"])


def train(
    run: TrainingRun,
    build: Callable[[], keras.Model],
    *,
    fresh: bool = False,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy=None,
    log: Callable[[str], None] = print,
) -> tuple[keras.Model, dict]:
    """Train (or resume) ``run`` to its last epoch, validating on the test split, and evaluate.

    Args:
        run: the run.
        build: returns a new compiled model (called under ``strategy``'s scope).
        fresh: start from scratch, overwriting the checkpoint.
        callbacks: more callbacks for ``fit`` (before the checkpoint's).
        strategy: a ``tf.distribute`` strategy, or None.
        log: where progress lines go.

    Returns:
        ``(model, test metrics)``: the trained model and ``{"loss", "accuracy"}`` on the test
        split.
    """
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:  # variables, optimizer and compile under the strategy
        model, state, completed = resume_or_build(run, build, fresh=fresh)
    state["args"] = {**run.settings, "epochs": run.epochs}
    # The recipe's schedule: a builder's model adds it in `fit`; a functional copy made for
    # slimming (`with_skip_bn`), fresh or resumed, needs it given.
    all_callbacks = with_recipe_callbacks(model, [*callbacks, EpochCheckpoint(run.output, state)])
    test = _test_batches(run, log)
    if completed < run.epochs:
        _fit(run, model, completed, test, all_callbacks, log)
    else:
        log(f"{run.output} is already trained for {completed} epochs; evaluating it")
    return model, model.evaluate(test, verbose=0, return_dict=True)


def _test_batches(run: TrainingRun, log: Callable[[str], None]):
    """The test split, batched; in a data-parallel run, its first multiple of the device count
    (every batch must split evenly; a note says how many images, at most devices - 1, that
    leaves out)."""
    test = data.load(run.dataset, "test", batch_size=run.batch_size, data_dir=run.data_dir)
    devices = data_parallel_devices()
    if devices == 1:
        return test
    images = sum(int(y.shape[0]) for _, y in test)
    keep = images - images % devices
    if keep == images:
        return test
    log(
        f"validating on {keep:,} of the {images:,} test images: {devices} devices split whole "
        f"multiples of {devices} only"
    )
    return data.load(
        run.dataset, "test", batch_size=run.batch_size, data_dir=run.data_dir, take=keep
    )


def _fit(run: TrainingRun, model, completed: int, test, callbacks, log) -> None:
    if completed:
        log(f"Resuming {run.output} after epoch {completed} of {run.epochs}")
    else:
        log(
            f"Training {model.name} ({model.count_params():,} parameters) on {run.dataset} for "
            f"{run.epochs} epoch{'s' if run.epochs > 1 else ''}; checkpoint: {run.output}"
        )
    run.output.parent.mkdir(parents=True, exist_ok=True)
    for stale in run.output.parent.glob(f".{run.output.name}.*"):  # temporaries of a killed save
        stale.unlink(missing_ok=True)
    # A resumed run reshuffles from a different seed than epoch 0 did, not from the same.
    train_data = data.load(
        run.dataset,
        "train",
        batch_size=run.batch_size,
        data_dir=run.data_dir,
        seed=run.seed + completed,
        take=run.train_images,
        drop_remainder=data_parallel_devices() > 1,  # every batch must split evenly
    )
    model.fit(
        train_data,
        validation_data=test,
        initial_epoch=completed,
        epochs=run.epochs,
        shuffle=False,  # the pipeline shuffles; Keras would warn that it cannot
        verbose=1 if sys.stdout.isatty() else 2,
        callbacks=callbacks,
    )
