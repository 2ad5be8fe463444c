"""Re-estimating the statistics of BN channels the RM operation made identity (Appendix A.2)."""

from __future__ import annotations

import keras
import numpy as np

from keras_dmr.layers.conv import bn_weights
from keras_dmr.rm import kernels


def identity_channels(bn: keras.layers.BatchNormalization, rtol: float = 1e-6) -> np.ndarray:
    """Channels where ``gamma == sqrt(variance + epsilon)``: the BN is the identity plus a
    constant there (Eq. 3), so their statistics can change without changing the output."""
    gamma, _, _, var = bn_weights(bn)
    return kernels.identity_bn_channels(gamma, var, bn.epsilon, rtol) & (gamma > 0)


def _batches(data, steps):
    if isinstance(data, np.ndarray):
        data = [data]
    for i, batch in enumerate(data):
        if steps is not None and i >= steps:
            return
        yield batch[0] if isinstance(batch, tuple | list) else batch


def recalibrate_bn(
    model: keras.Model, data, *, steps: int | None = None, verbose: int = 1
) -> dict[str, int]:
    """Set the running mean and variance of every identity BN channel of a plain model
    (``to_plain(..., fuse_bn=False)``) to the statistics of ``data``, keeping ``gamma =
    sqrt(var + eps)`` and the channel's offset, so outputs in inference mode do not change while
    training-mode BN (batch statistics) starts where the converted model is.

    ``data``: a ``tf.data.Dataset`` or iterable of image batches or ``(images, labels)`` pairs, or
    one array. Returns the number of channels recalibrated per BN layer.

    Args:
        model: a plain model with BN layers.
        data: the batches to take statistics from (see above).
        steps: at most this many batches (``None``: all).
        verbose: 1 shows a progress bar.

    Returns:
        ``{bn layer name: channels recalibrated}``.
    """
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        raise ValueError(
            f"model {model.name!r} has no BatchNormalization layer: convert with "
            "`to_plain(model, fuse_bn=False)` to keep BN for fine-tuning"
        )
    masks = {bn.name: identity_channels(bn) for bn in bns}
    bns = [bn for bn in bns if masks[bn.name].any()]
    if not bns:
        return {}
    probe = keras.Model(model.inputs[0], [bn.input for bn in bns])
    sums = [np.zeros(bn.input.shape[-1]) for bn in bns]
    squares = [np.zeros(bn.input.shape[-1]) for bn in bns]
    counts = [0] * len(bns)
    bar = keras.utils.Progbar(steps, verbose=verbose, unit_name="batch")
    expected = tuple(model.inputs[0].shape[1:])
    for i, images in enumerate(_batches(data, steps)):
        got = tuple(np.shape(images))
        if len(got) != len(expected) + 1 or any(
            e is not None and g != e for g, e in zip(got[1:], expected, strict=True)
        ):
            raise ValueError(
                f"`data` must yield image batches of shape (batch, {', '.join(map(str, expected))})"
                f" for model {model.name!r}; got a batch of shape {got}"
            )
        outputs = probe(images, training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        for j, z in enumerate(outputs):
            z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
            sums[j] += z.sum(0)
            squares[j] += (z * z).sum(0)
            counts[j] += z.shape[0]
        bar.update(i + 1)
    if counts[0] == 0:
        raise ValueError("`data` yielded no batches")
    done = {}
    for bn, total, square, n in zip(bns, sums, squares, counts, strict=True):
        mask = masks[bn.name]
        gamma, beta, mean, var = bn_weights(bn)
        new_mean = total / n
        new_var = np.maximum(square / n - new_mean**2, 0.0)
        offset = beta - mean  # an identity channel computes z - mean + beta
        gamma[mask] = np.sqrt(new_var[mask] + bn.epsilon)
        beta[mask] = offset[mask] + new_mean[mask]
        mean[mask], var[mask] = new_mean[mask], new_var[mask]
        bn.set_weights([gamma, beta, mean, var])
        done[bn.name] = int(mask.sum())
    return done


def reestimate_bn(model: keras.Model, data, *, steps: int | None = None) -> int:
    """Re-estimate the moving mean and variance of every BatchNormalization (and
    :class:`~keras_dmr.layers.ChannelScale`) of ``model`` from ``data``, as the average over the
    batches of each layer's batch statistics in a training-mode forward pass (no weight
    changes): the statistics of the network as it is now, after pruning removed channels that
    the next layers' statistics still counted (RMNet Appendix A.2; EagleEye's adaptive BN).
    Identity channels (:func:`identity_channels`) stay identities with their new statistics,
    as :func:`recalibrate_bn` leaves them. Nested layers included; Dropout runs in training
    mode during the passes.

    Args:
        model: any Keras model with BatchNormalization layers.
        data: the batches (as :func:`recalibrate_bn` takes them).
        steps: at most this many batches (``None``: all).

    Returns:
        The number of batches used.
    """
    from keras_dmr.layers.streams import ChannelScale
    from keras_dmr.utils import keras_internals

    layers = [
        layer
        for layer in keras_internals.all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization | ChannelScale)
    ]
    if not layers:
        raise ValueError(f"model {model.name!r} has no BatchNormalization to re-estimate")
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    identity = {id(bn): (identity_channels(bn), bn_weights(bn)) for bn in bns}
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for i, images in enumerate(_batches(data, steps)):
            for layer in layers:
                layer.momentum = i / (i + 1)  # a running average of the batches' statistics
            model(images, training=True)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if not used:
        raise ValueError("`data` yielded no batches")
    for bn in bns:
        mask, (_, old_beta, old_mean, _) = identity[id(bn)]
        if mask.any() and bn.scale and bn.center:
            gamma, beta, mean, var = bn_weights(bn)
            gamma[mask] = np.sqrt(var[mask] + bn.epsilon)
            beta[mask] = old_beta[mask] - old_mean[mask] + mean[mask]
            bn.set_weights([gamma, beta, mean, var])
    return used
