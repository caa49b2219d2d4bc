"""Orthogonal rotations of the latent space chosen after training (varimax, quartimax).

The prior N(0, 1) is invariant under an orthogonal ``R`` (L, L), so the decoder ``f(R z')`` with
``z' = R^T z`` is the same model: posterior mean ``R^T mu``, covariance ``R^T Sigma R``. A
rotation only changes which directions of the latent space are called features. The orthomax
family (Kaiser 1958 for varimax) picks the ``R`` that makes a loading matrix ``A R`` simple: each
feature loading strongly on few channels. The loadings are the decoder Jacobian ``J_p`` (C, L)
at each row's posterior mean, in the standardised data's units or in units of the noise
(``J_p / sigma``), summarised over the rows (:func:`loadings`) or stacked
(:func:`stacked_loadings`).
"""
import numpy as np

from .fisher import jacobian_forward

__all__ = ["orthomax", "varimax", "jacobians", "whitened_jacobians", "loadings", "stacked_loadings", "oriented",
           "embedded", "stacked_varimax", "rotate_moments", "rotate_covariances"]


def orthomax(A, gamma=1.0, normalize=True, max_iter=1000, tol=1e-10):
    """The orthogonal rotation maximising the orthomax criterion of ``A R``.

    Kaiser's iteration by singular value decompositions (Kaiser 1958, Psychometrika 23, 187;
    in the form of Jennrich 2001, Psychometrika 66, 289): with ``B = A R``,
    ``G = A^T (B^3 - gamma / n B diag(sum_i B_ij^2))`` and ``G = U S V^T``, the next rotation
    is ``U V^T``, until no entry of ``R`` changes by more than ``tol``.

    Parameters
    ----------
    A : ndarray, shape (n, L)
        Loadings: rows are variables (channels), columns latent features.
    gamma : float
        1 for varimax (the variance of the squared loadings of each feature), 0 for quartimax.
    normalize : bool
        Kaiser normalisation: the rows of ``A`` scaled to unit length for the criterion (each
        variable counts alike); rows of zeros are left alone.
    max_iter : int
    tol : float
        Largest change of an entry of ``R`` in the last iteration.

    Returns
    -------
    R : ndarray, shape (L, L)
        Orthogonal; the rotated loadings are ``A @ R``.
    """
    A = np.asarray(A, dtype=float)
    if normalize:
        norm = np.linalg.norm(A, axis=1, keepdims=True)
        A = A / np.where(norm > 0, norm, 1.0)
    n, L = A.shape
    R = np.eye(L)
    for _ in range(max_iter):
        B = A @ R
        # B * B * B, not B ** 3: numpy's float power calls pow() per element, 30x slower here
        G = A.T @ (B * B * B - (gamma / n) * B * np.sum(B * B, axis=0))
        U, _, Vt = np.linalg.svd(G)
        R, old = U @ Vt, R
        if np.max(np.abs(R - old)) <= tol:
            break
    return R


def varimax(A, normalize=True, max_iter=1000, tol=1e-10):
    """The varimax rotation of loadings ``A`` (n, L): :func:`orthomax` with ``gamma = 1``."""
    return orthomax(A, 1.0, normalize, max_iter, tol)


def jacobians(model, params, z):
    """Decoder Jacobians ``J_p`` at latents ``z`` (B, L), in the standardised data's units: (B, C, L)."""
    theta = model.split(params)[1]
    return jacobian_forward(theta, model.decoder.sizes, model.decoder.activation, np.asarray(z, float))[1]


def whitened_jacobians(model, params, z):
    """Decoder Jacobians in units of the noise, ``J_p / sigma`` at latents ``z`` (B, L): (B, C, L)."""
    return jacobians(model, params, z) / model.sigma(params)[None, :, None]


