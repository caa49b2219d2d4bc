"""Anomaly maps of a trained run: per-pixel scores of how badly the model explains each pixel.

Every score is a HEALPix map, higher = more anomalous (standardised units, the run's noise):

- ``chi2_per_channel``: ``sum_c m_c (d_c - f(mean)_c)^2 / sigma_c^2 / n_observed``, the
  reconstruction misfit per observed channel (pixels with gaps stay comparable);
- ``max_abs_residual``: ``max_c |d_c - f(mean)_c| / sigma_c`` over the observed channels;
- ``local_residual``: ``max_c |r_c| * 3`` where ``r_c`` is the normalised residual averaged over
  the pixel and its 8 neighbours (a unit-variance score for anomalies larger than one pixel);
- ``contrast_chi2``: chi2 per observed channel of the residuals normalised by their robust
  spread around the pixel: per channel, ``(r_c - median) / (1.4826 MAD)`` over the pixel's
  NESTED block of 64 pixels (the nside/8 parent pixel; MAD at least 0.1), so a pixel is compared
  with its surroundings where the model's misfit varies over the sky (e.g. the Galactic plane);
  blind to anomalies that fill whole blocks;
- ``neg_elbo``: ``-ELBO`` at the posterior mean (``-log p(d | f(mean)) + beta KL[q || p(z)]``);
- ``neg_log_prior``: ``-log N(mean; 0, 1)`` of the encoder's posterior mean;
- ``neg_log_latent_density``: ``-log p(mean)`` under the run's latent transform
  (``RUN/latent_transform.npz``), only if it exists and :mod:`galdecomp.model.latent_transform`
  is importable.

With ``noise="calibrated"`` (the default of :func:`run_anomaly`) every residual is in units of
its channel's calibrated spread: ``sigma_c`` times the factor that puts 68.27 % of the channel's
normalised residuals on the run's own data within +-1 (:func:`residual_scale`), so a channel
whose trained noise is too wide or too narrow for the residuals of the posterior mean neither
hides nor dominates the residual scores.

The last three are p(x)-type scores (how probable the pixel is under the model); they can rank
out-of-distribution inputs as *more* typical than in-distribution ones (an input the encoder maps
close to the latent origin gets a high prior density), so the residual scores are the default.
"""
import os
import warnings

import healpy as hp
import numpy as np

from ..errors import InputError
from ..fileio import write_healpix_fits, write_text
from .run_figures import mollview_grid
from .tables import format_table

__all__ = ["SCORES", "NOISE_MODES", "load_rows", "residual_scale", "anomaly_scores", "top_pixels",
           "write_anomaly_products"]

#: ``--noise`` of ``galdecomp anomaly``: the residuals' unit per channel
NOISE_MODES = ("calibrated", "model")
#: rows of the run's own data the calibration reads at most
CALIBRATION_ROWS = 50000
#: the probability mass of +-1 standard deviation of a Gaussian
ONE_SIGMA = 0.6826894921370859

#: score name -> description (the FITS columns, in this order, when present)
SCORES = {
    "chi2_per_channel": "reconstruction chi2 per observed channel",
    "max_abs_residual": "largest |d - f(mean)| / sigma over channels",
    "local_residual": "largest 9-pixel mean normalised residual, in its own sigma",
    "contrast_chi2": "chi2 per channel of residuals normalised in their 64-pixel block",
    "neg_elbo": "-ELBO at the posterior mean (nats)",
    "neg_log_prior": "-log N(mean; 0, 1) (nats)",
    "neg_log_latent_density": "-log p(mean) under the run's latent transform (nats)",
}
#: the default primary score of the top list
DEFAULT_SCORE = "chi2_per_channel"
#: channels listed per pixel in the top list
N_TOP_CHANNELS = 3


def load_rows(model, catalog=None, fwhm_arcmin=None):
    """The rows to score: a catalog's maps in the model's channel order, NESTED, physical units.

    Maps are matched by name and read at the run's nside (:meth:`TrainedModel.load_rows`).

    Parameters
    ----------
    model : TrainedModel
    catalog : str, optional
        Default the catalog the run was trained on.
    fwhm_arcmin : float, optional
        Target resolution of the maps (default: the run's, ``data.fwhm_arcmin``).

    Returns
    -------
    values : ndarray, shape (P, C)
        NaN where missing.
    nside : int
    catalog : str
        The catalog file read.

    Raises
    ------
    InputError
        No catalog recorded with the run, an unreadable catalog, a channel it does not hold, a
        map that cannot be read.
    """
    if catalog is None:
        catalog = model.data.get("path")
        if model.data.get("kind") != "sky" or not catalog:
            raise InputError("the run records no sky catalog: give one with --catalog")
        if not os.path.isfile(catalog):
            raise InputError(f"{catalog}: the run's catalog file no longer exists: give one with --catalog")
    return model.load_rows(catalog, fwhm_arcmin), int(model.data["nside"]), os.path.abspath(catalog)


