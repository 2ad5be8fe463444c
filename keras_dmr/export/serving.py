"""What the export formats share: the plain model, what it serves (a classifier's logits,
probabilities and classes, or a backbone's named feature maps), the serving function, metadata,
atomic versioned writing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from keras_dmr.convert import output_names, to_plain
from keras_dmr.convert.graph import read_graph
from keras_dmr.errors import ConversionError, ExportError
from keras_dmr.layers.conv import split_grouped_convolutions
from keras_dmr.rm.kernels import relative_error
from keras_dmr.utils import keras_internals
from keras_dmr.utils.arguments import directory_problem
from keras_dmr.utils.files import umask

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities", "classes")  # a classifier's


@dataclasses.dataclass
class Head:
    """What an export serves. ``kind="classifier"``: a model with one output after a Dense
    layer, served as ``logits`` (``model``: the model with its softmax moved out),
    ``probabilities`` and ``classes``. ``kind="features"``: any other model (a backbone, one
    output or several), each output served as it is under its name (``names``: the dict keys
    of a dict-structured output, else the output layers' names)."""

    model: keras.Model
    kind: str
    names: tuple[str, ...]

    @property
    def classes(self) -> int | None:
        return self.model.outputs[0].shape[-1] if self.kind == "classifier" else None

    def outputs(self, x) -> dict:
        """The served outputs of the float32 batch ``x`` (TensorFlow tensors)."""
        import tensorflow as tf

        y = self.model(x, training=False)
        if self.kind == "features":  # float32 whatever the model's compute dtype
            flat = [tf.cast(t, tf.float32) for t in keras.tree.flatten(y)]
            return dict(zip(self.names, flat, strict=True))
        return {
            "logits": tf.identity(y, name="logits"),
            "probabilities": tf.nn.softmax(y, name="probabilities"),
            "classes": tf.argmax(y, axis=-1, output_type=tf.int64, name="classes"),
        }

    def describe(self) -> list[dict]:
        """The served outputs for the metadata: name, and shape and dtype of each."""
        if self.kind == "classifier":
            c = self.classes
            return [
                {"name": "logits", "shape": [None, c], "dtype": "float32"},
                {"name": "probabilities", "shape": [None, c], "dtype": "float32"},
                {"name": "classes", "shape": [None], "dtype": "int64"},
            ]
        flat = keras.tree.flatten(self.model.output)
        return [
            {"name": n, "shape": [None, *t.shape[1:]], "dtype": "float32"}
            for n, t in zip(self.names, flat, strict=True)
        ]


def feature_names(model: keras.Model) -> tuple[str, ...]:
    """The names a backbone's outputs are served under (:func:`keras_dmr.convert.output_names`:
    a dict output's keys, else the output layers' names)."""
    return tuple(output_names(model))


def is_classifier(model: keras.Model) -> bool:
    """One output, computed by a Dense layer: served as logits, probabilities and classes."""
    return len(model.outputs) == 1 and isinstance(
        keras_internals.producer(model.outputs[0]), keras.layers.Dense
    )


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
        return read_graph(model, several_outputs=True).is_chain()
    except ConversionError:
        return False


def prepare(model, *, plain: bool, tolerance: float):
    """The model to export, what it serves (:class:`Head`), and what the metadata says about
    conversion."""
    if not isinstance(model, keras.Model) or not model.built:
        raise ExportError(f"{model!r} is not a built keras.Model")
    if len(model.inputs) != 1:
        raise ExportError(f"model {model.name!r}: one image input is required")
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
    if is_classifier(model):
        head = Head(_logits_model(model), "classifier", OUTPUT_NAMES)
    else:
        head = Head(model, "features", feature_names(model))
    return source, model, head, conversion


def check_classifier(head: Head, what: str) -> None:
    """Refuse what only a classifier has (class names, accuracy) for a feature model."""
    if head.kind != "classifier":
        raise ExportError(
            f"model {head.model.name!r} serves feature maps ({', '.join(head.names)}), not a "
            f"classifier's logits (its output is not one Dense layer's), so {what} does not "
            "apply to it"
        )


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


def serving_function(head: Head, preprocessing, *, check_shape: bool = True):
    """A ``tf.function`` from ``images`` (uint8, or float32 without preprocessing) to the named
    outputs of ``head``; ``check_shape=False`` leaves out the input shape assertion (an
    ``Assert`` is a Flex op in LiteRT, which checks input shapes itself)."""
    import tensorflow as tf

    h, w, c = head.model.inputs[0].shape[1:]
    norm = resolve_preprocessing(preprocessing)
    dtype = tf.uint8 if norm is not None else tf.float32
    spec = tf.TensorSpec([None, h, w, c], dtype, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(images):
        if check_shape:
            tf.debugging.assert_equal(
                tf.shape(images)[1:],
                tf.constant([h, w, c]),
                message=f"`images` must have shape [batch, {h}, {w}, {c}]",
            )
        x = tf.cast(images, tf.float32)
        if norm is not None:
            x = (x - tf.constant(norm[0])) / tf.constant(norm[1])
        return head.outputs(x)

    return serve, norm


# Every exported float32 file is run by its own runtime on this many random images and compared
# with the serving function in TensorFlow (:func:`check_exported_outputs`).
VERIFY_IMAGES = 2


def check_exported_outputs(predict, serve, head: Head, tolerance: float, uint8: bool, what: str):
    """Run an exported float32 file (``predict(output_name)(images)``, in its own runtime) and
    the serving function ``serve`` (TensorFlow) on :data:`VERIFY_IMAGES` random images; every
    output but ``classes`` (an argmax, compared through the logits) must agree within
    ``tolerance`` (maximum relative error), else :class:`ExportError` naming ``what``. A
    converter that mistranslates a graph fails here instead of writing a wrong file."""
    h, w, c = head.model.inputs[0].shape[1:]
    rng = np.random.default_rng(0)
    if uint8:
        images = rng.integers(0, 256, size=(VERIFY_IMAGES, h, w, c), dtype=np.uint8)
    else:
        images = rng.normal(size=(VERIFY_IMAGES, h, w, c)).astype(np.float32)
    want = {k: np.asarray(v) for k, v in serve(images).items()}
    for name in head.names:
        if name == "classes":
            continue
        error = relative_error(want[name], predict(name)(images))
        if not error <= tolerance:
            raise ExportError(
                f"{what}'s output {name!r} differs from the Keras model by a maximum relative "
                f"error of {error:.3g}, above `tolerance`={tolerance:g}; no file was written "
                "(a converter that mistranslates an operator shows as 1e-2 or more; float32 "
                "rounding in a deep model as 1e-5 to 1e-4, which a larger `tolerance` accepts)"
            )


@contextlib.contextmanager
def staged_saved_model(serve, model: keras.Model):
    """A scratch SavedModel of the serving function ``serve`` (calling ``model``): what the
    LiteRT and OpenVINO converters read best (they freeze the variables and keep the
    signature's names). Removed on exit."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as scratch:
        module = tf.Module()
        module.model_variables = [v.value for v in model.variables]
        module.serve = serve
        # Saving traces the function again: split there too (builtin CONV_2D per group,
        # whatever this machine's kernels).
        with split_grouped_convolutions():
            concrete = serve.get_concrete_function()
            tf.saved_model.save(module, scratch, signatures={"serving_default": concrete})
        yield scratch


def metadata(source, exported, conversion, norm, class_names, *, fmt: str, head: Head) -> dict:
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
        # quantization-aware fine-tuning (keras_dmr.training.qat.fine_tune) the model went through
        "qat": json.loads(json.dumps(getattr(source, "qat_report", None), default=str)),
        "input": {
            "name": INPUT_NAME,
            "shape": [None, h, w, c],
            "dtype": "uint8" if norm is not None else "float32",
            "normalization": None
            if norm is None
            else {"mean": norm[0].tolist(), "std": norm[1].tolist(), "scale": "0..255"},
        },
        "head": head.kind,
        "outputs": list(head.names),
        "output_specs": head.describe(),
        "class_names": list(class_names) if class_names is not None else None,
        "versions": {
            "keras_dmr": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
    }


def check_class_names(class_names: Sequence[str] | None, head: Head):
    if class_names is None:
        return
    check_classifier(head, "`class_names`")
    classes = head.classes
    if len(class_names) != classes:
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
