"""Fisher-metric posteriors of the per-pixel latents with NIFTy's MGVI or geoVI.

After amortised training the decoder and the noise are held at their trained values and NIFTy's
``optimize_kl`` approximates p(z | d) for all pixels jointly: MGVI with a Gaussian whose
covariance is the inverse Fisher metric ``(J^T N^-1 J + 1)^-1`` at the latent mean, geoVI with
the metric-adapted non-linear coordinate transformation. With the decoder fixed the pixels are
independent, so on MPI every rank runs ``optimize_kl`` on its own pixels, with no communication.
The encoder's means are the starting point; the result tells how far the amortised q(z | d) is
from the per-pixel optimum (the amortisation gap).
"""
import numpy as np
import nifty8 as ift

from ..model.operators import DecoderLikelihood

__all__ = ["latent_posterior_samples", "amortisation_gap"]


def latent_posterior_samples(model, params, data, mask, start, method="mgvi", n_samples=4,
                             iterations=4, seed=0, log=None):
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
        Pairs of antithetic samples per iteration (``optimize_kl`` draws 2 n_samples).
    iterations : int
        Global iterations of ``optimize_kl``.
    seed : int
    log : callable, optional

    Returns
    -------
    samples : ndarray, shape (2 n_samples, P, L)
        Posterior samples of the latents.
    """
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
    kl_min = ift.NewtonCG(ift.AbsDeltaEnergyController(deltaE=0.5, iteration_limit=10,
                                                       convergence_level=2, name=None))
    nonlin = None
    if method == "geovi":
        nonlin = ift.NewtonCG(ift.AbsDeltaEnergyController(deltaE=0.5, iteration_limit=5,
                                                           convergence_level=2, name=None))
    from ..parallel import world

    if world().rank != 0:  # NIFTy's own progress messages: rank 0 only
        import logging

        logging.getLogger("NIFTy8").setLevel(logging.ERROR)
    with ift.random.Context(seed):
        samples = ift.optimize_kl(lh_z, iterations, n_samples, kl_min, sampling, nonlin,
                                  initial_position=pos, output_directory=None, comm=None,
                                  plot_energy_history=False, plot_minisanity_history=False,
                                  sanity_checks=False,
                                  inspect_callback=(lambda sl, it: log(f"{method} iteration {it + 1}/{iterations}"))
                                  if log else None)
    return np.stack([s["latent"].val for s in samples.iterator()])


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
