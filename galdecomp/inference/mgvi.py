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
- KL minimisation and geoVI's non-linear sample update:
  :class:`~.block_metric.BlockNewton`, a NIFTy ``DescentMinimizer`` (NIFTy's line search and
  iteration controllers) whose direction is the exact Newton direction of the block metric.
- NIFTy's ``optimize_kl`` builds its own ``StandardHamiltonian`` (no hook for the metric), so its
  loop (``SampledKLEnergy``, then the minimiser, per iteration) is repeated in
  :func:`_block_kl`; geoVI's linear sampling step is always NIFTy's CG (hard-coded in
  ``draw_samples``), here only a few iterations, as it only starts the exact non-linear update.

``solver="cg"`` is NIFTy's ``optimize_kl`` with conjugate gradients (the reference).
"""
import numpy as np
import nifty8 as ift

from ..model.operators import DecoderLikelihood
from ..random import seed_sequence
from .block_metric import BlockDiagonalMetric, BlockNewton, LatentMetrics

__all__ = ["latent_posterior_samples", "BlockMetricHamiltonian", "amortisation_gap"]

#: Block solver, geoVI: conjugate-gradient iterations of NIFTy's linear sampling step, whose result
#: is only the starting point of the (exact-Newton) non-linear sample update.
GEOVI_LINEAR_CG = 5


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
    offset : int
        Global index of the first row (MPI: the rank's first pixel).
    solver : {"block", "cg"}
        ``"block"``: NIFTy's ``SampledKLEnergy`` with the exact block-diagonal metric
        (:mod:`.block_metric`): exact MGVI samples, exact Newton directions for the KL and for
        geoVI's non-linear sample update. ``"cg"``: NIFTy's ``optimize_kl`` with its conjugate
        gradients (the reference).
    draws : {"rows", "nifty"}
        Block solver, MGVI: ``"rows"`` draws by global row index (the same samples on any number
        of ranks); ``"nifty"`` uses NIFTy's own draws, the random numbers of the ``"cg"`` path.
        geoVI's draws and the ``"cg"`` path's are NIFTy's (per rank: seeded by ``(seed, offset)``).
    controllers : dict, optional
        Replace the default IterationControllers: ``sampling`` (CG of the samples; block solver:
        geoVI's linear step only), ``kl`` (KL minimisation), ``geo`` (geoVI's non-linear update).
    comm : SerialComm or MPIComm, optional
        The processes holding the rows (NIFTy's messages are silenced on ranks other than 0).

    Returns
    -------
    samples : ndarray, shape (2 n_samples, P, L)
        Posterior samples of the latents.
    """
    if solver not in ("block", "cg") or draws not in ("rows", "nifty") or method not in ("mgvi", "geovi"):
        raise ValueError(f"unknown method/solver/draws {method}/{solver}/{draws}")
    P, L = start.shape
    row = ift.UnstructuredDomain(P)
    lh = DecoderLikelihood(model.decoder, data, mask, model.floor, model.sigma0, model.tau,
                           row_domain=row, scales=model.dec_scales)
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
    if comm is not None and comm.rank != 0:  # NIFTy's own progress messages: rank 0 only
        import logging

        logging.getLogger("NIFTy8").setLevel(logging.ERROR)
    say = (lambda it: log(f"{method} iteration {it + 1}/{iterations}")) if log else None
    keyed = solver == "block" and method == "mgvi" and draws == "rows"
    with ift.random.Context(seed if keyed else seed_sequence(seed, "mgvi", offset)):
        if solver == "cg":
            samples = ift.optimize_kl(lh_z, iterations, n_samples, ift.NewtonCG(kl_ctrl), sampling,
                                      ift.NewtonCG(geo_ctrl) if method == "geovi" else None,
                                      initial_position=pos, output_directory=None, comm=None,
                                      plot_energy_history=False, plot_minisanity_history=False,
                                      sanity_checks=False,
                                      inspect_callback=(lambda sl, it: say(it)) if say else None)
        else:
            inv_var = mask / model.sigma(params)[None, :] ** 2
            metrics = LatentMetrics(model.decoder, model.split(params)[1], inv_var)
            # geoVI's linear step: NIFTy's CG gives only the start of the exact non-linear update
            lin = ctl.get("sampling", ift.AbsDeltaEnergyController(deltaE=0.05, iteration_limit=GEOVI_LINEAR_CG,
                                                                    name=None))
            ham = BlockMetricHamiltonian(lh_z, metrics, offset, draws, lin)
            # exact Newton steps are cheap: converge per row (1e-8 nats per row and step), so that
            # the result hardly depends on how many rows share the stopping rule (MPI ranks)
            kl_ctrl = ctl.get("kl", ift.AbsDeltaEnergyController(deltaE=1e-8 * P, iteration_limit=50,
                                                                  convergence_level=2, name=None))
            samples = _block_kl(ham, pos, method, n_samples, iterations, kl_ctrl, geo_ctrl, say)
    return np.stack([s["latent"].val for s in samples.iterator()])


