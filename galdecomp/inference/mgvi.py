"""Fisher-metric posteriors of the per-pixel latents with NIFTy's MGVI or geoVI.

After amortised training the decoder and the noise are held at their trained values and NIFTy's
``SampledKLEnergy`` approximates p(z | d) for all pixels jointly: MGVI with a Gaussian whose
covariance is the inverse Fisher metric ``(J^T N^-1 J + 1)^-1`` at the latent mean, geoVI with
the metric-adapted non-linear coordinate transformation. With the decoder fixed the pixels are
independent, so on MPI every rank runs it on its own pixels, with no communication. The
encoder's means are the starting point; the result tells how far the amortised q(z | d) is from
the per-pixel optimum (the amortisation gap).

Every metric involved is block-diagonal, one L x L block per pixel. The default solver
(``solver="block"``) gives NIFTy these blocks with exact inverses (:mod:`.block_metric`):

- samples: :class:`BlockMetricHamiltonian`, a ``StandardHamiltonian`` whose metric is the whole
  posterior metric as a :class:`~.block_metric.BlockDiagonalMetric`; NIFTy's ``draw_samples``
  calls its ``special_draw_sample`` (exact, Cholesky per pixel) instead of conjugate gradients.
- KL minimisation: :class:`~.block_metric.BlockNewton`, a NIFTy ``DescentMinimizer`` (NIFTy's
  line search and iteration controllers) whose direction is the exact Newton direction of the
  block metric.
- geoVI's samples: every row's non-linear equation solved on its own (:mod:`.geovi`), with
  MGVI's draws.
- NIFTy's ``optimize_kl`` builds its own ``StandardHamiltonian`` (no hook for the metric), so its
  loop (new samples, then the minimiser, per iteration) is repeated in :func:`_block_kl`.

``solver="cg"`` is NIFTy's ``optimize_kl`` with conjugate gradients (the reference).

The block solver's KL minimisation steps every row on its own energy (per-row backtracking of
the Newton step, rows at their optimum held fixed: :class:`~.block_metric.SampledKLRows`), so
that the line search over the sum of all rows does not wait for the worst-conditioned pixel.

NIFTy's own messages (controllers, line search, ``optimize_kl``) are sent to this module's
logger at DEBUG level while the posterior runs (:func:`galdecomp.logs.captured`), never
printed; every global iteration ends with one line to ``log`` with the KL energy, the number of
minimiser steps and the controllers' convergence state.
"""
import logging
import os

import numpy as np
import nifty8 as ift

from ..logs import captured
from ..model.operators import DecoderLikelihood
from ..seeds import seed_sequence
from .block_metric import BlockDiagonalMetric, BlockNewton, LatentMetrics, SampledKLRows
from .geovi import GeoVIStats, geovi_kl_energy

__all__ = ["latent_posterior_samples", "latent_posterior_samples_on_cores", "BlockMetricHamiltonian",
           "TrackedController", "amortisation_gap"]

_log = logging.getLogger(__name__)

#: Block solver, geoVI with NIFTy's draws: conjugate-gradient iterations of NIFTy's linear sampling
#: step, whose result is only the starting point of the (exact-Newton) non-linear sample update.
GEOVI_LINEAR_CG = 5


def _quiet(message):
    """The log of a worker's share: nothing (the first share's lines stand for all)."""


