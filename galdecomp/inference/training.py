"""Stochastic optimisation of the ELBO over row minibatches, with checkpoints and resume.

The optimisation path is a function of the configuration only: the training/validation split,
the minibatch order and the reparameterisation draws come from generators seeded by
``seed``, and the whole state (parameters, Adam moments, learning-rate schedule, early-stopping
state, generator state, history) is checkpointed at the end of every epoch, and inside an epoch
(with the position in the epoch) every ``checkpoint_seconds`` and when the job is asked to stop.
A resumed run therefore ends exactly where an uninterrupted run ends.
"""
import json
import time

import numpy as np

from ..errors import JobStopped
from ..parallel import SerialComm
from ..seeds import stream
from .minibatches import epoch_order, minibatches
from .optimiser import Adam

__all__ = ["TrainingState", "finished", "train"]


class TrainingState:
    """Everything that determines the rest of the optimisation.

    Attributes
    ----------
    params, best_params : ndarray
        Current and best (lowest validation loss) flat parameters.
    adam : Adam
    epoch, step : int
        Completed epochs and optimiser steps.
    lr : float
        Current learning rate.
    best_val : float
        Lowest validation loss seen (negative ELBO per row: the median or mean over the
        validation rows, ``training.select``).
    since_best, since_lr : int
        Epochs since the best validation loss / since the last learning-rate change.
    rng_state : dict
        State of the generator for minibatch order and draws at the start of the epoch.
    batch : int
        Minibatches of the current epoch done (0 at an epoch's end).
    batch_rng_state : dict or None
        State of that generator after ``batch`` minibatches of the current epoch.
    epoch_sums : ndarray, shape (3,)
        Sums of the loss, reconstruction and KL terms over those minibatches.
    epoch_seconds : float
        Time spent on them.
    history : list of dict
        One row per epoch: epoch, step, elbo, reconstruction, kl, validation_elbo (mean over the
        validation rows), validation_median, lr, seconds.
    done : bool
        Training has stopped (converged, early-stopped or reached max_epochs).
    """

    def __init__(self, params, lr, seed):
        self.params = np.array(params, dtype=np.float64)
        self.best_params = self.params.copy()
        self.adam = Adam(self.params.size)
        self.epoch = self.step = 0
        self.lr = float(lr)
        self.best_val = np.inf
        self.since_best = self.since_lr = 0
        self.rng_state = stream(seed, "training", "minibatches").bit_generator.state
        self.batch, self.batch_rng_state = 0, None
        self.epoch_sums, self.epoch_seconds = np.zeros(3), 0.0
        self.history = []
        self.done = False

    def to_arrays(self):
        """Flat dict of arrays and scalars for ``np.savez`` (no pickling needed)."""
        return dict(params=self.params, best_params=self.best_params, adam_m=self.adam.m,
                    adam_v=self.adam.v, adam_t=self.adam.t, epoch=self.epoch, step=self.step, lr=self.lr,
                    best_val=self.best_val, since_best=self.since_best, since_lr=self.since_lr,
                    rng_state=json.dumps(self.rng_state), batch=self.batch,
                    batch_rng_state=json.dumps(self.batch_rng_state), epoch_sums=self.epoch_sums,
                    epoch_seconds=self.epoch_seconds, history=json.dumps(self.history), done=self.done)

    @classmethod
    def from_arrays(cls, a):
        """Inverse of :meth:`to_arrays` (checkpoints from before mid-epoch checkpoints included)."""
        st = cls.__new__(cls)
        st.params = np.array(a["params"])
        st.best_params = np.array(a["best_params"])
        st.adam = Adam(st.params.size)
        st.adam.m, st.adam.v, st.adam.t = np.array(a["adam_m"]), np.array(a["adam_v"]), int(a["adam_t"])
        st.epoch, st.step, st.lr = int(a["epoch"]), int(a["step"]), float(a["lr"])
        st.best_val = float(a["best_val"])
        st.since_best, st.since_lr = int(a["since_best"]), int(a["since_lr"])
        st.rng_state = json.loads(str(a["rng_state"]))
        st.batch = int(a.get("batch", 0))
        st.batch_rng_state = json.loads(str(a.get("batch_rng_state", "null")))
        st.epoch_sums = np.array(a.get("epoch_sums", np.zeros(3)), dtype=np.float64)
        st.epoch_seconds = float(a.get("epoch_seconds", 0.0))
        st.history = json.loads(str(a["history"]))
        st.done = bool(a["done"])
        return st


