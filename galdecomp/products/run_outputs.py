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
        Sum over the given rows of ``nll(mean with z_k = 0) - nll(mean)`` in nats.
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


def write_run_products(run_dir, dataset, preprocessor, model, params, data, history, cfg,
                       catalog_path, comm=None, progress=print):
    """Compute and write every product of a trained model.

    Pixel-sharded: each process computes its own rows, the maps are gathered and written by
    rank 0 only.

    Parameters
    ----------
    run_dir : str
    dataset : SkyDataSet
        The data the model was fit to (this process's pixels; names, units, ordering).
    preprocessor : Preprocessor
    model : Autoencoder
    params : ndarray
        Trained parameters.
    data : ndarray, shape (P_local, C)
        Standardised data (rows = this process's pixels), NaN where missing.
    history : list of dict
    cfg : dict
        Resolved configuration.
    catalog_path : str
    comm : SerialComm or MPIComm, optional
    progress : callable

    Returns
    -------
    dict or None
        On rank 0: ``order`` (latent index of feature_01, feature_02, ...), ``significance``
        (nats, in that order), ``sigma`` (noise per channel, standardised), ``paths`` (name ->
        file written). None on other ranks.
    """
    from ..parallel import SerialComm

    comm = comm or SerialComm()
    nest, coord = dataset.nest, dataset.coord
    L = model.latent_dim
    mask = np.isfinite(data)
    data = np.where(mask, data, 0.0)
    progress("posterior means and covariances of all pixels")
    mean, cov = model.posterior_moments(params, data, mask)
    progress("feature significance")
    sig_nats = comm.allreduce_sum(feature_significance(model, params, data, mask, mean))
    order = np.argsort(-sig_nats, kind="stable")
    mean_o, cov_o = mean[:, order], cov[:, order][:, :, order]
    std_o = np.sqrt(np.einsum("pii->pi", cov_o))
    iu = np.triu_indices(L)
    sigma = model.sigma(params)
    pred = model.decode(params, mean)
    local = dict(mean=mean_o, std=std_o, recon=preprocessor.inverse(pred.T).T,
                 resid=np.where(mask, (data - pred) / sigma, hp.UNSEEN))
    if cfg["covariance"] == "fisher":
        local["cov"] = cov_o[:, iu[0], iu[1]]
    full = {k: comm.gather_rows(v) for k, v in local.items()}
    if comm.rank != 0:
        return None

    names = feature_names(L)
    hdr = _header(dataset, cfg, [("CATALOG", os.path.basename(catalog_path)[:60], "input catalog")])
    paths = {}

    def fits(name, maps, cols, units, content):
        paths[name] = os.path.join(run_dir, name)
        write_healpix_fits(paths[name], maps, cols, units, nest=nest, coord=coord,
                           header=hdr + [("CONTENT", content)])

    fits("latent_mean.fits", full["mean"].T, names, "1", "posterior mean of latent features")
    fits("latent_std.fits", full["std"].T, names, "1", "posterior std of latent features (marginal)")
    if "cov" in full:
        fits("latent_cov.fits", full["cov"].T, [f"cov_{i + 1:02d}_{j + 1:02d}" for i, j in zip(*iu)], "1",
             "posterior covariance M^-1, upper triangle")
    fits("reconstruction.fits", full["recon"].T, dataset.names, dataset.units,
         "decoded posterior mean, physical units")
    fits("residual.fits", full["resid"].T, dataset.names, "1", "(d - f(mean)) / sigma, standardised units")
    # noise in physical units: sigma / median |dy/dx| over observed pixels
    rows = [dict(channel=n, sigma_standardised=float(sigma[c]), sigma_physical=float(sigma[c] / t.slope),
                 unit=u, floor_standardised=float(model.floor[c]))
            for c, (n, t, u) in enumerate(zip(dataset.names, preprocessor.transforms, dataset.units))]
    n_pix = len(full["mean"])
    srows = [dict(feature=names[r], rank=r + 1, latent_index=int(order[r]),
                  delta_loglike_nats=float(sig_nats[order[r]]),
                  delta_loglike_per_pixel=float(sig_nats[order[r]] / n_pix)) for r in range(L)]
    hcols = ["epoch", "step", "elbo", "reconstruction", "kl", "validation_elbo", "lr", "seconds"]
    for name, table, cols in [("noise.csv", rows, list(rows[0])), ("significance.csv", srows, list(srows[0])),
                              ("history.csv", history, hcols)]:
        paths[name] = os.path.join(run_dir, name)
        write_text(paths[name], format_table(table, cols, "csv"))

    progress("plots")
    pdir = os.path.join(run_dir, "plots")
    os.makedirs(pdir, exist_ok=True)
    sig_txt = [f"{n} ({s:.3g} nats/pix)" for n, s in zip(names, sig_nats[order] / n_pix)]
    mollview_grid(full["mean"].T, sig_txt, os.path.join(pdir, "latent_mean.png"), nest=nest,
                  suptitle="posterior mean of the latent features, by significance")
    mollview_grid(full["std"].T, names, os.path.join(pdir, "latent_std.png"), nest=nest, cmap="magma",
                  suptitle="posterior standard deviation of the latent features")
    plot_history(history, os.path.join(pdir, "training.png"))
    resid = full["resid"].T
    plot_residual_summary(dataset.names, np.where(resid == hp.UNSEEN, np.nan, resid), sigma,
                          os.path.join(pdir, "residuals.png"))
    paths["plots"] = pdir
    return dict(order=order, significance=sig_nats[order], sigma=sigma, paths=paths)
