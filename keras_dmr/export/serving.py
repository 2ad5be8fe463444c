"""What both export formats share: the plain model, the serving function, metadata, atomic
versioned writing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from keras_dmr.convert import to_plain
from keras_dmr.convert.graph import read_graph
from keras_dmr.errors import ConversionError, ExportError
from keras_dmr.utils.arguments import directory_problem
from keras_dmr.utils.files import umask

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities", "classes")


def resolve_preprocessing(preprocessing) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` on the 0..255 scale from a dataset name or a pair; None for none."""
    if preprocessing is None or preprocessing == "none":
        return None
    if isinstance(preprocessing, str):
        from keras_dmr.data import dataset_info

        try:
            info = dataset_info(preprocessing)
        except ValueError as err:
            raise ExportError(
                f"`preprocessing` must be a dataset name of keras_dmr.data, a (mean, std) pair "
                f"or 'none'; got {preprocessing!r}"
            ) from err
        return np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    try:
        mean, std = (np.asarray(v, np.float32).reshape(-1) for v in preprocessing)
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"`preprocessing` must be a dataset name, a (mean, std) pair or 'none'; got "
            f"{preprocessing!r}"
        ) from err
    if np.any(std <= 0):
        raise ExportError(f"`preprocessing` std must be > 0; got {std.tolist()}")
    return mean, std


def is_plain(model: keras.Model) -> bool:
    """Single-path by its graph (nested models and operations such as ``x + y`` included):
    no tensor used twice, no merge, no layer that rewrites itself. A model whose graph cannot
    be read is not known to be plain."""
    try:
        return read_graph(model).is_chain()
    except ConversionError:
        return False


def prepare(model, *, plain: bool, tolerance: float):
    """The model to export, its logits model, and what the metadata says about conversion."""
    if not isinstance(model, keras.Model) or not model.built:
        raise ExportError(f"{model!r} is not a built keras.Model")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(f"model {model.name!r}: one input and one output are required")
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(s is None for s in shape):
        raise ExportError(
            f"model {model.name!r}: input shape {shape} must be a known (height, width, channels)"
        )
    conversion = None
    source = model
    if plain and not is_plain(model):
        model = to_plain(model, tolerance=tolerance)
        conversion = dict(model.conversion_report)
    return source, model, _logits_model(model), conversion


def _logits_model(model: keras.Model) -> keras.Model:
    """The model with a linear last Dense (its softmax moves into the serving function)."""
    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense):
        raise ExportError(
            f"model {model.name!r}: the last layer must be the Dense classifier (include_top=True) "
            f"to export logits, probabilities and classes; got {type(last).__name__}"
        )
    activation = keras.activations.serialize(last.activation)
    if activation in ("linear", None):
        return model
    if activation != "softmax":
        raise ExportError(
            f"model {model.name!r}: classifier activation {activation!r}: only None (logits) "
            "or 'softmax' can be exported"
        )
    linear = keras.layers.Dense(last.units, name=f"{last.name}_logits")
    outputs = linear(last.input)
    linear.set_weights(last.get_weights())
    return keras.Model(model.inputs, outputs, name=model.name)


def serving_function(logits_model: keras.Model, preprocessing):
    """A ``tf.function`` from ``images`` (uint8, or float32 without preprocessing) to the named
    outputs ``logits``, ``probabilities`` and ``classes``."""
    import tensorflow as tf

    h, w, c = logits_model.inputs[0].shape[1:]
    norm = resolve_preprocessing(preprocessing)
    dtype = tf.uint8 if norm is not None else tf.float32
    spec = tf.TensorSpec([None, h, w, c], dtype, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(images):
        tf.debugging.assert_equal(
            tf.shape(images)[1:],
            tf.constant([h, w, c]),
            message=f"`images` must have shape [batch, {h}, {w}, {c}]",
        )
        x = tf.cast(images, tf.float32)
        if norm is not None:
            x = (x - tf.constant(norm[0])) / tf.constant(norm[1])
        logits = logits_model(x, training=False)
        return {
            "logits": tf.identity(logits, name="logits"),
            "probabilities": tf.nn.softmax(logits, name="probabilities"),
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int64, name="classes"),
        }

    return serve, norm


