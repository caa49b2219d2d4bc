"""The latent transform of a run and generated data: `galdecomp transform` and `galdecomp sample`.

Shapes: data rows (P, C) standardised; latents and draws (N, L).

The transform is fitted to the aggregate posterior Q(z): ``DRAWS_PER_ROW`` draws from q(z | d) of
every training row (at most ``MAX_ROWS`` rows, taken by a fixed stride of global row indices, so
the same rows on any number of MPI ranks), validation rows excluded.
"""
import os

import numpy as np

from ..fileio import atomic_output_dir, write_text
from ..seeds import salted
from ..inference.minibatches import split_rows
from ..model.latent_transform import DENSITIES, gaussian_draws_per_row
from .sample_quality import frechet_distance, ks_per_feature
from .tables import format_table

__all__ = ["METHODS", "transform_rows", "held_out_rows", "refit_transform", "draws_from_moments", "encoder_draws",
           "fit_latent_density", "sample_quality",
           "write_samples", "MAX_ROWS", "DRAWS_PER_ROW"]

#: latent density methods: name -> class (the registry of :mod:`galdecomp.model.latent_transform`)
METHODS = DENSITIES
MAX_ROWS = 20000
DRAWS_PER_ROW = 8
#: histogram panels at most (wide tables show the channels of largest spread)
MAX_PANELS = 36


def transform_rows(n_rows, validation_fraction, seed, offset=0, n_local=None, max_rows=MAX_ROWS):
    """Global indices of the training rows the transform is fitted on, and the local ones.

    Parameters
    ----------
    n_rows : int
        Rows of the whole data set.
    validation_fraction, seed
        As the fit's (the validation rows are left out).
    offset, n_local : int
        This process's rows ``[offset, offset + n_local)`` (default: all).
    max_rows : int

    Returns
    -------
    ndarray of int
        Local row indices (``global - offset``) of this process's share, in global order.
    """
    train = split_rows(n_rows, validation_fraction, seed)[0]
    train = train[:: max(1, int(np.ceil(len(train) / max_rows)))]
    n_local = n_rows if n_local is None else n_local
    keep = train[(train >= offset) & (train < offset + n_local)]
    return keep - offset


def held_out_rows(trained, y):
    """The run's validation rows of ``y`` (P, C) without missing entries (held out from training)."""
    cfg = trained.config
    valid = y[split_rows(len(y), cfg["training"]["validation_fraction"], cfg["seed"])[1]]
    return valid[np.isfinite(valid).all(1)]


def draws_from_moments(mean, cov, rows, seed, n_per_row=DRAWS_PER_ROW):
    """Draws of the aggregate posterior from given posterior moments of ``rows`` (seeded, with groups).

    Parameters
    ----------
    mean, cov : ndarray, shape (P, L), (P, L, L)
        Posterior moments of the local rows (``cov`` may also be standard deviations (P, L)
        of diagonal posteriors).
    rows : ndarray of int
        Local rows to use.
    seed : int

    Returns
    -------
    z : ndarray, shape (len(rows) * n_per_row, L)
    groups : ndarray of int, shape (len(rows) * n_per_row,)
        The row of each draw (held out together when the stopping rule validates).
    """
    rng = salted(seed, "generate/draws")
    z = gaussian_draws_per_row(mean[rows], cov[rows], n_per_row, rng)
    return z, np.repeat(np.arange(len(rows)), n_per_row)


