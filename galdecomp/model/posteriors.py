"""Pluggable latent posterior families q(z | d) for the amortised ELBO.

A family maps the encoder output of a row block (and, if it wants, the decoder and the
per-entry inverse noise variances) to a reparameterised sample ``z = g(enc_out, xi)``, the
per-row ``KL[q || N(0, 1)]`` (or an estimate) and the backward pass of both. The registry of
families, ``POSTERIORS`` (name -> class), is built in one place,
:mod:`galdecomp.model.families`, which imports every family (this module imports none).
"""
import numpy as np

from .prior import STANDARD_NORMAL

__all__ = ["LatentPosterior", "DiagonalGaussian"]


class LatentPosterior:
    """Interface of a latent posterior family (all arrays float64, rows = batch B)."""

    #: registry name
    name = "base"

    @classmethod
    def from_architecture(cls, arch):
        """The family as an :class:`~galdecomp.model.settings.Architecture` sets it up (default:
        no settings)."""
        return cls()

    def n_encoder_outputs(self, latent_dim):
        """Number of encoder outputs per row for latent dimension ``latent_dim``."""
        raise NotImplementedError

    def forward(self, enc_out, xi, decoder, theta_dec, inv_var):
        """Sample and KL.

        Parameters
        ----------
        enc_out : ndarray (B, n_encoder_outputs)
        xi : ndarray (B, L)
            Standard-normal draws.
        decoder : MLP
        theta_dec : ndarray (n_params,)
            Decoder parameters (not excitations).
        inv_var : ndarray (B, C)
            ``mask / sigma_c**2``.

        Returns
        -------
        z : ndarray (B, L)
            Reparameterised sample.
        kl : ndarray (B,)
            Per-row ``KL[q || N(0, 1)]`` or its estimate.
        ctx : object
            Whatever :meth:`backward` needs.
        """
        raise NotImplementedError

    def backward(self, ctx, g_z, g_kl):
        """Reverse pass.

        Parameters
        ----------
        ctx : object
            From :meth:`forward`.
        g_z : ndarray (B, L)
            Cotangent of ``z``.
        g_kl : ndarray (B,)
            Cotangent of ``kl``.

        Returns
        -------
        g_enc_out : ndarray (B, n_encoder_outputs)
        g_theta_dec : ndarray (n_params,) or None
        g_inv_var : ndarray (B, C) or None
        """
        raise NotImplementedError

    def mean_and_cov(self, enc_out, decoder, theta_dec, inv_var):
        """Posterior mean (B, L) and covariance (B, L, L) for products."""
        raise NotImplementedError

    def mean_and_std(self, enc_out, decoder, theta_dec, inv_var):
        """Posterior mean (B, L) and marginal standard deviations (B, L) for products.

        The same numbers as ``sqrt`` of the diagonal of :meth:`mean_and_cov`'s covariance
        (bitwise); a family may override it to avoid forming the (B, L, L) array.
        """
        mu, cov = self.mean_and_cov(enc_out, decoder, theta_dec, inv_var)
        return mu, np.sqrt(np.diagonal(cov, axis1=1, axis2=2))


class DiagonalGaussian(LatentPosterior):
    """``q(z | d) = N(mu, diag(exp(2 log_sigma)))``, the standard VAE posterior.

    ``enc_out = [mu, log_sigma]`` (first L columns, last L columns); ``z = mu + exp(log_sigma) xi``;
    analytic KL to the prior (:meth:`.prior.StandardNormal.kl_diagonal`). An encoder whose outputs start
    near 0 starts at the prior (sigma = 1, KL = 0). The decoder and noise are not used.
    """

    name = "diagonal"

    def n_encoder_outputs(self, latent_dim):
        return 2 * int(latent_dim)

    def _split(self, enc_out):
        enc_out = np.asarray(enc_out, dtype=np.float64)
        L = enc_out.shape[1] // 2
        if enc_out.ndim != 2 or enc_out.shape[1] != 2 * L:
            raise ValueError(f"enc_out must be (B, 2L), got {enc_out.shape}")
        return enc_out[:, :L], enc_out[:, L:]

    def forward(self, enc_out, xi, decoder=None, theta_dec=None, inv_var=None):
        mu, log_sigma = self._split(enc_out)
        sd = np.exp(log_sigma)
        z = mu + sd * xi
        kl, d_mu, d_ls = STANDARD_NORMAL.kl_diagonal(mu, log_sigma)
        return z, kl, (sd, xi, d_mu, d_ls)

    def backward(self, ctx, g_z, g_kl):
        sd, xi, d_mu, d_ls = ctx
        g_kl = np.broadcast_to(np.asarray(g_kl, dtype=np.float64), (len(sd),))[:, None]
        g_mu = g_z + g_kl * d_mu
        g_ls = g_z * xi * sd + g_kl * d_ls
        return np.concatenate([g_mu, g_ls], axis=1), None, None

    def mean_and_cov(self, enc_out, decoder=None, theta_dec=None, inv_var=None):
        mu, log_sigma = self._split(enc_out)
        cov = np.zeros(mu.shape + (mu.shape[1],))
        idx = np.arange(mu.shape[1])
        cov[:, idx, idx] = np.exp(2.0 * log_sigma)
        return mu.copy(), cov

    def mean_and_std(self, enc_out, decoder=None, theta_dec=None, inv_var=None):
        """Posterior mean and std ``exp(log_sigma)`` (as ``sqrt`` of :meth:`mean_and_cov`'s diagonal), (B, L)."""
        mu, log_sigma = self._split(enc_out)
        return mu.copy(), np.sqrt(np.exp(2.0 * log_sigma))

