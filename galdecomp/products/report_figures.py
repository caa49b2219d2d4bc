"""The report's figures: mutual-information heatmaps, and per template its map beside the best
feature's and their 2-D histogram; and the labels and number formats the report shares with them.
"""
import os
import re

import numpy as np

__all__ = ["write_figures", "feature_labeller", "file_name", "fmt", "HIST_BINS"]

#: Bins per axis of the 2-D histograms.
HIST_BINS = 256


def feature_labeller(unused):
    """``label(feature)``: the feature's name, with `` (unused)`` if it is unused."""
    return lambda f: f"{f} (unused)" if f in unused else f


def file_name(name):
    """``name`` with every run of characters outside ``A-Za-z0-9_.-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def fmt(v, spec=".3g"):
    """A number formatted with ``spec``; ``–`` for NaN, inf or a missing value."""
    return format(v, spec) if isinstance(v, (int, float, np.floating)) and np.isfinite(v) else "–"


def _plot_hist2d(x, y, xlabel, ylabel, title, path):
    from matplotlib.colors import LogNorm

    from ..figures import pyplot, save_figure

    plt = pyplot()
    m = np.isfinite(x) & np.isfinite(y)
    h, xe, ye = np.histogram2d(x[m], y[m], bins=HIST_BINS)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(np.ma.masked_equal(h.T, 0), origin="lower", aspect="auto", cmap="viridis",
                   extent=(xe[0], xe[-1], ye[0], ye[-1]), norm=LogNorm(), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="pixels")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _plot_heatmap(mi, rows, cols, title, path, annotate=True):
    from ..figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * len(cols), 1.6 + 0.36 * len(rows)))
    im = ax.imshow(mi, cmap="magma", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, label="KSG MI [nats]", fraction=0.03)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    vmax = np.nanmax(mi) if np.isfinite(mi).any() else 1.0
    for (i, j), v in np.ndenumerate(mi if annotate else np.empty((0, 0))):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                    color="black" if v > 0.6 * vmax else "white")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_figures(pdir, methods, tset, T, summary, cm, unused=frozenset()):
    """All PNGs (galdecomp features in ``unused`` labelled so); returns {template: (maps png, hist2d png)}."""
    from .run_figures import mollview_grid

    names, F = methods["galdecomp"]
    label = feature_labeller(unused)
    for m, (mnames, _) in methods.items():
        mi = np.array([[cm[(m, f, t)]["mi_ksg"] for t in tset.names] for f in mnames])
        rows = [label(f) for f in mnames] if m == "galdecomp" else mnames
        _plot_heatmap(mi, rows, tset.names, f"{m}: KSG mutual information [nats]",
                      os.path.join(pdir, "mi_heatmap.png" if m == "galdecomp" else f"mi_heatmap_{m}.png"),
                      annotate=m == "galdecomp")
    figures = {}
    for j, (t, tr) in enumerate(zip(tset.names, tset.transforms)):
        s = next(r for r in summary if r["template"] == t and r["method"] == "galdecomp")
        f = s["best_feature"]
        x = F[names.index(f)]
        r = cm[("galdecomp", f, t)]
        text = f"MI {fmt(r['mi_ksg'], '.2f')} nats, r {fmt(r['pearson'], '+.2f')}"
        maps_png, hist_png = f"maps_{file_name(t)}.png", f"hist2d_{file_name(t)}.png"
        mollview_grid(np.stack([T[j], x]), [f"{t} ({tr}, standardised)", f"{label(f)} ({text})"],
                      os.path.join(pdir, maps_png), ncols=2)
        _plot_hist2d(x, T[j], f"{label(f)} (posterior mean)", f"{t} ({tr}, standardised)",
                     f"{t} vs {label(f)}: {text}", os.path.join(pdir, hist_png))
        figures[t] = (maps_png, hist_png)
    return figures
