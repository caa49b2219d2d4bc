"""The options of the command line: one argparse parser, built command by command.

Every command takes ``--debug``, ``--quiet``, ``--verbose`` and ``--log-file``; those that lock the
folder they write also ``--no-lock``. Usage errors are one line (:class:`InputError`, exit 2).
What each command does is in :mod:`galdecomp.cli`.
"""
import argparse

from . import __version__
from .errors import InputError

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def _nside(text):
    from .catalog import valid_nside

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"nside must be an integer, got {text!r}") from None
    if not valid_nside(n):
        raise argparse.ArgumentTypeError(f"nside {n} is not a power of two")
    return n


# -- commands -------------------------------------------------------------------------------------

def _fwhm(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (arcmin), got {text!r}") from None
    if not (x > 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number (arcmin), got {text}")
    return x


_FWHM_HELP = ("target resolution: each map with a fwhm_arcmin in its catalog entry is smoothed to this "
              "Gaussian FWHM in arcmin (maps with a coarser beam are refused, maps without one are left "
              "as they are)")


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def build_parser():
    """The command line: the options every command takes, then each command's (``_add_<command>``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an unexpected error")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="log warnings and errors only")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug messages too (NIFTy's among them)")
    common.add_argument("--log-file", metavar="FILE", default=argparse.SUPPRESS,
                        help="also append the log lines to FILE (rank 0 under MPI)")
    no_lock = argparse.ArgumentParser(add_help=False)
    no_lock.add_argument("--no-lock", action="store_true",
                         help="do not lock the folder written (for file systems that refuse locks); "
                              "a second job writing into it at the same time would corrupt it")
    p = _Parser(prog="galdecomp", parents=[common],
                description="Unsupervised Bayesian decomposition of the multi-frequency sky "
                            "with probabilistic autoencoders.")
    p.add_argument("--version", action="version", version=f"galdecomp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_simulate, _add_inspect, _add_fit, _add_report, _add_anomaly, _add_posterior_check, _add_run,
                _add_reconstruct, _add_transform, _add_sample):
        add(sub, common, no_lock)
    return p


def _add_simulate(sub, common, no_lock):
    """The ``simulate`` command's options."""
    s = sub.add_parser("simulate", parents=[common],
                       help="write a simulated 35-channel sky with its truth maps",
                       description="Simulate a realistic 35-channel sky (radio to gamma rays) and "
                                   "write DIR/catalog.yaml, DIR/maps/, DIR/truth/ and DIR/overview.png.")
    s.add_argument("--nside", type=_nside, required=True, help="HEALPix resolution (power of two)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    s.add_argument("--no-plot", action="store_true", help="skip the overview PNG")
    s.add_argument("--morphology", metavar="DIR",
                   help="folder with a catalog.yaml of real maps: their spatial structure replaces the "
                        "random amplitude maps of the components they are matched to (by name, "
                        "e.g. hi4pi/NHI -> gas_column; see README); spectra and channels unchanged")
    s.add_argument("--template", action="append", metavar="COMPONENT=MAP",
                   help="with --morphology: use exactly these matches instead of the name rule "
                        "(repeatable), e.g. --template gas=lab_NHI --template dust=planck13_EBV")


def _add_inspect(sub, common, no_lock):
    """The ``inspect`` command's options."""
    s = sub.add_parser("inspect", parents=[common], help="table of a catalog's maps, transforms and warnings",
                       description="Read a map catalog and print, per map: frequency, unit, kind, "
                                   "native nside, declared beam (fwhm_arcmin), frame (COORDSYS), "
                                   "coverage, min/median/max, the preprocessing "
                                   "transform and warnings (near-duplicates, gaps, zeros).")
    s.add_argument("catalog", help="catalog YAML file")
    s.add_argument("--nside", type=_nside, help="working resolution (default: catalog's or lowest)")
    s.add_argument("--fwhm-arcmin", type=_fwhm, metavar="X", help=_FWHM_HELP)
    s.add_argument("--format", choices=["text", "markdown", "csv"], default="text")


def _add_fit(sub, common, no_lock):
    """The ``fit`` command's options."""
    s = sub.add_parser("fit", parents=[common, no_lock],
                       help="fit the probabilistic autoencoder to a catalog's maps or a table",
                       description="Fit the probabilistic autoencoder (decoder, adaptive noise, "
                                   "amortised encoder) to the maps of CATALOG, or to the rows of a "
                                   "table (--data FILE), and write latent features and diagnostics "
                                   "to RUN. Ctrl-C leaves a resumable run.")
    s.add_argument("catalog", nargs="?", help="catalog YAML file (or --data FILE)")
    s.add_argument("--data", metavar="FILE",
                   help="a table instead of a catalog: FILE.npy (rows x features), FILE.npz (key data, "
                        "optional names) or FILE.csv (header of feature names); NaN = missing; or "
                        "'fashion-mnist': the 60,000 Fashion-MNIST training images with the image preset")
    s.add_argument("--out", required=True, metavar="RUN", help="run folder")
    s.add_argument("--nside", type=_nside, help="working resolution (default: catalog's or lowest)")
    s.add_argument("--latent-dim", type=_positive_int, help="number of latent features (default 10)")
    s.add_argument("--covariance", choices=["diagonal", "fisher", "fisher-scaled"],
                   help="latent posterior covariance (default diagonal; fisher-scaled: precision c J^T N^-1 J + D)")
    s.add_argument("--beta", type=float, help="weight of the KL term (default 1)")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    s.add_argument("--fwhm-arcmin", type=_fwhm, metavar="X", help=_FWHM_HELP + "; config data.fwhm_arcmin")
    s.add_argument("--max-epochs", type=_positive_int, help="training epochs at most (default 200)")
    s.add_argument("--threads", type=_positive_int, metavar="N",
                   help="cores of a one-process fit: this process and N-1 forked workers compute each "
                        "minibatch, bitwise as one (default: every core the process may use; under "
                        "mpiexec 1 per rank)")
    s.add_argument("--posterior", choices=["amortised", "mgvi", "geovi"],
                   help="latent posterior: the encoder's (default), or NIFTy's MGVI/geoVI after "
                        "training (also on a finished run with --resume)")
    s.add_argument("--rotate", choices=["none", "varimax"],
                   help="orthogonal rotation of the latent maps chosen after training (config "
                        "rotation.method; default varimax): varimax of the decoder Jacobians, or none")
    s.add_argument("--config", metavar="FILE", help="YAML configuration (e.g. a run's config.yaml)")
    s.add_argument("--resume", action="store_true", help="continue the run in RUN from its checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace an existing RUN")


def _add_report(sub, common, no_lock):
    """The ``report`` command's options."""
    s = sub.add_parser("report", parents=[common, no_lock], help="which latent feature is which physical component",
                       description="Compare a run's latent features (and PCA, FastICA, NMF of the same "
                                   "data) with template maps: correlations, mutual information with "
                                   "spatial-block significance, R^2 of all features; writes "
                                   "correlations.csv, summary.csv, report.md and plots/ to DIR.")
    s.add_argument("run", metavar="RUN", help="run folder of galdecomp fit")
    s.add_argument("--templates", required=True, metavar="CATALOG", help="catalog of template maps")
    s.add_argument("--out", metavar="DIR", help="report folder (default RUN/report; replaced)")
    s.add_argument("--bins", type=int, default=512, help="bins per axis of the binned MI (default 512)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_anomaly(sub, common, no_lock):
    """The ``anomaly`` command's options."""
    s = sub.add_parser("anomaly", parents=[common], help="per-pixel anomaly scores of a catalog under a run",
                       description="Score every pixel of a catalog (default: the run's own) with a finished "
                                   "run: reconstruction chi2 per channel, largest normalised residual, "
                                   "its 9-pixel mean, -ELBO, latent (prior) density; writes "
                                   "DIR/anomaly.fits, DIR/anomaly.png and DIR/anomaly_top.csv.")
    s.add_argument("run", metavar="RUN", help="run folder of galdecomp fit")
    s.add_argument("--catalog", metavar="CATALOG",
                   help="catalog to score (default: the one the run was trained on); maps matched by name")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    s.add_argument("--top", type=_positive_int, default=50, metavar="N",
                   help="pixels in anomaly_top.csv (default 50)")
    s.add_argument("--fwhm-arcmin", type=_fwhm, metavar="X",
                   help="target resolution of the maps the run is applied to (default: the run's data.fwhm_arcmin; "
                        "another value is used with a warning)")
    s.add_argument("--score", default="chi2_per_channel", metavar="NAME",
                   help="score that ranks anomaly_top.csv: chi2_per_channel (default), max_abs_residual, "
                        "local_residual, contrast_chi2, neg_elbo, neg_log_prior, neg_log_latent_density")
    s.add_argument("--noise", default="calibrated", choices=("calibrated", "model"),
                   help="unit of the residuals: each channel's noise calibrated so that 68%% of the run's own "
                        "residuals lie within +-1 (default; DIR/calibration.csv), or the trained noise")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")


def _add_posterior_check(sub, common, no_lock):
    """The ``posterior-check`` command's options."""
    s = sub.add_parser("posterior-check", parents=[common],
                       help="the encoder's q(z|d) against the true posterior, by importance sampling",
                       description="For random pixels of the run's data, compare Gaussian posteriors "
                                   "(the run's encoder, the other covariance type from the same decoder, "
                                   "the Laplace approximation at the MAP) with p(z|d) ~ p(d|z) N(z; 0, 1) "
                                   "by importance sampling with each as proposal: KL(q||p), effective "
                                   "sample size, mean shift, std ratio, 68 % coverage.")
    s.add_argument("run", metavar="RUN", help="run folder of galdecomp fit")
    s.add_argument("--pixels", type=_positive_int, required=True, metavar="N", help="random pixels to check")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the pixels and draws (default 0)")
    s.add_argument("--draws", type=_positive_int, default=2000, metavar="K",
                   help="importance draws per pixel and q (default 2000)")
    s.add_argument("--mcmc-steps", type=int, default=0, metavar="M",
                   help="also run a Metropolis chain of M steps per pixel (all pixels at once) and compare "
                        "each q and importance estimate with it: DIR/mcmc_check.csv (default 0: off)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")


def _add_run(sub, common, no_lock):
    """The ``run`` command's options."""
    s = sub.add_parser("run", parents=[common, no_lock], help="the main job: simulate the default sky, fit it, report",
                       description="Simulate the built-in default sky, fit the autoencoder to it and "
                                   "write everything below OUT (default runs/main): OUT/sky, OUT/fit, "
                                   "and the report against the truth maps, OUT/fit/report.")
    s.add_argument("--config", metavar="FILE",
                   help="YAML with out, simulate: {nside, seed, morphology}, fit: {fit settings}")
    s.add_argument("--out", help="output folder (default from the config, else runs/main)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted main job")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--fwhm-arcmin", type=_fwhm, metavar="X",
                   help="target resolution of the fit, as for galdecomp fit (config fit: data: fwhm_arcmin)")
    s.add_argument("--threads", type=_positive_int, metavar="N",
                   help="cores of the fit, as for galdecomp fit (default: every core the process may use)")


def _add_reconstruct(sub, common, no_lock):
    """The ``reconstruct`` command's options."""
    s = sub.add_parser("reconstruct", parents=[common], help="missing or corrupted channels, with uncertainties",
                       description="For every pixel of CATALOG's sky, the latent posterior given only its "
                                   "observed channels (MAP and Laplace covariance of the trained decoder; "
                                   "extra_noise and gain_sigma of catalog entries are marginalised) and the "
                                   "predictive distribution of every run channel: DIR/reconstruction_{mean,"
                                   "std,p50,p16,p84,p02,p98}.fits, latent_mean/std.fits, calibration.csv, "
                                   "and holdout.csv when channels are held out.")
    s.add_argument("run", metavar="RUN", help="run folder of galdecomp fit")
    s.add_argument("--catalog", required=True, help="catalog with (some of) the run's channels, by name")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--fwhm-arcmin", type=_fwhm, metavar="X",
                   help="target resolution of the maps the run is applied to (default: the run's data.fwhm_arcmin; "
                        "another value is used with a warning)")
    s.add_argument("--holdout", action="append", metavar="NAME",
                   help="hide this channel entirely and score its reconstruction (repeatable)")
    s.add_argument("--hide-fraction", type=float, default=0.0, metavar="F",
                   help="also hide this fraction of each pixel's other channels and score them")
    s.add_argument("--samples", type=int, default=200, metavar="K",
                   help="Monte Carlo draws of the predictive distribution per pixel (default 200)")
    s.add_argument("--noise", choices=["calibrated", "recalibrated", "model"], default="calibrated",
                   help="channel noise: re-estimated from the residuals at the MAP on the run's data and each "
                        "channel's predictive calibrated on entries of the run's data hidden as the rows to be "
                        "predicted are (default); re-estimated only; or the trained model's")
    s.add_argument("--calibration-rows", type=_positive_int, default=4096, metavar="N",
                   help="entries per channel hidden for the calibration (default 4096)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")


def _add_transform(sub, common, no_lock):
    """The ``transform`` command's options."""
    s = sub.add_parser("transform", parents=[common, no_lock], help="(re)fit the latent transform of a finished run",
                       description="Fit a density to the aggregate posterior Q(z) of RUN (8 draws from q(z|d) "
                                   "of up to 20,000 training rows) and write RUN/latent_transform.npz; "
                                   "`fit` does this at the end of training.")
    s.add_argument("run", metavar="RUN", help="run folder of galdecomp fit")
    s.add_argument("--method", choices=["gaussianising", "gmm", "gaussian"], default="gaussianising",
                   help="iterative Gaussianisation (exact inverse, default), a 16-component Gaussian "
                        "mixture (no inverse; best samples in benchmarks/README.md) or one Gaussian")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_sample(sub, common, no_lock):
    """The ``sample`` command's options."""
    s = sub.add_parser("sample", parents=[common], help="generate data from a trained run",
                       description="Draw latents from the prior N(0,1) or through the run's latent "
                                   "transform, decode and add the model's noise: DIR/samples.csv (physical "
                                   "units), DIR/sample_quality.csv (Frechet distance and KS per channel "
                                   "against the run's held-out rows, for every latent source) and plots.")
    s.add_argument("run", metavar="RUN", help="run folder of galdecomp fit")
    s.add_argument("--n", type=int, default=1000, help="rows to generate (default 1000)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--from", dest="source", choices=["prior", "transformed"], default="transformed",
                   help="latent source of samples.csv (default transformed)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
