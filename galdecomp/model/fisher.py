"""Fisher-metric latent posterior (FisherNet): q(z|d) = N(mu, M^-1), M = J^T diag(inv_var) J + 1.

``J = d f_theta / d z`` at ``mu`` is the decoder Jacobian, computed in forward mode by pushing the
L latent directions through the MLP (layout of :mod:`galdecomp.model.mlp`). Gradients of the
samples ``z = mu + L^-T xi`` (``M = L L^T``) and of the analytic KL with respect to ``mu``, the
decoder parameters and ``inv_var`` need second derivatives of the MLP; they are written by hand:
a symmetric cotangent ``G = dloss/dM`` gives ``dloss/dJ = 2 diag(inv_var) J G`` and
``dloss/dinv_var_c = (J G J^T)_cc``, followed by a reverse pass through the Jacobian computation.

Rows (pixels or images) are independent; every function is batched over the leading axis,
with Python loops only over layers or over the L latent dimensions.

Internally the Jacobian is kept as ``Jt`` of shape (B, L, C) (one output tangent per latent
direction, contiguous); the public API uses ``J`` of shape (B, C, L), a transposed view.
"""
import numpy as np

from .mlp import ACTIVATIONS, unpack_params
from .posteriors import LatentPosterior
from .prior import STANDARD_NORMAL

__all__ = ["jacobian_forward", "jacobian_backward", "metric", "cholesky",
           "inv_lower", "solve_lower", "logdet", "covariance", "FisherGaussian", "ScaledFisherGaussian"]


# ----------------------------------------------------------------------------- MLP Jacobian

def jacobian_forward(theta, sizes, activation, z):
    """MLP output and its Jacobian with respect to the input, by forward mode.

    Parameters
    ----------
    theta : ndarray, shape (n_params,)
        Flat MLP parameters (layout of :mod:`galdecomp.model.mlp`).
    sizes : sequence of int
        Layer widths ``[L, ..., C]``.
    activation : str
        Name in :data:`galdecomp.model.mlp.ACTIVATIONS`.
    z : ndarray, shape (B, L)

    Returns
    -------
    y : ndarray, shape (B, C)
    J : ndarray, shape (B, C, L)
        ``J[b, c, l] = dy[b, c] / dz[b, l]`` (a transposed view of the contiguous cache array).
    cache : dict
        Everything :func:`jacobian_backward` needs.
    """
    act = ACTIVATIONS[activation]
    layers = unpack_params(theta, sizes)
    z = np.asarray(z, dtype=np.result_type(theta.dtype, np.float32))
    B, L = z.shape
    # T_k = dh_k/dz (B, L, n_k) and dA_k = da_k/dz = T_k W_k. T_0 = 1, so dA_0 = W_0 (kept 2-D), and
    # dA_1 = (s1_0 * W_0) W_1 = s1_0 @ K with K[n, (l, m)] = W_0[l, n] W_1[n, m]: T_1 is never formed.
    h, T, K, s1 = z, None, None, None
    cache = dict(layers=layers, h=[], T=[], dA=[], s1=[], s2=[])
    for k, (W, b) in enumerate(layers):
        a = h @ W + b
        if k == 0:
            dA = W
        elif k == 1:
            K = (layers[0][0].T[:, :, None] * W[:, None, :]).reshape(W.shape[0], -1)
            dA = (s1 @ K).reshape(B, L, -1)
        else:
            dA = (T.reshape(B * L, -1) @ W).reshape(B, L, -1)
        for key, v in (("h", h), ("T", T), ("dA", dA)):
            cache[key].append(v)
        if k == len(layers) - 1:
            break
        h, s1, s2 = act(a)
        T = s1[:, None, :] * dA if k > 0 else None  # chain rule through the activation
        cache["s1"].append(s1)
        cache["s2"].append(s2)
    cache["K"] = K
    cache["Jt"] = Jt = np.ascontiguousarray(np.broadcast_to(dA, (B,) + dA.shape)) if k == 0 else dA
    return a, Jt.transpose(0, 2, 1), cache


