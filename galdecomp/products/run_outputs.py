"""The products of a fit: latent features, reconstruction, residuals, tables, figures.

Three steps: :func:`compute_products` (each process its own rows), :func:`gather_products`
(the rows of all processes on rank 0) and a writer, chosen by the kind of data set
(:data:`WRITERS`):

- sky (:func:`write_sky_products`): latent_mean.fits, latent_std.fits (and latent_cov.fits for
  the Fisher covariance), reconstruction.fits, residual.fits, plots/latent_*.png (mollview);
- table (:func:`write_table_products`): the same arrays as CSV tables (latent_mean.csv, ...,
  one row per data row);

and for both noise.csv, significance.csv, history.csv, plots/training.png, plots/residuals.png
(and rotation.csv with a latent rotation, ``rotation.method``).
The recipes (:mod:`galdecomp.pipeline`) run the three steps: :func:`compute_products`,
:func:`gather_products`, then the writer of the data set's kind (:data:`WRITERS`).
"""
import io
import os

import numpy as np

from .. import __version__
from ..fileio import atomic_path, write_healpix_fits, write_text
from ..inference.latent_maps import feature_names
from ..model.rotation import rotate_covariances
from ..run import RunFolder
from .latent_rotation import product_rotation, rotated_moments, rotation_rows
from .run_figures import mollview_grid, plot_history, plot_residual_summary
from .tables import format_table

__all__ = ["feature_significance", "UNUSED_NATS_PER_ROW", "unused_features", "feature_support",
           "compute_products", "covariance_blocks", "upper_triangles", "gather_products",
           "write_sky_products", "write_table_products", "WRITERS", "feature_names", "BLOCK"]


def feature_significance(model, params, data, mask, mean, block=16384, rotation=None):
    """Loss of log-likelihood when one feature is replaced by its prior mean (0).

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
    data, mask : ndarray, shape (P, C)
        Standardised data and observed mask.
    mean : ndarray, shape (P, L)
        Posterior means (of the rotated features ``z @ rotation`` with a rotation).
    block : int
    rotation : ndarray, shape (L, L), optional
        Orthogonal ``R``: the model's latents are ``mean @ R.T``.

    Returns
    -------
    ndarray, shape (L,)
        Sum over the given rows of ``nll(mean with z_k = 0) - nll(mean)`` in nats.
    """
    L = mean.shape[1]
    out = np.zeros(L)
    own = (lambda z: z) if rotation is None else (lambda z: z @ rotation.T)  # the model's latents
    for a in range(0, len(mean), block):
        d, m, z = data[a:a + block], mask[a:a + block], mean[a:a + block]
        base = model.nll_rows(params, d, m, own(z))
        for k in range(L):
            zk = z.copy()
            zk[:, k] = 0.0
            out[k] += (model.nll_rows(params, d, m, own(zk)) - base).sum()
    return out


#: A feature whose significance is below this many nats per row (pixel) is reported as unused:
#: setting it to its prior mean costs the likelihood less than a tenth of a nat per pixel.
UNUSED_NATS_PER_ROW = 0.1


def unused_features(per_row, threshold=UNUSED_NATS_PER_ROW):
    """Which features are unused: significance below ``threshold`` nats per row.

    Parameters
    ----------
    per_row : array_like, shape (L,)
        Significance per row (``significance.csv``'s ``delta_loglike_per_pixel``).
    threshold : float

    Returns
    -------
    ndarray of bool, shape (L,)
    """
    return np.asarray(per_row, dtype=float) < threshold


def feature_support(per_row, row_word="pixel", threshold=UNUSED_NATS_PER_ROW):
    """One line on how many features the data support.

    Parameters
    ----------
    per_row : array_like, shape (L,)
        Significance per row of feature_01, feature_02, ... (significance order).
    row_word : str
    threshold : float

    Returns
    -------
    str
        E.g. ``3 of 10 features carry < 0.1 nats/pixel (features 8, 9, 10): the data support
        about 7``.
    """
    unused = np.flatnonzero(unused_features(per_row, threshold))
    L = len(per_row)
    if not len(unused):
        return f"all {L} features carry >= {threshold:g} nats/{row_word}"
    which = ", ".join(str(i + 1) for i in unused)
    return (f"{len(unused)} of {L} features carry < {threshold:g} nats/{row_word} "
            f"(feature{'s' if len(unused) > 1 else ''} {which}): the data support about {L - len(unused)}")