def _neighbour_mean(r, nside):
    """Mean of each pixel's value and its 8 neighbours' (NESTED), ignoring NaN; shapes (P, C)."""
    P = len(r)
    nb = hp.get_all_neighbours(nside, np.arange(P), nest=True)  # (8, P), -1 where none
    idx = np.vstack([np.arange(P)[None], nb])                    # (9, P)
    vals = np.where(idx[..., None] >= 0, r[np.maximum(idx, 0)], np.nan)  # (9, P, C)
    n = np.isfinite(vals).sum(axis=0)
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, np.nansum(vals, axis=0) / np.maximum(n, 1), np.nan), n


def _block_contrast(r, block=64, floor=0.1):
    """Residuals (P, C, NESTED) normalised by median and MAD within blocks of ``block`` pixels."""
    P, C = r.shape
    b = min(block, P // 12)
    rb = r.reshape(P // b, b, C)
    med = np.nanmedian(rb, axis=1, keepdims=True)
    mad = 1.4826 * np.nanmedian(np.abs(rb - med), axis=1, keepdims=True)
    return ((rb - med) / np.maximum(mad, floor)).reshape(P, C)


def residual_scale(model, values, rows=CALIBRATION_ROWS, seed=0):
    """Per channel, the factor of ``sigma_c`` that makes the residuals of the posterior mean on
    ``values`` cover 68.27 % within +-1: the 68.27 % quantile of ``|d_c - f(mean)_c| / sigma_c``.

    Parameters
    ----------
    model : TrainedModel
    values : ndarray, shape (P, C)
        The run's own data (physical units, NaN where missing).
    rows : int
        At most this many rows, drawn at random (``seed``), are read.
    seed : int

    Returns
    -------
    scale : ndarray, shape (C,)
        1 for a channel without observed entries.
    coverage : ndarray, shape (C,)
        The fraction of those residuals within +-1 in the trained noise's units (before).
    """
    if len(values) > rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(values), rows, replace=False))
        values = values[pick]
    y = model.standardise(values)
    m = np.isfinite(y)
    r = np.abs(np.where(m, y - model.decode(model.encode(y, m, standardised=True)[0], physical=False), np.nan))
    r /= model.sigma
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a channel without entries
        scale = np.nanquantile(r, ONE_SIGMA, axis=0)
        coverage = np.nanmean(np.where(m, r <= 1.0, np.nan), axis=0)
    ok = np.isfinite(scale) & (scale > 0)
    return np.where(ok, scale, 1.0), coverage


def anomaly_scores(model, values, nside, transform=None, block=65536, scale=None):
    """Per-pixel anomaly scores of data under a trained model.

    Parameters
    ----------
    model : TrainedModel
    values : ndarray, shape (P, C)
        Physical units, NESTED rows of a full sky at ``nside``, NaN where missing.
    nside : int
    transform : object, optional
        With ``log_density(z)`` for latents (N, L): adds ``neg_log_latent_density``.
    block : int
        Rows per block.
    scale : ndarray, shape (C,), optional
        Factor of each channel's noise in the residuals (:func:`residual_scale`); default 1.

    Returns
    -------
    scores : dict of ndarray, shape (P,)
        The scores of :data:`SCORES` (NaN for a pixel without any observed channel).
    residual : ndarray, shape (P, C)
        Normalised residuals ``(d - f(mean)) / (sigma * scale)``, NaN where missing.
    n_observed : ndarray of int, shape (P,)
    """
    P = len(values)
    names = ["chi2", "n_observed", "neg_elbo", "neg_log_prior"] + (["lt"] if transform is not None else [])
    out = {k: np.empty(P) for k in names}
    residual = np.empty(values.shape)
    sigma = model.sigma if scale is None else model.sigma * scale
    for a in range(0, P, block):
        s = slice(a, a + block)
        y = model.standardise(values[s])
        m = np.isfinite(y)
        sc = model.score_rows(y, m, standardised=True)
        mean = model.encode(y, m, standardised=True)[0]
        f = model.decode(mean, physical=False)
        residual[s] = np.where(m, (y - f) / sigma, np.nan)
        out["chi2"][s], out["n_observed"][s], out["neg_elbo"][s] = sc["chi2"], sc["n_observed"], -sc["elbo"]
        out["neg_log_prior"][s] = -model.prior.log_density(mean)
        if transform is not None:
            out["lt"][s] = -np.asarray(transform.log_density(mean), float)
    n_obs = out["n_observed"].astype(int)
    seen = n_obs > 0
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks of a missing channel
        absr = np.abs(residual)
        local, n_local = _neighbour_mean(residual, nside)
        local = np.abs(local) * np.sqrt(n_local)
        chi2 = out["chi2"] if scale is None else np.nansum(residual ** 2, axis=1)
        scores = dict(chi2_per_channel=np.where(seen, chi2 / np.maximum(n_obs, 1), np.nan),
                      max_abs_residual=np.where(seen, np.nanmax(np.where(np.isfinite(absr), absr, -np.inf), axis=1),
                                                np.nan),
                      local_residual=np.nanmax(np.where(np.isfinite(local), local, -np.inf), axis=1),
                      contrast_chi2=np.where(seen, np.nansum(_block_contrast(residual) ** 2, axis=1)
                                             / np.maximum(n_obs, 1), np.nan),
                      neg_elbo=np.where(seen, out["neg_elbo"], np.nan),
                      neg_log_prior=np.where(seen, out["neg_log_prior"], np.nan))
        scores["local_residual"][~np.isfinite(scores["local_residual"])] = np.nan
        if transform is not None:
            scores["neg_log_latent_density"] = np.where(seen, out["lt"], np.nan)
    return scores, residual, n_obs