def jacobian_backward(cache, g_y, g_J):
    """Reverse pass through :func:`jacobian_forward` (second order in the MLP).

    Parameters
    ----------
    cache : dict
        From :func:`jacobian_forward`.
    g_y : ndarray, shape (B, C), or None
        Cotangent of the output ``y`` (None means zero).
    g_J : ndarray, shape (B, C, L)
        Cotangent of the Jacobian ``J``.

    Returns
    -------
    g_theta : ndarray, shape (n_params,)
    g_z : ndarray, shape (B, L)
    """
    layers, hs, Ts, dAs, s1s, s2s = (cache[k] for k in ("layers", "h", "T", "dA", "s1", "s2"))
    B, L = hs[0].shape
    g_dA = np.ascontiguousarray(np.swapaxes(g_J, 1, 2))  # (B, L, C)
    dt = layers[-1][0].dtype
    g_a = np.zeros((B, layers[-1][0].shape[1]), dt) if g_y is None else np.asarray(g_y, dtype=dt)
    grads = []
    for k in range(len(layers) - 1, -1, -1):
        W = layers[k][0]
        n_in, n_out = W.shape
        gb = g_a.sum(axis=0)
        # a_k = h_k W + b, dA_k = T_k W: g_W = h_k^T g_a + T_k^T g_dA (summed over rows and directions)
        if k == 0:  # T_0 = 1: the tangent part is the row sum of g_dA_0 (already summed if coming from k = 1)
            grads.append((hs[0].T @ g_a + (g_dA if g_dA.ndim == 2 else g_dA.sum(axis=0)), gb))
            g_z = g_a @ W.T
            break
        s1, s2 = s1s[k - 1], s2s[k - 1]
        # h_k = act(a_{k-1}), T_k = act'(a_{k-1}) dA_{k-1}: g_a_{k-1} = g_h act' + act'' sum_l g_T dA_{k-1}
        if k == 1:  # T_1 = s1 * W_0 implicit: with X[n, l, m] = sum_b s1[b, n] g_dA[b, l, m]
            W0, g_flat = layers[0][0], g_dA.reshape(B, -1)
            X = (s1.T @ g_flat).reshape(n_in, L, n_out)
            gW = hs[1].T @ g_a + np.einsum("ln,nlm->nm", W0, X)
            g_a = (g_a @ W.T) * s1 + s2 * (g_flat @ cache["K"].T)  # sum_l g_T1 W_0 with g_T1 = g_dA W_1^T
            g_dA = np.einsum("nm,nlm->ln", W, X)  # sum_b g_T1 s1 = g_dA_0 summed over rows
        else:
            gW = hs[k].T @ g_a + Ts[k].reshape(B * L, n_in).T @ g_dA.reshape(B * L, n_out)
            g_T = (g_dA.reshape(B * L, n_out) @ W.T).reshape(B, L, n_in)
            g_a = (g_a @ W.T) * s1 + s2 * np.einsum("bln,bln->bn", g_T, dAs[k - 1])
            g_dA = g_T * s1[:, None, :]
        grads.append((gW, gb))
    g_theta = np.concatenate([np.concatenate([gW.ravel(), gb]) for gW, gb in reversed(grads)])
    return g_theta, g_z


# ----------------------------------------------------------------------------- batched linear algebra

def metric(J, inv_var):
    """Fisher metric plus prior, ``M = J^T diag(inv_var) J + 1``.

    Parameters
    ----------
    J : ndarray, shape (B, C, L)
    inv_var : ndarray, shape (B, C)
        Inverse noise variance per row and channel (zero where a channel is missing).

    Returns
    -------
    M : ndarray, shape (B, L, L)
    """
    Jt = np.swapaxes(J, 1, 2)
    M = np.matmul(Jt * inv_var[:, None, :], J)
    M += np.eye(M.shape[-1])
    return M


def cholesky(M):
    """Lower Cholesky factor ``L`` of a batch of SPD matrices, ``M = L L^T``; shape (B, n, n)."""
    return np.linalg.cholesky(M)


def inv_lower(Lc):
    """Inverse of a batch of lower-triangular matrices by forward substitution.

    Parameters
    ----------
    Lc : ndarray, shape (B, n, n)

    Returns
    -------
    ndarray, shape (B, n, n)
        Lower triangular ``L^-1``.
    """
    Lt = np.ascontiguousarray(Lc.transpose(1, 2, 0))  # (n, n, B): elementwise work on contiguous rows
    n = Lt.shape[0]
    X = np.zeros_like(Lt)
    d = 1.0 / np.diagonal(Lt).T
    for i in range(n):  # row i of L X = 1:  X_i = (e_i - L_{i,<i} X_{<i}) / L_ii
        X[i, :i] = -np.einsum("kb,kjb->jb", Lt[i, :i], X[:i, :i]) * d[i]
        X[i, i] = d[i]
    return np.ascontiguousarray(X.transpose(2, 0, 1))


