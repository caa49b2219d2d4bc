"""Exact block-diagonal metrics for NIFTy's MGVI/geoVI on per-pixel latents.

With the decoder and the noise held fixed, every metric NIFTy's KL machinery uses for the latents
is block-diagonal with one L x L block per row (pixel): the posterior metric ``M_i = J_i^T N^-1 J_i
+ 1`` (MGVI samples, the sampled KL's metric as the average of ``M`` over the samples) and the
metric ``T_i^T T_i`` of geoVI's non-linear sample update (``T_i = 1 + J_i(x0)^T N^-1 J_i(x)``).
:class:`BlockDiagonalMetric` holds the blocks with their Cholesky factors and gives NIFTy an
exact inverse and exact inverse sampling (no conjugate gradients); :class:`BlockNewton` is a NIFTy
``DescentMinimizer`` whose Newton direction is the exact inverse of such a metric.

The rows of the sampled KL are independent, but NIFTy's line search takes one step length for
their sum: one badly conditioned row (a pixel the decoder fits poorly, where the Fisher metric is
far from the Hessian) shortens the step of all the others, and the minimisation crawls (measured
on the real maps at nside 32: 50 Newton steps, the iteration limit, against about 10 needed by
almost every row). :class:`SampledKLRows` therefore gives :class:`BlockNewton` the sampled KL
row by row (energies and metric blocks, recomputed only for rows that moved): each row's Newton
step is backtracked on its own energy (Armijo) before NIFTy's line search sees the direction,
which then accepts the full step, and rows whose Newton decrement is negligible are held fixed
(no step, no new Jacobians).

Draws are keyed by global row index: standard normals for global rows ``[k c, (k + 1) c)``
(``c = ROW_CHUNK``) come from ``default_rng([key, k])`` with ``key`` drawn from NIFTy's current
random state, so they do not depend on how the rows are split over MPI ranks.
"""
import numpy as np
import nifty8 as ift

from ..model.fisher import jacobian_forward, solve_lower
from ..model.mlp import MLP

__all__ = ["ROW_CHUNK", "FREEZE", "REFRESH", "row_keyed_normal", "backtrack_rows", "BlockDiagonalMetric", "BlockNewton",
           "LatentMetrics", "SampledKLRows"]

#: Rows per independent random stream of :func:`row_keyed_normal`.
ROW_CHUNK = 1024

#: :class:`BlockNewton` with row energies: a row whose squared Newton decrement ``g_i^T G_i^-1 g_i``
#: is below this takes no step (it is within ~1e-5 posterior sigma of its optimum, ~5e-11 nats).
FREEZE = 1e-10