def metadata(source, exported, conversion, norm, class_names, *, fmt: str) -> dict:
    import tensorflow as tf

    from keras_dmr.version import __version__

    config = None
    with contextlib.suppress(Exception):
        config = json.loads(json.dumps(source.get_config(), default=str))
    h, w, c = exported.inputs[0].shape[1:]
    return {
        "format": fmt,
        "source": {"name": source.name, "class": type(source).__name__, "config": config},
        "plain": conversion is not None or is_plain(source),
        "conversion": conversion,
        "input": {
            "name": INPUT_NAME,
            "shape": [None, h, w, c],
            "dtype": "uint8" if norm is not None else "float32",
            "normalization": None
            if norm is None
            else {"mean": norm[0].tolist(), "std": norm[1].tolist(), "scale": "0..255"},
        },
        "outputs": list(OUTPUT_NAMES),
        "class_names": list(class_names) if class_names is not None else None,
        "versions": {
            "keras_dmr": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
    }


def check_class_names(class_names: Sequence[str] | None, classes: int):
    if class_names is not None and len(class_names) != classes:
        raise ExportError(
            f"`class_names` must have one name per class ({classes}); got {len(class_names)}"
        )


def check_file_destination(path: Path, suffix: str, overwrite: bool) -> None:
    """Refuse, before any work, a file export's path: wrong suffix, a directory, an unwritable
    parent, or an existing file without ``overwrite``."""
    if path.suffix != suffix:
        raise ExportError(f"`path` must end in {suffix}; got {str(path)!r}")
    check_writable(path.parent)
    if path.is_dir():
        raise ExportError(f"`path` {path} is a directory; give a file path ending in {suffix}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True to replace it")


def check_writable(directory: Path) -> None:
    """Fail before any work if ``directory`` (or the nearest existing parent) is not writable."""
    problem = directory_problem(directory)
    if problem:
        raise ExportError(problem)


def next_version(base_dir: Path) -> int:
    """One more than the highest number any entry of ``base_dir`` is named (a version directory,
    or a file or folder that merely has a version's name: its name is never reused)."""
    taken = [int(p.name) for p in base_dir.iterdir() if re.fullmatch(r"\d+", p.name)]
    return max(taken, default=0) + 1


@contextlib.contextmanager
def staging_directory(parent: Path):
    """Yield a new hidden temporary directory in ``parent``, removed unless it was published."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MAX_VERSION_ATTEMPTS = 1000


def publish_version(tmp: Path, base: Path, version: int | None, before_rename=None) -> Path:
    """Rename the complete export ``tmp`` to ``base/<version>`` and return that path.

    An existing version is never overwritten: an explicit ``version`` that exists (or appears
    meanwhile) raises; with ``version=None`` another exporter that took the number first makes
    this one retry with the next free number, so concurrent exports all land as distinct
    versions. ``before_rename(number)`` runs before each attempt (to record the number).
    """
    os.chmod(tmp, 0o777 & ~umask())
    for _ in range(MAX_VERSION_ATTEMPTS):
        number = version or next_version(base)
        final = base / str(number)
        if not final.exists():
            if before_rename is not None:
                before_rename(number)
            try:
                os.rename(tmp, final)  # fails if another exporter's (non-empty) version is there
                return final
            except OSError:
                if not final.exists():
                    raise
        if version is not None:
            raise ExportError(
                f"{final} exists: an exported version is never overwritten; pass another "
                "`version` or None for the next one"
            )
    raise ExportError(f"{base}: no free version number after {MAX_VERSION_ATTEMPTS} attempts")