def encoder_draws(trained, y, rows, seed, n_per_row=DRAWS_PER_ROW, block=8192):
    """:func:`draws_from_moments` of the encoder's posteriors of ``y[rows]``, in row blocks.

    The same draws (bitwise) as ``draws_from_moments(*trained.encode(y, standardised=True,
    full_cov=True), rows, seed)`` without the covariances of all rows: the encoder runs over
    ``y`` in blocks of ``block`` rows (those of :meth:`~galdecomp.model.autoencoder.Autoencoder.
    posterior_moments`) and one block's covariances exist at a time; the random numbers are
    drawn block after block from one stream.

    Parameters
    ----------
    trained : TrainedModel
    y : ndarray, shape (P, C)
        Standardised rows, NaN where missing.
    rows : ndarray of int
        Sorted rows of ``y`` to draw from.
    seed : int
    n_per_row, block : int

    Returns
    -------
    z, groups
        As :func:`draws_from_moments`.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if np.any(np.diff(rows) < 0):
        raise ValueError("rows must be sorted")
    rng = salted(seed, "generate/draws")
    d, m = trained._rows(y, None, True)
    out = [np.zeros((0, trained.latent_dim))]
    for a in range(0, len(d), block):
        b = min(a + block, len(d))
        here = rows[(rows >= a) & (rows < b)] - a
        if len(here) == 0:
            continue
        mean, cov = trained.model.posterior_moments(trained.params, d[a:b], m[a:b], block=block, full_cov=True)
        out.append(gaussian_draws_per_row(mean[here], cov[here], n_per_row, rng))
    return np.concatenate(out), np.repeat(np.arange(len(rows)), n_per_row)


def fit_latent_density(z, groups, method="gaussianising", seed=0, log=None):
    """Fit a latent density of :data:`METHODS` to aggregate-posterior draws."""
    if method not in METHODS:
        raise ValueError(f"unknown latent density method {method!r}")
    if method == "gaussianising":
        return METHODS[method].fit(z, seed=seed, groups=groups, log=log)
    return METHODS[method].fit(z, seed=seed)


def refit_transform(trained, method="gaussianising", seed=0, progress=None):
    """``galdecomp transform``: the latent density of a finished run, fitted again on its data.

    Parameters
    ----------
    trained : TrainedModel
    method : str
        A key of :data:`METHODS`.
    seed : int
    progress : callable, optional

    Returns
    -------
    dict
        ``density`` (the fitted object); ``held_out_log_density`` and ``held_out_log_prior``:
        mean log-density per draw of 8 posterior draws of each held-out row without gaps, under
        the density and under N(0, 1).
    """
    say = progress or (lambda m: None)
    y = trained.standardise(trained.load_rows())
    say(f"posteriors of {len(y)} rows")
    cfg = trained.config
    z, groups = encoder_draws(trained, y, transform_rows(len(y), cfg["training"]["validation_fraction"],
                                                         cfg["seed"]), seed)
    say(f"latent transform ({method}) on {len(z)} draws of the aggregate posterior")
    density = fit_latent_density(z, groups, method, seed=seed)
    held = held_out_rows(trained, y)
    zq = encoder_draws(trained, held, np.arange(len(held)), seed + 1)[0]
    return dict(density=density, held_out_log_density=float(np.mean(density.log_density(zq))),
                held_out_log_prior=float(np.mean(trained.prior.log_density(zq))))


def sample_quality(trained, real, n, seed=0):
    """Generated against real rows, in standardised units, for every latent source of the run.

    Parameters
    ----------
    trained : TrainedModel
    real : ndarray, shape (M, C)
        Held-out real rows without missing entries (standardised).
    n : int
        Rows generated per source.
    seed : int

    Returns
    -------
    rows : list of dict
        Per source (``prior``, and ``transformed`` if the run has a transform): ``frechet``
        distance, ``median_ks`` and ``max_ks`` over channels, and ``ks_<channel>`` per channel.
    generated : dict
        Source -> generated standardised rows (n, C).
    """
    sources = ["prior"] + (["transformed"] if trained.transform is not None else [])
    rows, generated = [], {}
    for src in sources:
        g = trained.sample(n, salted(seed, "generate/samples"), source=src)["standardised"]
        ks = ks_per_feature(g, real)[0]
        generated[src] = g
        rows.append(dict(source=src, frechet=frechet_distance(g, real), median_ks=float(np.median(ks)),
                         max_ks=float(ks.max()), **{f"ks_{c}": float(k) for c, k in zip(trained.names, ks)}))
    return rows, generated


def write_samples(trained, out, n, source, seed, real, overwrite=False, progress=None):
    """``galdecomp sample``: generated rows, their quality against real rows, and plots.

    Parameters
    ----------
    trained : TrainedModel
    out : str
        Output folder: samples.csv, sample_quality.csv, plots/histograms.png, plots/corner.png.
    n : int
    source : {"prior", "transformed"}
        The latent source of samples.csv (sample_quality.csv has every source).
    seed : int
    real : ndarray, shape (M, C)
        Held-out real rows without missing entries (standardised), the reference.
    overwrite : bool
    progress : callable, optional

    Returns
    -------
    dict
        ``out``; ``quality`` (rows of sample_quality.csv).
    """
    say = progress or (lambda m: None)
    s = trained.sample(n, np.random.default_rng(seed), source=source)
    say(f"{n} samples from the {source} latent distribution; quality against {len(real)} held-out rows")
    quality, generated = sample_quality(trained, real, max(n, 2000), seed)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        cols = list(trained.names)
        write_text(os.path.join(tmp, "samples.csv"),
                   format_table([dict(zip(cols, r)) for r in s["physical"]], cols, "csv"))
        write_text(os.path.join(tmp, "sample_quality.csv"), format_table(quality, list(quality[0]), "csv"))
        os.makedirs(os.path.join(tmp, "plots"))
        _plots(trained, generated, real, os.path.join(tmp, "plots"))
    return dict(out=os.path.abspath(out), quality=quality)


def _plots(trained, generated, real, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = np.arange(trained.n_features)
    if len(shown) > MAX_PANELS:  # wide tables (images): the channels with the largest spread
        shown = np.sort(np.argsort(-real.std(0))[:MAX_PANELS])
    C = len(shown)
    ncol = 6
    fig, axes = plt.subplots(int(np.ceil(C / ncol)), ncol, figsize=(2.6 * ncol, 2.0 * np.ceil(C / ncol)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= C:
            ax.axis("off")
            continue
        c = shown[i]
        lo, hi = np.percentile(real[:, c], [0.5, 99.5])
        bins = np.linspace(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo), 40)
        ax.hist(real[:, c], bins, density=True, histtype="stepfilled", color="0.8", label="held-out data")
        for src, g in generated.items():
            ax.hist(g[:, c], bins, density=True, histtype="step", label=src)
        ax.set_title(trained.names[c], fontsize=8)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("standardised channels: generated (prior / transformed latents) against held-out data")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "histograms.png"), dpi=80)
    plt.close(fig)
    # corner plot of the four channels with the largest spread in the data
    pick = np.argsort(-real.std(0))[:4]
    fig, axes = plt.subplots(4, 4, figsize=(9, 9))
    for i, a in enumerate(pick):
        for j, b in enumerate(pick):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                ax.hist(real[:, a], 40, density=True, color="0.8")
                for g in generated.values():
                    ax.hist(g[:, a], 40, density=True, histtype="step")
            else:
                ax.scatter(real[:, b], real[:, a], s=1, c="0.6", alpha=0.3)
                last = list(generated.values())[-1]
                ax.scatter(last[:2000, b], last[:2000, a], s=1, alpha=0.3)
            if i == 3:
                ax.set_xlabel(trained.names[b], fontsize=7)
            if j == 0:
                ax.set_ylabel(trained.names[a], fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"held-out data (grey) and {list(generated)[-1]} samples")
    fig.savefig(os.path.join(folder, "corner.png"), dpi=80)
    plt.close(fig)
