"""geoVI's samples of the per-pixel latents, exact and row by row.

Shapes: ``P`` rows (pixels), ``L`` latents, ``C`` channels; ``S`` draws (pairs of samples).

geoVI (Frank, Leike & Enßlin 2021) places a sample around the expansion point ``m`` by solving

    ``g(x) = g(m) + y``,  ``g(x) = x + A f(x)``,  ``A = J(m)^T N^-1``  (L x C per row)

for ``x``, with ``y ~ N(0, M)``, ``M = J(m)^T N^-1 J(m) + 1`` the posterior metric at ``m``,
starting at the linear (MGVI) sample ``x = m + M^-1 y``; the mirrored sample solves it for ``-y``.
NIFTy's ``draw_samples`` solves it for all rows at once: conjugate gradients for ``M^-1 y``, then
a minimiser of ``0.5 |g(x) - g(m) - y|^2`` summed over the rows, whose single line search waits
for the worst-conditioned pixel (on the real maps at nside 64 its updates stopped at their
iteration limit with most rows far from the solution, and the sampled KL built on them did not
converge in 50 steps). With the decoder and the noise fixed the rows are independent, so here
each row is solved on its own: ``M^-1 y`` by the Cholesky factor of its block, then Newton's
method for the root of ``r(x) = g(x) - g(m) - y`` (Jacobian ``T = 1 + A J(x)``), every row
backtracking on its own ``0.5 |r|^2`` and stopping once its Newton step is below
:data:`TOLERANCE` in the posterior metric at ``m``.

The draws are those of MGVI's block solver (``row_keyed_normal`` keys from NIFTy's random state,
one NIFTy seed sequence per draw, as ``draw_samples`` spawns them): with a linear decoder the
geoVI samples are the MGVI samples, and the samples do not depend on how the rows are split over
ranks.
"""
import numpy as np
import nifty8 as ift

from .block_metric import BlockDiagonalMetric, backtrack_rows

__all__ = ["TOLERANCE", "MAX_STEPS", "MAX_MOVE", "GeoVIStats", "solve_rows", "geovi_kl_energy"]

#: A row's sample is solved once its Newton step ``p`` has ``p^T M p`` below this (1e-5 posterior
#: sigma).
TOLERANCE = 1e-10
#: Newton steps per sample and row at most (a row still moving then keeps its best point).
MAX_STEPS = 30
#: Longest Newton step of a row, in posterior sigma at the expansion point.
MAX_MOVE = 1.0
#: Armijo constant and backtracking rounds of each row's step.
_C1, _BACKTRACKS = 1e-4, 30


class GeoVIStats:
    """What the sample updates of one global iteration did (the interface of ``TrackedController``
    that :func:`galdecomp.inference.mgvi._reporter` reads).

    Attributes
    ----------
    samples, steps, at_limit, rows : int
        Samples solved, the most Newton steps any row took summed over the samples, rows that
        stopped at :data:`MAX_STEPS` or could not descend, rows solved (the last two summed over
        the samples).
    """

    def __init__(self):
        self.clear()

    def clear(self):
        """Forget the counts (the start of a global iteration)."""
        self.samples = self.steps = self.at_limit = self.rows = 0

    def add(self, steps, at_limit, rows):
        self.samples += 1
        self.steps += int(steps)
        self.at_limit += int(at_limit)
        self.rows += int(rows)

    def state(self, what):
        """E.g. ``"4 samples, 0 of 49152 row samples unsolved"`` (at the step limit or at a fold)."""
        return f"{self.samples} {what}, {self.at_limit} of {self.rows} row samples unsolved"


def _residual(metrics, A, x, target):
    """``r = x + A f(x) - target`` (n, L), ``0.5 |r|^2`` (n,) and the Jacobians ``J(x)`` (n, C, L)."""
    f, J = metrics.outputs_and_jacobians(x)
    r = x + np.einsum("plc,pc->pl", A, f) - target
    return r, 0.5 * np.einsum("pl,pl->p", r, r), J


