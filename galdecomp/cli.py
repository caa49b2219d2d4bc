"""The galdecomp command line: ``galdecomp COMMAND ...``.

Every failure is reported as one line ``galdecomp: error: ...``: exit status 2 for bad input,
1 for a failure of the environment (a write that failed, an unexpected error, whose traceback
goes to a log file; ``--debug`` shows it instead).
"""
import argparse
import contextlib
import logging
import os
import sys
import tempfile
import traceback
import warnings

from . import __version__
from .errors import InputError, JobStopped, WriteError

__all__ = ["main"]


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


log = logging.getLogger(__name__)


# -- commands -------------------------------------------------------------------------------------

def _template_pairs(pairs):
    """``--template COMPONENT=MAP`` options as a dict (None without any)."""
    if not pairs:
        return None
    mapping = {}
    for text in pairs:
        key, sep, name = text.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise InputError(f"--template: expected COMPONENT=MAP, got {text!r}")
        mapping[key.strip()] = name.strip()
    return mapping


def cmd_simulate(args, comm):
    from .fileio import atomic_output_dir
    from .simulation import (describe_morphology, plot_overview, resolve_morphology, simulate_sky,
                             write_simulated_sky)

    out = os.path.abspath(args.out)
    morphology = None
    if args.template and not args.morphology:
        raise InputError("--template needs --morphology DIR")
    if args.morphology:  # checked and read before anything is written
        morphology = resolve_morphology(args.morphology, _template_pairs(args.template))
        morphology.load(args.nside)
    with atomic_output_dir(out, args.overwrite) as tmp:
        real = f", spatial templates from {morphology.catalog}" if morphology else ""
        log.info(f"simulating the sky at nside {args.nside} (seed {args.seed}{real})")
        sky = simulate_sky(args.nside, seed=args.seed, morphology=morphology)
        for line in describe_morphology(sky)[1:]:
            log.info(line.strip())
        log.info(f"writing {len(sky.maps)} channel maps and the truth maps")
        write_simulated_sky(sky, tmp)
        if not args.no_plot:
            log.info("plotting the overview")
            plot_overview(sky, os.path.join(tmp, "overview.png"))
    print(f"simulated sky: {os.path.join(out, 'catalog.yaml')}")
    if not args.no_plot:
        print(f"overview: {os.path.join(out, 'overview.png')}")
    return 0


def cmd_inspect(args, comm):
    from .catalog import load_catalog
    from .preprocessing import Preprocessor
    from .products.catalog_summary import COLUMNS, summarise
    from .products.tables import format_table

    data = load_catalog(args.catalog, nside=args.nside, fwhm_arcmin=args.fwhm_arcmin)
    pre = Preprocessor.fit(data)
    rows = summarise(data, pre)
    if args.format == "text":
        beams = f", smoothed to fwhm {data.target_fwhm_arcmin:g} arcmin" if data.target_fwhm_arcmin else ""
        print(f"{args.catalog}: {data.n_features} maps, working nside {data.nside} "
              f"({data.n_samples} pixels), frame {data.coord}{beams}")
    sys.stdout.write(format_table(rows, COLUMNS, args.format))
    return 0


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


def _config_file(path):
    from .inference.config import load_config_file

    if path is None:
        return None
    cfg = load_config_file(path)
    cfg.pop("catalog", None)  # written into RUN/config.yaml for the record
    return cfg


def cmd_fit(args, comm):
    from .pipeline import fit_catalog, fit_overrides, fit_table

    if (args.catalog is None) == (args.data is None):
        raise InputError("fit: give exactly one of CATALOG or --data FILE")
    if args.data is not None and args.nside is not None:
        raise InputError("--nside: only for a catalog of maps, not with --data")
    if args.data is not None and args.fwhm_arcmin is not None:
        raise InputError("--fwhm-arcmin: only for a catalog of maps, not with --data")
    overrides = fit_overrides(dict(nside=args.nside, latent_dim=args.latent_dim, covariance=args.covariance,
                                   beta=args.beta, seed=args.seed, max_epochs=args.max_epochs,
                                   threads=args.threads, posterior=args.posterior,
                                   fwhm_arcmin=args.fwhm_arcmin))
    fit = fit_catalog if args.data is None else fit_table
    res = fit(args.catalog if args.data is None else args.data, args.out, overrides, _config_file(args.config),
              args.resume, args.overwrite, comm=comm)
    if comm.rank == 0:
        _print_fit(res)
    return 0


