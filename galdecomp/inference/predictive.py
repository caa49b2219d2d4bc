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

Calibration (:func:`pit_calibration`): the predictive is Gaussian in the noise and one noise level
per channel serves the whole sky, while the errors are heavier-tailed and larger in some parts of
the sky than others. Per channel, entries of the run's own data are hidden, with the other
channels of their row hidden as in a row to be predicted, and predicted from the rest; their
probability integral transforms (PIT: the fraction of the
predictive draws below the true value) are uniform for a calibrated predictive. A level ``a``
of the predictive is then read at the level ``G_c^-1(a)``, the ``a``-quantile of channel ``c``'s
PIT values (quantile recalibration, Kuleshov et al. 2018), which makes every level right on
average over the calibration entries, for both widths and tails.

Shapes: data, masks, predictive summaries (P, C); latents (P, L); draws (K, B, C) per block;
PIT values of a calibration (C, N), NaN-padded.
"""
import numpy as np

from ..model.rotation import rotate_moments

__all__ = ["QUANTILES", "extra_variance", "predictive", "pit_calibration", "CALIBRATION_ROWS"]

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
               block=1024, sigma=None, calibration=None, truth=None, pit_only=False):
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
    calibration : ndarray, shape (C, N), optional
        PIT values per channel (:func:`pit_calibration`, NaN-padded; a row of NaN: that channel
        uncalibrated): every summary is read from the recalibrated predictive.
    truth : ndarray, shape (P, C), optional
        Standardised values whose PIT under the (uncalibrated) predictive is wanted (NaN: none).
    pit_only : bool
        With ``truth``: compute the PIT values (and the conditioned latents) only, none of the
        predictive's summaries in physical units (what :func:`pit_calibration` needs).

    Returns
    -------
    dict
        ``mean``, ``std`` (P, C) in physical units; one (P, C) array per name of
        :data:`QUANTILES`; ``standardised_mean`` (P, C): the predictive mean of the standardised
        value; ``latent_mean``, ``latent_std`` (P, L): the conditioned posterior (of the latents
        of the run's maps, ``z @ trained.rotation``);
        ``converged`` (P,) bool; ``pit`` (P, C), NaN where ``truth`` is (only with ``truth``).
        With ``pit_only`` only ``latent_mean``, ``latent_std``, ``converged`` and ``pit``.
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
    pit_only = pit_only and truth is not None
    out = {} if pit_only else {k: np.empty((P, C)) for k in ["mean", "std", "standardised_mean", *QUANTILES]}
    out.update(latent_mean=np.empty((P, trained.latent_dim)), latent_std=np.empty((P, trained.latent_dim)),
               converged=np.empty(P, bool))
    if truth is not None:
        out["pit"] = np.full((P, C), np.nan)
    levels = None if calibration is None else _calibrated_levels(calibration, n_draws)
    for at in range(0, P, CONDITION_ROWS):
        c = slice(at, min(at + CONDITION_ROWS, P))
        cond = trained.condition(y[c], mask[c], standardised=True, extra_noise=np.sqrt(xvar[c]), sigma=sigma)
        out["latent_mean"][c], out["latent_std"][c] = rotate_moments(trained.rotation, cond["mean"], cond["cov"])[:2]
        out["converged"][c] = cond["converged"]
        _predict_rows(trained, cond, at, c.stop, block, n_draws, rng, sigma, en, gs, out, levels, truth, pit_only)
    return out


def _calibrated_levels(calibration, n_draws):
    """Per channel, the levels (percent, shape (C, n_draws)) at which the raw predictive's
    percentiles are draws of the calibrated one: the quantiles of the channel's PIT values at
    ``(k + 1/2) / n_draws``; a channel without PIT values keeps these nominal levels."""
    nominal = (np.arange(n_draws) + 0.5) / n_draws
    rows = []
    for pit in np.asarray(calibration, float):
        pit = pit[np.isfinite(pit)]
        rows.append(np.quantile(pit, nominal) if len(pit) else nominal)
    return 100 * np.array(rows)


def _recalibrate(draws, levels):
    """Draws (K, B, C) replaced by the raw predictive's percentiles at ``levels`` (C, K): draws of
    the recalibrated predictive, channel by channel."""
    out = np.empty_like(draws)
    for c in range(draws.shape[2]):
        out[:, :, c] = np.percentile(draws[:, :, c], levels[c], axis=0)
    return out


def _predict_rows(trained, cond, at, stop, block, n_draws, rng, sigma, en, gs, out, levels=None, truth=None,
                  pit_only=False):
    """:func:`predictive`'s Monte Carlo for the rows ``at .. stop - 1`` (conditioned in ``cond``,
    whose row 0 is row ``at``), ``block`` rows at a time, into ``out`` (``pit_only``: the PIT
    values only)."""
    C = trained.n_features
    for a in range(at, stop, block):
        s = slice(a, min(a + block, stop))
        m, cov = cond["mean"][s.start - at:s.stop - at], cond["cov"][s.start - at:s.stop - at]
        B, L = m.shape
        chol = np.linalg.cholesky(cov)
        z = m + np.einsum("bij,kbj->kbi", chol, rng.standard_normal((n_draws, B, L)))
        f = trained.decode(z.reshape(-1, L), physical=False).reshape(n_draws, B, C)
        f += sigma * rng.standard_normal(f.shape)
        if truth is not None:  # randomised PIT: ties (none in practice) split at random
            t = truth[s]
            pit = ((f < t).sum(0) + rng.random((B, C))) / (n_draws + 1)
            out["pit"][s] = np.where(np.isfinite(t), pit, np.nan)
            if pit_only:
                continue
        x = trained.physical(f.reshape(-1, C)).reshape(n_draws, B, C)
        x = x * (1.0 + gs * rng.standard_normal((n_draws, 1, C))) + en * rng.standard_normal(x.shape)
        if levels is not None:  # draws of the recalibrated predictive
            f, x = _recalibrate(f, levels), _recalibrate(x, levels)
        out["standardised_mean"][s] = f.mean(0)
        out["mean"][s], out["std"][s] = x.mean(0), x.std(0)
        for name, q in zip(QUANTILES, np.percentile(x, list(QUANTILES.values()), axis=0)):
            out[name][s] = q


#: Entries per channel hidden and predicted by :func:`pit_calibration` (at most). 4096: with
#: 1024 the calibrated 68 % coverage of a channel varied by ~1.5 points from the draw of the
#: entries alone, and one held-out channel of the demo sky missed 68.3 +- 3 (benchmarks/README.md,
#: "Reconstruction").
CALIBRATION_ROWS = 4096


def pit_calibration(trained, physical, sigma=None, n_rows=CALIBRATION_ROWS, n_draws=200, rng=None, patterns=None):
    """PIT values of entries of ``physical`` hidden and predicted from the rest, channel by channel.

    Each channel ``c`` is hidden in ``n_rows`` rows where it is observed; the other channels of
    such a row are hidden as in a row of ``patterns`` (the observed entries of the rows to be
    predicted) that lacks ``c``, drawn at random, so that the PIT values are measured under the
    same observation patterns as the predictions they calibrate. A channel that no pattern lacks
    is not predicted and gets no PIT values.

    Parameters
    ----------
    trained : TrainedModel
    physical : ndarray, shape (P, C)
        Rows in physical units (NaN where missing), e.g. the run's own data.
    sigma : ndarray, shape (C,), optional
        The noise of conditioning and prediction, as for :func:`predictive`.
    n_rows : int
        Rows per channel (at random among those where it is observed).
    n_draws : int
    rng : numpy.random.Generator, optional
    patterns : ndarray of bool, shape (Q, C), optional
        True where an entry of a row to be predicted is observed. Default: every channel in
        turn hidden alone (all others observed as in ``physical``).

    Returns
    -------
    ndarray, shape (C, n_rows)
        PIT values per channel (uniform on [0, 1] for a calibrated predictive); NaN-padded
        where a channel has fewer rows or none.
    """
    rng = np.random.default_rng() if rng is None else rng
    physical = np.asarray(physical, float)
    P, C = physical.shape
    observed = np.isfinite(physical)
    patterns = ~np.eye(C, dtype=bool) if patterns is None else np.asarray(patterns, bool)
    picks, masks = [], []
    for c in range(C):
        lacking = np.flatnonzero(~patterns[:, c])  # the rows of patterns that lack c
        usable = np.flatnonzero(observed[:, c])
        n = min(n_rows, len(usable)) if len(lacking) else 0
        rows = np.sort(rng.choice(usable, n, replace=False))
        picks.append(rows)
        masks.append(observed[rows] & patterns[lacking[rng.integers(len(lacking), size=n)]] if n
                     else np.zeros((0, C), bool))
    rows = np.concatenate(picks)
    channel = np.repeat(np.arange(C), [len(p) for p in picks])
    out = np.full((C, n_rows), np.nan)
    if not len(rows):
        return out
    data = physical[rows]
    truth = np.full(data.shape, np.nan)
    at = np.arange(len(rows))
    truth[at, channel] = trained.standardise(data)[at, channel]
    pit = predictive(trained, data, np.concatenate(masks), n_draws=n_draws, rng=rng, sigma=sigma, truth=truth,
                     pit_only=True)["pit"]
    for c, p in enumerate(picks):
        out[c, :len(p)] = pit[channel == c, c]
    return out
