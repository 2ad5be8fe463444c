"""Pruning to a MACs budget in steps, fine-tuning between them: :func:`prune_to_budget`.

One cut to a small budget removes channels whose loss the network has not learned to work
around, and the BN statistics of every later layer still describe the unpruned network. Here the
budget is reached in ``steps`` cuts of the same ratio (``macs ** (1 / steps)`` of the MACs left
each time), each a whole-graph pruning (:func:`~keras_dmr.prune.prune_channels`, so any
functional CNN: a plain model from ``to_plain(fuse_bn=False)``, a residual model as it is),
followed by a re-estimation of every BN's statistics on training batches
(:func:`keras_dmr.convert.reestimate_bn`, RMNet Appendix A.2) and ``epochs`` of fine-tuning
under the paper's recipe from ``learning_rate`` (its step decay within each cut's epochs: the
last ones at a tenth and a hundredth, where the network settles), optionally with sparsity training
(:class:`~keras_dmr.prune.BNSparsity`) so that the next cut finds small scales.

What the papers did: RMNet (Sec. 4.2, Fig. 7) and network slimming cut once, at a BN-scale
threshold, after sparsity training, and fine-tune; the ratio they reach follows from the
threshold. This reaches a requested MACs fraction exactly (up to the last channel group), in the
epochs given.

Cannot: what :func:`~keras_dmr.prune.prune_channels` cannot (it raises naming the layer).
Fine-tuning needs labelled batches and a classifier whose output is logits or probabilities
(read from its last layer's activation).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import keras

from keras_dmr.analysis.flops import count_flops
from keras_dmr.convert.recalibrate import reestimate_bn
from keras_dmr.prune.graph_prune import prune_channels

REESTIMATE_BATCHES = 20


def prune_to_budget(
    model: keras.Model,
    train,
    *,
    macs: float,
    steps: int = 3,
    epochs: int = 1,
    criterion: str = "bn",
    learning_rate: float = 0.01,
    sparsity: float | None = None,
    round_to: int = 1,
    log: Callable[[str], None] = print,
) -> keras.Model:
    """Prune ``model`` to ``macs`` of its multiply-accumulates in ``steps`` cuts, re-estimating
    BN statistics and fine-tuning after each (see the module docstring).

    Args:
        model: a functional CNN (see :func:`~keras_dmr.prune.prune_channels`).
        train: labelled training batches, ``(images, labels)`` (a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``: what ``Model.fit`` takes alone), used for the statistics
            and the fine-tuning.
        macs: the fraction of ``model``'s MACs to keep, in (0, 1].
        steps: cuts (each keeps the same fraction of what is left).
        epochs: fine-tuning epochs after each cut (0: none; statistics are still re-estimated).
        criterion: ``"bn"`` or ``"l2"``.
        learning_rate: the recipe's SGD learning rate while fine-tuning.
        sparsity: a :class:`~keras_dmr.prune.BNSparsity` factor while fine-tuning (None: none).
        round_to: every layer keeps a multiple of this many filters (as
            :func:`~keras_dmr.prune.prune_channels`).
        log: where a line per cut goes.

    Returns:
        The pruned, fine-tuned model (compiled with the recipe), with ``pruning_report``: MACs
        and parameters before and after, and one record per cut.
    """
    from keras_dmr.prune.sparsity import BNSparsity
    from keras_dmr.recipe import StepDecay, compile_with_recipe

    if not 0 < macs <= 1:
        raise ValueError(f"`macs` must be a fraction in (0, 1]; got {macs!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1; got {steps!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"`epochs` must be an integer >= 0; got {epochs!r}")
    last = model.layers[-1]
    from_logits = getattr(last, "activation", None) in (None, keras.activations.linear)
    before = count_flops(model)
    current, cuts = model, []
    for step in range(1, steps + 1):
        goal = before * macs ** (step / steps)
        keep = min(1.0, goal / count_flops(current))
        pruned = prune_channels(current, criterion=criterion, macs=keep, round_to=round_to)
        reestimate_bn(pruned, train, steps=REESTIMATE_BATCHES)
        record = {
            "step": step,
            "macs": count_flops(pruned),
            "params": pruned.count_params(),
            "channels": pruned.pruning_report["channels_after"],
        }
        compile_with_recipe(pruned, learning_rate=learning_rate, from_logits=from_logits)
        if epochs:
            callbacks = [StepDecay()] + ([BNSparsity(sparsity)] if sparsity else [])
            history = pruned.fit(
                train,
                epochs=epochs,
                callbacks=callbacks,
                shuffle=False,
                verbose=1 if sys.stdout.isatty() else 0,
            )
            record["loss"] = float(history.history["loss"][-1])
        log(
            f"cut {step}/{steps}: {record['macs'] / before:.1%} of the MACs, "
            f"{record['channels']:,} channels"
            + (f", fine-tuned {epochs} epoch(s), loss {record['loss']:.4f}" if epochs else "")
        )
        cuts.append(record)
        current = pruned
    current.pruning_report = {
        "source": model.name,
        "criterion": criterion,
        "macs_target": macs,
        "round_to": round_to,
        "macs_before": before,
        "macs_after": count_flops(current),
        "params_before": model.count_params(),
        "params_after": current.count_params(),
        "steps": cuts,
    }
    return current