def top_pixels(scores, residual, channel_names, nside, score=DEFAULT_SCORE, n=50, frame="G"):
    """The ``n`` most anomalous pixels by one score, as table rows.

    Parameters
    ----------
    scores : dict of ndarray, shape (P,)
    residual : ndarray, shape (P, C)
        Normalised residuals, NaN where missing.
    channel_names : list of str
    nside : int
        Resolution of the NESTED maps.
    score : str
        Key of ``scores`` to rank by (highest first; NaN last).
    n : int

    Returns
    -------
    list of dict
        ``rank, pixel`` (NESTED index), ``l_deg, b_deg`` (Galactic), every score, then
        ``channel_k, residual_k`` (k = 1..3): the channels with the largest ``|residual|`` and
        their signed normalised residuals.
    """
    s = np.where(np.isfinite(scores[score]), scores[score], -np.inf)
    pix = np.argsort(-s, kind="stable")[:n]
    pix = pix[np.isfinite(s[pix])]
    lon, lat = hp.pix2ang(nside, pix, nest=True, lonlat=True)
    if frame != "G" and len(pix):  # the table's coordinates are Galactic whatever the maps' frame
        lon, lat = hp.Rotator(coord=[frame, "G"])(lon, lat, lonlat=True)
        lon = np.mod(lon, 360.0)
    r = residual[pix]
    order = np.argsort(-np.where(np.isfinite(r), np.abs(r), -np.inf), axis=1, kind="stable")[:, :N_TOP_CHANNELS]
    top_r = np.take_along_axis(r, order, axis=1)
    names = np.asarray(channel_names)
    rows = []
    for i, p in enumerate(pix):  # over the n listed pixels only
        row = dict(rank=i + 1, pixel=int(p), l_deg=round(float(lon[i]), 4), b_deg=round(float(lat[i]), 4))
        row.update({k: float(v[p]) for k, v in scores.items()})
        for k in range(order.shape[1]):
            ok = np.isfinite(top_r[i, k])
            row[f"channel_{k + 1}"] = str(names[order[i, k]]) if ok else ""
            row[f"residual_{k + 1}"] = float(top_r[i, k]) if ok else ""
        rows.append(row)
    return rows


def write_anomaly_products(out, scores, residual, channel_names, nside, score=DEFAULT_SCORE, top=50,
                           header=(), frame="G"):
    """Write ``anomaly.fits``, ``anomaly.png`` and ``anomaly_top.csv`` into the folder ``out``.

    Parameters
    ----------
    out : str
        Existing folder (e.g. the temporary folder of an atomic output).
    scores, residual, channel_names, nside, score, top
        As for :func:`top_pixels`.
    header : sequence of FITS cards
    frame : str
        Coordinate frame of the maps (healpy's letter), written as COORDSYS.

    Returns
    -------
    dict
        Name -> path written, and ``top`` (the rows of the table).
    """
    names = list(scores)
    maps = np.array([np.where(np.isfinite(scores[k]), scores[k], hp.UNSEEN) for k in names])
    paths = {k: os.path.join(out, k) for k in ("anomaly.fits", "anomaly.png", "anomaly_top.csv")}
    write_healpix_fits(paths["anomaly.fits"], maps, names, "1", nest=True, coord=frame,
                       header=list(header) + [("CONTENT", "anomaly scores, higher = more anomalous")])
    logged = ("chi2_per_channel", "contrast_chi2")  # positive, heavy-tailed: shown as log10
    with np.errstate(invalid="ignore", divide="ignore"):
        shown = np.array([np.log10(np.where(scores[k] > 0, scores[k], np.nan)) if k in logged else scores[k]
                          for k in names])
    titles = [f"log10 {k}" if k in logged else k for k in names]
    mollview_grid(shown, titles, paths["anomaly.png"], nest=True, ncols=3, cmap="magma",
                  suptitle="anomaly scores (higher = more anomalous)")
    rows = top_pixels(scores, residual, channel_names, nside, score, top, frame)
    cols = ["rank", "pixel", "l_deg", "b_deg"] + names + [f"{w}_{k + 1}" for k in range(N_TOP_CHANNELS)
                                                          for w in ("channel", "residual")]
    write_text(paths["anomaly_top.csv"], format_table(rows, cols, "csv"))
    return dict(paths=paths, top=rows)


