"""The training objective: minibatch negative ELBO of an autoencoder over a table of rows.

:class:`ELBOObjective` deals the minibatches (global row indices) to the processes that hold the
rows, evaluates the model's :class:`~galdecomp.model.elbo.AmortisedELBO` on each process's share
(on forked workers in one process) and adds the partial sums with one collective per step. It
is training machinery, so it lives here and not in the model.
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
        self._workers = self._shared = None
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
        """Compute the row blocks of every later call with ``n - 1`` forked worker processes and
        this one (:mod:`galdecomp.workers`); results are bitwise those of one process.

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
        n = min(int(n), len(self._op.blocks(batch_rows)))  # a worker without a block would only wait
        if n <= 1 or self.comm.size > 1 or not hasattr(os, "fork"):
            return 1
        m, L, C = self.model, self.latent_dim, self.model.n_features
        max_rows = max(int(max_rows or 0), int(batch_rows))
        nb, ng = len(self._op.blocks(max_rows)), len(self._op.blocks(batch_rows))
        f8 = np.float64
        self._shared = SharedArrays(dict(
            header=((8,), f8), params=((m.n_params,), f8), rows=((max_rows,), np.int64), xi=((max_rows, L), f8),
            rr=((nb, C), f8), kl=((nb,), f8), gw=((nb, C), f8), gtd=((ng, m.decoder.n_params), f8),
            gte=((ng, m.encoder.n_params), f8), nll_rows=((max_rows,), f8), kl_rows=((max_rows,), f8)))
        # set before the fork: the workers see them
        self._max_rows, self._batch_rows, self._n_workers = max_rows, int(batch_rows), int(n)
        self._workers = ForkedWorkers(n, self._work_share)
        return self._workers.n

    def close_workers(self):
        """End the worker processes (if any)."""
        if getattr(self, "_workers", None) is not None:
            self._workers.close()
        self._workers, self._shared = None, None

    #: header of a task in shared memory: rows, beta (NaN: the model's), then the wanted flags
    _WANT = ("grad", "encoder", "decoder", "noise", "per_row")

    def _work_share(self, k):
        """Worker ``k``'s share of the task in shared memory: every block ``c`` with ``c % n == k``,
        each on a minibatch of its own rows (the rows of a block give the same arrays as the
        block of the whole minibatch, rows being independent)."""
        sh, n = self._shared, self._n_workers
        head = sh["header"]
        B, beta = int(head[0]), (None if np.isnan(head[1]) else float(head[1]))
        want = {key: bool(head[2 + i]) for i, key in enumerate(self._WANT)}
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

    def _excitations(self, params):
        return {key: params[s] for key, s in self.model.slices.items()}

    def _sums(self, params, rows, xi, beta=None, grad_keys=(), per_row=False):
        """The ELBO operator of the minibatch ``rows`` and its sums (``AmortisedELBO.sums``), the
        row blocks computed by the workers if there are any."""
        v = self._excitations(params)
        if self._workers is None or len(rows) > (self._batch_rows if grad_keys else self._max_rows):
            op = self._energy(rows, xi, beta)
            return op, op.sums(v, grad_keys=grad_keys, per_row=per_row)
        sh, B = self._shared, len(rows)
        op = self._op.for_rows(B, beta)
        want = op.wanted(grad_keys, per_row)
        sh["header"][:] = [B, np.nan if beta is None else beta] + [float(want[key]) for key in self._WANT] + [0.0]
        sh["params"][:], sh["rows"][:B], sh["xi"][:B] = params, rows, xi
        self._workers.run()
        # views of the shared memory: op.sums only reads them (into new arrays) before returning
        parts = [dict(rr=sh["rr"][c], kl=float(sh["kl"][c]), gw=sh["gw"][c],
                      gtd=sh["gtd"][c] if want["decoder"] else None, gte=sh["gte"][c] if want["encoder"] else None,
                      nll_rows=sh["nll_rows"][r], kl_rows=sh["kl_rows"][r])
                 for c, r in enumerate(op.blocks(B))]
        return op, op.sums(v, op.counts(self.mask[rows], B, per_row), grad_keys, per_row, parts)

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
