"""Posterior predictive of every channel from the observed entries of each row.

For each row, ``p(z | y_obs)`` is the Laplace/Fisher posterior of
:meth:`galdecomp.inference.trained.TrainedModel.condition` (the encoder never saw the gaps), and the
predictive distribution of channel ``c`` is that of a new measurement
``x_c = g_c T_c^-1(f_c(z) + sigma_c eps) + n'_c`` with ``z ~ p(z | y_obs)``, the model's noise
``sigma_c`` (standardised units), a calibration factor ``g_c ~ N(1, gain_sigma_c^2)`` and extra
noise ``n'_c ~ N(0, extra_noise_c^2)`` (physical units), by Monte Carlo draws.

In the conditioning, the extra noise and the gain uncertainty of an observed entry enter as
additional variance in standardised units, linearised at the observed value:
``(extra_noise_c^2 + (gain_sigma_c x_c)^2) (dy/dx)^2``; the gain is marginalised per row (its
correlation between rows of one map is not modelled).

Shapes: data, masks, predictive summaries (P, C); latents (P, L); draws (K, B, C) per block.
"""
import numpy as np

__all__ = ["QUANTILES", "extra_variance", "predictive"]

#: predictive percentiles written by `galdecomp reconstruct`: name -> percent
QUANTILES = {"p02": 2.5, "p16": 15.865525, "p50": 50.0, "p84": 84.134475, "p98": 97.5}


def extra_variance(trained, physical, mask, extra_noise=None, gain_sigma=None):
    """Variance beyond the model's per observed entry, in standardised units.

    Parameters
    ----------
    trained : TrainedModel
    physical : ndarray, shape (P, C)
        Data in physical units (NaN where missing).
    mask : ndarray of bool, shape (P, C)
    extra_noise, gain_sigma : ndarray, shape (C,), optional
        Extra noise (physical units) and relative calibration uncertainty per channel.

    Returns
    -------
    ndarray, shape (P, C)
        0 where missing or nothing is extra.
    """
    C = trained.n_features
    en = np.zeros(C) if extra_noise is None else np.asarray(extra_noise, float)
    gs = np.zeros(C) if gain_sigma is None else np.asarray(gain_sigma, float)
    x = np.where(mask, physical, 1.0)
    slope = np.stack([t.derivative(x[:, c]) for c, t in enumerate(trained.preprocessor.transforms)], axis=1)
    var = (en ** 2 + (gs * x) ** 2) * slope ** 2
    return np.where(mask & np.isfinite(var), var, 0.0)


#: Rows conditioned at a time by :func:`predictive`: their Laplace covariances (CONDITION_ROWS, L, L)
#: are the only ones held. A multiple of the blocks of ``TrainedModel.encode`` (8192) and of
#: ``conditional.latent_map`` (2048), so every row's numbers are those of one call on all rows.
CONDITION_ROWS = 65536


def predictive(trained, physical, mask, extra_noise=None, gain_sigma=None, n_draws=200, rng=None,
               block=1024, sigma=None):
    """Predictive mean, standard deviation and percentiles of every channel of every row.

    Parameters
    ----------
    trained : TrainedModel
    physical : ndarray, shape (P, C)
        Data in physical units; entries outside ``mask`` are ignored.
    mask : ndarray of bool, shape (P, C)
        Entries to condition on.
    extra_noise, gain_sigma : ndarray, shape (C,), optional
        Per channel, as in :func:`extra_variance`.
    n_draws : int
        Monte Carlo draws per row.
    rng : numpy.random.Generator, optional
    block : int
        Rows per block.
    sigma : ndarray, shape (C,), optional
        The noise (standardised units) of conditioning and prediction instead of the model's,
        e.g. :meth:`TrainedModel.recalibrated_sigma`.

    Returns
    -------
    dict
        ``mean``, ``std`` (P, C) in physical units; one (P, C) array per name of
        :data:`QUANTILES`; ``standardised_mean`` (P, C): the predictive mean of the standardised
        value; ``latent_mean``, ``latent_std`` (P, L): the conditioned posterior;
        ``converged`` (P,) bool.
    """
    rng = np.random.default_rng() if rng is None else rng
    C = trained.n_features
    mask = np.asarray(mask, bool) & np.isfinite(physical)
    y = np.where(mask, trained.standardise(np.where(mask, physical, 1.0)), 0.0)
    xvar = extra_variance(trained, physical, mask, extra_noise, gain_sigma)
    sigma = trained.sigma if sigma is None else np.asarray(sigma, float)
    en = np.zeros(C) if extra_noise is None else np.asarray(extra_noise, float)
    gs = np.zeros(C) if gain_sigma is None else np.asarray(gain_sigma, float)
    P = len(y)
    out = {k: np.empty((P, C)) for k in ["mean", "std", "standardised_mean", *QUANTILES]}
    out.update(latent_mean=np.empty((P, trained.latent_dim)), latent_std=np.empty((P, trained.latent_dim)),
               converged=np.empty(P, bool))
    for at in range(0, P, CONDITION_ROWS):
        c = slice(at, min(at + CONDITION_ROWS, P))
        cond = trained.condition(y[c], mask[c], standardised=True, extra_noise=np.sqrt(xvar[c]), sigma=sigma)
        out["latent_mean"][c], out["latent_std"][c], out["converged"][c] = cond["mean"], cond["std"], cond["converged"]
        _predict_rows(trained, cond, at, c.stop, block, n_draws, rng, sigma, en, gs, out)
    return out


def _predict_rows(trained, cond, at, stop, block, n_draws, rng, sigma, en, gs, out):
    """:func:`predictive`'s Monte Carlo for the rows ``at .. stop - 1`` (conditioned in ``cond``,
    whose row 0 is row ``at``), ``block`` rows at a time, into ``out``."""
    C = trained.n_features
    for a in range(at, stop, block):
        s = slice(a, min(a + block, stop))
        m, cov = cond["mean"][s.start - at:s.stop - at], cond["cov"][s.start - at:s.stop - at]
        B, L = m.shape
        chol = np.linalg.cholesky(cov)
        z = m + np.einsum("bij,kbj->kbi", chol, rng.standard_normal((n_draws, B, L)))
        f = trained.decode(z.reshape(-1, L), physical=False).reshape(n_draws, B, C)
        f += sigma * rng.standard_normal(f.shape)
        out["standardised_mean"][s] = f.mean(0)
        x = trained.physical(f.reshape(-1, C)).reshape(n_draws, B, C)
        x = x * (1.0 + gs * rng.standard_normal((n_draws, 1, C))) + en * rng.standard_normal(x.shape)
        out["mean"][s], out["std"][s] = x.mean(0), x.std(0)
        for name, q in zip(QUANTILES, np.percentile(x, list(QUANTILES.values()), axis=0)):
            out[name][s] = q
