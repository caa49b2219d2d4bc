"""Figures of a run: feature maps, training curves, residual summary (matplotlib Agg, healpy)."""
import os
import warnings

import numpy as np

__all__ = ["mollview_grid", "plot_history", "plot_residual_summary"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    from ..fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or "png")


def mollview_grid(maps, titles, path, nest=False, ncols=4, unit="", cmap="viridis", suptitle=None):
    """Mollweide views of several HEALPix maps in one PNG.

    Parameters
    ----------
    maps : ndarray, shape (n_maps, n_pix)
        Maps, NaN or UNSEEN where missing.
    titles : list of str
    path : str
        Output PNG (written atomically).
    nest : bool
        Ordering of ``maps``.
    ncols : int
    unit : str
        Colour-bar label.
    cmap : str
    suptitle : str, optional
    """
    import healpy as hp

    plt = _pyplot()
    n = len(maps)
    nrows = int(np.ceil(n / ncols))
    height = 2.7 * nrows + (0.5 if suptitle else 0.0)
    fig = plt.figure(figsize=(4.2 * ncols, height))
    for i, (m, t) in enumerate(zip(maps, titles)):
        m = np.where(np.isfinite(m), m, hp.UNSEEN)
        good = m[m != hp.UNSEEN]
        lo, hi = (np.percentile(good, [1, 99]) if good.size else (0, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hp.mollview(m, nest=nest, fig=fig.number, sub=(nrows, ncols, i + 1), title=t, unit=unit,
                        min=lo, max=hi, cmap=cmap, cbar=True, notext=True)
    if suptitle:
        f = 1 - 0.5 / height  # healpy places its panels itself: squeeze them below the title
        for ax in fig.axes:
            x0, y0, w, h = ax.get_position().bounds
            ax.set_position([x0, y0 * f, w, h * f])
        fig.suptitle(suptitle, y=1 - 0.15 / height)
    _save(fig, path)
    plt.close(fig)


def plot_history(history, path):
    """Training curves: ELBO, reconstruction and KL per epoch, validation ELBO, learning rate.

    Parameters
    ----------
    history : list of dict
        Rows with keys epoch, elbo, reconstruction, kl, validation_elbo, lr.
    path : str
    """
    plt = _pyplot()
    ep = np.array([h["epoch"] for h in history])
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [h["elbo"] for h in history], label="training ELBO")
    ax[0].plot(ep, [h["validation_elbo"] for h in history], label="validation ELBO")
    ax[0].set_ylabel("ELBO per pixel [nats]")
    ax[1].plot(ep, [-h["reconstruction"] for h in history], label="-E[log p(d|z)]")
    ax[1].plot(ep, [h["kl"] for h in history], label="KL[q||p]")
    ax[1].set_yscale("log")
    ax[2].plot(ep, [h["lr"] for h in history])
    ax[2].set_yscale("log")
    ax[2].set_ylabel("learning rate")
    for a in ax:
        a.set_xlabel("epoch")
    ax[0].legend()
    ax[1].legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_residual_summary(names, residual, sigma, path):
    """Per-channel summary of normalised residuals and the learned noise.

    Parameters
    ----------
    names : list of str
        Channel names.
    residual : ndarray, shape (n_channels, n_pix)
        Normalised residuals (NaN where missing).
    sigma : ndarray, shape (n_channels,)
        Learned noise in standardised units.
    path : str
    """
    plt = _pyplot()
    fig, ax = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(names)), 6.5), sharex=True)
    x = np.arange(len(names))
    q = np.nanpercentile(residual, [2.5, 16, 50, 84, 97.5], axis=1)
    ax[0].fill_between(x, q[0], q[4], alpha=0.25, step="mid", label="95 %")
    ax[0].fill_between(x, q[1], q[3], alpha=0.5, step="mid", label="68 %")
    ax[0].plot(x, q[2], "k.", label="median")
    ax[0].axhline(0, color="grey", lw=0.5)
    ax[0].set_ylabel("(d - f(mean)) / sigma")
    ax[0].legend(fontsize=8)
    ax[1].semilogy(x, sigma, "o")
    ax[1].set_ylabel("learned sigma (standardised)")
    ax[1].set_xticks(x)
    ax[1].set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