def _header(dataset, cfg, extra=()):
    cards = [("ORIGIN", f"galdecomp {__version__}", "software"),
             ("NSIDE", dataset.nside), ("LATDIM", cfg["latent_dim"], "latent features"),
             ("COVTYPE", cfg["covariance"], "posterior covariance"),
             ("BETA", cfg["beta"], "KL weight"), ("SEED", cfg["seed"], "random seed")]
    target = getattr(dataset, "target_fwhm_arcmin", None)
    if target is not None:
        cards.append(("FWHMARCM", target, "target resolution of the maps, FWHM arcmin"))
    return cards + list(extra)


#: Rows per block of the posterior moments (:meth:`~galdecomp.model.autoencoder.Autoencoder.posterior_moments`'s
#: default): products that need covariances recompute them on the same blocks, one at a time.
BLOCK = 8192


def covariance_blocks(model, params, data, mask, block=BLOCK):
    """The encoder's posterior covariances, one block of rows at a time.

    The same numbers (bitwise) as ``model.posterior_moments(params, data, mask, block,
    full_cov=True)``, which computes the same blocks; never more than one (block, L, L) array.

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
    data, mask : ndarray, shape (P, C)
        Standardised data (missing entries zeroed) and observed entries.
    block : int

    Yields
    ------
    rows : slice
        The block's rows ``[a, a + block)``.
    cov : ndarray, shape (rows, L, L)
    """
    for a in range(0, len(data), block):
        s = slice(a, min(a + block, len(data)))
        yield s, model.posterior_moments(params, data[s], mask[s], block=block, full_cov=True)[1]


def compute_products(preprocessor, model, params, data, mean, std, cfg, samples=None, comm=None,
                     progress=None, block=BLOCK):
    """The per-row products of a trained model on this process's rows, and the global summaries.

    Works in row blocks: the covariances the Fisher products (upper triangles) and the
    amortisation gap need are recomputed a block at a time (:func:`covariance_blocks`), never
    held for all rows.

    Parameters
    ----------
    preprocessor : Preprocessor
    model : Autoencoder
    params : ndarray
        Trained parameters.
    data : ndarray, shape (P_local, C)
        Standardised data (rows = this process's rows), NaN where missing.
    mean, std : ndarray, shape (P_local, L)
        The encoder's posterior means and standard deviations
        (:meth:`~galdecomp.model.autoencoder.Autoencoder.posterior_moments`). Covariances
        (P_local, L, L) are accepted in place of ``std`` (only their diagonals are used).
    cfg : dict
        Resolved configuration.
    samples : ndarray, shape (S, P_local, L), optional
        MGVI/geoVI posterior samples: then the latent products are their mean and std, and the
        encoder's are kept beside them with the amortisation gap.
    comm : SerialComm or MPIComm, optional
    progress : callable, optional
    block : int
        Rows per block; the block of ``posterior_moments`` that gave ``mean`` and ``std``.

    Returns
    -------
    dict
        ``rows``: name -> array with this process's rows first (``mean``, ``std`` (P_local, L)
        by significance; ``recon`` (P_local, C) physical units; ``resid`` (P_local, C)
        standardised, NaN where missing; ``cov`` (P_local, L (L + 1) / 2) for the Fisher
        covariance; with samples ``enc_mean``, ``enc_std``, ``samples``, ``gap``, ``shift``,
        ``ratio``); ``significance`` (L,) nats summed over all rows, by latent index; ``order``
        (latent index of feature_01, ...); ``sigma`` (C,) learned noise, standardised;
        ``rotation`` (L, L) or None: the latent products are of ``z @ rotation``
        (:mod:`~galdecomp.products.latent_rotation`; latent indices are then the rotated ones);
        ``rotation_method``; ``n_samples`` (S or None).
    """
    from ..parallel import SerialComm

    comm = comm or SerialComm()
    progress = progress or (lambda msg: None)
    mask = np.isfinite(data)
    data = np.where(mask, data, 0.0)
    enc_std = np.sqrt(np.diagonal(std, axis1=1, axis2=2)) if np.ndim(std) == 3 else np.asarray(std)
    if samples is not None:
        from ..inference.mgvi import amortisation_gap

        gap = {}
        for s, cov in covariance_blocks(model, params, data, mask, block):
            for k, v in amortisation_gap(mean[s], cov, samples[:, s]).items():
                gap.setdefault(k, np.empty((len(mean),) + v.shape[1:]))[s] = v
        post_mean, post_std = gap["mean"], gap["std"]
    else:
        post_mean, post_std = mean, enc_std
    progress("feature significance")
    sig_nats = comm.allreduce_sum(feature_significance(model, params, data, mask, post_mean))
    rotation = cfg.get("rotation", {}).get("method", "none")
    R, post_mean, post_std, sig_nats = _rotated(model, params, data, mask, (post_mean, post_std, std), sig_nats,
                                                rotation if samples is None else "none", cfg, comm, block, progress)
    if rotation != "none" and samples is not None:
        progress("latent rotation: not applied to MGVI/geoVI samples")
    order = np.argsort(-sig_nats, kind="stable")
    sigma = model.sigma(params)
    pred = model.decode(params, post_mean if R is None else post_mean @ R.T)  # the model's own latents
    local = dict(mean=post_mean[:, order], std=post_std[:, order], recon=preprocessor.inverse(pred.T).T,
                 resid=np.where(mask, (data - pred) / sigma, np.nan))
    if cfg["covariance"] != "diagonal":
        local["cov"] = upper_triangles(model, params, data, mask, order, block, R)
    if samples is not None:
        local.update(enc_mean=mean[:, order], enc_std=enc_std[:, order],
                     samples=np.concatenate(samples[:, :, order], axis=1),
                     gap=np.column_stack([gap["mahalanobis"], np.log(gap["std_ratio"]).mean(1)]),
                     shift=gap["shift"][:, order], ratio=gap["std_ratio"][:, order])
    return dict(rows=local, significance=sig_nats, order=order, sigma=sigma, rotation=R,
                rotation_method=rotation, n_samples=None if samples is None else len(samples))


