"""`galdecomp reconstruct`: missing or corrupted channels of a sky from a trained run.

Output contract (DIR/): reconstruction_{mean,std,p50,p16,p84,p02,p98}.fits (one column per run
channel, physical units, every pixel), latent_mean.fits / latent_std.fits (the conditioned
posterior, columns feature_01.. as the run's), holdout.csv (with --holdout or --hide-fraction),
calibration.csv (with ``--noise calibrated``: per channel, the nominal intervals' coverage of
entries of the run's own data hidden and predicted, and the levels read instead), plots/holdout.png.
"""
import os

import numpy as np

from ..catalog import read_catalog, select_maps
from ..errors import InputError
from ..fileio import atomic_output_dir, write_healpix_fits, write_text
from ..inference.predictive import CALIBRATION_ROWS, QUANTILES, pit_calibration, predictive
from ..seeds import stream
from ..sources import channel_rows
from .tables import format_table

__all__ = ["reconstruct_sky", "regression_baselines", "interval_coverage", "calibration_table"]

_CONTENT = {"mean": "predictive mean", "std": "predictive standard deviation",
            **{k: f"predictive {q:g} percentile" for k, q in QUANTILES.items()}}


def interval_coverage(truth, lo, hi):
    """Fraction of finite ``truth`` values inside ``[lo, hi]`` (arrays of one shape)."""
    ok = np.isfinite(truth)
    return float(np.mean((truth[ok] >= lo[ok]) & (truth[ok] <= hi[ok]))) if ok.any() else float("nan")


