"""Figure helpers every layer may use: a headless pyplot, atomic PNG saving, Mollweide grids of
HEALPix maps (the pixel of each image point computed once per resolution)."""
import functools
import os

import numpy as np

__all__ = ["pyplot", "save_figure", "mollweide_pixels", "mollview_grid"]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Save ``fig`` to ``path`` (format from the extension, 110 dpi) atomically."""
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or "png")


@functools.lru_cache(maxsize=8)
def mollweide_pixels(nside, nest=False, xsize=800):
    """The HEALPix pixel shown at each point of a Mollweide image (Galactic centre in the
    middle, longitude increasing to the left), computed once per resolution.

    Returns
    -------
    index : ndarray of int, shape (xsize // 2, xsize)
        Pixel index, -1 outside the sky's ellipse (image row 0 at the bottom).
    extent : tuple of float
        The image's extent for ``imshow``.
    """
    import healpy as hp

    proj = hp.projector.MollweideProj(xsize=xsize, flipconv="astro")
    img = proj.projmap(np.arange(12 * nside * nside, dtype=float),
                       lambda x, y, z: hp.vec2pix(nside, x, y, z, nest=nest))
    index = np.where(np.isfinite(img) & (img != hp.UNSEEN), img, -1).astype(np.int64)
    index.setflags(write=False)
    return index, tuple(proj.get_extent())


def mollview_grid(maps, titles, path, nest=False, ncols=4, unit="", cmap="viridis", suptitle=None,
                  percentiles=(1, 99), panel_size=(4.2, 2.7), xsize=800):
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
    percentiles : (float, float)
        Colour range of each panel: these percentiles of its valid pixels.
    panel_size : (float, float)
        Width and height of one panel in inches.
    xsize : int
        Image pixels across each map.
    """
    import healpy as hp

    plt = pyplot()
    maps = np.asarray(maps, dtype=float)
    n = len(maps)
    nside = hp.npix2nside(maps.shape[1])
    index, extent = mollweide_pixels(nside, bool(nest), int(xsize))
    outside = index < 0
    nrows = int(np.ceil(n / ncols))
    top = 0.5 if suptitle else 0.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows + top),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, m, t in zip(axes.flat, maps, titles):
        m = np.where(m == hp.UNSEEN, np.nan, m)
        good = m[np.isfinite(m)]
        lo, hi = np.percentile(good, percentiles) if good.size else (0.0, 1.0)
        img = np.ma.masked_invalid(np.where(outside, np.nan, m[np.where(outside, 0, index)]))
        im = ax.imshow(img, origin="lower", extent=extent, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1,
                       interpolation="nearest")
        ax.set_title(t, fontsize=8)
        cbar = fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.06, pad=0.02, aspect=30)
        cbar.ax.tick_params(labelsize=6)
        if unit:
            cbar.set_label(unit, fontsize=6)
    if suptitle:
        fig.suptitle(suptitle)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - (top + 0.25) / fig.get_figheight(),
                        wspace=0.05, hspace=0.35)
    save_figure(fig, path)
    plt.close(fig)