def _rotated(model, params, data, mask, moments, sig_nats, method, cfg, comm, block, progress):
    """``(R, mean, std, significance)`` of the rotated features (``R`` None for ``method`` none);
    ``moments``: posterior mean, std and the std or covariances :func:`compute_products` was given."""
    mean, std, given = moments
    if method == "none":
        return None, mean, std, sig_nats
    progress(f"latent rotation ({method})")
    n_all = comm.allreduce_sum(np.array([float(len(data))]))[0]
    R = product_rotation(model, params, mean, ~unused_features(sig_nats / max(n_all, 1.0)), comm)
    mean, std = rotated_moments(model, params, data, mask, mean, given, R, cfg, block)
    return R, mean, std, comm.allreduce_sum(feature_significance(model, params, data, mask, mean, rotation=R))


def upper_triangles(model, params, data, mask, order, block=BLOCK, rotation=None):
    """The upper triangles of the encoder's posterior covariances, features in ``order``.

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
    data, mask : ndarray, shape (P, C)
        Standardised data (missing entries zeroed) and observed entries.
    order : ndarray of int, shape (L,)
        Latent index of feature_01, feature_02, ...
    block : int
    rotation : ndarray, shape (L, L), optional
        The covariances of the rotated features ``R^T cov R``.

    Returns
    -------
    ndarray, shape (P, L (L + 1) / 2)
        ``cov[:, order[i], order[j]]`` for ``i <= j`` (:func:`numpy.triu_indices` order), built
        one block of rows at a time.
    """
    iu = np.triu_indices(len(order))
    a, b = np.asarray(order)[iu[0]], np.asarray(order)[iu[1]]
    out = np.empty((len(data), len(a)))
    for s, cov in covariance_blocks(model, params, data, mask, block):
        if rotation is not None:
            cov = rotate_covariances(rotation, cov)
        out[s] = cov[:, a, b]
    return out


def gather_products(products, comm=None):
    """The products of :func:`compute_products` with the rows of all processes, on rank 0.

    Returns
    -------
    dict or None
        ``products`` with ``rows`` holding all rows in order, on rank 0; None on other ranks.
    """
    if comm is None:
        return products
    rows = {k: comm.gather_rows(v) for k, v in products["rows"].items()}
    return {**products, "rows": rows} if comm.rank == 0 else None


