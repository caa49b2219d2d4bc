"""The rotation of a run's latent maps (``rotation.method``), chosen after training.

The prior N(0, 1) is invariant under an orthogonal ``R``, so the features ``z' = R^T z`` of the
decoder ``f(R z')`` are the same model's: only the latent products (latent_mean, latent_std,
latent_cov, significance.csv and the report that reads them, ``TrainedModel.encode_maps``, the
latent maps of ``galdecomp reconstruct``) are given in the rotated coordinates. The encoder,
the decoder, the latent transform, samples, anomaly scores and reconstructions are unchanged.
``varimax``: :func:`galdecomp.model.rotation.stacked_varimax` of the used features (benchmarks/README.md,
"One feature, one component").
"""
import numpy as np

from ..model.rotation import rotate_moments, stacked_varimax

__all__ = ["ROTATION_ROWS", "ROTATION_NAMES", "product_rotation", "rotated_moments", "rotation_rows", "read_rotation"]

#: Rows (pixels) of the subsample whose decoder Jacobians define the rotation, at most.
ROTATION_ROWS = 2000
#: What each ``rotation.method`` is, in words (the report's).
ROTATION_NAMES = {"none": "none (the model's own latent coordinates)",
                  "varimax": "varimax of the decoder Jacobians in the standardised data's units, among the used features"}


def product_rotation(model, params, mean, used, comm=None, n_rows=ROTATION_ROWS):
    """The varimax rotation of a fit, from every ``ceil(P / n_rows)``-th row of all processes' rows.

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
    mean : ndarray, shape (P_local, L)
        Posterior means of this process's rows.
    used : ndarray of bool, shape (L,)
        Features at or above the significance of a used feature.
    comm : SerialComm or MPIComm, optional
    n_rows : int
        Rows of the subsample at most (over all processes).

    Returns
    -------
    ndarray, shape (L, L)
        The same on every process.
    """
    from ..parallel import SerialComm

    comm = comm or SerialComm()
    sizes = np.zeros(comm.size)
    sizes[comm.rank] = len(mean)
    sizes = comm.allreduce_sum(sizes)
    step = max(1, -(-int(sizes.sum()) // n_rows))
    first = -int(sizes[:comm.rank].sum()) % step  # every step-th row of all rows, whatever the ranks
    sub = comm.gather_rows(np.ascontiguousarray(mean[first::step]))
    R = stacked_varimax(model, params, sub, used) if comm.rank == 0 else None
    return comm.bcast(R)


def rotated_moments(model, params, data, mask, mean, std, R, cfg, block):
    """Posterior mean and standard deviation of the rotated features, (P_local, L) each.

    A Fisher posterior's standard deviations come from its covariances (recomputed a block of
    rows at a time, the blocks of ``posterior_moments``); a diagonal posterior's from ``std``
    (exact: ``sqrt(diag(R^T diag(std^2) R))``).
    """
    if cfg["covariance"] == "diagonal":
        return rotate_moments(R, mean, std)[:2]
    out = np.empty_like(mean)
    for a in range(0, len(data), block):
        s = slice(a, min(a + block, len(data)))
        cov = model.posterior_moments(params, data[s], mask[s], block=block, full_cov=True)[1]
        out[s] = rotate_moments(R, mean[s], cov)[1]
    return mean @ R, out


def rotation_rows(R, order, method):
    """Rows of rotation.csv: per latent index of the model, its weight in feature_01, feature_02, ...
    (``feature_k = sum_i z_i R[i, order[k - 1]]``)."""
    return [dict(latent_index=i, method=method,
                 **{f"feature_{k + 1:02d}": float(R[i, j]) for k, j in enumerate(order)}) for i in range(len(R))]


def read_rotation(path):
    """The method of a run's rotation.csv, or ``"none"`` if there is no such file."""
    import csv
    import os

    if not os.path.isfile(path):
        return "none"
    with open(path, newline="") as f:
        first = next(csv.DictReader(f), None)
    return first["method"] if first else "none"