def _print_fit(res):
    p = res["products"]["paths"]
    print(f"run folder: {res['run_dir']}")
    if "latent_mean.fits" in p:
        print(f"latent feature maps: {p['latent_mean.fits']} (std: {p['latent_std.fits']})")
    else:
        print(f"latent features: {p['latent_mean.csv']} (std: {p['latent_std.csv']})")
    print(f"plots: {p['plots']}")


def cmd_report(args, comm):
    from .fileio import folder_lock

    if comm.size > 1:
        raise InputError("galdecomp report runs on one process (start it without mpiexec)")
    if args.bins < 2:
        raise InputError(f"--bins must be at least 2, got {args.bins}")
    run = os.path.abspath(args.run)
    out = os.path.abspath(args.out or os.path.join(run, "report"))
    into_run = os.path.isdir(run) and os.path.commonpath([run, out]) == run
    with folder_lock(run) if into_run else contextlib.nullcontext():  # one writer per run folder
        from .products.report import make_report

        res = make_report(args.run, args.templates, out=args.out, bins=args.bins, seed=args.seed,
                          progress=log.info)
    print(f"report: {res['paths'].get('report.md', os.path.join(res['out'], 'report.md'))}")
    return 0


def cmd_run(args, comm):
    from .pipeline import run_main_job

    cfg = None
    if args.config:
        from .inference.config import load_config_file
        cfg = load_config_file(args.config)
    base = os.path.dirname(os.path.abspath(args.config)) if args.config else None
    if args.threads is not None:
        fit = dict((cfg or {}).get("fit") or {})
        fit["training"] = {**(fit.get("training") or {}), "threads": args.threads}
        cfg = {**(cfg or {}), "fit": fit}
    if args.fwhm_arcmin is not None:
        fit = dict((cfg or {}).get("fit") or {})
        fit["data"] = {**(fit.get("data") or {}), "fwhm_arcmin": args.fwhm_arcmin}
        cfg = {**(cfg or {}), "fit": fit}
    res = run_main_job(cfg, out=args.out, overwrite=args.overwrite, resume=args.resume, config_dir=base,
                       comm=comm)
    if res["fit"]["products"] is None:  # not rank 0
        return 0
    print(f"simulated sky: {res['sky']}")
    _print_fit(res["fit"])
    if res.get("report"):
        print(f"report: {res['report']}")
    return 0


def cmd_anomaly(args, comm):
    _one_process(comm, args.command)
    from .products.anomaly import run_anomaly

    res = run_anomaly(args.run, args.out, catalog=args.catalog, top=args.top, score=args.score,
                      overwrite=args.overwrite, progress=log.info, fwhm_arcmin=args.fwhm_arcmin)
    print(f"anomaly maps: {res['paths']['anomaly.fits']} (plot: {res['paths']['anomaly.png']})")
    print(f"most anomalous pixels by {args.score}: {res['paths']['anomaly_top.csv']}")
    return 0


def cmd_posterior_check(args, comm):
    _one_process(comm, args.command)
    from .products.posterior_check import run_posterior_check

    res = run_posterior_check(args.run, args.out, n_pixels=args.pixels, draws=args.draws, seed=args.seed,
                              overwrite=args.overwrite, progress=log.info, mcmc_steps=args.mcmc_steps)
    print(res["text"], end="")
    print(f"per pixel: {res['paths']['posterior_check.csv']}; summary: "
          f"{res['paths']['posterior_check_summary.csv']}; plot: {res['paths']['posterior_check.png']}")
    return 0


