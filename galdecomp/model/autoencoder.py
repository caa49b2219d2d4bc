"""The probabilistic autoencoder as one object: networks, posterior family, noise model, parameters.

All parameters live in one flat vector of excitations ``[encoder | decoder | noise]`` (so an
optimiser, a checkpoint or an MPI Allreduce handles one array); the networks' weights are
``scales * excitation``. Rows are samples (pixels, images), columns features (channels):
nothing here knows about HEALPix.
"""
import os
import time

import numpy as np
import nifty8 as ift

from .elbo import AmortisedELBO, encoder_input
from .likelihood import GaussianLikelihood
from .mlp import MLP
from .families import POSTERIORS
from .prior import STANDARD_NORMAL
from .settings import Architecture, ELBOSettings
from ..seeds import stream

__all__ = ["Autoencoder", "ELBOObjective"]


class Autoencoder:
    """Encoder, decoder, latent posterior family and adaptive noise.

    Parameters
    ----------
    n_features : int
        Data columns (channels) C.
    latent_dim : int
        Latent features L.
    architecture : Architecture, optional
        The networks (hidden widths, activations, dtype, initial output scale of the encoder,
        its mask input), the posterior family (``covariance``) and the row blocks of a minibatch
        (:class:`~galdecomp.model.settings.Architecture`); default ``Architecture()``.
    likelihood : GaussianLikelihood, optional
        The noise model: known floor per feature (standardised units, broadcast to C) and the
        prior of the adaptive noise ``sigma0``, ``tau`` (:mod:`galdecomp.model.noise`); default
        ``GaussianLikelihood()`` (no floor).
    beta : float
        Weight of the KL term.

    Attributes
    ----------
    floor : ndarray, shape (C,)
    sigma0, tau, beta : float
    likelihood : GaussianLikelihood
        With the floor broadcast to C.
    """

    def __init__(self, n_features, latent_dim=10, architecture=None, likelihood=None, beta=1.0):
        arch = Architecture() if architecture is None else architecture
        lik = GaussianLikelihood() if likelihood is None else likelihood
        dt = np.dtype(arch.dtype).type
        self.n_features, self.latent_dim = int(n_features), int(latent_dim)
        self.architecture = arch
        self.posterior = POSTERIORS[arch.covariance].from_architecture(arch)
        self.decoder = MLP([latent_dim, *arch.decoder_hidden, n_features], arch.decoder_activation, dtype=dt)
        self.encoder = MLP([2 * n_features, *arch.encoder_hidden, self.posterior.n_encoder_outputs(latent_dim)],
                           arch.encoder_activation, dtype=dt, sparse_inputs=slice(n_features, 2 * n_features))
        self.floor = np.broadcast_to(np.asarray(lik.floor, float), (n_features,)).copy()
        self.sigma0, self.tau, self.beta = float(lik.sigma0), float(lik.tau), float(beta)
        self.likelihood = GaussianLikelihood(self.floor, self.sigma0, self.tau)
        self.prior = STANDARD_NORMAL
        self.encoder_output_scale = float(arch.encoder_output_scale)
        self.mask_input = arch.mask_input
        self.block_rows = int(arch.block_rows)
        self.enc_scales = self.encoder.init_scales()
        self.dec_scales = self.decoder.init_scales()
        sizes = [("encoder", self.encoder.n_params), ("decoder", self.decoder.n_params),
                 ("noise", n_features)]
        self.slices, i = {}, 0
        for k, n in sizes:
            self.slices[k] = slice(i, i + n)
            i += n
        self.n_params = i

    @classmethod
    def from_config(cls, cfg, n_features, floor=0.0):
        """Build from a resolved fit configuration (:mod:`galdecomp.inference.config`) and the
        noise floor per feature."""
        return cls(n_features, cfg["latent_dim"], Architecture.from_config(cfg),
                   GaussianLikelihood(floor, cfg["noise"]["sigma0"], cfg["noise"]["tau"]), cfg["beta"])

    # -- parameters -------------------------------------------------------------------------------
    def init_params(self, seed):
        """Initial excitations: a prior draw for the decoder, encoder outputs scaled by
        ``encoder_output_scale``, noise at sigma0."""
        rng = stream(seed, "model", "init")
        p = np.zeros(self.n_params)
        p[self.slices["encoder"]] = rng.standard_normal(self.encoder.n_params)
        n_last = self.encoder.sizes[-2] * self.encoder.sizes[-1] + self.encoder.sizes[-1]
        p[self.slices["encoder"].stop - n_last:self.slices["encoder"].stop] *= self.encoder_output_scale
        p[self.slices["decoder"]] = rng.standard_normal(self.decoder.n_params)
        return p

    def step_scales(self):
        """Per-parameter factor that turns an optimiser step on the weights into one on the
        excitations: ``1 / scales`` for the networks, ``1 / tau`` for the noise (a step in log sigma).

        Returns
        -------
        ndarray, shape (n_params,)
        """
        u = np.empty(self.n_params)
        u[self.slices["encoder"]] = 1.0 / self.enc_scales
        u[self.slices["decoder"]] = 1.0 / self.dec_scales
        u[self.slices["noise"]] = 1.0 / self.tau
        return u

    def split(self, params):
        """Network weights and noise excitation: ``(theta_enc, theta_dec, s)``."""
        return (self.enc_scales * params[self.slices["encoder"]],
                self.dec_scales * params[self.slices["decoder"]], params[self.slices["noise"]])

    def sigma(self, params):
        """Noise standard deviation per feature (standardised units)."""
        return self.likelihood.sigma(params[self.slices["noise"]])

    # -- NIFTy energy -----------------------------------------------------------------------------
    def elbo(self, data, mask, xi, n_total, with_prior=True):
        """The :class:`AmortisedELBO` operator (negative ELBO per row) for one minibatch."""
        return AmortisedELBO(data, mask, xi, self.encoder, self.decoder, self.posterior, self.likelihood,
                             ELBOSettings(self.beta, n_total, with_prior=with_prior, mask_input=self.mask_input,
                                          block_rows=self.block_rows, encoder_scales=self.enc_scales,
                                          decoder_scales=self.dec_scales))

    def position(self, params, domain):
        """Flat excitations as a MultiField on an ELBO operator's domain."""
        return ift.MultiField.from_dict(
            {k: ift.makeField(domain[k], params[self.slices[k]]) for k in self.slices}, domain)

    def flatten(self, multifield):
        """Inverse of :meth:`position`."""
        out = np.empty(self.n_params)
        for k, s in self.slices.items():
            out[s] = multifield[k].val
        return out

    # -- evaluation in blocks ---------------------------------------------------------------------
    def _inv_var(self, params, mask):
        return mask / self.sigma(params) ** 2

    def posterior_moments(self, params, data, mask, block=8192, full_cov=False, cov_rows=None):
        """Posterior mean and standard deviation (or covariance) of every row, in row blocks.

        Only one block's (block, L, L) covariance exists at a time unless ``full_cov`` asks for
        all of them (P x L x L x 8 bytes: 10 GB at nside 1024 with L = 10). Every row's numbers
        are the same (bitwise) whatever is asked for; products that need covariances of all rows
        call this on slices ``[a, a + block)`` with ``a`` a multiple of ``block`` (the same blocks).

        Parameters
        ----------
        params : ndarray
        data : ndarray, shape (P, C)
            Standardised data (missing entries arbitrary).
        mask : ndarray of bool, shape (P, C)
            True where observed.
        block : int
            Rows per block.
        full_cov : bool
            Return the covariances (P, L, L) instead of the standard deviations (P, L).
        cov_rows : array of int, optional
            Also return the covariances of these rows (K, L, L), e.g. the few rows a latent
            transform is fitted on.

        Returns
        -------
        mean : ndarray, shape (P, L)
        std : ndarray, shape (P, L)
            ``sqrt`` of the covariances' diagonals; with ``full_cov`` instead
            ``cov`` : ndarray, shape (P, L, L).
        cov_at_rows : ndarray, shape (K, L, L)
            Only with ``cov_rows``: ``cov[cov_rows]``.
        """
        th_e, th_d, _ = self.split(params)
        P, L = len(data), self.latent_dim
        mean = np.empty((P, L))
        second = np.empty((P, L, L)) if full_cov else np.empty((P, L))
        if cov_rows is not None:
            cov_rows = np.asarray(cov_rows, dtype=np.int64).reshape(-1)
            at = np.empty((len(cov_rows), L, L))
        for a in range(0, P, block):
            b = min(a + block, P)
            d, m = data[a:b], mask[a:b].astype(float)
            x = encoder_input(np.where(m > 0, d, 0.0), mask[a:b], self.mask_input)
            enc = np.asarray(self.encoder.forward(th_e, x), dtype=float)
            inv_var = self._inv_var(params, m)
            if not full_cov and cov_rows is None:
                mean[a:b], second[a:b] = self.posterior.mean_and_std(enc, self.decoder, th_d, inv_var)
                continue
            mean[a:b], cov = self.posterior.mean_and_cov(enc, self.decoder, th_d, inv_var)
            second[a:b] = cov if full_cov else np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
            if cov_rows is not None:
                here = (cov_rows >= a) & (cov_rows < b)
                at[here] = cov[cov_rows[here] - a]
        return (mean, second) if cov_rows is None else (mean, second, at)

    def decode(self, params, z):
        """Decoder output ``f(z)`` (standardised units), shape (P, C)."""
        return np.asarray(self.decoder.forward(self.split(params)[1], z), dtype=float)

    def nll_rows(self, params, data, mask, z):
        """Per-row negative log-likelihood ``-log N(d | f(z), N)`` over observed features."""
        return self.likelihood.nll_rows(data, mask, self.decode(params, z), params[self.slices["noise"]])


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
