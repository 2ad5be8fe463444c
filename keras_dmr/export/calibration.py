"""Calibration and evaluation images for the quantized exports, checked before any work.

Both take what the exported model takes: images as its ``images`` input receives them — raw
0..255 pixels when the export normalises (uint8 input), float32 as the model expects without
preprocessing. Accepted forms: a NumPy array ``[N, H, W, C]``, or any iterable (a ``tf.data``
pipeline included) of batches or of ``(images, labels)`` pairs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from keras_dmr.errors import ExportError

MAX_CALIBRATION_IMAGES = 512


def _batches(source, argument: str) -> Iterable:
    if source is None:
        raise ExportError(
            f"`{argument}` is required: give the images (a NumPy array or batches of a "
            "tf.data pipeline) that int8 ranges are calibrated on"
        )
    if isinstance(source, np.ndarray):
        return [source]
    if isinstance(source, str | bytes) or not hasattr(source, "__iter__"):
        raise ExportError(
            f"`{argument}` must be a NumPy array [N, H, W, C] or an iterable of batches "
            f"(images or (images, labels)); got {type(source).__name__}"
        )
    return source


def _as_images(batch, argument: str, shape: tuple, uint8: bool, index: int) -> np.ndarray:
    images = batch[0] if isinstance(batch, tuple | list) else batch
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ExportError(
            f"`{argument}` batch {index}: images of shape {list(images.shape)}; the model takes "
            f"[batch, {', '.join(map(str, shape))}]"
        )
    if not np.issubdtype(images.dtype, np.number):
        raise ExportError(f"`{argument}` batch {index}: dtype {images.dtype} is not numeric")
    if uint8:
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 255:
            raise ExportError(
                f"`{argument}` batch {index}: values in [{low:.3g}, {high:.3g}]; the export "
                "takes raw 0..255 pixels (its uint8 input normalises them), so pass images "
                "before normalisation, e.g. keras_dmr.data.load(..., normalize=False)"
            )
        return np.round(images).astype(np.uint8)
    return images.astype(np.float32)


def calibration_images(
    source, shape: tuple, *, uint8: bool, limit: int = MAX_CALIBRATION_IMAGES
) -> np.ndarray:
    """Up to ``limit`` images of ``source`` in the export's input form, checked."""
    out, count = [], 0
    for index, batch in enumerate(_batches(source, "calibration")):
        images = _as_images(batch, "calibration", shape, uint8, index)
        out.append(images[: limit - count])
        count += len(out[-1])
        if count >= limit:
            break
    if count == 0:
        raise ExportError("`calibration` yielded no images")
    return np.concatenate(out)


def labelled_batches(source, shape: tuple, *, uint8: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(images, labels)`` batches of an evaluation split, in the export's input form."""
    out = []
    for index, batch in enumerate(_batches(source, "evaluation")):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ExportError(
                f"`evaluation` batch {index}: expected (images, labels) pairs, e.g. "
                "keras_dmr.data.load(name, 'test', normalize=False)"
            )
        images = _as_images(batch, "evaluation", shape, uint8, index)
        labels = np.asarray(batch[1]).reshape(-1)
        if len(labels) != len(images):
            raise ExportError(
                f"`evaluation` batch {index}: {len(images)} images but {len(labels)} labels"
            )
        out.append((images, labels))
    if not out:
        raise ExportError("`evaluation` yielded no batches")
    return out


def quantization_inputs(
    quantize, allowed: tuple, calibration, evaluation, shape: tuple, *, uint8: bool
) -> tuple[np.ndarray | None, list | None]:
    """The checked calibration images (int8 only) and evaluation batches of an export."""
    if quantize not in allowed:
        raise ExportError(f"`quantize` must be one of {allowed}; got {quantize!r}")
    images = None
    if quantize == "int8":
        images = calibration_images(calibration, shape, uint8=uint8)
    elif calibration is not None:
        raise ExportError("`calibration` is only used with quantize='int8'")
    held_out = None if evaluation is None else labelled_batches(evaluation, shape, uint8=uint8)
    return images, held_out


def in_batches(images: np.ndarray, size: int) -> Iterable[np.ndarray]:
    """``images`` in consecutive batches of at most ``size``."""
    for start in range(0, len(images), size):
        yield images[start : start + size]


def accuracy_record(predict, batches: list) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of ``predict(images) -> logits`` over ``batches``, and its predictions."""
    predictions, correct, total = [], 0, 0
    for images, labels in batches:
        pred = np.argmax(np.asarray(predict(images)), -1)
        predictions.append(pred)
        correct += int(np.sum(pred == labels))
        total += len(labels)
    return correct / total, np.concatenate(predictions)


def quantization_metadata(
    *, mode: str, engine: str, calibration: int, details: dict, float_run=None, quant_run=None
) -> dict:
    """The ``quantization`` entry of an export's metadata: how, and what it cost in accuracy."""
    record = {"mode": mode, "engine": engine, "calibration_images": calibration, **details}
    if float_run is not None and quant_run is not None:
        (float_acc, float_pred), (quant_acc, quant_pred) = float_run, quant_run
        record["accuracy"] = {
            "float32": float_acc,
            mode: quant_acc,
            "images": int(len(float_pred)),
            "top1_agreement": float(np.mean(float_pred == quant_pred)),
        }
    return record