def _arrays(prod, dataset, cfg):
    """The per-row products as (file stem, array (P, K), column names, units, content)."""
    full, L = prod["rows"], len(prod["order"])
    names = feature_names(L)
    how = "encoder" if prod["n_samples"] is None else f"{cfg['posterior']['method']} samples"
    out = [("latent_mean", full["mean"], names, "1", f"posterior mean of latent features ({how})"),
           ("latent_std", full["std"], names, "1", f"posterior std of latent features ({how})")]
    if prod["n_samples"] is not None:
        out += [("encoder_latent_mean", full["enc_mean"], names, "1", "amortised (encoder) posterior mean"),
                ("encoder_latent_std", full["enc_std"], names, "1", "amortised (encoder) posterior std"),
                ("latent_samples", full["samples"],
                 [f"s{k:02d}_{n}" for k in range(prod["n_samples"]) for n in names], "1",
                 f"{cfg['posterior']['method']} posterior samples"),
                ("amortisation_gap", full["gap"], ["mean_shift_sigma", "mean_log_std_ratio"], "1",
                 "encoder vs MGVI/geoVI: RMS mean shift in posterior sigmas, mean log(std_enc/std)")]
    if "cov" in full:
        iu = np.triu_indices(L)
        out.append(("latent_cov", full["cov"], [f"cov_{i + 1:02d}_{j + 1:02d}" for i, j in zip(*iu)], "1",
                    "posterior covariance M^-1, upper triangle"))
    out += [("reconstruction", full["recon"], dataset.names, dataset.units, "decoded posterior mean, physical units"),
            ("residual", full["resid"], dataset.names, "1", "(d - f(mean)) / sigma, standardised units")]
    return out


def _write_tables(run, prod, dataset, preprocessor, model, history, paths, kind, progress):
    """The products that do not depend on the kind of data set: CSV tables and training plots.

    ``kind``: of the data set, names the amortisation-gap summary per feature (MGVI/geoVI only;
    :meth:`RunFolder.gap_summary`).
    """
    full, order, sig_nats, sigma = prod["rows"], prod["order"], prod["significance"], prod["sigma"]
    names = feature_names(len(order))
    tables = []
    if prod["n_samples"] is not None:
        shift, ratio = np.abs(full["shift"]), full["ratio"]
        grows = [dict(feature=n, median_abs_shift_sigma=float(np.median(shift[:, k])),
                      p90_abs_shift_sigma=float(np.percentile(shift[:, k], 90)),
                      median_std_ratio=float(np.median(ratio[:, k])),
                      p10_std_ratio=float(np.percentile(ratio[:, k], 10)),
                      p90_std_ratio=float(np.percentile(ratio[:, k], 90))) for k, n in enumerate(names)]
        tables.append((RunFolder.GAP_SUMMARY[kind], run.gap_summary(kind), grows, list(grows[0])))
    # noise in physical units: sigma / median |dy/dx| over observed rows
    rows = [dict(channel=n, sigma_standardised=float(sigma[c]), sigma_physical=float(sigma[c] / t.slope),
                 unit=u, floor_standardised=float(model.floor[c]))
            for c, (n, t, u) in enumerate(zip(dataset.names, preprocessor.transforms, dataset.units))]
    n_rows = len(full["mean"])
    srows = [dict(feature=names[r], rank=r + 1, latent_index=int(order[r]),
                  delta_loglike_nats=float(sig_nats[order[r]]),
                  delta_loglike_per_pixel=float(sig_nats[order[r]] / n_rows)) for r in range(len(order))]
    hcols = ["epoch", "step", "elbo", "reconstruction", "kl", "validation_elbo", "validation_median", "lr", "seconds"]
    tables += [(key, run.path(key), table, cols) for key, table, cols in
               (("noise", rows, list(rows[0])), ("significance", srows, list(srows[0])), ("history", history, hcols))]
    if prod.get("rotation") is not None:
        rrows = rotation_rows(prod["rotation"], order, prod["rotation_method"])
        tables.append(("rotation", run.path("rotation"), rrows, list(rrows[0])))
    elif run.has("rotation"):  # of earlier products (--resume --rotate none)
        os.remove(run.path("rotation"))
    for key, path, table, cols in tables:
        paths[RunFolder.FILES.get(key, key)] = path
        write_text(path, format_table(table, cols, "csv"))
    if progress:
        progress("plots")
    pdir = run.path("plots")
    os.makedirs(pdir, exist_ok=True)
    plot_history(history, run.plot("training"))
    plot_residual_summary(dataset.names, full["resid"].T, sigma, run.plot("residuals"))
    paths["plots"] = pdir
    return pdir