def loadings(model, params, z, block=4096):
    """Root mean square over the rows of the whitened Jacobians :func:`whitened_jacobians`.

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
    z : ndarray, shape (P, L)
        Latents (posterior means), computed in row blocks.
    block : int

    Returns
    -------
    ndarray, shape (C, L)
    """
    s = np.zeros((model.n_features, model.latent_dim))
    for a in range(0, len(z), block):
        s += np.sum(whitened_jacobians(model, params, z[a:a + block]) ** 2, axis=0)
    return np.sqrt(s / max(len(z), 1))


def stacked_loadings(model, params, z, noise_units=False):
    """The Jacobians of the rows ``z`` (B, L) stacked: (B * C, L), one row per row and channel; in
    the standardised data's units (:func:`jacobians`) or, with ``noise_units``, in units of the
    noise (:func:`whitened_jacobians`)."""
    J = whitened_jacobians(model, params, z) if noise_units else jacobians(model, params, z)
    return J.reshape(-1, model.latent_dim)


def oriented(R, A):
    """``R`` with its columns signed and ordered: each rotated feature's loadings ``A @ R`` summing
    to >= 0, the features by their sum of squared loadings, largest first.

    Parameters
    ----------
    R : ndarray, shape (L, L)
    A : ndarray, shape (n, L)

    Returns
    -------
    ndarray, shape (L, L)
    """
    B = np.asarray(A, float) @ R
    sign = np.where(B.sum(axis=0) < 0, -1.0, 1.0)
    order = np.argsort(-np.sum(B ** 2, axis=0), kind="stable")
    return (R * sign)[:, order]


def embedded(R, used):
    """The (L, L) rotation that is ``R`` (k, k) on the features ``used`` (bool, (L,), k true) and
    the identity on the others."""
    used = np.asarray(used, bool)
    out = np.eye(len(used))
    out[np.ix_(used, used)] = R
    return out


def stacked_varimax(model, params, z, used):
    """The varimax rotation of the stacked Jacobians among the ``used`` features.

    The criterion of the rotated Jacobians ``J_p R`` themselves, in the standardised data's
    units (every channel of unit variance, as PCA sees the data), every row's C x L block one set
    of variables (no Kaiser normalisation: a channel where the decoder is flat counts little);
    signed and ordered by :func:`oriented`; the unused features (whose posterior is the prior in
    every row) are left alone (:func:`embedded`). In units of the noise instead (``J_p R /
    sigma``, the choice before 2026-12-08), the channels with the smallest noise set the
    rotation and the best single feature per template held 0.06-0.13 nats less
    (benchmarks/README.md, "One feature, one component").

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
    z : ndarray, shape (B, L)
        Posterior means of a subsample of the rows (a few thousand suffice).
    used : ndarray of bool, shape (L,)

    Returns
    -------
    ndarray, shape (L, L)
        Orthogonal: rotated features ``z @ R``.
    """
    used = np.asarray(used, bool)
    if used.sum() < 2:
        return np.eye(len(used))
    S = stacked_loadings(model, params, z)[:, used]
    return embedded(oriented(varimax(S, normalize=False), S), used)


def rotate_moments(R, mean, second):
    """Posterior moments of the rotated latents ``z' = R^T z``.

    Parameters
    ----------
    R : ndarray, shape (L, L)
    mean : ndarray, shape (P, L)
    second : ndarray, shape (P, L) or (P, L, L)
        Standard deviations of a diagonal posterior, or covariances.

    Returns
    -------
    mean : ndarray, shape (P, L)
        ``mean @ R``.
    std : ndarray, shape (P, L)
        ``sqrt(diag(R^T Sigma R))``.
    cov : ndarray, shape (P, L, L)
        Only for covariances given: ``R^T Sigma R``.
    """
    mean = np.asarray(mean, float) @ R
    second = np.asarray(second, float)
    if second.ndim == 2:
        return mean, np.sqrt(second ** 2 @ R ** 2)
    cov = rotate_covariances(R, second)
    return mean, np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), cov


def rotate_covariances(R, cov):
    """Covariances (P, L, L) of the rotated latents ``z' = R^T z``: ``R^T Sigma R`` for each row."""
    return np.einsum("li,plm,mj->pij", R, cov, R, optimize=True)