def _newton_steps(A, J, r):
    """``p = -T^-1 r`` per row with ``T = 1 + A J`` (least squares where ``T`` is singular)."""
    T = np.matmul(A, J)
    T += np.eye(T.shape[-1])
    try:
        return -np.linalg.solve(T, r[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return -np.matmul(np.linalg.pinv(T), r[..., None])[..., 0]


def solve_rows(metrics, A, target, x, M, tol=TOLERANCE, max_steps=MAX_STEPS, max_move=MAX_MOVE):
    """Solve ``x + A f(x) = target`` row by row by Newton's method with per-row backtracking.

    Parameters
    ----------
    metrics : LatentMetrics
        The decoder (outputs and Jacobians).
    A : ndarray, shape (P, L, C)
        ``J(m)^T N^-1`` at the expansion point (:meth:`LatentMetrics.pullback`).
    target : ndarray, shape (P, L)
        ``g(m) + y``.
    x : ndarray, shape (P, L)
        The starting point (overwritten with the solution).
    M : ndarray, shape (P, L, L)
        The posterior metric at the expansion point: the norm of the stopping rule.
    tol : float
        A row stops once its Newton step ``p`` has ``p^T M p <= tol`` (the step is taken).
    max_steps : int
    max_move : float
        Longest step in the norm of ``M`` (posterior sigma): a row does not jump across a fold of
        ``g`` to a far root of another branch.

    Returns
    -------
    x : ndarray, shape (P, L)
        The solution (the input array).
    steps : int
        The most Newton steps any row took.
    unsolved : int
        Rows that reached ``max_steps`` or found no descent before reaching the tolerance.
    """
    r, e, J = _residual(metrics, A, x, target)
    active = np.arange(len(x))
    steps = failed = 0
    while active.size and steps < max_steps:
        steps += 1
        p = _newton_steps(A[active], J[active], r[active])
        norm2 = np.einsum("pi,pij,pj->p", p, M[active], p)
        small = norm2 <= tol
        x[active[small]] += p[small]
        todo, p, norm2 = active[~small], p[~small], norm2[~small]
        n = todo.size
        xn, rn, en, Jn = np.empty((n, x.shape[1])), np.empty((n, r.shape[1])), np.empty(n), np.empty((n,) + J.shape[1:])

        def trial(i, a):  # kept per row: a row's last trial is its accepted step
            rows = todo[i]
            xn[i] = x[rows] + a[:, None] * p[i]
            rn[i], en[i], Jn[i] = _residual(metrics, A[rows], xn[i], target[rows])
            return en[i]

        e0 = e[todo]  # Armijo on 0.5 |r|^2, whose slope along the Newton step is -|r|^2
        alpha = backtrack_rows(trial, e0, -2.0 * e0, np.minimum(1.0, max_move / np.sqrt(norm2)), _C1, _BACKTRACKS)
        moved = alpha > 0  # a trust region first: a row stays on its branch
        done = todo[moved]
        x[done], r[done], e[done], J[done] = xn[moved], rn[moved], en[moved], Jn[moved]
        active, failed = todo[moved], failed + int((~moved).sum())
    return x, steps, active.size + failed


def geovi_kl_energy(ham, mean, n_samples, offset, stats, tol=TOLERANCE, max_steps=MAX_STEPS):
    """NIFTy's sampled KL at ``mean`` with geoVI samples solved row by row.

    Parameters
    ----------
    ham : BlockMetricHamiltonian
        Its ``metrics`` (a :class:`LatentMetrics`) give the decoder and the posterior blocks.
    mean : MultiField
        The expansion point (one key: the latents, (P, L)).
    n_samples : int
        Draws ``y``; every draw gives the pair of samples for ``y`` and ``-y``.
    offset : int
        Global index of the first row (keys of the draws).
    stats : GeoVIStats
        Receives each sample's steps and unsolved rows.
    tol, max_steps
        See :func:`solve_rows`.

    Returns
    -------
    SampledKLEnergyClass
        As ``ift.SampledKLEnergy(mean, ham, n_samples, minimizer, mirror_samples=True)`` returns
        it, its residuals being the solved samples minus ``mean``.
    """
    dom = ham.domain
    key = next(iter(dom.keys()))
    m = mean[key].val
    metrics = ham.metrics
    M = metrics.posterior(m)
    metric = BlockDiagonalMetric(dom, M, offset)
    A = metrics.pullback(m)
    f0, _ = metrics.outputs_and_jacobians(m)
    g0 = m + np.einsum("plc,pc->pl", A, f0)
    residuals = []
    for seq in ift.random.spawn_sseq(n_samples):
        with ift.random.Context(seq):
            y, yi = metric.special_draw_sample(True)
        for sign in (1.0, -1.0):
            x, steps, unsolved = solve_rows(metrics, A, g0 + sign * y[key].val, m + sign * yi[key].val, M,
                                            tol, max_steps)
            stats.add(steps, unsolved, len(m))
            residuals.append(ift.MultiField.from_dict({key: ift.makeField(dom[key], x - m)}, dom))
    samples = ift.ResidualSampleList(mean, residuals, [False] * len(residuals))
    return ift.SampledKLEnergyClass(samples, ham, [], None, True)