def finished(state, cfg):
    """Whether training stops at ``state``: ``max_epochs`` reached or, under the plateau
    schedule, ``patience`` epochs without validation improvement (``cfg``: the training settings)."""
    plateau = cfg.get("schedule", "plateau") == "plateau"
    return state.epoch >= cfg["max_epochs"] or plateau and state.since_best >= cfg["patience"]


class _Loop:
    """One call of :func:`train`: what its epochs and steps share, and the time they took."""

    def __init__(self, objective, state, rows, cfg, seed, checkpoint, stop, step_scale):
        """``rows``: the training and the validation rows (a pair); the rest as :func:`train`'s."""
        self.objective, self.state, self.cfg = objective, state, cfg
        self.train_rows, self.valid_rows = train_rows, valid_rows = rows
        self.checkpoint, self.stop, self.step_scale = checkpoint, stop, step_scale
        self.bs = int(cfg["batch_size"])
        self.warmup = int(cfg.get("kl_warmup_epochs", 0))
        self.cosine = cfg.get("schedule", "plateau") == "cosine"
        self.lr0 = float(cfg["learning_rate"])
        self.select = cfg.get("select", "mean")
        self.val_xi = stream(seed, "training", "validation").standard_normal((valid_rows.size, objective.latent_dim))
        self.t_start, self.epoch0 = time.perf_counter(), state.epoch
        self.t_saved = self.t_start
        self.comm = getattr(objective, "comm", None) or SerialComm()
        self.n_par = state.params.size
        self.part = self.comm.vector_block(self.n_par)
        self.frozen = getattr(objective, "frozen", None)
        self.sec = dict.fromkeys(("gradient", "optimiser", "params_gather", "checks", "validation", "checkpoint"),
                                 0.0)
        self.sec.update(steps=0, epochs=0)

    def gather_moments(self):
        """Every rank's block of the Adam moments gathered (for a checkpoint)."""
        if self.comm.size > 1:
            adam, part = self.state.adam, self.part
            adam.m = self.comm.allgather_blocks(adam.m[part], self.n_par)
            adam.v = self.comm.allgather_blocks(adam.v[part], self.n_par)

    def epoch(self):
        """One epoch, or the rest of one (resuming inside it), with its validation and checkpoint;
        returns the signal to stop on after it, or None (inside it: raises JobStopped)."""
        state, cfg = self.state, self.cfg
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng_state
        t0 = time.perf_counter() - state.epoch_seconds
        order = epoch_order(rng, self.train_rows, self.bs, cfg.get("minibatches", "shuffled"))
        if state.batch:  # resuming inside the epoch
            rng.bit_generator.state = state.batch_rng_state
        if self.cosine:
            lo = float(cfg["min_learning_rate"])
            frac = min(state.epoch / cfg["schedule_epochs"], 1.0)
            state.lr = lo + (self.lr0 - lo) * 0.5 * (1.0 + np.cos(np.pi * frac))
        lr = state.lr if self.step_scale is None else state.lr * self.step_scale
        kw = {}
        if self.warmup > 0 and state.epoch < self.warmup:
            kw["beta"] = self.objective.beta * (state.epoch + 1) / (self.warmup + 1)
        batches = minibatches(order, self.bs)
        n_batches = len(batches)
        self.objective.deal(batches)
        signum = None
        for b in range(state.batch, n_batches):
            signum = self.step(rng, batches, b, lr, kw, t0)
        self.end_epoch(rng, n_batches, t0)
        return signum

    def step(self, rng, batches, b, lr, kw, t0):
        """Minibatch ``b``: gradient, Adam on this rank's block, the blocks gathered, checks, and a
        checkpoint inside the epoch when one is due or a signal asks; returns the signal."""
        state, clock, sec, n_batches = self.state, time.perf_counter, self.sec, len(batches)
        rows = batches[b]
        xi = rng.standard_normal((rows.size, self.objective.latent_dim))
        t1 = clock()
        due = (self.checkpoint is not None and b + 1 < n_batches
               and t1 - self.t_saved >= self.cfg["checkpoint_seconds"])
        flags = np.concatenate([[float(due)], self.stop.flags() if self.stop is not None else []])
        if getattr(self.objective, "splits_update", False):  # worker processes share Adam's update
            value, params, terms, update = self.objective.descend(state.params, rows, xi, state.adam, lr,
                                                                  extra=flags, **kw)
            t3 = t4 = clock()
            t2 = t3 - update
        else:
            value, grad, terms = self.objective.value_and_gradient(state.params, rows, xi, extra=flags, dealt=b,
                                                                   scatter=True, **kw)
            t2 = clock()
            mine = state.adam.step(state.params, grad, lr, self.part, self.frozen)
            t3 = clock()
            params = self.comm.allgather_blocks(mine, self.n_par)
            t4 = clock()
        # a non-finite gradient makes the parameters non-finite (inf / inf in Adam), on every
        # rank alike; their sum is non-finite exactly then (parameters are far from overflow)
        if not np.isfinite(value + params.sum()):
            raise FloatingPointError(f"non-finite ELBO at epoch {state.epoch + 1}, step {state.step + 1}")
        state.params = params
        state.step += 1
        state.epoch_sums += (value, terms["nll"], terms["kl"])
        signum = self.stop.signal(terms["extra"][1:]) if self.stop is not None else None
        t5 = clock()
        sec["gradient"] += t2 - t1
        sec["optimiser"] += t3 - t2
        sec["params_gather"] += t4 - t3
        sec["checks"] += t5 - t4
        sec["steps"] += 1
        if b + 1 < n_batches and (signum or terms["extra"][0] > 0):
            self.gather_moments()
            state.batch, state.batch_rng_state = b + 1, rng.bit_generator.state
            state.epoch_seconds = clock() - t0
            if self.checkpoint is not None:
                self.checkpoint(state)
                self.t_saved = clock()
                sec["checkpoint"] += self.t_saved - t5
            if signum:
                raise JobStopped(signum)
        return signum

    def end_epoch(self, rng, n_batches, t0):
        """Validation, the history, the kept parameters, the plateau schedule, the stopping rule,
        and the epoch's checkpoint."""
        state, cfg, clock, sec = self.state, self.cfg, time.perf_counter, self.sec
        t1 = clock()
        if self.select == "median":
            val_mean, val_median = self.objective.validation(state.params, self.valid_rows, self.val_xi)
            val = val_median
        else:
            val, _ = self.objective.value(state.params, self.valid_rows, self.val_xi)
            val_mean = val_median = val
        sec["validation"] += clock() - t1
        state.epoch += 1
        state.rng_state = rng.bit_generator.state
        mean = state.epoch_sums / n_batches
        state.batch, state.batch_rng_state, state.epoch_sums, state.epoch_seconds = 0, None, np.zeros(3), 0.0
        state.history.append(dict(epoch=state.epoch, step=state.step, elbo=-mean[0],
                                  reconstruction=-mean[1], kl=mean[2], validation_elbo=-val_mean,
                                  validation_median=-val_median, lr=state.lr,
                                  seconds=time.perf_counter() - t0))
        if not np.isfinite(state.best_val) or val < state.best_val - 1e-4 * abs(state.best_val):
            state.best_val, state.best_params = val, state.params.copy()
            state.since_best = state.since_lr = 0
        else:
            state.since_best += 1
            state.since_lr += 1
        if not self.cosine and state.since_lr >= cfg["lr_patience"] and state.lr > cfg["min_learning_rate"]:
            state.lr = max(state.lr * cfg["lr_factor"], cfg["min_learning_rate"])
            state.since_lr = 0
        if finished(state, cfg):
            state.done = True
        sec["epochs"] += 1
        self.gather_moments()
        if self.checkpoint is not None:
            t1 = clock()
            self.checkpoint(state)
            self.t_saved = clock()
            sec["checkpoint"] += self.t_saved - t1