def _one_process(comm, command):
    """InputError for a single-process command started on several MPI ranks."""
    if comm.size > 1:
        raise InputError(f"galdecomp {command} runs on one process (start it without mpiexec)")


def _load_run(path):
    """The trained model of a run folder (InputError if there is none)."""
    from .inference.trained import TrainedModel

    if not os.path.isdir(path):
        raise InputError(f"{path}: run folder not found")
    return TrainedModel.load(path)


def cmd_reconstruct(args, comm):
    _one_process(comm, args.command)
    from .products.reconstruct import reconstruct_sky

    if args.samples < 2:
        raise InputError(f"--samples must be at least 2, got {args.samples}")
    trained = _load_run(args.run)
    res = reconstruct_sky(trained, args.catalog, args.out, holdout=args.holdout or (),
                          hide_fraction=args.hide_fraction, n_draws=args.samples, seed=args.seed,
                          overwrite=args.overwrite, progress=log.info, noise=args.noise,
                          calibration_rows=args.calibration_rows, fwhm_arcmin=args.fwhm_arcmin)
    print(f"reconstruction: {res['out']} (MAP converged in {100 * res['converged']:.1f}% of pixels)")
    for r in res["holdout"]:
        print(f"  {r['channel']}: RMSE {r['rmse_standardised']:.3f} (linear {r['rmse_linear']:.3f}, "
              f"boosting {r['rmse_boosting']:.3f}), 68% coverage {100 * r['coverage_68']:.1f}%, "
              f"95% coverage {100 * r['coverage_95']:.1f}%")
    return 0


def cmd_transform(args, comm):
    _one_process(comm, args.command)
    from .fileio import folder_lock
    from .inference.trained import write_transform
    from .products.generate import refit_transform

    trained = _load_run(args.run)
    res = refit_transform(trained, args.method, args.seed, progress=log.info)
    with folder_lock(os.path.abspath(args.run)):
        path = write_transform(args.run, res["density"])
    print(f"latent transform: {path}")
    print(f"held-out log-density per draw: {res['held_out_log_density']:.3f} "
          f"(prior N(0, 1): {res['held_out_log_prior']:.3f})")
    return 0


def cmd_sample(args, comm):
    _one_process(comm, args.command)
    from .products.generate import held_out_rows, write_samples

    if args.n < 1:
        raise InputError(f"--n must be positive, got {args.n}")
    trained = _load_run(args.run)
    if args.source == "transformed" and trained.transform is None:
        raise InputError(f"{args.run}: no latent transform (latent_transform.npz): fit one with "
                         f"`galdecomp transform {args.run}`")
    real = held_out_rows(trained, trained.standardise(trained.load_rows()))
    if len(real) < 2:
        raise InputError(f"{args.run}: fewer than 2 held-out rows without missing channels to compare with")
    res = write_samples(trained, args.out, args.n, args.source, args.seed, real, overwrite=args.overwrite,
                        progress=log.info)
    print(f"samples: {os.path.join(res['out'], 'samples.csv')}")
    for r in res["quality"]:
        print(f"  {r['source']:>11}: Frechet distance {r['frechet']:.3f}, median KS {r['median_ks']:.3f} "
              f"(standardised channels, against {len(real)} held-out rows)")
    return 0


