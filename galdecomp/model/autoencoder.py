"""The probabilistic autoencoder as one object: networks, posterior family, noise model, parameters.

All parameters live in one flat vector of excitations ``[encoder | decoder | noise]`` (so an
optimiser, a checkpoint or an MPI Allreduce handles one array); the networks' weights are
``scales * excitation``. Rows are samples (pixels, images), columns features (channels):
nothing here knows about HEALPix.
"""
import numpy as np
import nifty8 as ift

from .elbo import AmortisedELBO, encoder_input
from .likelihood import GaussianLikelihood
from .mlp import MLP
from .families import POSTERIORS
from .prior import STANDARD_NORMAL
from .settings import Architecture, ELBOSettings
from ..seeds import stream

__all__ = ["Autoencoder"]


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