class BlockMetricHamiltonian(ift.StandardHamiltonian):
    """NIFTy's ``StandardHamiltonian`` whose metric is the exact per-row posterior metric.

    ``optimize_kl`` builds ``StandardHamiltonian(lh, ic)`` itself, whose metric is a
    ``SamplingEnabler(likelihood metric, prior identity)``: a sum that NIFTy inverts and samples
    from by conjugate gradients only. This subclass (the one change to NIFTy's chain) returns the
    same value and gradient but, when the metric is asked for, the whole posterior metric ``J^T
    N^-1 J + 1`` (identity included once) as a :class:`BlockDiagonalMetric`, which
    ``draw_samples`` samples from exactly.

    Parameters
    ----------
    lh : LikelihoodEnergyOperator
        The likelihood of the latents (domain ``{"latent": (rows, L)}``).
    metrics : LatentMetrics
    offset : int
        Global index of the first row.
    draws : {"rows", "nifty"}
        See :func:`latent_posterior_samples`.
    ic_samp : IterationController, optional
        For geoVI's linear sampling step, which NIFTy always solves by conjugate gradients.
    """

    def __init__(self, lh, metrics, offset=0, draws="rows", ic_samp=None):
        super().__init__(lh, ic_samp)
        self._metrics, self._offset, self._draws = metrics, int(offset), draws
        self._key = next(iter(lh.domain.keys()))

    @property
    def metrics(self):
        return self._metrics

    def apply(self, x):
        self._check_input(x)
        if x.jac is None or not x.want_metric:
            return super().apply(x)
        lhx, prx = self._lh(x), self._prior(x)
        nifty_draw = None
        if self._draws == "nifty":  # y = s + nj as NIFTy's SamplingEnabler draws it
            lm, pm = lhx.metric, prx.metric
            nifty_draw = lambda: pm.draw_sample(from_inverse=True) + lm.draw_sample()
        met = BlockDiagonalMetric(self._domain, self.posterior_blocks(x.val), self._offset, nifty_draw)
        return (lhx + prx).add_metric(met)

    def posterior_blocks(self, position):
        """The blocks of the posterior metric at ``position`` (a MultiField)."""
        return self._metrics.posterior(position[self._key].val)

    def _simplify_for_constant_input_nontrivial(self, c_inp):
        raise NotImplementedError("BlockMetricHamiltonian: no constant inputs")


def _block_kl(ham, pos, method, n_samples, iterations, kl_ctrl, geo_ctrl, say):
    """The loop of ``optimize_kl`` (samples, then KL minimisation) with ``ham`` and exact solves."""
    dom = ham.domain
    key = next(iter(dom.keys()))

    def kl_metric(energy):  # the sampled KL's metric: the mean of the samples' posterior metrics
        acc, n = 0.0, 0
        for s in energy.samples.iterator():
            acc = acc + ham.posterior_blocks(s)
            n += 1
        return BlockDiagonalMetric(dom, acc / n)

    kl_min = BlockNewton(kl_ctrl, kl_metric)
    mean = pos.extract(dom)
    for it in range(iterations):
        nonlin = None
        if method == "geovi":
            geo = ham.metrics.geometric(mean[key].val)
            nonlin = BlockNewton(geo_ctrl, lambda e, geo=geo: BlockDiagonalMetric(
                dom, geo(e.position[key].val)), damping=1.0)  # T may be near-singular in some rows
        e = ift.SampledKLEnergy(mean, ham, n_samples, nonlin, mirror_samples=True)
        e, _ = kl_min(e)
        mean = e.position
        if say:
            say(it)
    return e.samples.at(mean)


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