#: :class:`SampledKLRows`: a row's metric blocks are recomputed once it has moved by more than
#: ``sqrt(REFRESH)`` (0.1) posterior sigma since they were computed.
REFRESH = 1e-2


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
    row_energy : callable, optional
        ``row_energy(energy, rows, step)``: the energy of each of the rows ``rows`` (index array)
        at ``energy.position`` plus ``step`` (shape (len(rows), L); None: no step), the energy
        being the sum of these over all rows. If given, every row's Newton step is backtracked
        on its own energy until it satisfies the Armijo condition (see Notes), and rows whose
        squared Newton decrement ``g_i^T G_i^-1 g_i`` is at most ``freeze`` take no step.
    freeze : float
        See ``row_energy``; default :data:`FREEZE`.
    c1 : float
        Armijo constant of the per-row backtracking (NIFTy's line search uses 1e-4 as well).
    max_backtracks : int
        A row still failing the Armijo condition after this many reductions takes no step.

    Notes
    -----
    NIFTy's ``NewtonCG`` finds the same direction with conjugate gradients on ``energy.metric``;
    here the metric's blocks are built directly and inverted by Cholesky.

    With ``row_energy`` the direction is ``alpha_i p_i`` per row, ``alpha_i`` from backtracking
    (quadratic interpolation, reductions by 2 to 10 per round) with ``E_i(alpha_i) <= E_i(0) + c1
    alpha_i g_i . p_i``. Summed over rows this is the Armijo condition of the whole energy at step
    1, so NIFTy's line search (still the judge, on the whole energy) normally accepts its first
    trial: one energy and gradient evaluation per Newton step. The per-row energies cost one
    forward pass of the decoder per sample, and further passes only for the rows backtracking.
    """

    def __init__(self, controller, metric_of, damping=0.0, line_searcher=None, row_energy=None,
                 freeze=FREEZE, c1=1e-4, max_backtracks=30):
        super().__init__(controller, ift.LineSearch(preferred_initial_step_size=1.)
                         if line_searcher is None else line_searcher)
        self._metric_of = metric_of
        self._damping = float(damping)
        self._row_energy = row_energy
        self._freeze, self._c1, self._max_bt = float(freeze), float(c1), int(max_backtracks)

    def get_descent_direction(self, energy, old_value=None):
        met, g = self._metric_of(energy), energy.gradient
        (k, f), = g.items()
        gv = f.val
        if self._damping:  # Levenberg-Marquardt, per row: (G_i + c |g_i| 1) p_i = -g_i
            gn = np.sqrt(np.einsum("pi,pi->p", gv, gv))
            met = BlockDiagonalMetric(met.domain, met.blocks + (self._damping * gn)[:, None, None]
                                      * np.eye(f.shape[-1]))
        if self._row_energy is None:
            return -met.inverse_times(g)
        p = -met.inverse_solve(gv)
        slope = np.einsum("pi,pi->p", gv, p)  # minus the squared Newton decrement per row
        p *= self.row_steps(energy, p, slope)[:, None]
        return ift.MultiField.from_dict({k: ift.makeField(f.domain, p)}, g.domain)

    def row_steps(self, energy, p, slope):
        """Per-row step lengths ``alpha_i`` in [0, 1] along the Newton steps ``p`` (rows, L).

        Parameters
        ----------
        energy : Energy
        p : ndarray, shape (rows, L)
        slope : ndarray, shape (rows,)
            ``g_i . p_i`` (negative for a descent direction).

        Returns
        -------
        ndarray, shape (rows,)
            0 for rows with ``-slope <= freeze`` (or no descent), else the first backtracking
            step satisfying the Armijo condition on the row's own energy.
        """
        alpha = np.zeros(p.shape[0])
        todo = np.flatnonzero(-slope > self._freeze)
        if todo.size:
            alpha[todo] = backtrack_rows(
                lambda i, a: self._row_energy(energy, todo[i], a[:, None] * p[todo[i]]),
                self._row_energy(energy, todo, None), slope[todo], np.ones(todo.size), self._c1, self._max_bt)
        return alpha


def backtrack_rows(trial, e0, slope, a, c1, max_backtracks):
    """Armijo backtracking for many independent rows at once.

    Row ``i`` takes the first step length with ``E_i(alpha) - E_i(0) <= c1 alpha slope_i``, trying
    ``a_i`` first, then the minimum of the parabola through ``E_i(0)``, ``E_i'(0) = slope_i`` and
    the last trial, clipped to [0.1, 0.5] times the last step length.

    Parameters
    ----------
    trial : callable
        ``trial(rows, a) -> energies``: the energies, shape (len(rows),), of the rows ``rows``
        (indices into ``e0``) at step lengths ``a``; called once per backtracking round with the
        rows not yet accepted (a row's last call is the accepted step's).
    e0 : ndarray, shape (n,)
        Energies at step length 0.
    slope : ndarray, shape (n,)
        Derivatives along the unit step (negative for a descent direction).
    a : ndarray, shape (n,)
        First step lengths.
    c1 : float
        Armijo constant.
    max_backtracks : int
        Most rounds.

    Returns
    -------
    ndarray, shape (n,)
        The accepted step lengths; 0 where none passed (or the energy was NaN).
    """
    alpha = np.zeros(len(e0))
    todo, a, sl, e0 = np.arange(len(e0)), np.array(a, np.float64), np.asarray(slope), np.asarray(e0)
    for _ in range(max_backtracks):
        if not todo.size:
            break
        d = trial(todo, a) - e0
        ok = d <= c1 * a * sl  # False for NaN
        alpha[todo[ok]] = a[ok]
        if ok.all():
            break
        bad = ~ok
        a, sl, d, todo, e0 = a[bad], sl[bad], d[bad], todo[bad], e0[bad]
        with np.errstate(all="ignore"):  # minimum of the parabola through E(0), E'(0), E(a)
            t = -sl * a * a / (2.0 * (d - sl * a))
        a = np.clip(np.where(np.isfinite(t), t, 0.5 * a), 0.1 * a, 0.5 * a)
    return alpha


class LatentMetrics:
    """Per-row metric blocks and energies of the latents for a fixed decoder and noise.

    Parameters
    ----------
    decoder : MLP
    theta : ndarray
        Decoder parameters (not excitations).
    inv_var : ndarray, shape (rows, C)
        Inverse noise variance, zero where a channel is missing.
    data : ndarray, shape (rows, C), optional
        The data (arbitrary where missing); needed by :meth:`energies` only.
    block_size : int
        Rows per Jacobian pass.
    """

    def __init__(self, decoder, theta, inv_var, data=None, block_size=1024):
        self._dec, self._theta = decoder, np.asarray(theta, np.float64)
        self._iv = np.asarray(inv_var, np.float64)
        self._data = None if data is None else np.asarray(data, np.float64)
        self._bs = int(block_size)
        self._mlp = self._weights = None

    def _blocks(self, n):
        return [slice(i, min(i + self._bs, n)) for i in range(0, n, self._bs)]

    def _jac(self, z):
        return jacobian_forward(self._theta, self._dec.sizes, self._dec.activation, z)[1]

    def _rows(self, a, rows):
        return a if rows is None else a[rows]

    def posterior(self, z, rows=None):
        """``M_i = J_i^T N_i^-1 J_i + 1`` at latents ``z`` (n, L); shape (n, L, L).

        ``rows`` (index array of length n): the rows ``z`` belongs to (default: all, in order).
        """
        P, L = z.shape
        iv = self._rows(self._iv, rows)
        out = np.empty((P, L, L))
        for s in self._blocks(P):
            J = self._jac(z[s])
            out[s] = np.matmul(np.swapaxes(J, 1, 2) * iv[s, None, :], J)
        out += np.eye(L)
        return out

    def energies(self, z, rows=None):
        """Per-row energy ``0.5 sum_c N_ic^-1 (d_ic - f(z_i)_c)^2 + 0.5 |z_i|^2`` (n,).

        The likelihood's and the prior's terms of NIFTy's Hamiltonian without the constants,
        computed in float64 whatever the decoder's compute dtype. ``z`` (n, L) and ``rows`` as for
        :meth:`posterior`.
        """
        if self._data is None:
            raise ValueError("LatentMetrics without data has no energies")
        if self._mlp is None:
            self._mlp = MLP(self._dec.sizes, self._dec.activation, self._bs, np.float64)
            self._weights = self._mlp.prepare(self._theta)
        r = self._mlp.forward(self._weights, z)
        r -= self._rows(self._data, rows)
        return 0.5 * (np.einsum("pc,pc,pc->p", r, r, self._rows(self._iv, rows)) + np.einsum("pl,pl->p", z, z))

    def energies_and_gradients(self, z, rows=None):
        """:meth:`energies` and their gradients with respect to ``z``, (n,) and (n, L).

        One fused forward and reverse pass of the decoder in float64 (the residual's loss is
        applied block by block inside the pass, as in
        :class:`~galdecomp.model.operators.DecoderLikelihood`).
        """
        if self._data is None:
            raise ValueError("LatentMetrics without data has no energies")
        if self._mlp is None:
            self.energies(z[:0], np.arange(0))
        d, iv = self._rows(self._data, rows), self._rows(self._iv, rows)
        e = np.empty(len(z))

        def g_y(y, sl):
            y -= d[sl]
            r = y * iv[sl]
            e[sl] = 0.5 * np.einsum("pc,pc->p", r, y)
            return r

        _, _, g = self._mlp.vjp(self._weights, z, g_y, want_theta=False, want_x=True, return_y=False)
        e += 0.5 * np.einsum("pl,pl->p", z, z)
        g += z
        return e, g

    def outputs_and_jacobians(self, z):
        """Decoder outputs ``f(z)`` (n, C) and Jacobians ``J(z)`` (n, C, L) at latents ``z`` (n, L)."""
        n, C = len(z), self._iv.shape[1]
        f, J = np.empty((n, C)), np.empty((n, C, z.shape[1]))
        for s in self._blocks(n):
            f[s], J[s], _ = jacobian_forward(self._theta, self._dec.sizes, self._dec.activation, z[s])
        return f, J

    def pullback(self, z0, rows=None):
        """``A_i = J_i(z0)^T N_i^-1``, shape (n, L, C): geoVI's transformation ``g(z) = z + A f(z)``
        at expansion point ``z0`` (n, L); ``rows`` as for :meth:`posterior`."""
        iv = self._rows(self._iv, rows)
        A = np.empty(z0.shape + iv.shape[1:])
        for s in self._blocks(len(z0)):
            A[s] = np.swapaxes(self._jac(z0[s]), 1, 2) * iv[s, None, :]
        return A

    def geometric(self, z0):
        """The metric of geoVI's non-linear sample update for expansion point ``z0`` (rows, L).

        Returns
        -------
        callable
            ``z -> T^T T`` per row, shape (rows, L, L), with ``T_i = 1 + J_i(z0)^T N_i^-1 J_i(z)``;
            ``J(z0)^T N^-1`` (rows x L x C) is computed once, here.
        """
        P, L = z0.shape
        A = self.pullback(z0)

        def blocks(z):
            out = np.empty((P, L, L))
            for s in self._blocks(P):
                T = np.matmul(A[s], self._jac(z[s]))
                T += np.eye(L)
                out[s] = np.matmul(np.swapaxes(T, 1, 2), T)
            return out

        return blocks


class SampledKLRows:
    """NIFTy's sampled KL of the latents (``SampledKLEnergy``) row by row, for :class:`BlockNewton`.

    The KL at mean ``m`` is ``sum_i KL_i``, ``KL_i = mean_k E_i(m_i + r_ik)`` over the samples'
    residuals ``r_k`` (fixed during one KL minimisation) and its metric has the blocks ``G_i =
    mean_k M_i(m_i + r_ik)``. The energies are kept for the current position and recomputed for
    the rows whose mean moved since the last call. The metric blocks (one Jacobian pass per
    sample: the expensive part) are recomputed only for rows that moved by more than
    ``sqrt(refresh)`` in the norm of their blocks since the blocks were computed; the other rows
    keep them (a chord step: the Gauss-Newton metric is only a preconditioner of the exact
    gradient, so the optimum does not change, and near it the steps are small). Use one instance
    per set of samples (per ``SampledKLEnergy``).

    Parameters
    ----------
    metrics : LatentMetrics
        With data (for the energies).
    domain : MultiDomain
        One key, the latents (rows, L).
    refresh : float
        Squared displacement, in the metric's norm (posterior sigma squared), beyond which a
        row's blocks are recomputed; default :data:`REFRESH`. 0: at every move (the exact
        sampled-KL metric at every step).
    row_energies : callable, optional
        ``row_energies(z)``: per-row energies (rows,) at a whole sample position ``z`` (rows, L),
        e.g. :meth:`~galdecomp.inference.mgvi.BlockMetricHamiltonian.row_energies`, whose cache
        already holds them for the positions NIFTy evaluated. Default: ``metrics.energies``.
    """

    def __init__(self, metrics, domain, refresh=None, row_energies=None):
        self._m = metrics
        self._row_energies = row_energies
        self._dom = ift.MultiDomain.make(domain)
        self._key = next(iter(self._dom.keys()))
        self._refresh = REFRESH if refresh is None else float(refresh)
        self._pos = self._ref = self._blocks = self._energy = self._samples = None
        #: Rows whose blocks were (re)computed, summed over the calls.
        self.rows_computed = 0

    def _update(self, energy):
        m = energy.position[self._key].val
        if m is self._pos:
            return
        S = np.stack([s[self._key].val for s in energy.samples.iterator()])  # (S, rows, L)
        if self._pos is None:
            moved = stale = np.arange(m.shape[0])
            self._blocks, self._energy = np.empty(m.shape + m.shape[-1:]), np.empty(m.shape[0])
            self._ref = m.copy()
        else:
            moved = np.flatnonzero(np.any(m != self._pos, axis=1))
            d = m[moved] - self._ref[moved]
            stale = moved[np.einsum("pi,pij,pj->p", d, self._blocks[moved], d) > self._refresh]
        if stale.size:
            acc = 0.0
            for s in S:
                acc = acc + self._m.posterior(s[stale], stale)
            self._blocks[stale] = acc / len(S)
            self._ref[stale] = m[stale]
            self.rows_computed += stale.size
        if moved.size and self._row_energies is not None:
            self._energy[moved] = np.mean([self._row_energies(s)[moved] for s in S], axis=0)
        elif moved.size:
            self._energy[moved] = self._mean_energy(S[:, moved], moved)
        self._pos, self._samples = m, S

    def _mean_energy(self, s, rows):
        n, L = s.shape[1:]
        return self._m.energies(s.reshape(-1, L), np.tile(rows, len(s))).reshape(len(s), n).mean(0)

    def metric(self, energy):
        """The sampled KL's metric at ``energy.position`` as a :class:`BlockDiagonalMetric`."""
        self._update(energy)
        return BlockDiagonalMetric(self._dom, self._blocks.copy())

    def energies(self, energy, rows, step=None):
        """``KL_i`` of the rows ``rows`` at ``energy.position`` (+ ``step``, shape (len(rows), L))."""
        self._update(energy)
        if step is None:
            return self._energy[rows]
        return self._mean_energy(self._samples[:, rows] + step, rows)
