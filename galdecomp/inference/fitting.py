"""Training an autoencoder on a table of rows, whatever the data set: the loop's glue.

:func:`fit_rows` splits the rows into training and validation sets, starts the forked workers
of a one-process fit, runs :func:`~galdecomp.inference.training.train` and logs its progress;
:class:`StopSignals` turns SIGINT and SIGTERM into a stop at the next step;
:func:`training_time_summary` says where a fit's time went. The run folder around a fit
(configuration, checkpoints, products) is the recipes' (:mod:`galdecomp.pipeline`).
"""
import contextlib
import signal
import time

import numpy as np

from .objective import ELBOObjective
from ..workers import blas_threads, describe_threads, threads_of
from .minibatches import largest_minibatch, split_rows
from .training import train

__all__ = ["StopSignals", "fit_rows", "training_time_summary"]


class StopSignals:
    """While training, SIGINT and SIGTERM ask the job to stop at the next step (after a checkpoint).

    The ranks agree on the step: the flags travel with the step's gradient (see
    :func:`~galdecomp.inference.training.train`'s ``stop``). A second SIGINT (Ctrl-C) interrupts
    at once. Outside the main thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.got, self.old = dict.fromkeys(self.SIGNALS, 0), {}

    def __enter__(self):
        with contextlib.suppress(ValueError):
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.got[signum]:
            raise KeyboardInterrupt
        self.got[signum] = 1

    def flags(self):
        """This rank's count of each signal (``SIGNALS`` order), to be summed over the ranks."""
        return np.array([self.got[s] for s in self.SIGNALS], dtype=np.float64)

    def signal(self, sums):
        """The signal to stop on for the ``flags`` summed over the ranks (SIGTERM before SIGINT),
        or None."""
        return next((s for s, k in zip(self.SIGNALS[::-1], sums[::-1]) if k), None)


def fit_rows(model, data, state, cfg, checkpoint=None, log=None, offset=0, n_rows=None, comm=None,
             stop=None):
    """Train an autoencoder on a table of rows (pixels, images): the data-set-independent core.

    Parameters
    ----------
    model : Autoencoder
    data : ndarray, shape (P_local, C)
        Standardised data of this process's rows, NaN where missing.
    state : TrainingState
        Fresh or resumed; updated in place.
    cfg : dict
        Resolved configuration (uses ``seed`` and ``training``).
    checkpoint : callable, optional
        ``checkpoint(state)`` after every epoch, and inside an epoch every
        ``training.checkpoint_seconds``.
    log : callable, optional
        Progress messages.
    offset, n_rows : int
        Global index of the first local row and number of rows of all processes (pixel
        sharding; default: this process holds all rows).
    comm : SerialComm or MPIComm, optional
    stop : object, optional
        Stop requests, checked at every step (see :func:`train`).

    Returns
    -------
    TrainingState
        The final state (``best_params`` are the trained parameters).
    """
    tcfg = cfg["training"]
    n_rows = len(data) if n_rows is None else n_rows
    train_rows, valid_rows = split_rows(n_rows, tcfg["validation_fraction"], cfg["seed"])
    objective = ELBOObjective(model, data, train_rows.size, offset, comm)

    def progress(st, eta):
        h = st.history[-1]
        log(f"epoch {st.epoch:4d}/{tcfg['max_epochs']}  ELBO {h['elbo']:10.4f}  "
            f"validation {h['validation_elbo']:10.4f} (median {h.get('validation_median', np.nan):.4f})  "
            f"lr {h['lr']:.2g}  "
            f"{h['seconds']:.1f}s/epoch  ETA {eta / 60:.1f} min (at most)")

    t0 = time.perf_counter()
    asked = threads_of(tcfg, objective.comm)
    largest = largest_minibatch(train_rows.size, int(tcfg["batch_size"]))
    threads = objective.start_workers(asked, largest, valid_rows.size)
    if log:
        log(f"{train_rows.size} training / {valid_rows.size} validation rows, batch {tcfg['batch_size']}; "
            f"{describe_threads(threads, objective.comm)}, {tcfg['dtype']} kernels")
        if objective.comm.size > 1 and (tcfg["threads"] or 1) > 1:
            log(f"training.threads {tcfg['threads']} ignored: under MPI each rank computes its rows alone")
        elif asked > threads:
            blocks = -(-largest // int(tcfg["block_rows"]))
            log(f"{asked} cores, {threads} used: a minibatch has at most {blocks} block{'s' * (blocks > 1)} of "
                f"{tcfg['block_rows']} rows (a smaller training.block_rows gives more)")
    seconds = {}
    try:
        with blas_threads(1):  # idle BLAS threads spin and would take the workers' cores
            train(objective, state, train_rows, valid_rows, tcfg, seed=cfg["seed"], checkpoint=checkpoint,
                  progress=progress if log else None, stop=stop,
                  step_scale=model.step_scales() if tcfg["step_on"] == "weights" else None, seconds=seconds)
    finally:
        objective.close_workers()
    where = training_time_summary(dict(seconds, reduction=objective.reduce_seconds), objective.comm)
    if log:
        log(f"training done after {state.epoch} epochs in {time.perf_counter() - t0:.1f} s; "
            f"best validation ELBO ({tcfg['select']} over the rows) {-state.best_val:.4f}")
        if where:
            log(where)
    return state


def training_time_summary(seconds, comm):
    """One line on where the training time went, per step and per epoch, over the ranks.

    Parameters
    ----------
    seconds : dict
        :func:`~galdecomp.inference.training.train`'s ``seconds`` of this rank, with
        ``reduction`` (the objective's sum of the gradient over the ranks, waits included);
        without ``epochs`` if no epoch ran.
    comm : SerialComm or MPIComm
        Collective: every rank calls it.

    Returns
    -------
    str or None
        On rank 0 (None elsewhere, and when no epoch ran): milliseconds per step of the
        gradient on the rank's own rows, the reduce-scatter with the wait for the slowest rank,
        Adam on the rank's block of the parameters, the Allgather of the blocks, the finiteness
        and signal checks and the rest of the loop; per epoch of the validation and the
        checkpoints; minimum-maximum over the ranks.
    """
    keys = ("gradient", "reduction", "optimiser", "params_gather", "checks", "validation", "checkpoint",
            "total", "steps", "epochs")
    mine = np.array([[seconds.get(k, 0.0) for k in keys]])
    every = comm.gather_rows(mine)
    if every is None or every[:, -1].min() < 1:
        return None
    s = dict(zip(keys, every.T))
    per_step = {"gradient on the rank's rows": s["gradient"] - s["reduction"],
                "reduce-scatter with the wait for the slowest rank": s["reduction"],
                "Adam on the rank's block": s["optimiser"], "parameter Allgather": s["params_gather"],
                "checks": s["checks"],
                "rest of the loop": s["total"] - s["gradient"] - s["optimiser"] - s["params_gather"]
                - s["checks"] - s["validation"] - s["checkpoint"]}
    per_epoch = {"validation": s["validation"], "checkpoints": s["checkpoint"]}

    def fmt(v, n):
        lo, hi = 1e3 * np.min(v / n), 1e3 * np.max(v / n)
        return f"{lo:.2f}" if comm.size == 1 else f"{lo:.2f}-{hi:.2f}"

    ranks = f" (min-max over {comm.size} ranks)" if comm.size > 1 else ""
    return (f"training time{ranks}: per step [ms] "
            + ", ".join(f"{k} {fmt(v, s['steps'])}" for k, v in per_step.items())
            + "; per epoch [ms] " + ", ".join(f"{k} {fmt(v, s['epochs'])}" for k, v in per_epoch.items()))
