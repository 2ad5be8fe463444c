"""The DMRNet paper's training recipe (Sec. 4.2), attached to every builder by default.

SGD with Nesterov momentum 0.9, learning rate 0.1 divided by 10 at 1/2, 3/4 and 7/8 of the
epochs, weight decay 1e-4, sparse categorical cross-entropy, accuracy. The schedule depends on the
number of epochs, which only ``fit`` knows: models compiled with :class:`RecipeSGD` add a
:class:`StepDecay` callback to ``fit`` unless one is passed.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

MILESTONES = (0.5, 0.75, 0.875)


@keras.saving.register_keras_serializable(package="keras_dmr")
class RecipeSGD(keras.optimizers.SGD):
    """SGD whose weight decay is an L2 term added to the gradient before momentum.

    That is the weight decay of the paper's MXNet/Torch training (Keras' ``weight_decay`` argument
    is the decoupled kind, which decays weights ~10× less under momentum 0.9). The schedule's
    milestones travel with the optimizer so that a reloaded model resumes the same recipe.
    """

    def __init__(
        self,
        learning_rate: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        l2: float = 1e-4,
        milestones: Sequence[float] = MILESTONES,
        decay_factor: float = 0.1,
        name: str = "recipe_sgd",
        **kwargs,
    ):
        kwargs.pop("weight_decay", None)
        super().__init__(
            learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, name=name, **kwargs
        )
        self.l2 = float(l2)
        self.initial_learning_rate = float(learning_rate)
        self.milestones = tuple(float(m) for m in milestones)
        self.decay_factor = float(decay_factor)

    def update_step(self, gradient, variable, learning_rate):
        if self.l2:
            gradient = ops.add(
                ops.cast(gradient, variable.dtype),
                ops.multiply(self.l2, ops.cast(variable, variable.dtype)),
            )
        super().update_step(gradient, variable, learning_rate)

    def learning_rate_at(self, epoch: int, epochs: int) -> float:
        """The recipe's learning rate for a 0-based ``epoch`` of a run of ``epochs``.

        A milestone never falls before epoch 1: a one-epoch run trains at the initial rate.
        """
        passed = sum(epoch >= max(1, round(m * epochs)) for m in self.milestones)
        return self.initial_learning_rate * self.decay_factor**passed

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)
        config["learning_rate"] = self.initial_learning_rate
        config.update(l2=self.l2, milestones=list(self.milestones), decay_factor=self.decay_factor)
        return config


class StepDecay(keras.callbacks.Callback):
    """Sets a :class:`RecipeSGD`'s learning rate at each epoch from the run's total epochs."""

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        lr = optimizer.learning_rate_at(epoch, self.params["epochs"])
        optimizer.learning_rate.assign(lr)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))


def compile_with_recipe(
    model: keras.Model,
    *,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    from_logits: bool = True,
    **compile_kwargs,
) -> keras.Model:
    """Compile ``model`` with the paper's optimizer, loss and metric; returns the model."""
    model.compile(
        optimizer=RecipeSGD(learning_rate=learning_rate, momentum=momentum, l2=weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        **compile_kwargs,
    )
    return model


def with_recipe_callbacks(model: keras.Model, callbacks) -> list:
    """``callbacks`` plus a :class:`StepDecay` when ``model`` trains with :class:`RecipeSGD`."""
    callbacks = list(callbacks or [])
    if isinstance(getattr(model, "optimizer", None), RecipeSGD) and not any(
        isinstance(c, StepDecay) for c in callbacks
    ):
        callbacks.append(StepDecay())
    return callbacks
