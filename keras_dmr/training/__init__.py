"""Training beyond the recipe (:mod:`keras_dmr.recipe`): the checkpoint and resume format
(:mod:`~keras_dmr.training.checkpoints`) and tf.distribute strategies
(:mod:`~keras_dmr.training.distribute`)."""
