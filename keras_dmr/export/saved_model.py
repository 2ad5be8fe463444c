"""SavedModels in TF Serving's layout: ``base_dir/<version>/saved_model.pb`` + ``variables/``."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras

from keras_dmr.export.serving import (
    ExportError,
    check_class_names,
    check_writable,
    metadata,
    prepare,
    publish_version,
    serving_function,
    staging_directory,
)
from keras_dmr.layers.conv import split_grouped_convolutions

METADATA_FILE = "keras_dmr.json"


def saved_model(
    model: keras.Model,
    base_dir: str | Path,
    *,
    preprocessing,
    version: int | None = None,
    plain: bool = True,
    class_names: Sequence[str] | None = None,
    tolerance: float = 1e-4,
) -> str:
    """Export ``model`` for TF Serving and return the version directory written.

    ``preprocessing`` says what the signature receives: a dataset name of :mod:`keras_dmr.data`
    (``"digits"``, ``"cifar10"``, ...) or a ``(mean, std)`` pair on the 0..255 scale makes the
    input ``images`` **uint8** pixels ``[batch, H, W, 3]``, normalised inside the graph;
    ``"none"`` makes it float32 fed to the model as is. The ``serving_default`` signature of a
    classifier (one output, a Dense layer's) returns ``logits`` (float32), ``probabilities``
    (softmax) and ``classes`` (int64 argmax); any other model (a backbone with one output or a
    feature pyramid) returns each output under its name (a dict output's keys, else the output
    layers' names), float32.

    With ``plain=True`` a residual model is first converted by :func:`keras_dmr.to_plain` and
    verified (the error goes into the metadata asset ``assets/keras_dmr.json``, beside the source
    architecture and config, the input spec, ``class_names`` and the versions used).
    ``version=None`` takes the next integer after the highest name present (a file named like a
    version counts) and, when another export takes that number first (two processes exporting
    to one ``base_dir``), the next free one; an existing version is never overwritten. The export
    is written to a hidden temporary directory in ``base_dir`` and renamed at the end, so a
    version directory is always complete.

    Args:
        model: the Keras model to export (converted first with ``plain=True``).
        base_dir: the model's directory; versions are its numbered subdirectories.
        preprocessing: a dataset name, a ``(mean, std)`` pair or ``"none"``.
        version: the version number (``None``: the next free one).
        plain: convert a residual model with :func:`keras_dmr.to_plain` first.
        class_names: names of the classes, stored in the metadata.
        tolerance: maximum relative error of the conversion and of the exported outputs.

    Returns:
        The version directory written.
    """
    import tensorflow as tf

    base = Path(base_dir)
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ExportError(f"`version` must be an integer >= 1 or None; got {version!r}")
    if base.exists() and not base.is_dir():
        raise ExportError(f"`base_dir` {base} exists and is not a directory")
    check_writable(base)
    source, exported, head, conversion = prepare(model, plain=plain, tolerance=tolerance)
    check_class_names(class_names, head)
    serve, norm = serving_function(head, preprocessing)
    base.mkdir(parents=True, exist_ok=True)
    if version is not None and (base / str(version)).exists():
        raise ExportError(
            f"{base / str(version)} exists: an exported version is never overwritten; pass "
            "another `version` or None for the next one"
        )
    info = metadata(source, exported, conversion, norm, class_names, fmt="saved_model", head=head)
    with staging_directory(base) as tmp, tempfile.TemporaryDirectory() as scratch:
        meta_path = Path(scratch) / METADATA_FILE
        meta_path.write_text(json.dumps(info, indent=2) + "\n")
        module = tf.Module()
        # The tf.Variables behind the Keras variables, tracked directly: a Keras variable (or a
        # model held as an attribute) is saved as a wrapper that TF2's loader resolves but the
        # TF1 Session restore of `saved_model_cli run` and TF Serving's C++ loader cannot
        # ("Could not find variable ..."). Listing them also reaches variables of layers held
        # in nested lists (a residual ParallelBranchBlock).
        module.model_variables = [v.value for v in head.model.variables]
        module.serve = serve
        module.metadata = tf.saved_model.Asset(str(meta_path))
        export_dir = tmp / "version"
        # Standard ops any TensorFlow (Serving) build runs; saving traces the function again.
        with split_grouped_convolutions():
            concrete = serve.get_concrete_function()
            tf.saved_model.save(module, str(export_dir), signatures={"serving_default": concrete})
        check_no_xla(export_dir)

        def record(number: int) -> None:  # the version lands in the exported metadata asset
            info["version"] = number
            asset = export_dir / "assets" / METADATA_FILE
            asset.write_text(json.dumps(info, indent=2) + "\n")

        final = publish_version(export_dir, base, version, before_rename=record)
    return str(final)


def check_no_xla(export_dir: str | Path) -> None:
    """Raise if a function in the SavedModel must be XLA-compiled: TF Serving runs standard
    kernels, and Keras' grouped Conv2D on TensorFlow compiles its convolution with XLA.

    Args:
        export_dir: a SavedModel directory.

    Returns:
        None.

    Raises:
        ExportError: a function is marked ``_XlaMustCompile``.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(export_dir) / "saved_model.pb").read_bytes())
    for graph in proto.meta_graphs:
        for function in graph.graph_def.library.function:
            attr = function.attr.get("_XlaMustCompile")
            if attr is not None and attr.b:
                raise ExportError(
                    f"function {function.signature.name} requires XLA compilation "
                    "(_XlaMustCompile): a Keras grouped Conv2D? Use keras_dmr's GroupedConv2D"
                )


def read_saved_model_metadata(path: Path) -> dict:
    """The ``assets/keras_dmr.json`` of a SavedModel version directory."""
    meta = Path(path) / "assets" / METADATA_FILE
    if not meta.is_file():
        raise ExportError(f"{path} is not a keras_dmr SavedModel export (no {meta.name})")
    return json.loads(meta.read_text())