def train(objective, state, train_rows, valid_rows, cfg, seed=0, checkpoint=None, progress=None,
          stop=None, step_scale=None, seconds=None):
    """Run (or continue) the optimisation until it stops.

    Parameters
    ----------
    objective : object
        ``objective.deal(batches)`` at the start of every epoch with its minibatches (sorted row
        indices), then ``objective.value_and_gradient(params, batches[b], xi, extra=flags,
        dealt=b, scatter=True) -> (value, grad, terms)`` for each (``grad``: this rank's block
        ``comm.vector_block(n_params)`` of the gradient; ``terms``: dict with per-row means
        ``nll`` and ``kl``, and ``extra``: the ``flags`` summed over the ranks with it),
        ``objective.value(params, rows, xi) -> (value, terms)``, ``objective.latent_dim`` and,
        for ``cfg["select"] == "median"``, ``objective.validation(params, rows, xi) -> (mean,
        median)`` of the rows' negative ELBOs; ``objective.comm`` (optional, default serial): the
        ranks; ``objective.frozen`` (optional): a slice of parameters whose gradient is always 0
        (:meth:`Adam.step`). Each rank takes the Adam step of its block of the parameters and the blocks are
        gathered, so the parameters are the same on every rank.
    state : TrainingState
        Where to start (fresh or loaded from a checkpoint); updated in place.
    train_rows, valid_rows : ndarray of int
    cfg : dict
        The ``training`` section of the configuration. ``select`` (``median`` or ``mean``, default
        ``mean``): the validation statistic that picks the kept parameters (``best_params``) and
        drives the plateau schedule; the history records both.
    seed : int
        Seed of the fixed validation draws.
    checkpoint : callable, optional
        ``checkpoint(state)`` called after every epoch, and inside an epoch once
        ``cfg["checkpoint_seconds"]`` have passed since the last one (writes it atomically). Under
        MPI one rank has it; its decision to write inside an epoch travels with the step's
        gradient, so that every rank takes part in gathering the Adam moments for it.
    progress : callable, optional
        ``progress(state, eta_seconds)`` called after every epoch.
    stop : object, optional
        Stop requests: ``stop.flags()``, this rank's counts (1-D array), summed over the ranks
        with the step's gradient; ``stop.signal(sums)``, the signal number to stop on for those
        sums, or None. All ranks therefore stop at the same step.
    step_scale : ndarray, optional
        Per-parameter factor of the learning rate (``cfg["step_on"] == "weights"``: the model's
        ``step_scales()``, so that Adam's steps are ``learning_rate`` on the weights and on log
        sigma whatever the parameterisation); default 1.
    seconds : dict, optional
        Filled with where the time went (wall seconds in this call): ``gradient`` (the
        objective's value and gradient), ``optimiser`` (Adam on this rank's block),
        ``params_gather`` (gathering the blocks), ``checks`` (finiteness, ``stop.signal``),
        ``validation``, ``checkpoint`` and ``total``, and ``steps`` and ``epochs`` done.

    Returns
    -------
    TrainingState
        The final state; ``state.best_params`` are the parameters to use.

    Raises
    ------
    JobStopped
        ``stop.signal`` returned a signal: after the step (or the epoch, at its last step) and a
        checkpoint of the state.
    """
    loop = _Loop(objective, state, (train_rows, valid_rows), cfg, seed, checkpoint, stop, step_scale)
    while not state.done:
        signum = loop.epoch()
        if seconds is not None:
            seconds.update(loop.sec, total=time.perf_counter() - loop.t_start)
        if progress is not None:
            rate = (time.perf_counter() - loop.t_start) / (state.epoch - loop.epoch0)
            progress(state, rate * (cfg["max_epochs"] - state.epoch))
        if signum:
            raise JobStopped(signum)
    return state
