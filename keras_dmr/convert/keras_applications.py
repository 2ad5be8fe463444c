"""``from_keras_application``: deprecated, :func:`keras_dmr.to_plain` reads these models itself.

It used to map keras.applications ResNet v1 and MobileNetV2 onto the package's blocks by their
layer names before ``to_plain`` could run. ``to_plain`` now reads any model's graph (ResNet v1
and v2, MobileNetV2, nested as a transfer-learning backbone or not), so this name only forwards
to it, with a ``DeprecationWarning``; it will be removed in a later release.
"""

from __future__ import annotations

import warnings

import keras

from keras_dmr.convert.plain import to_plain


def from_keras_application(model: keras.Model, **kwargs) -> keras.Model:
    """Deprecated: ``to_plain(model, **kwargs)``, which reads keras.applications models directly
    (the result is the plain model, not a model of the package's blocks as before).

    Args:
        model: a keras.applications model.
        **kwargs: arguments of :func:`keras_dmr.to_plain`.

    Returns:
        The plain model.
    """
    warnings.warn(
        "keras_dmr.convert.from_keras_application is deprecated: call keras_dmr.to_plain(model) "
        "on the keras.applications model itself",
        DeprecationWarning,
        stacklevel=2,
    )
    return to_plain(model, **kwargs)
