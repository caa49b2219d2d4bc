"""Latent feature maps of a sky under a trained model, as ``galdecomp fit`` writes them.

Shapes: maps in and out are HEALPix (C, npix) and (L, npix); the rows the encoder takes are
(npix, C) in NESTED order. Features are in the run's significance order (feature_01, ...).
"""
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = ["LatentMaps", "feature_names", "encode_maps"]


def feature_names(n):
    """Column names of the latent maps: feature_01, feature_02, ..."""
    return [f"feature_{i + 1:02d}" for i in range(n)]


@dataclass
class LatentMaps:
    """HEALPix maps of the latent features (:meth:`TrainedModel.encode_maps`).

    Attributes
    ----------
    mean : ndarray, shape (L, npix)
        Posterior mean of feature_01, feature_02, ... (by significance, as the run's
        ``latent_mean.fits``).
    std : ndarray, shape (L, npix)
        Posterior standard deviation (as ``latent_std.fits``).
    names : list of str
        ``feature_01``, ``feature_02``, ...
    nside : int
    nest : bool
        Pixel ordering of ``mean`` and ``std``: NESTED if true (that of the run's FITS files).
    latent_index : ndarray of int, shape (L,)
        The model's latent index of each feature (:attr:`TrainedModel.feature_order`; of the
        rotated latents ``z @ R`` with a :attr:`TrainedModel.rotation`).
    """

    mean: np.ndarray
    std: np.ndarray
    names: list
    nside: int
    nest: bool
    latent_index: np.ndarray


def encode_maps(model, maps, nest=True, input_nest=False, allow_missing=False):
    """HEALPix maps of the latent features of a sky under ``model`` (a TrainedModel): see
    :meth:`galdecomp.inference.trained.TrainedModel.encode_maps`."""
    import healpy as hp

    from ..model.rotation import rotate_moments

    rows, nside = _map_rows(model, maps, input_nest, allow_missing)
    R = model.rotation
    if np.array_equal(R, np.eye(len(R))):
        mean, std = model.encode(rows)
    else:  # the rotated features' std from the covariances (one block of rows at a time)
        mean, std = np.empty((len(rows), len(R))), np.empty((len(rows), len(R)))
        for a in range(0, len(rows), 8192):
            m, cov = model.encode(rows[a:a + 8192], full_cov=True)
            mean[a:a + 8192], std[a:a + 8192] = rotate_moments(R, m, cov)[:2]
    order = model.feature_order
    mean, std = mean[:, order].T, std[:, order].T
    if not nest:
        ring = hp.ring2nest(nside, np.arange(12 * nside * nside))
        mean, std = mean[:, ring], std[:, ring]
    return LatentMaps(np.ascontiguousarray(mean), np.ascontiguousarray(std), feature_names(len(order)),
                      nside, bool(nest), order.copy())


def _map_rows(model, maps, input_nest, allow_missing):
    """Rows (NESTED pixels) x the run's channels in physical units, and the nside, for
    :func:`encode_maps`."""
    import healpy as hp

    from ..catalog import unseen_to_nan
    from ..sources import channel_rows

    if model.data.get("kind") != "sky":
        raise InputError(f"encode_maps: the run was fitted to a {model.data.get('kind')}, not to maps "
                         f"(use encode)")
    C = model.n_features
    if isinstance(maps, (str, os.PathLike)):
        nside = int(model.data["nside"])
        rows = channel_rows(os.fspath(maps), model.names, nside, model.target_fwhm(), allow_missing)[0]
        return rows, nside
    if isinstance(maps, dict):
        unknown = [k for k in maps if k not in model.names]
        if unknown:
            raise InputError(f"encode_maps: '{unknown[0]}' is not a channel of the run "
                             f"({', '.join(model.names[:4])}, ...)")
        absent = [n for n in model.names if n not in maps]
        if absent and not allow_missing:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise InputError(f"encode_maps: no map for channel '{absent[0]}'{more} of the run "
                             f"(allow_missing=True treats it as missing)")
        arrays = [maps.get(n) for n in model.names]
    else:
        a = np.asarray(maps)
        if a.ndim != 2 or len(a) != C:
            raise InputError(f"encode_maps: an array of maps must have shape (C, npix) with C = {C} "
                             f"(the run's channels), got {a.shape}")
        arrays = list(a)
    sizes = {np.shape(v) for v in arrays if v is not None}
    if not sizes:
        raise InputError("encode_maps: no maps given")
    if len(sizes) > 1:
        raise InputError(f"encode_maps: maps of different shapes {sorted(sizes)}")
    shape = sizes.pop()
    if len(shape) != 1 or not hp.isnpixok(shape[0]):
        raise InputError(f"encode_maps: a map of shape {shape} is not a full HEALPix map")
    npix = shape[0]
    nside = hp.npix2nside(npix)
    rows = np.full((npix, C), np.nan)
    for c, v in enumerate(arrays):
        if v is not None:
            rows[:, c] = v
    unseen_to_nan(rows)
    if not input_nest:
        rows = rows[hp.nest2ring(nside, np.arange(npix))]
    return rows, nside