def latent_posterior_samples_on_cores(n, model, params, data, mask, start, method="mgvi", n_samples=4,
                                      iterations=4, seed=0, log=None, offset=0):
    """:func:`latent_posterior_samples` of one process on ``n`` cores: ``n - 1`` forked workers
    and this process each take a contiguous share of the rows, as ``n`` MPI ranks would (the
    rows are independent with the decoder fixed; MGVI's draws are keyed by global row index).

    Parameters and returns as :func:`latent_posterior_samples` (block solver, draws by rows);
    ``log`` gets this process's messages (its share, the first).
    """
    from ..workers import ForkedWorkers, SharedArrays

    P, L = start.shape
    n = max(1, min(int(n), P // 64))
    if n == 1 or not hasattr(os, "fork"):
        return latent_posterior_samples(model, params, data, mask, start, method, n_samples, iterations, seed=seed,
                                        log=log, offset=offset)
    cuts = np.linspace(0, P, n + 1).astype(int)
    out = SharedArrays({"samples": ((2 * n_samples, P, L), np.float64)})["samples"]

    def share(k):
        a, b = cuts[k], cuts[k + 1]
        out[:, a:b] = latent_posterior_samples(model, params, data[a:b], mask[a:b], start[a:b], method, n_samples,
                                               iterations, seed=seed, log=log if k == 0 else _quiet, offset=offset + a)

    with ForkedWorkers(n, share) as workers:
        workers.run()
    return np.array(out)


def latent_posterior_samples(model, params, data, mask, start, method="mgvi", n_samples=4,
                             iterations=4, seed=0, log=None, offset=0, solver="block", draws="rows",
                             controllers=None, comm=None):
    """MGVI or geoVI posterior samples of the latents of every row, decoder and noise fixed.

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
        Trained parameters (decoder and noise are held at these values).
    data : ndarray, shape (P, C)
        Standardised data (missing entries arbitrary).
    mask : ndarray of bool, shape (P, C)
    start : ndarray, shape (P, L)
        Initial latent position (the encoder's means).
    method : {"mgvi", "geovi"}
    n_samples : int
        Pairs of antithetic samples per iteration (NIFTy draws 2 n_samples).
    iterations : int
        Global iterations (new samples, then the KL minimisation).
    seed : int
    log : callable, optional
        Receives one line per global iteration: KL energy, minimiser steps, the controllers'
        convergence state (NIFTy's own messages go to this module's logger, DEBUG level).
    offset : int
        Global index of the first row (MPI: the rank's first pixel).
    solver : {"block", "cg"}
        ``"block"``: NIFTy's ``SampledKLEnergy`` with the exact block-diagonal metric
        (:mod:`.block_metric`): exact MGVI samples, exact Newton directions for the KL, geoVI's
        samples solved row by row (:mod:`.geovi`). ``"cg"``: NIFTy's ``optimize_kl`` with its conjugate
        gradients (the reference).
    draws : {"rows", "nifty"}
        Block solver: ``"rows"`` draws by global row index (the same samples on any number of
        ranks; geoVI: :func:`.geovi.geovi_kl_energy`); ``"nifty"`` uses NIFTy's own draws, the
        random numbers of the ``"cg"`` path (per rank: seeded by ``(seed, offset)``), and for geoVI
        NIFTy's ``draw_samples`` (CG linear step, one minimiser for all rows).
    controllers : dict, optional
        Replace the default IterationControllers: ``sampling`` (CG of the samples), ``kl`` (KL
        minimisation), ``geo`` (geoVI's non-linear update); ``"rows"`` geoVI uses ``kl`` only.
    comm : SerialComm or MPIComm, optional
        Unused (NIFTy's messages go through the package's logging: rank 0 only).

    Returns
    -------
    samples : ndarray, shape (2 n_samples, P, L)
        Posterior samples of the latents.
    """
    if solver not in ("block", "cg") or draws not in ("rows", "nifty") or method not in ("mgvi", "geovi"):
        raise ValueError(f"unknown method/solver/draws {method}/{solver}/{draws}")
    P, L = start.shape
    row = ift.UnstructuredDomain(P)
    lh = DecoderLikelihood(model.decoder, data, mask, model.likelihood, row_domain=row, scales=model.dec_scales)
    const = ift.MultiField.from_dict({
        "weights": ift.makeField(lh.domain["weights"], params[model.slices["decoder"]]),
        "noise": ift.makeField(lh.domain["noise"], params[model.slices["noise"]])})
    _, lh_z = lh.simplify_for_constant_input(const)
    pos = ift.MultiField.from_dict({"latent": ift.makeField(lh_z.domain["latent"], start)})
    sampling = ift.AbsDeltaEnergyController(deltaE=0.05, iteration_limit=50, name=None)
    kl_ctrl = ift.AbsDeltaEnergyController(deltaE=0.5, iteration_limit=10, convergence_level=2, name=None)
    geo_ctrl = ift.AbsDeltaEnergyController(deltaE=0.5, iteration_limit=5, convergence_level=2, name=None)
    ctl = dict(controllers or {})
    sampling, kl_ctrl, geo_ctrl = (ctl.get(k, v) for k, v in
                                   (("sampling", sampling), ("kl", kl_ctrl), ("geo", geo_ctrl)))
    keyed = solver == "block" and draws == "rows"
    with captured("NIFTy8", _log) as nifty_msgs, \
            ift.random.Context(seed if keyed else seed_sequence(seed, "mgvi", offset)):
        if solver == "cg":
            kl_t, geo_t = TrackedController(kl_ctrl), TrackedController(geo_ctrl)
            say = _reporter(log, method, iterations, kl_t, geo_t if method == "geovi" else None, nifty_msgs)
            samples = ift.optimize_kl(lh_z, iterations, n_samples, ift.NewtonCG(kl_t), sampling,
                                      ift.NewtonCG(geo_t) if method == "geovi" else None,
                                      initial_position=pos, output_directory=None, comm=None,
                                      plot_energy_history=False, plot_minisanity_history=False,
                                      sanity_checks=False, inspect_callback=lambda sl, it: say(it))
        else:
            inv_var = mask / model.sigma(params)[None, :] ** 2
            metrics = LatentMetrics(model.decoder, model.split(params)[1], inv_var, data)
            # geoVI's linear step: NIFTy's CG gives only the start of the exact non-linear update
            lin = ctl.get("sampling", ift.AbsDeltaEnergyController(deltaE=0.05, iteration_limit=GEOVI_LINEAR_CG,
                                                                    name=None))
            ham = BlockMetricHamiltonian(lh_z, metrics, offset, draws, lin, cache=2 * (2 * n_samples + 1))
            # exact Newton steps are cheap: converge per row (1e-8 nats per row and step), so that
            # the result hardly depends on how many rows share the stopping rule (MPI ranks)
            kl_t = TrackedController(ctl.get("kl", ift.AbsDeltaEnergyController(
                deltaE=1e-8 * P, iteration_limit=50, convergence_level=2, name=None)))
            geo_t = GeoVIStats() if draws == "rows" else TrackedController(geo_ctrl)
            say = _reporter(log, method, iterations, kl_t, geo_t if method == "geovi" else None, nifty_msgs)
            samples = _block_kl(ham, pos, method, n_samples, iterations, kl_t, geo_t, say, offset)
    return np.stack([s["latent"].val for s in samples.iterator()])


class BlockMetricHamiltonian(ift.StandardHamiltonian):
    """NIFTy's ``StandardHamiltonian`` whose metric is the exact per-row posterior metric.

    ``optimize_kl`` builds ``StandardHamiltonian(lh, ic)`` itself, whose metric is a
    ``SamplingEnabler(likelihood metric, prior identity)``: a sum that NIFTy inverts and samples
    from by conjugate gradients only. This subclass (the one change to NIFTy's chain) returns the
    same value and gradient but, when the metric is asked for, the whole posterior metric ``J^T
    N^-1 J + 1`` (identity included once) as a :class:`BlockDiagonalMetric`, which
    ``draw_samples`` samples from exactly.

    Value and gradient are computed row by row (:meth:`LatentMetrics.energies_and_gradients`)
    and cached for the last ``cache`` positions: a row whose position equals its position in a
    cached evaluation is not computed again. During the KL minimisation the rows at their
    optimum keep their positions in every sample, so each step costs decoder passes over the
    moving rows only. The value's constant (the noise normalisation) is taken from the
    likelihood's own value at the first evaluation.

    Parameters
    ----------
    lh : LikelihoodEnergyOperator
        The likelihood of the latents (domain ``{"latent": (rows, L)}``).
    metrics : LatentMetrics
        With the data.
    offset : int
        Global index of the first row.
    draws : {"rows", "nifty"}
        See :func:`latent_posterior_samples`.
    ic_samp : IterationController, optional
        For geoVI's linear sampling step, which NIFTy always solves by conjugate gradients.
    cache : int
        Positions whose per-row values and gradients are kept (at least the number of samples).
    """

    def __init__(self, lh, metrics, offset=0, draws="rows", ic_samp=None, cache=8):
        super().__init__(lh, ic_samp)
        self._metrics, self._offset, self._draws = metrics, int(offset), draws
        self._key = next(iter(lh.domain.keys()))
        self._cache, self._cache_size, self._const = [], max(int(cache), 1), None
        #: Rows evaluated by :meth:`row_energies_and_gradients`, summed over the calls.
        self.rows_evaluated = 0

    @property
    def metrics(self):
        return self._metrics

    def apply(self, x):
        self._check_input(x)
        if x.jac is None:
            return super().apply(x)
        if not x.want_metric:
            z = x.val[self._key].val
            if self._const is None:  # the likelihood's normalisation, once
                ref = super().apply(x)
                self._const = ref.val.val[()] - self.row_energies_and_gradients(z)[0].sum()
                return ref
            e, g = self.row_energies_and_gradients(z)
            grad = ift.MultiField.from_dict({self._key: ift.makeField(self._domain[self._key], g)}, self._domain)
            return x.new(ift.Field.scalar(self._const + e.sum()), ift.VdotOperator(grad))
        lhx, prx = self._lh(x), self._prior(x)
        nifty_draw = None
        if self._draws == "nifty":  # y = s + nj as NIFTy's SamplingEnabler draws it
            lm, pm = lhx.metric, prx.metric
            nifty_draw = lambda: pm.draw_sample(from_inverse=True) + lm.draw_sample()
        met = BlockDiagonalMetric(self._domain, self.posterior_blocks(x.val), self._offset, nifty_draw)
        return (lhx + prx).add_metric(met)

    def row_energies_and_gradients(self, z):
        """Per-row energy (rows,) and gradient (rows, L) at latents ``z``, through the cache."""
        best, eq = None, None
        for i, c in enumerate(self._cache):
            same = np.all(z == c[0], axis=1)
            if eq is None or same.sum() > eq.sum():
                best, eq = i, same
        if best is not None and not eq.any():
            best = None
        if best is not None:  # the new entry supersedes it (the same sample, moved rows)
            best = self._cache.pop(best)
            if eq.all():
                self._cache.append(best)
                return best[1], best[2]
        e, g = np.empty(z.shape[0]), np.empty(z.shape)
        rows = np.arange(z.shape[0]) if best is None else np.flatnonzero(~eq)
        if best is not None:
            e[eq], g[eq] = best[1][eq], best[2][eq]
        e[rows], g[rows] = self._metrics.energies_and_gradients(z[rows], rows)
        self.rows_evaluated += rows.size
        self._cache = (self._cache + [(z.copy(), e, g)])[-self._cache_size:]
        return e, g

    def row_energies(self, z):
        """Per-row energies (rows,) at latents ``z`` (rows, L), through the cache."""
        return self.row_energies_and_gradients(z)[0]

    def posterior_blocks(self, position):
        """The blocks of the posterior metric at ``position`` (a MultiField)."""
        return self._metrics.posterior(position[self._key].val)

    def _simplify_for_constant_input_nontrivial(self, c_inp):
        raise NotImplementedError("BlockMetricHamiltonian: no constant inputs")


def _block_kl(ham, pos, method, n_samples, iterations, kl_ctrl, geo_ctrl, say, offset=0):
    """The loop of ``optimize_kl`` (samples, then KL minimisation) with ``ham`` and exact solves.

    The KL minimiser is a :class:`BlockNewton` on the sampled KL row by row
    (:class:`SampledKLRows`: per-row step lengths, rows at their optimum held fixed). geoVI with
    ``geo_ctrl`` a :class:`~.geovi.GeoVIStats`: samples solved row by row
    (:func:`~.geovi.geovi_kl_energy`); with an IterationController: NIFTy's ``draw_samples`` (its
    draws and CG linear step) with a :class:`BlockNewton` non-linear update.
    """
    dom = ham.domain
    key = next(iter(dom.keys()))
    mean = pos.extract(dom)
    for it in range(iterations):
        nonlin = None
        if method == "geovi" and isinstance(geo_ctrl, GeoVIStats):
            e = geovi_kl_energy(ham, mean, n_samples, offset, geo_ctrl)
        else:
            if method == "geovi":
                geo = ham.metrics.geometric(mean[key].val)
                nonlin = BlockNewton(geo_ctrl, lambda e, geo=geo: BlockDiagonalMetric(
                    dom, geo(e.position[key].val)), damping=1.0)  # T may be near-singular in some rows
            e = ift.SampledKLEnergy(mean, ham, n_samples, nonlin, mirror_samples=True)
        rows = SampledKLRows(ham.metrics, dom, row_energies=ham.row_energies)
        e, _ = BlockNewton(kl_ctrl, rows.metric, row_energy=rows.energies)(e)
        mean = e.position
        say(it)
    return e.samples.at(mean)


class TrackedController(ift.IterationController):
    """A NIFTy ``IterationController`` that remembers what the one it wraps decided.

    Parameters
    ----------
    inner : IterationController

    Attributes
    ----------
    runs, steps : int
        Minimisations started and steps checked since :meth:`clear`.
    at_limit : int
        Minimisations stopped by the inner controller's iteration limit.
    energy : float or None
        The last energy seen.
    """

    def __init__(self, inner):
        super().__init__()
        self._inner = inner
        self.clear()

    def clear(self):
        """Forget the counts (the start of a global iteration)."""
        self.runs = self.steps = self.at_limit = 0
        self.energy = None
        self._n = 0

    def start(self, energy):
        self.runs += 1
        self._n, self.energy = 0, energy.value
        return self._inner.start(energy)

    def check(self, energy):
        self._n += 1
        self.steps += 1
        self.energy = energy.value
        status = self._inner.check(energy)
        # NIFTy's controllers keep their limit in the private ``_iteration_limit`` and have no
        # public getter (checked with nifty8 8.5.7; tests/test_mgvi.py pins it); without it the
        # state reads "converged" where the limit stopped the minimiser
        limit = getattr(self._inner, "_iteration_limit", None)
        if status == self.CONVERGED and limit is not None and self._n >= limit:
            self.at_limit += 1
        return status

    def state(self, what):
        """``"converged"``, ``"iteration limit reached"`` or (several runs) how many reached it."""
        if self.runs <= 1:
            return "iteration limit reached" if self.at_limit else "converged"
        return f"{self.runs} {what}, {self.at_limit} at the iteration limit"


def _reporter(log, method, iterations, kl, geo, nifty_msgs):
    """The per-iteration line: KL energy, minimiser steps, controllers' state; resets the counts."""

    def say(it):
        line = (f"{method} iteration {it + 1}/{iterations}: KL energy {kl.energy:.6e}, "
                f"{kl.steps} Newton steps, {kl.state('KL minimisations')}")
        if geo is not None:
            line += f"; sample updates: {geo.steps} steps, {geo.state('samples')}"
        errors = [m for m in nifty_msgs if m.levelno >= logging.ERROR]
        if errors:
            line += f"; NIFTy: {errors[-1].getMessage()!r}" + (f" (+{len(errors) - 1})" if len(errors) > 1 else "")
        nifty_msgs.clear()
        kl.clear()
        if geo is not None:
            geo.clear()
        (log or _log.info)(line)

    return say


def amortisation_gap(enc_mean, enc_cov, samples):
    """How far the encoder's q(z | d) is from the MGVI/geoVI posterior, per pixel.

    Parameters
    ----------
    enc_mean : ndarray, shape (P, L)
    enc_cov : ndarray, shape (P, L, L)
        The encoder's posterior mean and covariance.
    samples : ndarray, shape (S, P, L)
        MGVI/geoVI posterior samples (antithetic pairs).

    Returns
    -------
    dict
        ``mean`` (P, L) and ``std`` (P, L) of the samples; ``shift`` (P, L): encoder mean minus
        sample mean in units of the sample std; ``std_ratio`` (P, L): encoder std over sample std;
        ``mahalanobis`` (P,): RMS over features of ``shift``.
    """
    # MGVI/geoVI samples come in antithetic pairs around the mean: no ddof correction
    mean, std = samples.mean(0), samples.std(0)
    std = np.maximum(std, 1e-12)
    shift = (enc_mean - mean) / std
    ratio = np.sqrt(np.einsum("pii->pi", enc_cov)) / std
    return dict(mean=mean, std=std, shift=shift, std_ratio=ratio,
                mahalanobis=np.sqrt(np.mean(shift ** 2, axis=1)))
