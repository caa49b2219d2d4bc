"""Two-sample quality measures of generated rows against real rows.

Both take sample sets as ndarrays of shape (N, D) (rows x features); N may differ between the
two sets, D must not.
"""
import numpy as np
from scipy import linalg, stats

__all__ = ["frechet_distance", "ks_per_feature"]


def _rows(a, name):
    a = np.asarray(a, float)
    if a.ndim != 2 or len(a) < 2:
        raise ValueError(f"{name} must be an (N, D) array with N >= 2, got shape {a.shape}")
    return a


def frechet_distance(x, y):
    """Fréchet distance between Gaussian fits of two sample sets (the "FID" formula).

    ``|m_x - m_y|^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2))`` with sample means m and covariances C.

    Parameters
    ----------
    x : ndarray, shape (N, D)
    y : ndarray, shape (M, D)

    Returns
    -------
    float
        The squared Fréchet (2-Wasserstein) distance of the two Gaussians, >= 0 (tiny
        imaginary parts of the matrix square root from round-off are dropped).
    """
    x, y = _rows(x, "x"), _rows(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature counts differ: {x.shape[1]} and {y.shape[1]}")
    mx, my = x.mean(0), y.mean(0)
    cx = np.atleast_2d(np.cov(x, rowvar=False))
    cy = np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(cx @ cy)
    if not np.all(np.isfinite(covmean)):
        off = 1e-6 * np.eye(len(cx))
        covmean = linalg.sqrtm((cx + off) @ (cy + off))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    d = float(((mx - my) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.trace(covmean))
    return max(d, 0.0)


def ks_per_feature(x, y):
    """Two-sample Kolmogorov-Smirnov test of every column (:func:`scipy.stats.ks_2samp`).

    Parameters
    ----------
    x : ndarray, shape (N, D)
    y : ndarray, shape (M, D)

    Returns
    -------
    statistic : ndarray, shape (D,)
        KS statistic (largest CDF difference) per column.
    pvalue : ndarray, shape (D,)
        Its p-value per column.
    """
    x, y = _rows(x, "x"), _rows(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature counts differ: {x.shape[1]} and {y.shape[1]}")
    res = [stats.ks_2samp(x[:, j], y[:, j]) for j in range(x.shape[1])]
    return np.array([r.statistic for r in res]), np.array([r.pvalue for r in res])