def solve_lower(Lc, y, trans=False):
    """Solve ``L x = y`` (or ``L^T x = y`` if ``trans``) for a batch of lower-triangular ``L``.

    Parameters
    ----------
    Lc : ndarray, shape (B, n, n)
    y : ndarray, shape (B, n) or (B, n, k)
    trans : bool

    Returns
    -------
    x : ndarray, same shape as ``y``
    """
    U = np.swapaxes(Lc, 1, 2) if trans else Lc
    x = np.array(y, dtype=np.result_type(Lc, y))
    vec = x.ndim == 2
    if vec:
        x = x[..., None]
    n = Lc.shape[1]
    for i in (range(n - 1, -1, -1) if trans else range(n)):  # substitution, one unknown row at a time
        s = slice(i + 1, n) if trans else slice(0, i)
        x[:, i] -= np.einsum("bk,bkj->bj", U[:, i, s], x[:, s])
        x[:, i] /= U[:, i, i, None]
    return x[..., 0] if vec else x


def logdet(Lc):
    """``log det M`` from its Cholesky factor; shape (B,)."""
    return 2.0 * np.log(np.diagonal(Lc, axis1=1, axis2=2)).sum(axis=1)


def covariance(M):
    """Covariance ``M^-1`` and marginal standard deviations of a batch of precision matrices.

    Returns
    -------
    cov : ndarray, shape (B, L, L)
    std : ndarray, shape (B, L)
    """
    Li = inv_lower(cholesky(M))
    cov = np.swapaxes(Li, 1, 2) @ Li
    return cov, np.sqrt(np.diagonal(cov, axis1=1, axis2=2))


# ----------------------------------------------------------------------------- posterior