def run_anomaly(run_dir, out, catalog=None, top=50, score=DEFAULT_SCORE, overwrite=False, progress=print,
                fwhm_arcmin=None, noise="calibrated"):
    """Score a catalog with a finished run and write the anomaly products to the folder ``out``.

    Every input is checked before anything is written; ``out`` is built under a temporary name
    and renamed when complete.

    Parameters
    ----------
    run_dir : str
        Run folder of ``galdecomp fit``.
    out : str
        Output folder (must not exist unless ``overwrite``).
    catalog : str, optional
        Catalog to score (default the run's own).
    top : int
        Pixels in ``anomaly_top.csv``.
    score : str
        Primary score of the top list (a key of :data:`SCORES`).
    overwrite : bool
    progress : callable
    fwhm_arcmin : float, optional
        Target resolution of the maps (default: the run's, ``data.fwhm_arcmin``).
    noise : {"calibrated", "model"}
        The residuals' unit: each channel's trained noise calibrated on the run's own data
        (:func:`residual_scale`; ``calibration.csv`` written), or the trained noise as it is.

    Returns
    -------
    dict
        ``out``, ``paths``, ``top`` rows, ``scores``, ``residual``, ``n_observed`` and
        ``scale`` (C,) (ones for ``noise="model"``).

    Raises
    ------
    InputError
        A missing or unfinished run, a bad catalog or a missing channel, an unknown score, an
        output folder that exists.
    """
    from .. import __version__
    from ..catalog import read_catalog
    from ..fileio import atomic_output_dir, check_output_dir
    from ..run import RunFolder

    if score not in SCORES:
        raise InputError(f"--score: unknown score {score!r} (one of {', '.join(SCORES)})")
    if top < 1:
        raise InputError(f"--top: must be a positive integer, got {top}")
    if noise not in NOISE_MODES:
        raise InputError(f"--noise: must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: run folder not found")
    check_output_dir(out, overwrite)
    model = RunFolder(run_dir).trained_model()
    transform = model.transform
    if score == "neg_log_latent_density" and transform is None:
        raise InputError(f"--score neg_log_latent_density: {run_dir} has no usable {RunFolder.FILES['transform']}")
    values, nside, cat_path = load_rows(model, catalog, model.target_fwhm(fwhm_arcmin, progress))
    frame = read_catalog(cat_path).frame
    progress(f"read {cat_path}")
    scale, cal_rows = None, None  # None: the trained noise, the scores' own chi2
    if noise == "calibrated":
        progress("calibrating each channel's residuals on the run's own data")
        scale, before = residual_scale(model, model.load_rows())  # at the run's resolution
        cal_rows = [dict(channel=c, coverage_68_trained_noise=round(float(b), 4), noise_factor=round(float(f), 4))
                    for c, b, f in zip(model.names, before, scale)]
    progress(f"scoring {len(values)} pixels x {values.shape[1]} channels")
    scores, residual, n_obs = anomaly_scores(model, values, nside, transform, scale=scale)
    hdr = [("ORIGIN", f"galdecomp {__version__}", "software"), ("NSIDE", nside),
           ("CATALOG", os.path.basename(cat_path)[:60], "scored catalog"),
           ("RUN", os.path.basename(os.path.abspath(run_dir))[:60], "run folder"),
           ("NOISE", noise, "residual unit: calibrated or trained (model) noise")]
    with atomic_output_dir(out, overwrite) as tmp:
        progress(f"writing {out}")
        res = write_anomaly_products(tmp, scores, residual, model.names, nside, score, top, hdr, frame)
        if cal_rows is not None:
            write_text(os.path.join(tmp, "calibration.csv"), format_table(cal_rows, list(cal_rows[0]), "csv"))
            res["paths"]["calibration.csv"] = os.path.join(tmp, "calibration.csv")
    paths = {k: os.path.join(os.path.abspath(out), os.path.basename(v)) for k, v in res["paths"].items()}
    return dict(out=os.path.abspath(out), paths=paths, top=res["top"], scores=scores, residual=residual,
                n_observed=n_obs, scale=np.ones(len(model.names)) if scale is None else scale)
