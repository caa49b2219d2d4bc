"""The latent posterior p(z | y) of a trained decoder given only the observed entries of each row.

``E(z) = 0.5 sum_c w_c (y_c - f(z)_c)^2 + 0.5 |z|^2`` with ``w_c = m_c / sigma_c^2`` (zero for a
missing entry) is minimised row by row with Levenberg-Marquardt damped Gauss-Newton steps
``(M + lambda 1) dz = -grad E``, ``M = J^T diag(w) J + 1`` (the Fisher metric plus the prior,
:func:`galdecomp.model.fisher.metric`). The Laplace/Fisher approximation is
``p(z | y) ~ N(z_MAP, M(z_MAP)^-1)``; for a linear decoder it is exact.

Shapes: data, inverse variances (B, C); latents (B, L); precisions and covariances (B, L, L).
All rows of a block are iterated together; a row whose step does not lower its energy keeps its
position and raises its own damping.
"""
import numpy as np

from ..model.fisher import covariance, jacobian_forward, metric

__all__ = ["latent_map"]


def _energy(y, data, inv_var, z):
    r = data - y
    return 0.5 * (inv_var * r * r).sum(axis=1) + 0.5 * (z * z).sum(axis=1)


def _state(theta, sizes, act, d, w, z):
    """Energy, gradient, Gauss-Newton metric and decoder output at ``z`` (rows of one block)."""
    y, J, _ = jacobian_forward(theta, sizes, act, z)
    g = z - np.einsum("bcl,bc->bl", J, w * (d - y))
    return _energy(y, d, w, z), g, metric(J, w)


def _hessian(theta, sizes, act, d, w, z, g, h=1e-5):
    """Exact Hessian of the energy by forward differences of the analytic gradient, symmetrised."""
    L = z.shape[1]
    H = np.empty(z.shape + (L,))
    for k in range(L):
        zk = z.copy()
        zk[:, k] += h
        H[:, :, k] = (_state(theta, sizes, act, d, w, zk)[1] - g) / h
    return 0.5 * (H + np.swapaxes(H, 1, 2))


def latent_map(decoder, theta_dec, data, inv_var, start, iterations=100, tol=1e-6, newton_after=10, block=2048):
    """MAP latents of every row and the Fisher/Laplace covariance there.

    Damped Gauss-Newton steps first; rows not converged after ``newton_after`` steps continue
    with damped Newton steps on the exact Hessian (forward differences of the gradient, so
    that large-residual rows converge quadratically). Only unconverged rows are iterated.

    Parameters
    ----------
    decoder : MLP
        The decoder (``sizes``, ``activation``).
    theta_dec : ndarray, shape (n_params,)
        Decoder parameters (not excitations).
    data : ndarray, shape (P, C)
        Standardised data, any finite value where missing.
    inv_var : ndarray, shape (P, C)
        ``mask / sigma_c^2`` (0 where missing; extra known noise lowers it).
    start : ndarray, shape (P, L)
        Initial latents (e.g. the encoder's means).
    iterations : int
        Steps at most.
    tol : float
        A row has converged when its Newton decrement ``sqrt(g^T M^-1 g)`` (the distance to the
        optimum in posterior standard deviations) is below this.
    newton_after : int
        Gauss-Newton steps before switching to Newton steps.
    block : int
        Rows iterated together.

    Returns
    -------
    dict
        ``mean`` (P, L): the MAP; ``cov`` (P, L, L): ``M(z_MAP)^-1``; ``energy`` (P,): ``E`` at
        the MAP (without constants); ``converged`` (P,) bool; ``iterations`` (int): steps taken
        by the slowest row.
    """
    data, inv_var = np.asarray(data, float), np.asarray(inv_var, float)
    z_all = np.array(start, dtype=float)
    P, L = z_all.shape
    cov, energy, conv = np.empty((P, L, L)), np.empty(P), np.zeros(P, bool)
    theta, sizes, act, most = theta_dec, decoder.sizes, decoder.activation, 0
    eye = np.eye(L)
    for a in range(0, P, block):
        idx = np.arange(a, min(a + block, P))
        z, d, w = z_all[idx], data[idx], inv_var[idx]
        E, g, M = _state(theta, sizes, act, d, w, z)
        lam = np.full(len(idx), 1e-3)
        for it in range(iterations + 1):
            dec = np.sqrt(np.maximum(np.einsum("bl,bl->b", g, np.linalg.solve(M, g[..., None])[..., 0]), 0))
            done = dec < tol
            if done.any():  # store the converged rows and drop them from the block
                z_all[idx[done]], energy[idx[done]], conv[idx[done]] = z[done], E[done], True
                cov[idx[done]] = covariance(M[done])[0]
                keep = ~done
                idx, z, d, w, E, g, M, lam = (v[keep] for v in (idx, z, d, w, E, g, M, lam))
            if len(idx) == 0 or it == iterations:
                break
            most = max(most, it + 1)
            A = M
            if it >= newton_after:
                H = _hessian(theta, sizes, act, d, w, z, g)
                pd = np.linalg.eigvalsh(H)[:, 0] > 1e-9
                A = np.where(pd[:, None, None], H, M)
            step = -np.linalg.solve(A + lam[:, None, None] * eye, g[..., None])[..., 0]
            E1, g1, M1 = _state(theta, sizes, act, d, w, z + step)
            ok = E1 <= E + 1e-13 * (1.0 + np.abs(E))  # slack: rounding near the optimum
            z = np.where(ok[:, None], z + step, z)
            E, g, M = np.where(ok, E1, E), np.where(ok[:, None], g1, g), np.where(ok[:, None, None], M1, M)
            lam = np.where(ok, np.maximum(lam * 0.3, 1e-12), np.minimum(lam * 10.0, 1e9))
        if len(idx):  # not converged within the iterations: the last position
            z_all[idx], energy[idx], cov[idx] = z, E, covariance(M)[0]
    return dict(mean=z_all, cov=cov, energy=energy, converged=conv, iterations=most)