class FisherGaussian(LatentPosterior):
    """FisherNet posterior ``q(z|d) = N(mu, M(mu)^-1)``; the encoder outputs ``mu`` only.

    Parameters
    ----------
    block_size : int
        Rows processed together (small blocks keep the (block, L, width) tangents in cache).
    cache_rows : int
        Keep the forward Jacobian caches for :meth:`backward` when the batch has at most this many
        rows (about 21 kB per row for a 10-64-64-35 decoder); recompute them otherwise.
    dtype : {"float64", "float32"}
        Of the decoder's Jacobian passes in training (forward and reverse, the cost of this
        posterior); the metric, its Cholesky factor, the draws, the KL and its derivatives, and
        :meth:`mean_and_cov` / :meth:`mean_and_std` (the products) are float64 always.
    """

    name = "fisher"

    def __init__(self, block_size=1024, cache_rows=8192, dtype="float64"):
        self.block_size = int(block_size)
        self.cache_rows = int(cache_rows)
        self.dtype = np.dtype(dtype)

    def n_encoder_outputs(self, latent_dim):
        """Number of encoder outputs per row: the mean only."""
        return latent_dim

    def _blocks(self, n):
        return [slice(i, min(i + self.block_size, n)) for i in range(0, n, self.block_size)]

    @classmethod
    def from_architecture(cls, arch):
        """The family with its Jacobian passes in ``arch.fisher_dtype`` (None: ``arch.dtype``)."""
        return cls(dtype=arch.fisher_dtype or arch.dtype)

    def _precision(self, mu, decoder, theta_dec, inv_var, dtype=np.float64):
        """``M(mu)`` (float64) and the cache of the Jacobian pass (computed in ``dtype``)."""
        _, J, cache = jacobian_forward(np.asarray(theta_dec, dtype), decoder.sizes, decoder.activation,
                                       mu.astype(dtype, copy=False))
        return metric(J.astype(np.float64, copy=False), inv_var), cache

    # -- what a family of precisions built on M(mu) changes (here: nothing) ----------------------
    def _split(self, enc_out):
        """The encoder output as the mean (B, L) and the family's other outputs (None here)."""
        return np.asarray(enc_out, dtype=float), None

    def _adjust(self, precision_and_cache, extra, s):
        """``((P, cache), aux)``: the precision of rows ``s`` from ``M(mu)`` (here ``P = M``)."""
        return precision_and_cache, None

    def _block_precision(self, mu, extra, s, decoder, theta_dec, inv_var, dtype=np.float64):
        """``((P, cache), aux)`` of the rows ``s``: :meth:`_precision` then :meth:`_adjust`."""
        return self._adjust(self._precision(mu[s], decoder, theta_dec, inv_var[s], dtype), extra, s)

    def _adjust_back(self, G, aux, g_extra):
        """The cotangent of ``M`` from that of ``P`` (here the same); a family appends the
        gradients of its other outputs for the block to ``g_extra``."""
        return G

    def _join(self, g_mu, g_extra):
        """The gradient of the encoder output (here of the mean only)."""
        return g_mu

    def forward(self, enc_out, xi, decoder, theta_dec, inv_var):
        """Draw ``z = mu + L^-T xi`` and the analytic KL to the prior.

        Parameters
        ----------
        enc_out : ndarray, shape (B, L)
            Encoder output, the mean ``mu``.
        xi : ndarray, shape (B, L)
            Standard normal draws.
        decoder : object
            With attributes ``sizes`` and ``activation``.
        theta_dec : ndarray, shape (n_params,)
        inv_var : ndarray, shape (B, C)

        Returns
        -------
        z : ndarray, shape (B, L)
        kl : ndarray, shape (B,)
            ``KL[N(mu, M^-1) || N(0, 1)] = (tr M^-1 + |mu|^2 - L + log det M) / 2``.
        ctx : dict
            For :meth:`backward`.
        """
        (mu, extra), xi, inv_var = self._split(enc_out), np.asarray(xi, dtype=float), np.asarray(inv_var, dtype=float)
        theta_dec = np.array(theta_dec, dtype=self.dtype)  # a copy: backward must see the same decoder
        B, L = mu.shape
        z, kl, Linv, caches, auxes = np.empty_like(mu), np.empty(B), np.empty((B, L, L)), [], []
        for s in self._blocks(B):
            (M, cache), aux = self._block_precision(mu, extra, s, decoder, theta_dec, inv_var, self.dtype)
            auxes.append(aux)
            Lc = cholesky(M)
            Li = inv_lower(Lc)
            z[s] = mu[s] + np.einsum("bji,bj->bi", Li, xi[s])  # L^-T xi
            kl[s] = STANDARD_NORMAL.kl_precision(mu[s], Li, logdet(Lc))[0]
            Linv[s] = Li
            caches.append(cache if B <= self.cache_rows else None)
        ctx = dict(mu=mu, xi=xi, inv_var=inv_var, decoder=decoder, theta=theta_dec, Linv=Linv, caches=caches,
                   aux=auxes)
        return z, kl, ctx

    def backward(self, ctx, g_z, g_kl):
        """Full gradient of ``sum(g_z * z) + sum(g_kl * kl)``.

        Returns
        -------
        g_enc_out : ndarray, shape (B, L)
        g_theta_dec : ndarray, shape (n_params,)
        g_inv_var : ndarray, shape (B, C)
        """
        mu, xi, inv_var, Linv = (ctx[k] for k in ("mu", "xi", "inv_var", "Linv"))
        dec, theta = ctx["decoder"], ctx["theta"]
        B, L = mu.shape
        g_z = np.asarray(g_z, dtype=float)
        g_kl = np.broadcast_to(np.asarray(g_kl, dtype=float), (B,))
        g_mu = g_z.copy()  # z = mu + s; the KL's d/dmu is added per block
        g_iv, g_theta = np.empty_like(inv_var), np.zeros(np.size(theta))
        low = np.tri(L, k=-1) + 0.5 * np.eye(L)  # Phi: lower triangle, halved diagonal
        g_extra = []
        for s, cache, aux in zip(self._blocks(B), ctx["caches"], ctx["aux"]):
            if cache is None:
                cache = jacobian_forward(theta, dec.sizes, dec.activation, mu[s].astype(theta.dtype))[2]
            Li, Jt = Linv[s], cache["Jt"]
            dt = Jt.dtype
            LiT = np.ascontiguousarray(Li.transpose(0, 2, 1))  # contiguous: numpy's fast batched matmul
            # kl: G_kl = dKL/dM = L^-T Q_kl L^-1 with Q_kl from the prior (M^-1 = L^-T L^-1)
            _, d_mu, q_kl = STANDARD_NORMAL.kl_precision(mu[s], Li, 0.0)
            g_mu[s] += g_kl[s, None] * d_mu
            Q = g_kl[s, None, None] * q_kl
            # z = mu + L^-T xi: g_L = -tril(L^-T xi u^T), u = L^-1 g_z; Murray's G = L^-T Phi(L^T g_L) L^-1
            #     symmetrised, and Phi(L^T g_L) = Phi(-xi u^T) since L^T L^-T xi = xi
            u = np.einsum("bij,bj->bi", Li, g_z[s])
            P = -(xi[s, :, None] * u[:, None, :]) * low
            Q += 0.5 * (P + P.transpose(0, 2, 1))
            G = LiT @ Q @ Li  # G_kl + G_sample
            G = self._adjust_back(G, aux, g_extra)  # the cotangent of J^T N J + 1
            # M = J^T N J + 1: g_J = 2 N J G, g_N_c = (J G J^T)_cc  (in the (B, L, C) layout, G symmetric)
            GJt = G.astype(dt, copy=False) @ Jt
            g_iv[s] = np.einsum("blc,blc->bc", Jt, GJt)
            GJt *= 2.0 * inv_var[s, None, :].astype(dt)
            gt, gm = jacobian_backward(cache, None, GJt.transpose(0, 2, 1))
            g_theta += gt
            g_mu[s] += gm
        return self._join(g_mu, g_extra), g_theta, g_iv

    def mean_and_cov(self, enc_out, decoder, theta_dec, inv_var):
        """Posterior mean and covariance.

        Returns
        -------
        mu : ndarray, shape (B, L)
        cov : ndarray, shape (B, L, L)
            ``M(mu)^-1``.
        """
        (mu, extra), inv_var = self._split(enc_out), np.asarray(inv_var, dtype=float)
        cov = np.empty(mu.shape + mu.shape[-1:])
        for s in self._blocks(mu.shape[0]):
            (P, _), _ = self._block_precision(mu, extra, s, decoder, theta_dec, inv_var)
            cov[s] = covariance(P)[0]
        return mu.copy(), cov

    def mean_and_std(self, enc_out, decoder, theta_dec, inv_var):
        """Posterior mean and marginal standard deviations, both (B, L); the (B, L, L) covariance
        exists one block of :attr:`block_size` rows at a time."""
        (mu, extra), inv_var = self._split(enc_out), np.asarray(inv_var, dtype=float)
        std = np.empty(mu.shape)
        for s in self._blocks(mu.shape[0]):
            (P, _), _ = self._block_precision(mu, extra, s, decoder, theta_dec, inv_var)
            std[s] = covariance(P)[1]
        return mu.copy(), std



