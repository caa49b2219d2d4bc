"""Exact block-diagonal metrics for NIFTy's MGVI/geoVI on per-pixel latents.

With the decoder and the noise held fixed, every metric NIFTy's KL machinery uses for the latents
is block-diagonal with one L x L block per row (pixel): the posterior metric ``M_i = J_i^T N^-1 J_i
+ 1`` (MGVI samples, the sampled KL's metric as the average of ``M`` over the samples) and the
metric ``T_i^T T_i`` of geoVI's non-linear sample update (``T_i = 1 + J_i(x0)^T N^-1 J_i(x)``).
:class:`BlockDiagonalMetric` holds the blocks with their Cholesky factors and gives NIFTy an
exact inverse and exact inverse sampling (no conjugate gradients); :class:`BlockNewton` is a NIFTy
``DescentMinimizer`` whose Newton direction is the exact inverse of such a metric.

Draws are keyed by global row index: standard normals for global rows ``[k c, (k + 1) c)``
(``c = ROW_CHUNK``) come from ``default_rng([key, k])`` with ``key`` drawn from NIFTy's current
random state, so they do not depend on how the rows are split over MPI ranks.
"""
import numpy as np
import nifty8 as ift

from ..model.fisher import jacobian_forward, solve_lower

__all__ = ["ROW_CHUNK", "row_keyed_normal", "BlockDiagonalMetric", "BlockNewton", "LatentMetrics"]

#: Rows per independent random stream of :func:`row_keyed_normal`.
ROW_CHUNK = 1024


