"""Tuners by name and a summary of the best trial (what ``keras-dmr tune`` uses).

Nothing here is needed to tune: the hypermodels work with any Keras Tuner tuner as they are.
``make_tuner`` only picks the class, the default objective and, for Hyperband, a trial cap.
"""

from __future__ import annotations

import os
import time

import keras_tuner as kt

TUNERS = ("random", "bayesian", "hyperband")


def tuner_role() -> str:
    """``"chief"``, ``"worker"`` or ``"single"``: this process's part in Keras Tuner's
    distributed mode, read from the environment as Keras Tuner reads it (``KERASTUNER_ORACLE_IP``
    set: distributed; ``KERASTUNER_TUNER_ID`` containing ``"chief"``: the oracle).

    Returns:
        The role.
    """
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


def make_tuner(
    hypermodel: kt.HyperModel,
    tuner: str = "random",
    *,
    objective: kt.Objective | str | None = None,
    max_trials: int | None = 10,
    max_epochs: int | None = None,
    seed: int | None = None,
    directory: str | None = None,
    project_name: str | None = None,
    overwrite: bool = False,
    distribution_strategy=None,
    **kwargs,
) -> kt.Tuner:
    """A ``kt.RandomSearch``, ``kt.BayesianOptimization`` or ``kt.Hyperband`` on ``hypermodel``.

    ``objective`` defaults to ``hypermodel.objective`` (the latency objective if it has one),
    else max ``val_accuracy``. ``max_epochs`` is Hyperband's (required there); Hyperband
    takes no ``max_trials``, so a given one is set on its oracle afterwards as a cap.
    ``distribution_strategy`` runs every trial under that strategy (Keras Tuner builds the
    model, and so compiles it, under its scope). ``overwrite=False`` resumes the project in
    ``directory/project_name``. Other keyword arguments go to the tuner class.

    Args:
        hypermodel: the search space.
        tuner: ``"random"``, ``"bayesian"`` or ``"hyperband"``.
        objective: what to maximise (see above).
        max_trials: trials at most.
        max_epochs: Hyperband's epochs per trial.
        seed: the search's seed.
        directory: where trials are stored.
        project_name: the project's folder in ``directory``.
        overwrite: start afresh instead of resuming.
        distribution_strategy: a ``tf.distribute`` strategy for every trial.
        **kwargs: passed to the tuner class.

    Returns:
        The tuner.
    """
    if tuner not in TUNERS:
        raise ValueError(f"`tuner` must be one of {TUNERS}; got {tuner!r}")
    if objective is None:
        objective = getattr(hypermodel, "objective", None) or kt.Objective("val_accuracy", "max")
    common = dict(
        objective=objective,
        seed=seed,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        distribution_strategy=distribution_strategy,
        **kwargs,
    )
    if tuner == "hyperband":
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(
                f"`max_epochs` must be an integer >= 1 for Hyperband; got {max_epochs!r}"
            )
        result = kt.Hyperband(hypermodel, max_epochs=max_epochs, **common)
        if max_trials is not None:
            oracle = getattr(result.oracle, "_oracle", result.oracle)  # a worker's OracleClient
            oracle.max_trials = max_trials
        return result
    cls = kt.RandomSearch if tuner == "random" else kt.BayesianOptimization
    return cls(hypermodel, max_trials=max_trials, **common)


def serve_oracle(tuner: kt.Tuner, *, verbose: int = 1, poll_seconds: float = 0.5) -> None:
    """The chief's part of a distributed search: serve ``tuner``'s oracle to the worker tuners
    over gRPC at ``KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT`` until every trial has ended and
    every worker has been told to stop.

    What ``tuner.search()`` does in the chief, except that it returns within ``poll_seconds`` of
    the end: Keras Tuner 1.4.8's loop checks only every 20 s once the search is stopping. Built on
    Keras Tuner's servicer (``keras_tuner.src.distribute``); where that is missing it falls back
    to ``tuner.search()``.

    Args:
        tuner: the chief's tuner.
        verbose: 1 prints progress.
        poll_seconds: how often the end of the search is checked.

    Returns:
        None.
    """
    try:
        from concurrent import futures

        import grpc
        from keras_tuner.src import protos
        from keras_tuner.src.distribute.oracle_chief import OracleServicer, exit_chief
    except ImportError:
        tuner.search(verbose=verbose)
        return
    oracle = tuner.oracle
    oracle.verbose = verbose
    tuner.save()
    servicer = OracleServicer(oracle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server.add_insecure_port(address)
    server.start()
    try:
        while not (servicer.stop_triggered and exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1.0)


def best_trial(tuner: kt.Tuner) -> kt.engine.trial.Trial:
    """The best completed trial; ties go to the earliest trial (Keras Tuner's own order of equal
    scores depends on the order its files are listed in, so it can change on reload).

    Args:
        tuner: a Keras Tuner tuner.

    Returns:
        The trial.
    """
    trials = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    if not trials:
        raise ValueError("the search has no completed trial")
    sign = -1.0 if tuner.oracle.objective.direction == "max" else 1.0
    return min(trials, key=lambda t: (sign * t.score, t.trial_id))


def best_summary(tuner: kt.Tuner) -> dict:
    """The best completed trial (:func:`best_trial`): id, score, hyperparameter values and last
    metric values. Reload its model with ``tuner.load_model(best_trial(tuner))``.

    Args:
        tuner: a Keras Tuner tuner.

    Returns:
        ``{"trial_id", "score", "objective", "hyperparameters", "metrics"}``.
    """
    trial = best_trial(tuner)
    metrics = {name: trial.metrics.get_last_value(name) for name in sorted(trial.metrics.metrics)}
    return {
        "trial_id": trial.trial_id,
        "score": trial.score,
        "objective": tuner.oracle.objective.name,
        "hyperparameters": dict(trial.hyperparameters.values),
        "metrics": metrics,
    }