class ScaledFisherGaussian(FisherGaussian):
    """``q(z|d) = N(mu, P^-1)`` with ``P = c J^T N^-1 J + diag(D)``: the Fisher family and the
    diagonal one in one (``c = 0``: a diagonal Gaussian; ``c = 1, D = 1``: :class:`FisherGaussian`).

    The encoder outputs ``[mu (L), log c (1), log sqrt(D) (L)]``; outputs near 0 start at the
    Fisher posterior. ``J`` at ``mu`` as in :class:`FisherGaussian` (same settings).
    """

    name = "fisher-scaled"

    def n_encoder_outputs(self, latent_dim):
        """Number of encoder outputs per row: mean, log scale, log standard deviations."""
        return 2 * int(latent_dim) + 1

    def _split(self, enc_out):
        enc_out = np.asarray(enc_out, dtype=float)
        L = (enc_out.shape[1] - 1) // 2
        if enc_out.ndim != 2 or enc_out.shape[1] != 2 * L + 1:
            raise ValueError(f"enc_out must be (B, 2L + 1), got {enc_out.shape}")
        return enc_out[:, :L], (np.exp(enc_out[:, L]), np.exp(2.0 * enc_out[:, L + 1:]))

    def _adjust(self, precision_and_cache, extra, s):
        (M, cache), (c, D) = precision_and_cache, (extra[0][s], extra[1][s])
        M0 = M - np.eye(M.shape[-1])  # J^T N^-1 J
        P = c[:, None, None] * M0
        idx = np.arange(M.shape[-1])
        P[:, idx, idx] += D
        return (P, cache), (c, D, M0)

    def _adjust_back(self, G, aux, g_extra):
        c, D, M0 = aux
        g_extra.append(np.column_stack([c * np.einsum("bij,bij->b", G, M0),
                                        2.0 * D * np.diagonal(G, axis1=1, axis2=2)]))
        return c[:, None, None] * G

    def _join(self, g_mu, g_extra):
        return np.concatenate([g_mu, np.concatenate(g_extra)], axis=1)
