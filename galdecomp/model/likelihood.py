"""Likelihood families p(d | f(z)): the per-entry noise model of the data, written once.

Shapes: data, mask and predictions ``f(z)`` (B, C) (mask True where observed); noise
excitations ``s`` (C,). The fused kernels (:class:`~galdecomp.model.elbo.AmortisedELBO`,
:class:`~galdecomp.model.operators.DecoderLikelihood`, :class:`~galdecomp.model.operators.MaskedGaussianEnergy`)
accumulate the per-channel residual sums ``rr_c = sum_i m_ic (d_ic - f_ic)^2`` and counts
``n_c = sum_i m_ic`` in their own blocked passes and take the value and its derivative with
respect to the inverse variances from :meth:`GaussianLikelihood.value_from_sums` and
:meth:`GaussianLikelihood.grad_inv_var_from_sums`; tests check them against :meth:`GaussianLikelihood.nll_rows`.
"""
import numpy as np

from . import noise as _noise

__all__ = ["Likelihood", "GaussianLikelihood"]

_LOG2PI = np.log(2.0 * np.pi)


class Likelihood:
    """Interface of a likelihood family with ``n_params(C)`` parameters of its own (excitations)."""

    #: name stored with a run
    name = "base"

    def n_params(self, n_features):
        """Number of likelihood parameters (excitations with a N(0, 1) prior)."""
        raise NotImplementedError

    def nll_rows(self, data, mask, pred, s):
        """``-log p(d_i | f_i)`` over the observed entries of each row, shape (B,)."""
        raise NotImplementedError

    def metric_weights(self, mask, s):
        """Fisher information of the prediction per entry, shape (B, C) (0 where missing)."""
        raise NotImplementedError

    def sample(self, pred, s, rng):
        """Draws of the data given predictions ``pred`` (B, C)."""
        raise NotImplementedError


class GaussianLikelihood(Likelihood):
    """Independent Gaussian noise per channel with the adaptive noise model of :mod:`.noise`.

    ``-log p(d_i | f_i) = 0.5 sum_c m_ic [(d_ic - f_ic)^2 / sigma_c^2 + log(2 pi sigma_c^2)]``,
    ``sigma_c^2 = floor_c^2 + (sigma0 exp(tau s_c))^2``.

    Parameters
    ----------
    floor : array_like, shape (C,) or float
        Known noise floor (standardised units).
    sigma0, tau : float
        Prior of the adaptive part.
    """

    name = "gaussian"

    def __init__(self, floor=0.0, sigma0=_noise.SIGMA0, tau=_noise.TAU):
        self.floor = np.asarray(floor, dtype=float)
        self.sigma0, self.tau = float(sigma0), float(tau)

    def n_params(self, n_features):
        return int(n_features)

    def sigma(self, s):
        """Noise standard deviation per channel, shape (C,)."""
        return _noise.sigma(s, self.floor, self.sigma0, self.tau)

    def inv_var(self, s):
        """``1 / sigma_c^2`` and its derivative ``d w_c / d s_c``, each shape (C,)."""
        return _noise.d_inv_var_ds(s, self.floor, self.sigma0, self.tau)

    # -- per row ------------------------------------------------------------------------------
    def chi2_rows(self, data, mask, pred, s):
        """``sum_c m_ic (d_ic - f_ic)^2 / sigma_c^2`` per row, shape (B,)."""
        r = np.where(mask, (np.asarray(data, float) - pred) / self.sigma(s), 0.0)
        return (r * r).sum(axis=1)

    def nll_rows(self, data, mask, pred, s):
        log_norm = np.log(2.0 * np.pi * self.sigma(s) ** 2)
        return 0.5 * (self.chi2_rows(data, mask, pred, s) + np.asarray(mask, float) @ log_norm)

    def grad_pred(self, data, mask, pred, s):
        """``d nll / d f`` per entry, shape (B, C)."""
        return np.where(mask, (pred - np.asarray(data, float)) / self.sigma(s) ** 2, 0.0)

    def metric_weights(self, mask, s):
        return np.asarray(mask, float) * self.inv_var(s)[0]

    def sample(self, pred, s, rng):
        return pred + self.sigma(s) * rng.standard_normal(np.shape(pred))

    # -- from per-channel sums (the fused kernels) --------------------------------------------
    @staticmethod
    def value_from_sums(rr, count, w):
        """Summed NLL ``0.5 sum_c [w_c rr_c + n_c log(2 pi / w_c)]`` from residual sums.

        Parameters
        ----------
        rr : ndarray, shape (C,)
            ``sum_i m_ic (d_ic - f_ic)^2``.
        count : ndarray, shape (C,)
            Observed entries per channel.
        w : ndarray, shape (C,)
            Inverse variances.
        """
        return 0.5 * (w @ rr + count @ (_LOG2PI - np.log(w)))

    @staticmethod
    def grad_inv_var_from_sums(rr, count, w):
        """Derivative of :meth:`value_from_sums` with respect to ``w``, shape (C,)."""
        return 0.5 * (rr - count / w)

    @staticmethod
    def log_norm_rows(mask, w):
        """Normalisation part of each row's NLL, ``0.5 sum_c m_ic log(2 pi / w_c)``, shape (B,)."""
        return 0.5 * (np.asarray(mask, float) @ (_LOG2PI - np.log(w)))

    def noise_fisher(self, count, s):
        """Fisher information of the noise excitations, ``0.5 n_c (d log sigma_c^2 / d s_c)^2``."""
        return 0.5 * count * _noise.d_log_var_ds(s, self.floor, self.sigma0, self.tau) ** 2
