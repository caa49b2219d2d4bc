"""Figures of a run: feature maps, training curves, residual summary (matplotlib Agg, healpy)."""
import numpy as np

from ..figures import pyplot, save_figure, mollview_grid

__all__ = ["mollview_grid", "plot_history", "plot_residual_summary"]


def plot_history(history, path):
    """Training curves: ELBO, reconstruction and KL per epoch, validation ELBO, learning rate.

    Parameters
    ----------
    history : list of dict
        Rows with keys epoch, elbo, reconstruction, kl, validation_elbo, lr (and
        validation_median).
    path : str
    """
    plt = pyplot()
    ep = np.array([h["epoch"] for h in history])
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [h["elbo"] for h in history], label="training ELBO")
    ax[0].plot(ep, [h["validation_elbo"] for h in history], label="validation ELBO")
    if all("validation_median" in h for h in history):
        ax[0].plot(ep, [h["validation_median"] for h in history], label="validation ELBO, median pixel")
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
    save_figure(fig, path)
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
    plt = pyplot()
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
    save_figure(fig, path)
    plt.close(fig)