def row_keyed_normal(key, offset, n_rows, width, chunk=ROW_CHUNK):
    """Standard normals for the global rows ``offset .. offset + n_rows - 1``.

    Row ``g`` gets row ``g % chunk`` of ``default_rng([key, g // chunk]).standard_normal((chunk,
    width))``: the same numbers whatever the split of the rows over ranks.

    Returns
    -------
    ndarray, shape (n_rows, width)
    """
    out = np.empty((n_rows, width))
    for k in range(offset // chunk, (offset + n_rows - 1) // chunk + 1 if n_rows else offset // chunk):
        lo = k * chunk
        z = np.random.default_rng([int(key), k]).standard_normal((chunk, width))
        a, b = max(lo, offset), min(lo + chunk, offset + n_rows)
        out[a - offset:b - offset] = z[a - lo:b - lo]
    return out


def _new_key():
    """A stream key from NIFTy's current random state (the same on every rank for the same seed)."""
    return int(ift.random.current_rng().integers(0, 2 ** 63))


class BlockDiagonalMetric(ift.EndomorphicOperator):
    """SPD operator with one L x L block per row, exact inverse and exact (inverse) sampling.

    Parameters
    ----------
    domain : MultiDomain
        One key whose field has shape (rows, L).
    blocks : ndarray, shape (rows, L, L)
        Symmetric positive definite blocks.
    offset : int
        Global index of the first row (for the row-keyed draws).
    nifty_draw : callable, optional
        If given, ``draw_sample`` / ``special_draw_sample`` take ``y ~ N(0, M)`` from it (NIFTy's
        own random numbers, as its ``SamplingEnabler`` draws them) instead of the row-keyed
        ``y = C xi`` (``M = C C^T``); the inverse sample is ``M^-1 y`` either way.

    Notes
    -----
    ``special_draw_sample(True)`` returns ``(y, M^-1 y)``, the pair NIFTy's ``draw_samples``
    asks the metric for; ``draw_sample(from_inverse=True)`` is ``C^-T xi``.
    """

    def __init__(self, domain, blocks, offset=0, nifty_draw=None):
        self._domain = ift.MultiDomain.make(domain)
        if len(self._domain.keys()) != 1:
            raise ValueError("BlockDiagonalMetric needs a MultiDomain with one key")
        self._key = next(iter(self._domain.keys()))
        shape = self._domain[self._key].shape
        if blocks.shape != shape + shape[-1:]:
            raise ValueError(f"blocks of shape {blocks.shape} do not fit a field of shape {shape}")
        self._capability = self.TIMES | self.ADJOINT_TIMES | self.INVERSE_TIMES | self.ADJOINT_INVERSE_TIMES
        self._blocks = blocks
        self._chol_ = None
        self._offset = int(offset)
        self._nifty_draw = nifty_draw

    @property
    def blocks(self):
        return self._blocks

    @property
    def _chol(self):
        """Lower Cholesky factors of the blocks (computed on first use)."""
        if self._chol_ is None:
            self._chol_ = np.linalg.cholesky(self._blocks)
        return self._chol_

    def _field(self, v):
        return ift.MultiField.from_dict({self._key: ift.makeField(self._domain[self._key], v)}, self._domain)

    def inverse_solve(self, v):
        """``M^-1 v`` for an array ``v`` of shape (rows, L)."""
        return solve_lower(self._chol, solve_lower(self._chol, v), trans=True)

    def apply(self, x, mode):
        self._check_input(x, mode)
        v = x[self._key].val
        if mode & (self.TIMES | self.ADJOINT_TIMES):
            return self._field(np.einsum("pij,pj->pi", self._blocks, v))
        return self._field(self.inverse_solve(v))

    def _pair(self):
        """``(y, M^-1 y)`` with ``y ~ N(0, M)``."""
        if self._nifty_draw is not None:
            y = self._nifty_draw()
            return y, self._field(self.inverse_solve(y[self._key].val))
        xi = row_keyed_normal(_new_key(), self._offset, *self._domain[self._key].shape)
        return (self._field(np.einsum("pij,pj->pi", self._chol, xi)),
                self._field(solve_lower(self._chol, xi, trans=True)))

    def special_draw_sample(self, from_inverse=False):
        """``(y, M^-1 y)`` with ``y ~ N(0, M)`` (the interface of NIFTy's ``SamplingEnabler``)."""
        if not from_inverse:
            raise ValueError("from_inverse must be True here")
        return self._pair()

    def draw_sample(self, from_inverse=False):
        y, yi = self._pair()
        return yi if from_inverse else y

    def __repr__(self):
        return f"BlockDiagonalMetric({self._blocks.shape})"


class BlockNewton(ift.DescentMinimizer):
    """Newton's method whose direction ``-G^-1 g`` uses an exact block-diagonal metric ``G``.

    Parameters
    ----------
    controller : IterationController
    metric_of : callable
        ``metric_of(energy)`` returns the energy's metric as a :class:`BlockDiagonalMetric`.
    damping : float
        ``c``: solve ``(G_i + c |g_i| 1) p_i = -g_i`` per row (Levenberg-Marquardt with a damping
        that vanishes at the solution), so that a row far from its solution takes a shorter,
        more gradient-like step instead of shortening every row's step in the line search over
        their sum. 0: plain Newton.
    line_searcher : LineSearch, optional
        Default ``LineSearch(preferred_initial_step_size=1.)``, as for NIFTy's ``NewtonCG``.

    Notes
    -----
    NIFTy's ``NewtonCG`` finds the same direction with conjugate gradients on ``energy.metric``;
    here the metric's blocks are built directly and inverted by Cholesky.
    """

    def __init__(self, controller, metric_of, damping=0.0, line_searcher=None):
        super().__init__(controller, ift.LineSearch(preferred_initial_step_size=1.)
                         if line_searcher is None else line_searcher)
        self._metric_of = metric_of
        self._damping = float(damping)

    def get_descent_direction(self, energy, old_value=None):
        met, g = self._metric_of(energy), energy.gradient
        if self._damping:  # Levenberg-Marquardt, per row: (G_i + c |g_i| 1) p_i = -g_i
            (k, f), = g.items()
            gn = np.sqrt(np.einsum("pi,pi->p", f.val, f.val))
            met = BlockDiagonalMetric(met.domain, met.blocks + (self._damping * gn)[:, None, None]
                                      * np.eye(f.shape[-1]))
        return -met.inverse_times(g)


class LatentMetrics:
    """Per-row metric blocks of the latents for a fixed decoder and noise.

    Parameters
    ----------
    decoder : MLP
    theta : ndarray
        Decoder parameters (not excitations).
    inv_var : ndarray, shape (rows, C)
        Inverse noise variance, zero where a channel is missing.
    block_size : int
        Rows per Jacobian pass.
    """

    def __init__(self, decoder, theta, inv_var, block_size=1024):
        self._dec, self._theta = decoder, np.asarray(theta, np.float64)
        self._iv = np.asarray(inv_var, np.float64)
        self._bs = int(block_size)

    def _blocks(self, n):
        return [slice(i, min(i + self._bs, n)) for i in range(0, n, self._bs)]

    def _jac(self, z):
        return jacobian_forward(self._theta, self._dec.sizes, self._dec.activation, z)[1]

    def posterior(self, z):
        """``M_i = J_i^T N_i^-1 J_i + 1`` at latents ``z`` (rows, L); shape (rows, L, L)."""
        P, L = z.shape
        out = np.empty((P, L, L))
        for s in self._blocks(P):
            J = self._jac(z[s])
            out[s] = np.matmul(np.swapaxes(J, 1, 2) * self._iv[s, None, :], J)
        out += np.eye(L)
        return out

    def geometric(self, z0):
        """The metric of geoVI's non-linear sample update for expansion point ``z0`` (rows, L).

        Returns
        -------
        callable
            ``z -> T^T T`` per row, shape (rows, L, L), with ``T_i = 1 + J_i(z0)^T N_i^-1 J_i(z)``;
            ``J(z0)^T N^-1`` (rows x L x C) is computed once, here.
        """
        P, L = z0.shape
        A = np.empty((P, L, self._iv.shape[1]))
        for s in self._blocks(P):
            A[s] = np.swapaxes(self._jac(z0[s]), 1, 2) * self._iv[s, None, :]

        def blocks(z):
            out = np.empty((P, L, L))
            for s in self._blocks(P):
                T = np.matmul(A[s], self._jac(z[s]))
                T += np.eye(L)
                out[s] = np.matmul(np.swapaxes(T, 1, 2), T)
            return out

        return blocks