# -- parser ---------------------------------------------------------------------------------------


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
    s.set_defaults(func=cmd_simulate)


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
    s.set_defaults(func=cmd_inspect)


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
    s.add_argument("--covariance", choices=["diagonal", "fisher"],
                   help="latent posterior covariance (default diagonal)")
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
    s.add_argument("--config", metavar="FILE", help="YAML configuration (e.g. a run's config.yaml)")
    s.add_argument("--resume", action="store_true", help="continue the run in RUN from its checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace an existing RUN")
    s.set_defaults(func=cmd_fit)


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
    s.set_defaults(func=cmd_report)


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
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    s.set_defaults(func=cmd_anomaly)


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
    s.set_defaults(func=cmd_posterior_check)


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
    s.set_defaults(func=cmd_run)


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
    s.add_argument("--calibration-rows", type=_positive_int, default=1024, metavar="N",
                   help="entries per channel hidden for the calibration (default 1024)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    s.set_defaults(func=cmd_reconstruct)


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
    s.set_defaults(func=cmd_transform)


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
    s.set_defaults(func=cmd_sample)


def _save_traceback():
    """Write the current exception's traceback to a log file; return its path (None if that fails)."""
    try:
        fd, path = tempfile.mkstemp(prefix="galdecomp-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"galdecomp {__version__}: {' '.join(sys.argv)}\n")
            traceback.print_exc(file=f)
        return path
    except OSError:
        return None


def _unexpected(e):
    """One line for an unexpected exception ``e``, naming the log file with its traceback."""
    if isinstance(e, OSError) and e.filename:
        what = f"{e.filename}: {e.strerror or e}"
    else:
        what = f"unexpected {type(e).__name__}: " + (str(e).splitlines() or [""])[0]
    log_file = _save_traceback()
    where = f"traceback in {log_file}" if log_file else "traceback not saved"
    return f"{what} ({where}; --debug shows it)"


def _configure_logging(args, comm):
    """Apply ``--quiet``, ``--verbose`` and ``--log-file`` (InputError for both of the first two)."""
    from .logs import configure

    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if quiet and verbose:
        raise InputError("--quiet and --verbose: give at most one")
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    configure(comm, level, getattr(args, "log_file", None))


def _error(line):
    """Print the error ``line`` on stderr and append it to the ``--log-file``, if any."""
    from .logs import to_log_file

    print(line, file=sys.stderr)
    to_log_file(line.removeprefix("galdecomp: error: "))  # the log line says "error: "


def main(argv=None):
    """Run the command line; returns the exit status.

    Exit status 2: bad input (one line from rank 0, on every rank under MPI, as it is checked
    identically everywhere); 1: a diverging fit (one line from rank 0: every rank sees the same
    non-finite ELBO or parameters at the same step) or a failure of the environment (a write
    that failed, an unexpected error; under MPI it aborts the whole job); 128 + N: stopped by
    signal N after a checkpoint.
    """
    from .fileio import without_folder_locks
    from .logs import configure
    from .parallel import world

    comm = world()
    configure(comm)
    parser = build_parser()
    debug = False
    try:
        args = parser.parse_args(argv)
        debug = getattr(args, "debug", False)
        _configure_logging(args, comm)
        if args.command is None:
            parser.print_help()
            return 0
        with warnings.catch_warnings(), \
                without_folder_locks() if getattr(args, "no_lock", False) else contextlib.nullcontext():
            warnings.simplefilter("default" if comm.rank == 0 else "ignore")
            return args.func(args, comm)
    except InputError as e:
        if comm.rank == 0:
            _error(f"galdecomp: error: {e}")
        return 2
    except JobStopped as e:  # every rank stopped at the same step, after the checkpoint
        return 128 + e.signum
    except KeyboardInterrupt:
        print("galdecomp: interrupted", file=sys.stderr)
        if comm.size > 1:
            comm.abort(130)
        return 130
    except FloatingPointError as e:  # raised by every rank at the same step
        if comm.rank == 0:
            _error(f"galdecomp: error: {e}")
        return 1
    except WriteError as e:
        _error(f"galdecomp: error: {e}")
        if comm.size > 1:
            comm.abort(1)
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        line = _unexpected(e)
        if comm.size == 1:
            _error(f"galdecomp: error: {line}")
            return 1
        _error(f"galdecomp: error: rank {comm.rank} failed: aborting all {comm.size} ranks: {line}")
        comm.abort(1)
    finally:
        configure(comm)  # closes the --log-file


if __name__ == "__main__":
    sys.exit(main())