def write_sky_products(run, prod, dataset, preprocessor, model, history, cfg, source, progress=None):
    """Write the gathered products of a sky: HEALPix FITS maps, tables and mollview plots.

    Parameters
    ----------
    run : RunFolder
        Where each file goes.
    prod : dict
        From :func:`gather_products` (all pixels, the data set's ordering).
    dataset : SkyDataSet
        The data the model was fit to (names, units, nside, ordering).
    preprocessor : Preprocessor
    model : Autoencoder
    history : list of dict
    cfg : dict
        Resolved configuration.
    source : str
        The input catalog (a header card).
    progress : callable, optional

    Returns
    -------
    dict
        File name -> path written (``plots``: the plots folder).
    """
    import healpy as hp

    nest, coord = dataset.nest, dataset.coord
    hdr = _header(dataset, cfg, [("CATALOG", os.path.basename(source)[:60], "input catalog")])
    paths = {}
    for stem, rows, cols, units, content in _arrays(prod, dataset, cfg):
        path = paths[RunFolder.array_name(stem, ".fits")] = run.array(stem, ".fits")
        missing = np.isnan(rows)
        maps = np.where(missing, hp.UNSEEN, rows).T if missing.any() else rows.T  # no copy without NaN
        del missing
        write_healpix_fits(path, maps, cols, units, nest=nest, coord=coord,
                           header=hdr + [("CONTENT", content)])
        del maps
    _write_tables(run, prod, dataset, preprocessor, model, history, paths, "sky", progress)
    full, names = prod["rows"], feature_names(len(prod["order"]))
    sig = prod["significance"][prod["order"]] / len(full["mean"])
    sig_txt = [f"{n} ({s:.3g} nats/pix{', unused' if u else ''})"
               for n, s, u in zip(names, sig, unused_features(sig))]
    mollview_grid(full["mean"].T, sig_txt, run.plot("latent_mean"), nest=nest,
                  suptitle="posterior mean of the latent features, by significance")
    mollview_grid(full["std"].T, names, run.plot("latent_std"), nest=nest, cmap="magma",
                  suptitle="posterior standard deviation of the latent features")
    if prod["n_samples"] is not None:
        mollview_grid(full["gap"].T, ["RMS mean shift [posterior sigma]", "mean log(std_encoder / std)"],
                      run.plot("amortisation_gap"), nest=nest, ncols=2, cmap="coolwarm",
                      suptitle=f"amortisation gap: encoder vs {cfg['posterior']['method']}")
    return paths


def _csv(path, rows, columns):
    """Write an array (P, K) as CSV with a header, atomically (NaN as ``nan``)."""
    buf = io.StringIO()
    np.savetxt(buf, rows, delimiter=",", fmt="%.10g", header=",".join(columns), comments="")
    write_text(path, buf.getvalue())


def write_table_products(run, prod, dataset, preprocessor, model, history, cfg, source, progress=None):
    """Write the gathered products of a table as CSV tables (one row per data row) and plots.

    Parameters and returns as :func:`write_sky_products` (``dataset``: a DataSet, ``source``:
    the table file).
    """
    paths = {}
    for stem, rows, cols, _, _ in _arrays(prod, dataset, cfg):
        if len(cols) > WIDE_TABLE:  # images: a CSV of 60,000 x 784 numbers would be ~0.6 GB
            path = paths[RunFolder.array_name(stem, ".npy")] = run.array(stem, ".npy")
            with atomic_path(path) as tmp:
                np.save(tmp, np.asarray(rows, dtype=np.float32))
        else:
            path = paths[RunFolder.array_name(stem, ".csv")] = run.array(stem, ".csv")
            _csv(path, rows, cols)
    _write_tables(run, prod, dataset, preprocessor, model, history, paths, "table", progress)
    side = int(round(np.sqrt(dataset.n_features)))
    if side * side == dataset.n_features and side >= 8:  # square images: a grid of data and reconstructions
        path = paths[RunFolder.plot_name("reconstructions")] = run.plot("reconstructions")
        _image_grid(dataset.values.T[:32], prod["rows"]["recon"][:32], side, path)
    return paths


#: Tables wider than this many features are written as float32 .npy instead of CSV.
WIDE_TABLE = 100


def _image_grid(data, recon, side, path):
    """Rows of data images over their reconstructions (physical units), one PNG."""
    from ..figures import pyplot, save_figure

    plt = pyplot()
    n = len(data)
    fig, axes = plt.subplots(2, n, figsize=(0.6 * n, 1.4), squeeze=False)
    for j in range(n):
        for i, img in enumerate((data[j], recon[j])):
            axes[i, j].imshow(np.reshape(img, (side, side)), cmap="gray_r", vmin=0, vmax=1)
            axes[i, j].axis("off")
    fig.suptitle("data (top) and reconstructions of the posterior means (bottom)", fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


#: The writer of each kind of data set (``config: data: kind``).
WRITERS = {"sky": write_sky_products, "table": write_table_products}

