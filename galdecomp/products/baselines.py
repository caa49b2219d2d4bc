"""Linear decompositions of the preprocessed channels, baselines for the latent features.

PCA, FastICA and NMF (scikit-learn) of the same standardised data the autoencoder sees, on the
same pixels, with as many components as latent features. Missing standardised values are
filled with 0 (the channel mean). NMF needs non-negative input: each standardised channel is
shifted by its minimum over the pixels (``x - min x >= 0``); NMF is skipped, with the reason,
if it does not converge. Components are ordered by the variance they explain: PCA by its
eigenvalues, ICA by the squared norm of the mixing-matrix columns (unit-variance sources), NMF
by ``|W_k| |H_k|`` (the Frobenius norm of each rank-one term). ICA and NMF are learnt on at
most ``fit_pixels`` random pixels and applied to all.
"""
import warnings

import numpy as np

from ..seeds import stream

__all__ = ["METHODS", "component_names", "linear_baselines"]

METHODS = ("pca", "ica", "nmf")


def component_names(method, n):
    """``pca_01``, ``pca_02``, ..."""
    return [f"{method}_{i + 1:02d}" for i in range(n)]


def _ordered(maps, weight):
    return maps[np.argsort(-weight, kind="stable")]


def linear_baselines(data, n_components, seed=0, max_iter=1000, fit_pixels=10000, log=None):
    """PCA, FastICA and NMF components of standardised channels.

    Parameters
    ----------
    data : ndarray, shape (n_channels, n_pix)
        Standardised values, NaN where missing (filled with 0).
    n_components : int
        Components per method (at most ``n_channels``).
    seed : int
        ``random_state`` of ICA and NMF and of the ICA pixel subsample.
    max_iter : int
        Iterations of ICA and NMF at most.
    fit_pixels : int
        ICA and NMF learn their unmixing matrix / non-negative basis on at most this many random
        pixels (for speed) and are then applied to all pixels; PCA uses all pixels.
    log : callable, optional
        Notes: convergence, skipped methods.

    Returns
    -------
    components : dict
        Method name -> ndarray, shape (n_components, n_pix), ordered as described above.
    skipped : dict
        Method name -> reason, for methods that were not run.
    """
    from sklearn.decomposition import NMF, PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    say = log or (lambda msg: None)
    X = np.where(np.isfinite(data), data, 0.0).T            # (P, C)
    n = int(min(n_components, X.shape[1], X.shape[0]))
    out, skipped = {}, {}

    pca = PCA(n, random_state=seed)
    out["pca"] = pca.fit_transform(X).T

    rng = stream(seed, "report", "baselines")
    pick = slice(None) if len(X) <= fit_pixels else np.sort(rng.choice(len(X), fit_pixels, replace=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ica = FastICA(n, whiten="unit-variance", max_iter=max_iter, random_state=seed).fit(X[pick])
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        say(f"ica: FastICA did not converge in {max_iter} iterations; its components are kept")
    out["ica"] = _ordered(ica.transform(X).T, (ica.mixing_ ** 2).sum(axis=0))

    Xs = X - X.min(axis=0)
    if not np.any(Xs > 0):
        skipped["nmf"] = "the shifted data are all zero"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            nmf = NMF(n, init="nndsvda", max_iter=max_iter, random_state=seed).fit(Xs[pick])
            W = nmf.transform(Xs)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            skipped["nmf"] = f"NMF did not converge in {max_iter} iterations"
        else:
            weight = np.linalg.norm(W, axis=0) * np.linalg.norm(nmf.components_, axis=1)
            out["nmf"] = _ordered(W.T, weight)
    for m, why in skipped.items():
        say(f"{m}: skipped ({why})")
    return out, skipped
