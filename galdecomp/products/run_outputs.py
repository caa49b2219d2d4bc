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


def write_run_products(run_dir, dataset, preprocessor, model, params, data, mean, cov, history, cfg,
                       catalog_path, samples=None, comm=None, progress=print):
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
    mean, cov : ndarray, shape (P_local, L) and (P_local, L, L)
        The encoder's posterior means and covariances.
    history : list of dict
    cfg : dict
        Resolved configuration.
    catalog_path : str
    samples : ndarray, shape (S, P_local, L), optional
        MGVI/geoVI posterior samples: then the latent maps are their mean and std, the encoder's
        are written beside them (encoder_latent_*.fits) with the amortisation gap.
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
    enc_std = np.sqrt(np.einsum("pii->pi", cov))
    if samples is not None:
        from ..inference.mgvi import amortisation_gap

        gap = amortisation_gap(mean, cov, samples)
        post_mean, post_std = gap["mean"], gap["std"]
    else:
        post_mean, post_std = mean, enc_std
    progress("feature significance")
    sig_nats = comm.allreduce_sum(feature_significance(model, params, data, mask, post_mean))
    order = np.argsort(-sig_nats, kind="stable")
    iu = np.triu_indices(L)
    sigma = model.sigma(params)
    pred = model.decode(params, post_mean)
    local = dict(mean=post_mean[:, order], std=post_std[:, order], recon=preprocessor.inverse(pred.T).T,
                 resid=np.where(mask, (data - pred) / sigma, hp.UNSEEN))
    if cfg["covariance"] == "fisher":
        local["cov"] = cov[:, order][:, :, order][:, iu[0], iu[1]]
    if samples is not None:
        local.update(enc_mean=mean[:, order], enc_std=enc_std[:, order],
                     samples=np.concatenate(samples[:, :, order], axis=1),
                     gap=np.column_stack([gap["mahalanobis"], np.log(gap["std_ratio"]).mean(1)]),
                     shift=gap["shift"][:, order], ratio=gap["std_ratio"][:, order])
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

    how = "encoder" if samples is None else f"{cfg['posterior']['method']} samples"
    fits("latent_mean.fits", full["mean"].T, names, "1", f"posterior mean of latent features ({how})")
    fits("latent_std.fits", full["std"].T, names, "1", f"posterior std of latent features ({how})")
    if samples is not None:
        fits("encoder_latent_mean.fits", full["enc_mean"].T, names, "1", "amortised (encoder) posterior mean")
        fits("encoder_latent_std.fits", full["enc_std"].T, names, "1", "amortised (encoder) posterior std")
        fits("latent_samples.fits", full["samples"].T,
             [f"s{k:02d}_{n}" for k in range(len(samples)) for n in names], "1",
             f"{cfg['posterior']['method']} posterior samples")
        fits("amortisation_gap.fits", full["gap"].T, ["mean_shift_sigma", "mean_log_std_ratio"], "1",
             "encoder vs MGVI/geoVI: RMS mean shift in posterior sigmas, mean log(std_enc/std)")
        shift, ratio = np.abs(full["shift"]), full["ratio"]
        grows = [dict(feature=n, median_abs_shift_sigma=float(np.median(shift[:, k])),
                      p90_abs_shift_sigma=float(np.percentile(shift[:, k], 90)),
                      median_std_ratio=float(np.median(ratio[:, k])),
                      p10_std_ratio=float(np.percentile(ratio[:, k], 10)),
                      p90_std_ratio=float(np.percentile(ratio[:, k], 90))) for k, n in enumerate(names)]
        paths["amortisation_gap.csv"] = os.path.join(run_dir, "amortisation_gap.csv")
        write_text(paths["amortisation_gap.csv"], format_table(grows, list(grows[0]), "csv"))
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
    if samples is not None:
        mollview_grid(full["gap"].T, ["RMS mean shift [posterior sigma]", "mean log(std_encoder / std)"],
                      os.path.join(pdir, "amortisation_gap.png"), nest=nest, ncols=2, cmap="coolwarm",
                      suptitle=f"amortisation gap: encoder vs {cfg['posterior']['method']}")
    paths["plots"] = pdir
    return dict(order=order, significance=sig_nats[order], sigma=sigma, paths=paths)
