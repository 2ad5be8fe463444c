"""The training checkpoint format of ``keras-dmr train``: one ``.keras`` archive holding the model,
its optimizer and the training state (``keras_dmr_state.json`` inside the zip, so weights and the
epoch count cannot disagree), a readable copy beside it (``PATH.state.json``), written atomically
after every epoch (:class:`EpochCheckpoint`) and read back to resume (:func:`read_state`)."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import keras

from keras_dmr.errors import CorruptArchiveError, UsageError
from keras_dmr.utils.archives import check_keras_archive
from keras_dmr.utils.files import atomic_output, write_json

STATE_MEMBER = "keras_dmr_state.json"  # the training state inside the .keras zip


def save_checkpoint(model: keras.Model, path: Path, state: dict) -> None:
    """Save ``model`` (optimizer included) to ``path`` atomically, ``state`` inside the zip.

    The state travels in the ``.keras`` archive itself (Keras ignores extra members) so that the
    weights and the epoch count can never disagree; ``<path>.state.json`` is a readable copy.
    """
    with atomic_output(path, suffix=".keras") as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(STATE_MEMBER, json.dumps(state, indent=2))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    write_json(state, state_path(path))


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".state.json")


def read_state(output: Path) -> dict | None:
    """The training state of checkpoint ``output``; ``None`` when there is no checkpoint.

    A checkpoint that is not an intact ``.keras`` archive is never resumed nor overwritten
    silently: it is a :class:`UsageError` that says ``--fresh`` starts over."""
    if not output.exists():
        return None
    try:
        check_keras_archive(output)
    except CorruptArchiveError as err:
        raise UsageError(
            f"cannot resume: {err}. It was left as it is; pass --fresh to start over "
            "(overwriting it) or --output to write elsewhere"
        ) from None
    try:
        with zipfile.ZipFile(output) as zf:
            return json.loads(zf.read(STATE_MEMBER))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError):
        pass
    try:  # a checkpoint saved by other means, with only the sidecar
        return json.loads(state_path(output).read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(
            f"{output} exists but holds no keras-dmr training state; pass --fresh to overwrite "
            "it or --output to write elsewhere"
        ) from None


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: append the epoch's metrics to ``state`` and save the checkpoint."""

    def __init__(self, path: Path, state: dict):
        super().__init__()
        self.path, self.state = path, state
        self._start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        record["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        record["seconds"] = round(time.monotonic() - self._start, 2)
        self.state["history"].append(record)
        self.state["completed_epochs"] = epoch + 1
        save_checkpoint(self.model, self.path, self.state)
