"""The galdecomp command line: ``galdecomp COMMAND ...``.

Every failure is reported as one line ``galdecomp: error: ...``: exit status 2 for bad input,
1 for a failure of the environment (a write that failed, an unexpected error, whose traceback
goes to a log file; ``--debug`` shows it instead).
"""
import contextlib
import logging
import os
import sys
import tempfile
import traceback
import warnings

from . import __version__
from .cli_options import build_parser
from .errors import InputError, JobStopped, WriteError

__all__ = ["main", "COMMANDS"]

log = logging.getLogger(__name__)


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
                                   fwhm_arcmin=args.fwhm_arcmin, rotation=args.rotate))
    fit = fit_catalog if args.data is None else fit_table
    res = fit(args.catalog if args.data is None else args.data, args.out, overrides, _config_file(args.config),
              args.resume, args.overwrite, comm=comm)
    if comm.rank == 0:
        _print_fit(res)
    return 0


def _print_fit(res):
    from .run import RunFolder

    p, name = res["products"]["paths"], RunFolder.array_name
    print(f"run folder: {res['run_dir']}")
    if name("latent_mean", ".fits") in p:
        print(f"latent feature maps: {p[name('latent_mean', '.fits')]} (std: {p[name('latent_std', '.fits')]})")
    else:
        print(f"latent features: {p[name('latent_mean', '.csv')]} (std: {p[name('latent_std', '.csv')]})")
    print(f"plots: {p['plots']}")


def cmd_report(args, comm):
    from .run import RunFolder

    if comm.size > 1:
        raise InputError("galdecomp report runs on one process (start it without mpiexec)")
    if args.bins < 2:
        raise InputError(f"--bins must be at least 2, got {args.bins}")
    run = RunFolder(os.path.abspath(args.run))
    out = os.path.abspath(args.out or run.path("report"))
    into_run = os.path.isdir(run.dir) and os.path.commonpath([run.dir, out]) == run.dir
    with run.lock() if into_run else contextlib.nullcontext():  # one writer per run folder
        from .products.report import make_report

        res = make_report(args.run, args.templates, out=args.out, bins=args.bins, seed=args.seed,
                          progress=log.info)
    report_md = RunFolder.REPORT_FILES["report"]
    print(f"report: {res['paths'].get(report_md, RunFolder.report_file(res['out'], 'report'))} "
          f"(latent features rotated: {res.get('rotation', 'none')})")
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
                      overwrite=args.overwrite, progress=log.info, fwhm_arcmin=args.fwhm_arcmin,
                      noise=args.noise)
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
    from .run import RunFolder

    if not os.path.isdir(path):
        raise InputError(f"{path}: run folder not found")
    return RunFolder(path).trained_model()


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
    from .products.generate import refit_transform
    from .run import RunFolder

    trained = _load_run(args.run)
    res = refit_transform(trained, args.method, args.seed, progress=log.info)
    run = RunFolder(args.run)
    with RunFolder(os.path.abspath(args.run)).lock():
        path = run.write_transform(res["density"])
    print(f"latent transform: {path}")
    print(f"held-out log-density per draw: {res['held_out_log_density']:.3f} "
          f"(prior N(0, 1): {res['held_out_log_prior']:.3f})")
    return 0


def cmd_sample(args, comm):
    _one_process(comm, args.command)
    from .products.generate import held_out_rows, write_samples

    if args.n < 1:
        raise InputError(f"--n must be positive, got {args.n}")
    from .run import RunFolder

    trained = _load_run(args.run)
    if args.source == "transformed" and trained.transform is None:
        raise InputError(f"{args.run}: no latent transform ({RunFolder.FILES['transform']}): fit one with "
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


#: the function of each command (``galdecomp COMMAND``; options in :mod:`galdecomp.cli_options`)
COMMANDS = {
    "simulate": cmd_simulate,
    "inspect": cmd_inspect,
    "fit": cmd_fit,
    "report": cmd_report,
    "run": cmd_run,
    "anomaly": cmd_anomaly,
    "posterior-check": cmd_posterior_check,
    "reconstruct": cmd_reconstruct,
    "transform": cmd_transform,
    "sample": cmd_sample,
}


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
            return COMMANDS[args.command](args, comm)
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
