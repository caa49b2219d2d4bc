"""The products of a fit on a sky: feature maps, reconstruction, residuals, tables, figures.

Output contract (RUN/):
latent_mean.fits, latent_std.fits (and latent_cov.fits for the Fisher covariance),
reconstruction.fits, residual.fits, noise.csv, significance.csv, history.csv, plots/.
"""
import os

import healpy as hp
import numpy as np

from .. import __version__
from ..fileio import write_healpix_fits, write_text
from .plots import mollview_grid, plot_history, plot_residual_summary
from .tables import format_table

__all__ = ["feature_significance", "write_run_products", "feature_names"]


def feature_names(n):
    """Column names of the latent maps: feature_01, feature_02, ..."""
    return [f"feature_{i + 1:02d}" for i in range(n)]


def feature_significance(model, params, data, mask, mean, block=16384):
    """Loss of log-likelihood when one feature is replaced by its prior mean (0).

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
    data, mask : ndarray, shape (P, C)
        Standardised data and observed mask.
    mean : ndarray, shape (P, L)
        Posterior means.
    block : int

    Returns
    -------
    ndarray, shape (L,)
        Sum over rows of ``nll(mean with z_k = 0) - nll(mean)`` in nats.
    """
    L = mean.shape[1]
    out = np.zeros(L)
    for a in range(0, len(mean), block):
        d, m, z = data[a:a + block], mask[a:a + block], mean[a:a + block]
        base = model.nll_rows(params, d, m, z)
        for k in range(L):
            zk = z.copy()
            zk[:, k] = 0.0
            out[k] += (model.nll_rows(params, d, m, zk) - base).sum()
    return out


def _header(dataset, cfg, extra=()):
    cards = [("ORIGIN", f"galdecomp {__version__}", "software"),
             ("NSIDE", dataset.nside), ("LATDIM", cfg["latent_dim"], "latent features"),
             ("COVTYPE", cfg["covariance"], "posterior covariance"),
             ("BETA", cfg["beta"], "KL weight"), ("SEED", cfg["seed"], "random seed")]
    return cards + list(extra)


def write_run_products(run_dir, dataset, preprocessor, model, params, data, mask, history, cfg,
                       catalog_path, progress=print):
    """Compute and write every product of a trained model.

    Parameters
    ----------
    run_dir : str
    dataset : SkyDataSet
        The data the model was fit to (channels x pixels, physical units).
    preprocessor : Preprocessor
    model : Autoencoder
    params : ndarray
        Trained parameters.
    data, mask : ndarray, shape (P, C)
        Standardised data and observed mask (rows = pixels in the data set's ordering).
    history : list of dict
    cfg : dict
        Resolved configuration.
    catalog_path : str
    progress : callable

    Returns
    -------
    dict
        ``order`` (latent index of feature_01, feature_02, ...), ``significance`` (nats, in that
        order), ``sigma`` (noise per channel, standardised), ``paths`` (name -> file written).
    """
    nest, coord = dataset.nest, dataset.coord
    L = model.latent_dim
    prov = [("CATALOG", os.path.basename(catalog_path)[:60], "input catalog")]
    hdr = _header(dataset, cfg, prov)
    progress("posterior means and covariances of all pixels")
    mean, cov = model.posterior_moments(params, data, mask)
    progress("feature significance")
    sig_nats = feature_significance(model, params, data, mask, mean)
    order = np.argsort(-sig_nats, kind="stable")
    names = feature_names(L)
    mean_o, cov_o = mean[:, order], cov[:, order][:, :, order]
    std_o = np.sqrt(np.einsum("pii->pi", cov_o))
    paths = {}

    def fits(name, maps, cols, units, extra=()):
        paths[name] = os.path.join(run_dir, name)
        write_healpix_fits(paths[name], maps, cols, units, nest=nest, coord=coord, header=hdr + list(extra))

    fits("latent_mean.fits", mean_o.T, names, "1", [("CONTENT", "posterior mean of latent features")])
    fits("latent_std.fits", std_o.T, names, "1",
         [("CONTENT", "posterior std of latent features (marginal)")])
    if cfg["covariance"] == "fisher":
        iu = np.triu_indices(L)
        fits("latent_cov.fits", cov_o[:, iu[0], iu[1]].T,
             [f"cov_{i + 1:02d}_{j + 1:02d}" for i, j in zip(*iu)], "1",
             [("CONTENT", "posterior covariance M^-1, upper triangle")])
    sigma = model.sigma(params)
    pred = model.decode(params, mean)
    recon = preprocessor.inverse(pred.T)
    fits("reconstruction.fits", recon, dataset.names, dataset.units,
         [("CONTENT", "decoded posterior mean, physical units")])
    resid = np.where(mask, (data - pred) / sigma, hp.UNSEEN).T
    fits("residual.fits", resid, dataset.names, "1",
         [("CONTENT", "(d - f(mean)) / sigma, standardised units")])
    # noise in physical units: sigma / median |dy/dx| over observed pixels
    rows = []
    for c, (n, t, u) in enumerate(zip(dataset.names, preprocessor.transforms, dataset.units)):
        v = dataset.values[c][dataset.observed[c]]
        rows.append(dict(channel=n, sigma_standardised=float(sigma[c]),
                         sigma_physical=float(sigma[c] / np.median(np.abs(t.derivative(v)))),
                         unit=u, floor_standardised=float(model.floor[c])))
    paths["noise.csv"] = os.path.join(run_dir, "noise.csv")
    write_text(paths["noise.csv"], format_table(rows, list(rows[0]), "csv"))
    srows = [dict(feature=names[r], rank=r + 1, latent_index=int(order[r]),
                  delta_loglike_nats=float(sig_nats[order[r]]),
                  delta_loglike_per_pixel=float(sig_nats[order[r]] / len(data))) for r in range(L)]
    paths["significance.csv"] = os.path.join(run_dir, "significance.csv")
    write_text(paths["significance.csv"], format_table(srows, list(srows[0]), "csv"))
    hcols = ["epoch", "step", "elbo", "reconstruction", "kl", "validation_elbo", "lr", "seconds"]
    paths["history.csv"] = os.path.join(run_dir, "history.csv")
    write_text(paths["history.csv"], format_table(history, hcols, "csv"))

    progress("plots")
    pdir = os.path.join(run_dir, "plots")
    os.makedirs(pdir, exist_ok=True)
    sig_txt = [f"{n} ({s:.3g} nats/pix)" for n, s in zip(names, sig_nats[order] / len(data))]
    mollview_grid(mean_o.T, sig_txt, os.path.join(pdir, "latent_mean.png"), nest=nest,
                  suptitle="posterior mean of the latent features, by significance")
    mollview_grid(std_o.T, names, os.path.join(pdir, "latent_std.png"), nest=nest, cmap="magma",
                  suptitle="posterior standard deviation of the latent features")
    plot_history(history, os.path.join(pdir, "training.png"))
    plot_residual_summary(dataset.names, np.where(resid == hp.UNSEEN, np.nan, resid), sigma,
                          os.path.join(pdir, "residuals.png"))
    paths["plots"] = pdir
    return dict(order=order, significance=sig_nats[order], sigma=sigma, paths=paths)
