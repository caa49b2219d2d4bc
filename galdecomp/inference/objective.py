"""The training objective: minibatch negative ELBO of an autoencoder over a table of rows.

:class:`ELBOObjective` deals the minibatches (global row indices) to the processes that hold the
rows, evaluates the model's :class:`~galdecomp.model.elbo.AmortisedELBO` on each process's share
(on forked workers in one process) and adds the partial sums with one collective per step. With
forked workers, :meth:`~ELBOObjective.descend` also shares the optimiser's update among the
processes (each adds up and steps a span of the parameters), so that no per-parameter pass runs
on one core only. It is training machinery, so it lives here and not in the model.
"""
import os
import time

import numpy as np

__all__ = ["ELBOObjective"]


class ELBOObjective:
    """Minibatch negative ELBO of an :class:`Autoencoder` on a table of rows, for training.

    Minibatches are given as global row indices; with a communicator, this process holds only
    the rows ``[offset, offset + len(data))`` and the ranks' partial sums are added with one
    collective per step: an Allreduce (every rank gets the global value and gradient) or, for
    the training loop, a reduce-scatter (every rank gets the value and its block of the
    gradient, for its block of the optimiser update).
    :meth:`deal` evens out the ranks' work: the rows of a minibatch beyond a rank's even share
    are computed by a rank with fewer, from data sent once per epoch.

    Parameters
    ----------
    model : Autoencoder
    data : ndarray, shape (P_local, C)
        Standardised data of this process's rows; NaN where missing.
    n_total : int
        Rows of the training set (scales the prior terms).
    offset : int
        Global index of this process's first row.
    comm : SerialComm or MPIComm, optional

    Attributes
    ----------
    reduce_seconds : float
        Time spent summing the gradient over the ranks (reduce-scatter or Allreduce), including
        the wait for the slowest rank.
    frozen : slice or None
        Parameters whose gradient is 0 in every minibatch: the encoder's weights of the
        missing-entry indicators when no row of any rank lacks an entry (the first layer then
        skips those inputs, :class:`~galdecomp.model.mlp.MLP` ``sparse_inputs``, and the
        parameters have no prior term); None otherwise.
    """

    def __init__(self, model, data, n_total, offset=0, comm=None):
        from ..parallel import SerialComm

        self.model = model
        self.comm = comm or SerialComm()
        self.mask = np.isfinite(data)
        self.data = np.where(self.mask, data, 0.0)
        self.n_total = int(n_total)
        self.offset = int(offset)
        self.latent_dim = model.latent_dim
        self.beta = model.beta
        self.reduce_seconds = 0.0
        self._edges, self._dealt = None, None
        self._workers = self._shared = self._adam = self._update_adam = None
        if self.comm.size > 1:  # the ranks' first rows, for deal()
            sizes = np.zeros(self.comm.size)
            sizes[self.comm.rank] = len(self.data)
            self._edges = np.concatenate([[0], np.cumsum(self.comm.allreduce_sum(sizes))]).astype(np.int64)
            if self._edges[self.comm.rank] != self.offset:
                raise ValueError(f"rank {self.comm.rank}: rows start at {self.offset}, not after the lower "
                                 f"ranks' {self._edges[self.comm.rank]}")
        self.frozen = None
        lacking = self.comm.allreduce_sum(np.array([float((~self.mask).sum())]))[0]
        if model.mask_input == "missing" and lacking == 0:
            C, H = model.n_features, model.encoder.sizes[1]
            start = model.slices["encoder"].start
            self.frozen = slice(start + C * H, start + 2 * C * H)
        L = model.latent_dim
        self._op = model.elbo(self.data[:0], self.mask[:0], np.zeros((0, L)), self.n_total,
                              with_prior=self.comm.rank == 0)

    def _energy(self, rows, xi, beta=None):
        local = (rows >= self.offset) & (rows < self.offset + len(self.data))
        r = rows[local] - self.offset
        return self._op.with_batch(self.data[r], self.mask[r], xi[local], n_batch=len(rows), beta=beta)

    def deal(self, batches):
        """Share the rows of each of an epoch's minibatches evenly over the ranks (collective).

        A rank computes its own rows of a minibatch up to its even share (``n // K``, one more on
        the first ``n % K`` ranks); the rows beyond it go, in rank order, to the ranks below
        their share, and their data travel now, in one exchange for the whole epoch. Which rank
        computes a row changes only the order in which the partial sums are added.

        Parameters
        ----------
        batches : list of ndarray of int
            The epoch's minibatches (sorted global row indices), the same on every rank;
            :meth:`value_and_gradient` with ``dealt=i`` then computes this rank's share of
            ``batches[i]``.
        """
        K, me = self.comm.size, self.comm.rank
        self._dealt = None
        if K == 1:
            return
        nb = len(batches)
        sizes = np.array([len(r) for r in batches])
        first = np.cumsum(sizes) - sizes
        rows = np.concatenate(batches)
        batch = np.repeat(np.arange(nb), sizes)
        pos = np.arange(rows.size) - first[batch]  # position in the minibatch
        owner = np.searchsorted(self._edges, rows, side="right") - 1
        cell = batch * K + owner
        count = np.bincount(cell, minlength=nb * K).reshape(nb, K)
        even = sizes[:, None] // K + (np.arange(K) < sizes[:, None] % K)
        keep = np.minimum(count, even)
        # rows of a minibatch are sorted, so each owner's rows are consecutive: the first `keep` stay
        spare = pos - (np.cumsum(count, axis=1) - count).ravel()[cell] >= keep.ravel()[cell]
        taker = np.full(rows.size, -1)
        taker[spare] = np.repeat(np.tile(np.arange(K), nb), (even - keep).ravel())
        given = spare & (owner == me)
        send_rows, send_to = rows[given] - self.offset, taker[given]
        by_dst = np.argsort(send_to, kind="stable")  # each destination's rows in epoch order
        send_rows, cuts = send_rows[by_dst], np.searchsorted(send_to[by_dst], np.arange(K + 1))
        raw = np.where(self.mask[send_rows], self.data[send_rows], np.nan)
        received = self.comm.alltoall([raw[cuts[d]:cuts[d + 1]] for d in range(K)])
        guest = taker == me
        data = np.empty((guest.sum(), self.data.shape[1]))
        for src in range(K):
            data[owner[guest] == src] = received[src]
        mask = np.isfinite(data)
        data[~mask] = 0.0
        own = ~spare & (owner == me)
        self._dealt = dict(own_rows=rows[own] - self.offset, own_pos=pos[own], guest_pos=pos[guest],
                           guest_data=data, guest_mask=mask,
                           own_cut=np.searchsorted(batch[own], np.arange(nb + 1)),
                           guest_cut=np.searchsorted(batch[guest], np.arange(nb + 1)))

    def _dealt_energy(self, i, rows, xi, beta=None):
        d = self._dealt
        o, g = slice(*d["own_cut"][i:i + 2]), slice(*d["guest_cut"][i:i + 2])
        local = d["own_rows"][o]
        data = np.concatenate([self.data[local], d["guest_data"][g]])
        mask = np.concatenate([self.mask[local], d["guest_mask"][g]])
        at = np.concatenate([d["own_pos"][o], d["guest_pos"][g]])
        return self._op.with_batch(data, mask, xi[at], n_batch=len(rows), beta=beta)

    # -- worker processes (one process only) ------------------------------------------------------
    def start_workers(self, n, batch_rows, max_rows=None):
        """Compute the row blocks of every later call, and the update of :meth:`descend`, with
        ``n - 1`` forked worker processes and this one (:mod:`galdecomp.workers`); results are
        bitwise those of one process.

        Parameters
        ----------
        n : int
            Threads of execution in all (1: none forked).
        batch_rows : int
            Most rows of a call with gradients (the minibatch size).
        max_rows : int, optional
            Most rows of a call without gradients (the validation rows; default ``batch_rows``).
            Larger calls are computed by this process alone.

        Returns
        -------
        int
            The threads of execution used: ``n``, at most the number of blocks of a minibatch, 1
            under MPI.
        """
        from ..workers import ForkedWorkers, SharedArrays

        self.close_workers()
        n_blocks = len(self._op.blocks(batch_rows))
        # a worker without a block would only wait, or take a span of the update: measured no
        # faster than one process on minibatches of one block (Fashion-MNIST's 128 images)
        n = min(int(n), n_blocks)
        if n <= 1 or self.comm.size > 1 or not hasattr(os, "fork"):
            return 1
        m, L, C = self.model, self.latent_dim, self.model.n_features
        max_rows = max(int(max_rows or 0), int(batch_rows))
        nb = len(self._op.blocks(max_rows))
        f8, P = np.float64, m.n_params
        self._shared = SharedArrays(dict(
            header=((len(self._HEADER),), f8), params=((P,), f8), rows=((max_rows,), np.int64),
            xi=((max_rows, L), f8), rr=((nb, C), f8), kl=((nb,), f8), gw=((nb, C), f8),
            gtd=((n_blocks, m.decoder.n_params), f8), gte=((n_blocks, m.encoder.n_params), f8),
            nll_rows=((max_rows,), f8), kl_rows=((max_rows,), f8),
            adam_m=((P,), f8), adam_v=((P,), f8), lr=((P,), f8), grad=((P,), f8)))
        # set before the fork: the workers see them
        self._max_rows, self._batch_rows, self._n_workers = max_rows, int(batch_rows), int(n)
        self._spans = self._update_spans(n)
        self._adam = self._lr = self._update_adam = None
        self._workers = ForkedWorkers(n, self._work_share)
        return self._workers.n

    def _update_spans(self, n):
        """``n`` consecutive spans of the networks' parameters ``[encoder | decoder]``, one per
        process, with equal numbers of parameters that are not frozen (a frozen one is a copy)."""
        ne, nd = self.model.encoder.n_params, self.model.decoder.n_params
        live = np.ones(ne + nd, bool)
        if self.frozen is not None:
            live[self.frozen] = False
        cum = np.cumsum(live)
        cuts = np.searchsorted(cum, np.arange(1, n) * cum[-1] / n)
        cuts = np.concatenate([[0], cuts // 8 * 8, [ne + nd]])  # cache-line aligned
        return [slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]

    def close_workers(self):
        """End the worker processes (if any)."""
        if getattr(self, "_workers", None) is not None:
            self._workers.close()
        adam = self._adam
        if adam is not None:  # the moments leave the shared mapping
            adam.m, adam.v = np.array(adam.m), np.array(adam.v)
        self._workers, self._shared, self._adam = None, None, None

    #: a task in shared memory: rows, beta (NaN: the model's), the wanted flags, the task (0: the
    #: blocks of a minibatch, 1: the update of descend), Adam's step, learning rate (NaN: the
    #: array ``lr``), beta1, beta2, eps
    _WANT = ("grad", "encoder", "decoder", "noise", "per_row")
    _HEADER = ("rows", "beta") + _WANT + ("task", "t", "lr", "beta1", "beta2", "eps")

    def _head(self, **values):
        head = self._shared["header"]
        for key, value in values.items():
            head[self._HEADER.index(key)] = value

    def _work_share(self, k):
        """Worker ``k``'s share of the task in shared memory (:meth:`_block_share` or
        :meth:`_update_share`)."""
        head = dict(zip(self._HEADER, self._shared["header"]))
        B, beta = int(head["rows"]), (None if np.isnan(head["beta"]) else float(head["beta"]))
        if head["task"] == 1:
            self._update_share(k, B, beta, head)
        else:
            self._block_share(k, B, beta, {key: bool(head[key]) for key in self._WANT})

    def _block_share(self, k, B, beta, want):
        """Every block ``c`` with ``c % n == k``, each on a minibatch of its own rows (the rows of a
        block give the same arrays as the block of the whole minibatch, rows being independent)."""
        sh, n = self._shared, self._n_workers
        weights = None
        for c, rows in enumerate(self._op.blocks(B)):
            if c % n != k:
                continue
            op = self._energy(sh["rows"][rows], sh["xi"][rows], beta)
            weights = weights or op.prepare(self._excitations(sh["params"]))
            part = op.block_sums(weights, slice(0, rows.stop - rows.start), want)
            sh["rr"][c], sh["kl"][c], sh["gw"][c] = part["rr"], part["kl"], part["gw"]
            for key in ("gtd", "gte"):
                if part[key] is not None:
                    sh[key][c] = part[key]
            if want["per_row"]:
                sh["nll_rows"][rows], sh["kl_rows"][rows] = part["nll_rows"], part["kl_rows"]

    def _update_share(self, k, B, beta, head):
        """Process ``k``'s span of the networks' gradient (summed over the blocks) and its Adam
        update, written in place (the parameters and moments in shared memory)."""
        from .optimiser import Adam

        sh, span = self._shared, self._spans[k]
        if span.stop <= span.start:
            return
        op = self._op.for_rows(B, beta)
        parts = [dict(gte=sh["gte"][c], gtd=sh["gtd"][c]) for c in range(len(op.blocks(B)))]
        grad = sh["grad"][span]
        op.weight_gradient(self._excitations(sh["params"]), parts, span, grad, op.batch_norm(B))
        adam = self._update_adam
        if adam is None:  # this process's view of the shared moments (kept for later steps)
            adam = self._update_adam = Adam(len(sh["params"]))
            adam.m, adam.v = sh["adam_m"], sh["adam_v"]
        adam.t = int(head["t"])
        adam.beta1, adam.beta2, adam.eps = float(head["beta1"]), float(head["beta2"]), float(head["eps"])
        lr = sh["lr"] if np.isnan(head["lr"]) else float(head["lr"])
        adam.update(sh["params"], grad, lr, span, self.frozen, out=sh["params"][span])  # in place: elementwise

    def _excitations(self, params):
        return {key: params[s] for key, s in self.model.slices.items()}

    def _sums(self, params, rows, xi, beta=None, grad_keys=(), per_row=False):
        """The ELBO operator of the minibatch ``rows`` and its sums (``AmortisedELBO.sums``), the
        row blocks computed by the workers if there are any."""
        v = self._excitations(params)
        if self._workers is None or len(rows) > (self._batch_rows if grad_keys else self._max_rows):
            op = self._energy(rows, xi, beta)
            return op, op.sums(v, grad_keys=grad_keys, per_row=per_row)
        op, parts = self._blocks_by_workers(params, rows, xi, beta, self._op.wanted(grad_keys, per_row))
        return op, op.sums(v, op.counts(self.mask[rows], len(rows), per_row), grad_keys, per_row, parts)

    def _blocks_by_workers(self, params, rows, xi, beta, want):
        """The blocks' partial sums of the minibatch ``rows``, computed by all processes: the ELBO
        operator and the parts (views of the shared memory, valid until the next task)."""
        sh, B = self._shared, len(rows)
        op = self._op.for_rows(B, beta)
        self._head(rows=B, beta=np.nan if beta is None else beta, task=0, **{k: float(want[k]) for k in self._WANT})
        if params is not sh["params"]:  # (descend returns the shared parameters)
            sh["params"][:] = params
        sh["rows"][:B], sh["xi"][:B] = rows, xi
        self._workers.run()
        parts = [dict(rr=sh["rr"][c], kl=float(sh["kl"][c]), gw=sh["gw"][c],
                      gtd=sh["gtd"][c] if want["decoder"] else None, gte=sh["gte"][c] if want["encoder"] else None,
                      nll_rows=sh["nll_rows"][r], kl_rows=sh["kl_rows"][r])
                 for c, r in enumerate(op.blocks(B))]
        return op, parts

    @property
    def splits_update(self):
        """Whether :meth:`descend` shares the optimiser's update among worker processes."""
        return self._workers is not None

    def descend(self, params, rows, xi, adam, lr, beta=None, extra=()):
        """One optimiser step on the minibatch ``rows``, the update shared by all processes.

        The workers and this process compute the row blocks (as :meth:`value_and_gradient`),
        then each takes a span of the networks' parameters: the span's gradient (the blocks
        added in block order) and its Adam update, the moments in shared memory; this process
        also updates the noise parameters. The parameters are bitwise those of
        ``adam.step(params, value_and_gradient(...)[1], lr, frozen=self.frozen)``. They are
        updated in place in the shared memory and that array is returned: passed back at the next
        call it is not copied (and is overwritten); any other ``params`` is left as it is.

        Parameters
        ----------
        params : ndarray, shape (n_params,)
        rows : ndarray of int
            The minibatch (global row indices; beyond ``batch_rows`` of :meth:`start_workers`
            computed by this process alone).
        xi : ndarray, shape (len(rows), L)
        adam : Adam
            Its moments move into the shared memory at the first call (and back to private
            arrays at :meth:`close_workers`); its step count advances by one.
        lr : float or ndarray, shape (n_params,)
            Learning rate (per parameter).
        beta : float, optional
            KL weight of this step.
        extra : sequence of float
            Returned as ``terms["extra"]`` (one process: nothing to sum them with).

        Returns
        -------
        value : float
            Negative ELBO per row at ``params``.
        new_params : ndarray, shape (n_params,)
            The shared parameters (valid until the next call with workers).
        terms : dict
            ``nll``, ``kl`` (per row), ``extra``.
        seconds : float
            Wall time of the update (the gradient's spans and Adam).
        """
        sh = self._shared
        if len(rows) > self._batch_rows:  # beyond the shared memory: computed here
            value, grad, terms = self.value_and_gradient(params, rows, xi, beta, extra)
            t0 = time.perf_counter()
            new = adam.step(params, grad, lr, frozen=self.frozen)
            return value, new, terms, time.perf_counter() - t0
        if adam.m is not sh["adam_m"]:  # fresh, resumed, or another optimiser
            sh["adam_m"][:], sh["adam_v"][:] = adam.m, adam.v
            adam.m, adam.v = sh["adam_m"], sh["adam_v"]
        self._adam = adam
        op, parts = self._blocks_by_workers(params, rows, xi, beta, self._op.wanted(self.model.slices))
        # the terms and the noise gradient read the parameters before the update overwrites them
        t = op.sums(self._excitations(sh["params"]), op.counts(self.mask[rows], len(rows)), ("noise",), False, parts)
        value, terms = float(op.value_of(t)), {"nll": t["nll"] / t["B"], "kl": t["kl"] / t["B"],
                                               "extra": np.asarray(extra, np.float64)}
        t0 = time.perf_counter()
        adam.t += 1
        if np.ndim(lr) and lr is not self._lr:  # per-parameter rates: copied when they change
            sh["lr"][:], self._lr = lr, lr
        self._head(task=1, t=adam.t, lr=np.nan if np.ndim(lr) else lr, beta1=adam.beta1, beta2=adam.beta2,
                   eps=adam.eps)
        self._workers.run()
        noise, new = self.model.slices["noise"], sh["params"]
        adam.update(new, t["grad_flat"], lr, noise, self.frozen, out=new[noise])
        return value, new, terms, time.perf_counter() - t0

    def value_and_gradient(self, params, rows, xi, beta=None, extra=(), dealt=None, scatter=False):
        """Negative ELBO per row of the minibatch ``rows``, its gradient and terms (nll, kl).

        ``beta`` replaces the model's KL weight for this step (KL warm-up). ``extra``: a few
        numbers of this rank summed over the ranks in the same reduction (the training loop's
        stop and checkpoint flags), returned as ``terms["extra"]``. ``dealt``: ``rows`` is
        minibatch ``dealt`` of the last :meth:`deal`; this rank computes its share of it.
        ``scatter``: return only this rank's block ``comm.vector_block(n_params)`` of the
        gradient (a reduce-scatter instead of an Allreduce).
        """
        if dealt is not None and self._dealt is not None:
            op = self._dealt_energy(dealt, rows, xi, beta)
            t = op.sums(self._excitations(params), grad_keys=self.model.slices)
        else:
            op, t = self._sums(params, rows, xi, beta, grad_keys=self.model.slices)
        grad = t["grad_flat"]  # [encoder | decoder | noise], the model's order
        head = np.concatenate([[op.value_of(t), t["nll"] / t["B"], t["kl"] / t["B"]], extra])
        t0 = time.perf_counter()
        if scatter:
            head, grad = self.comm.sum_scattered(head, grad)
        else:
            packed = self.comm.allreduce_sum(np.concatenate([head, grad]))
            head, grad = packed[:len(head)], packed[len(head):]
        self.reduce_seconds += time.perf_counter() - t0
        return float(head[0]), grad, {"nll": head[1], "kl": head[2], "extra": head[3:]}

    def value(self, params, rows, xi):
        """Negative ELBO per row of ``rows`` (no gradient) and its terms (nll, kl)."""
        op, t = self._sums(params, rows, xi)
        packed = self.comm.allreduce_sum([op.value_of(t), t["nll"] / t["B"], t["kl"] / t["B"]])
        return float(packed[0]), {"nll": packed[1], "kl": packed[2]}

    def validation(self, params, rows, xi):
        """Mean and median over ``rows`` of each row's negative ELBO (``nll + kl``, no prior
        terms), on every rank.

        The median is the robust statistic: one anomalous row (a bright compact source on a sky)
        can dominate the mean.

        Returns
        -------
        mean, median : float
        """
        _, t = self._sums(params, rows, xi, per_row=True)
        per_row = self.comm.gather_rows(t["nll_rows"] + t["kl_rows"])
        stats = None if per_row is None else (float(np.mean(per_row)), float(np.median(per_row)))
        return self.comm.bcast(stats)