def regression_baselines(features, target, folds=5, seed=0):
    """Out-of-fold predictions of ``target`` from ``features`` by two regressions.

    Folds are contiguous blocks of rows (NESTED pixel order: sky patches), so that neighbouring
    pixels do not leak between training and test.

    Parameters
    ----------
    features : ndarray, shape (P, F)
        Standardised predictors, NaN where missing.
    target : ndarray, shape (P,)
        Standardised values (finite rows only are used).
    folds : int
    seed : int

    Returns
    -------
    linear : ndarray, shape (P,)
        Ordinary least squares on the predictors (missing -> 0) and their missingness indicators.
    boosting : ndarray, shape (P,)
        scikit-learn's HistGradientBoostingRegressor (handles missing predictors itself).
        Both NaN where ``target`` is not finite.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold, cross_val_predict

    ok = np.isfinite(target)
    X, t = features[ok], target[ok]
    X_lin = np.concatenate([np.nan_to_num(X), np.isnan(X)], axis=1)
    cv = KFold(folds, shuffle=False)
    lin, gb = np.full(len(target), np.nan), np.full(len(target), np.nan)
    lin[ok] = cross_val_predict(LinearRegression(), X_lin, t, cv=cv)
    gb[ok] = cross_val_predict(HistGradientBoostingRegressor(max_iter=200, random_state=seed), X, t, cv=cv)
    return lin, gb


def _run_channels(trained, catalog_path):
    """The catalog's entries for the run's channels (None for a channel the catalog lacks)."""
    cat = read_catalog(catalog_path)
    entries = select_maps(cat, trained.names, allow_missing=True)
    if not any(entries):
        raise InputError(f"{catalog_path}: none of the run's channels ({', '.join(trained.names[:4])}, ...)")
    return cat, entries


def reconstruct_sky(trained, catalog_path, out, holdout=(), hide_fraction=0.0, n_draws=200, seed=0,
                    overwrite=False, progress=None, noise="calibrated", calibration_rows=CALIBRATION_ROWS,
                    fwhm_arcmin=None):
    """Reconstruct every channel of a catalog's sky with the posterior given its observed entries.

    Parameters
    ----------
    trained : TrainedModel
        A run trained on a sky.
    catalog_path : str
        Maps of (some of) the run's channels, matched by name; channels it lacks are
        reconstructed. Entries may give ``extra_noise`` and ``gain_sigma``.
    out : str
        Output folder (created; replaced with ``overwrite``).
    holdout : sequence of str
        Channels hidden entirely and scored against their maps.
    hide_fraction : float
        Also hide this fraction of each pixel's other observed channels (at random) and score
        the hidden entries.
    n_draws : int
        Monte Carlo draws of the predictive distribution per pixel.
    seed : int
    overwrite : bool
    progress : callable, optional
    noise : {"calibrated", "recalibrated", "model"}
        The per-channel noise of conditioning and prediction: re-estimated from the residuals
        at the MAP on the run's own data (:meth:`TrainedModel.recalibrated_sigma`), or the
        trained model's; ``calibrated``: re-estimated, and each channel's predictive levels
        recalibrated on entries of the run's own data hidden and predicted
        (:func:`galdecomp.inference.predictive.pit_calibration`).
    calibration_rows : int
        Entries per channel hidden for the calibration.
    fwhm_arcmin : float, optional
        Target resolution of the catalog's maps (default: the run's, ``data.fwhm_arcmin``; the
        run's own data used for the noise are always read at the run's).

    Returns
    -------
    dict
        ``out``; ``sigma`` (the noise used, standardised); ``holdout`` (list of dict rows of holdout.csv, empty without scoring);
        ``converged`` (fraction of pixels whose MAP converged); ``calibration`` (list of dict
        rows of calibration.csv, empty unless ``calibrated``).
    """
    say = progress or (lambda msg: None)
    if trained.data.get("kind") != "sky":
        raise InputError(f"{catalog_path}: the run was not trained on a sky ({trained.data.get('kind')})")
    cat, entries = _run_channels(trained, catalog_path)
    unknown = [h for h in holdout if h not in trained.names]
    if unknown:
        raise InputError(f"--holdout: {', '.join(unknown)}: not a channel of the run")
    missing = [h for h in holdout if entries[trained.names.index(h)] is None]
    if missing:
        raise InputError(f"--holdout: {', '.join(missing)}: not in {catalog_path} (nothing to score)")
    if not 0.0 <= hide_fraction < 1.0:
        raise InputError(f"--hide-fraction: must be in [0, 1), got {hide_fraction}")
    physical, ds, _ = channel_rows(cat, trained.names, int(trained.data["nside"]),
                                   trained.target_fwhm(fwhm_arcmin, say), allow_missing=True)
    P, C = physical.shape
    present = [e for e in entries if e is not None]
    idx = [trained.names.index(e.name) for e in present]
    extra_noise, gain_sigma = np.zeros(C), np.zeros(C)
    extra_noise[idx] = [e.extra_noise for e in present]
    gain_sigma[idx] = [e.gain_sigma for e in present]
    rng = np.random.default_rng(seed)
    observed = np.isfinite(physical)
    mask = observed.copy()
    hold = np.isin(np.arange(C), [trained.names.index(h) for h in holdout])
    mask[:, hold] = False
    hidden = np.zeros_like(mask)
    if hide_fraction > 0:
        hidden = mask & (rng.random(mask.shape) < hide_fraction)
        mask &= ~hidden
    lacking = [n for n, e in zip(trained.names, entries) if e is None]
    say(f"reconstructing {P} pixels x {C} channels from {int(mask.sum())} observed entries"
        + (f"; not in the catalog: {', '.join(lacking)}" if lacking else "")
        + (f"; held out: {', '.join(holdout)}" if len(holdout) else ""))
    sigma, pit = _noise(trained, noise, calibration_rows, n_draws, seed, say, mask)
    cal_rows = [] if pit is None else calibration_table(trained.names, pit)
    pred = predictive(trained, physical, mask, extra_noise, gain_sigma, n_draws, rng, sigma=sigma, calibration=pit)
    rows = _score(trained, physical, mask, hold, hidden, pred, seed, hide_fraction, say)
    _write(trained, ds, out, pred, rows, hold, physical, overwrite, cal_rows)
    return dict(out=os.path.abspath(out), sigma=sigma, holdout=rows, converged=float(pred["converged"].mean()),
                calibration=cal_rows)


def _noise(trained, noise, calibration_rows, n_draws, seed, say, mask):
    """The noise (C,) of ``noise`` mode and the PIT values of the calibration (None unless
    ``calibrated``), both from the run's own data; the calibration hides entries as ``mask``
    (P, C), the observed entries of the rows to be predicted, does."""
    if noise not in ("calibrated", "recalibrated", "model"):
        raise InputError(f"--noise: must be calibrated, recalibrated or model, got {noise!r}")
    if noise == "model":
        return trained.sigma, None
    say("noise re-estimated from the residuals at the MAP on the run's own data")
    own = trained.load_rows()
    sigma = trained.recalibrated_sigma(own)
    if noise == "recalibrated":
        return sigma, None
    say(f"calibrating each channel's predictive on {calibration_rows} entries of the run's own data "
        f"per channel, hidden as in the rows to be predicted")
    return sigma, pit_calibration(trained, own, sigma, calibration_rows, n_draws,
                                  stream(seed, "reconstruct", "calibration"), patterns=mask)


def calibration_table(names, pit):
    """Rows of calibration.csv: per channel, the entries hidden, the nominal 68 % and 95 %
    intervals' coverage of them before the calibration and the levels (percent) read instead.

    Parameters
    ----------
    names : list of str
    pit : ndarray, shape (C, N)
        PIT values (:func:`galdecomp.inference.predictive.pit_calibration`), NaN-padded.

    Returns
    -------
    list of dict
    """
    rows = []
    q = QUANTILES
    for name, p in zip(names, pit):
        p = p[np.isfinite(p)]
        if not len(p):
            rows.append(dict(channel=name, entries=0))
            continue
        inside = lambda lo, hi: float(np.mean((p >= lo / 100) & (p <= hi / 100)))
        lv = np.percentile(p, list(q.values()))
        rows.append(dict(channel=name, entries=len(p), raw_coverage_68=inside(q["p16"], q["p84"]),
                         raw_coverage_95=inside(q["p02"], q["p98"]),
                         **{f"level_{k}": float(100 * v) for k, v in zip(q, lv)}))
    return rows


def _score(trained, physical, mask, hold, hidden, pred, seed, hide_fraction, say):
    """Rows of holdout.csv: RMSE (standardised) of the model and two regressions, coverage."""
    rows = []
    y = trained.standardise(physical)
    median = trained.standardise(pred["p50"])
    feats = np.where(mask, y, np.nan)
    for c in np.flatnonzero(hold):
        say(f"scoring {trained.names[c]} against a linear regression and gradient boosting")
        lin, gb = regression_baselines(feats[:, ~hold], y[:, c], seed=seed)
        t = y[:, c]
        ok = np.isfinite(t)
        rmse = lambda p: float(np.sqrt(np.mean((p[ok] - t[ok]) ** 2)))
        rows.append(dict(channel=trained.names[c], pixels=int(ok.sum()),
                         rmse_standardised=rmse(pred["standardised_mean"][:, c]),
                         rmse_median=rmse(median[:, c]), rmse_linear=rmse(lin), rmse_boosting=rmse(gb),
                         coverage_68=interval_coverage(physical[:, c], pred["p16"][:, c], pred["p84"][:, c]),
                         coverage_95=interval_coverage(physical[:, c], pred["p02"][:, c], pred["p98"][:, c])))
    if hidden.any():
        t = np.where(hidden, y, np.nan)
        ok = np.isfinite(t)
        rows.append(dict(channel=f"hidden_{hide_fraction:g}_of_each_pixel", pixels=int(ok.any(1).sum()),
                         rmse_standardised=float(np.sqrt(np.mean((pred["standardised_mean"][ok] - t[ok]) ** 2))),
                         rmse_median=float(np.sqrt(np.mean((median[ok] - t[ok]) ** 2))),
                         rmse_linear=float("nan"), rmse_boosting=float("nan"),
                         coverage_68=interval_coverage(np.where(hidden, physical, np.nan), pred["p16"], pred["p84"]),
                         coverage_95=interval_coverage(np.where(hidden, physical, np.nan), pred["p02"], pred["p98"])))
    return rows


def _write(trained, ds, out, pred, rows, hold, physical, overwrite, cal_rows=()):
    from .run_figures import mollview_grid
    from .run_outputs import feature_names

    order = trained.feature_order
    hdr = [("ORIGIN", "galdecomp reconstruct"), ("NSIDE", ds.nside)]
    coord = ds.coord
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for key in ["mean", "std", *QUANTILES]:
            write_healpix_fits(os.path.join(tmp, f"reconstruction_{key}.fits"), pred[key].T, trained.names,
                               trained.units, nest=True, coord=coord, header=hdr + [("CONTENT", _CONTENT[key])])
        names = feature_names(trained.latent_dim)
        for key, what in (("latent_mean", "MAP"), ("latent_std", "Laplace std")):
            write_healpix_fits(os.path.join(tmp, f"{key}.fits"), pred[key][:, order].T, names, "1", nest=True,
                               coord=coord,
                               header=hdr + [("CONTENT", f"latent posterior given the observed channels ({what})")])
        if rows:
            write_text(os.path.join(tmp, "holdout.csv"), format_table(rows, list(rows[0]), "csv"))
        if cal_rows:
            cols = max((list(r) for r in cal_rows), key=len)
            write_text(os.path.join(tmp, "calibration.csv"), format_table(cal_rows, cols, "csv"))
        if hold.any():
            os.makedirs(os.path.join(tmp, "plots"))
            maps, titles = [], []
            for c in np.flatnonzero(hold)[:4]:
                z = (physical[:, c] - pred["mean"][:, c]) / pred["std"][:, c]
                maps += [np.log10(np.abs(physical[:, c]) + 1e-30), np.log10(np.abs(pred["mean"][:, c]) + 1e-30), z]
                titles += [f"{trained.names[c]}: log10 |map|", "log10 |reconstruction|", "(map - mean) / std"]
            mollview_grid(np.array(maps), titles, os.path.join(tmp, "plots", "holdout.png"), nest=True, ncols=3,
                          suptitle="held-out channels: map, reconstruction, normalised residual")
