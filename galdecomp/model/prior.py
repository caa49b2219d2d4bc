"""Latent prior families p(z): the standard normal of training, and its KL to Gaussian posteriors.

Shapes: ``z`` (N, L); posterior means (B, L), log standard deviations (B, L), Cholesky factors
of precisions and their inverses (B, L, L). Every KL to the prior used in training lives here:
the posterior families (:mod:`.posteriors`, :mod:`.fisher`) call these functions, so the
N(0, 1) prior is written once.
"""
import numpy as np

__all__ = ["LatentPrior", "StandardNormal", "STANDARD_NORMAL"]

_LOG2PI = np.log(2.0 * np.pi)


class LatentPrior:
    """Interface of a latent prior: log-density and sampling, rows x latent features."""

    #: name stored with a run
    name = "base"

    def log_density(self, z):
        """``log p(z)`` per row; ``z`` shape (N, L), returns (N,)."""
        raise NotImplementedError

    def sample(self, n, latent_dim, rng):
        """``n`` draws, shape (n, L)."""
        raise NotImplementedError


class StandardNormal(LatentPrior):
    """``p(z) = N(0, 1)``, the prior the autoencoder is trained with."""

    name = "standard_normal"

    def log_density(self, z):
        z = np.asarray(z, dtype=float)
        return -0.5 * (z * z).sum(axis=1) - 0.5 * z.shape[1] * _LOG2PI

    def sample(self, n, latent_dim, rng):
        return rng.standard_normal((int(n), int(latent_dim)))

    # -- KL of Gaussian posteriors to this prior ---------------------------------------------
    @staticmethod
    def kl_diagonal(mu, log_sigma):
        """``KL[N(mu, diag sigma^2) || N(0, 1)]`` per row and its partial derivatives.

        Parameters
        ----------
        mu, log_sigma : ndarray, shape (B, L)

        Returns
        -------
        kl : ndarray, shape (B,)
        d_mu : ndarray, shape (B, L)
            ``dKL / dmu = mu``.
        d_log_sigma : ndarray, shape (B, L)
            ``dKL / dlog sigma = sigma^2 - 1``.
        """
        sd = np.exp(log_sigma)
        var = sd * sd
        kl = 0.5 * np.sum(mu * mu + var - 1.0 - 2.0 * log_sigma, axis=1)
        return kl, mu, var - 1.0

    @staticmethod
    def kl_precision(mu, chol_inv, logdet_precision):
        """``KL[N(mu, M^-1) || N(0, 1)]`` per row from ``M = Lc Lc^T`` and its derivatives.

        ``KL = (tr M^-1 + |mu|^2 - L + log det M) / 2``.

        Parameters
        ----------
        mu : ndarray, shape (B, L)
        chol_inv : ndarray, shape (B, L, L)
            ``Lc^-1`` (lower triangular), so that ``M^-1 = Lc^-T Lc^-1``.
        logdet_precision : ndarray, shape (B,)
            ``log det M``.

        Returns
        -------
        kl : ndarray, shape (B,)
        d_mu : ndarray, shape (B, L)
            ``dKL / dmu = mu``.
        q : ndarray, shape (B, L, L)
            ``(1 - Lc^-1 Lc^-T) / 2``: the derivative with respect to ``M`` is
            ``dKL / dM = Lc^-T q Lc^-1 = (M^-1 - M^-2) / 2``.
        """
        L = mu.shape[1]
        kl = 0.5 * ((chol_inv * chol_inv).sum(axis=(1, 2)) + (mu * mu).sum(axis=1) - L + logdet_precision)
        q = 0.5 * (np.eye(L) - chol_inv @ np.ascontiguousarray(np.swapaxes(chol_inv, 1, 2)))
        return kl, mu, q


#: the training prior
STANDARD_NORMAL = StandardNormal()
