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

    data = load_catalog(args.catalog, nside=args.nside)
    pre = Preprocessor.fit(data)
    rows = summarise(data, pre)
    if args.format == "text":
        print(f"{args.catalog}: {data.n_features} maps, working nside {data.nside} "
              f"({data.n_samples} pixels)")
    sys.stdout.write(format_table(rows, COLUMNS, args.format))
    return 0


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
    from .pipeline import fit_catalog, fit_table

    if (args.catalog is None) == (args.data is None):
        raise InputError("fit: give exactly one of CATALOG or --data FILE")
    if args.data is not None and args.nside is not None:
        raise InputError("--nside: only for a catalog of maps, not with --data")
    overrides = dict(nside=args.nside, latent_dim=args.latent_dim, covariance=args.covariance,
                     beta=args.beta, seed=args.seed)
    if args.max_epochs is not None:
        overrides["training"] = {"max_epochs": args.max_epochs}
    if args.posterior is not None:
        overrides["posterior"] = {"method": args.posterior}
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
    res = run_main_job(cfg, out=args.out, overwrite=args.overwrite, resume=args.resume, config_dir=base,
                       comm=comm)
    if res["fit"]["products"] is None:  # not rank 0
        return 0
    print(f"simulated sky: {res['sky']}")
    _print_fit(res["fit"])
    if res.get("report"):
        print(f"report: {res['report']}")
    return 0


# -- parser ---------------------------------------------------------------------------------------


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an unexpected error")
    p = _Parser(prog="galdecomp", parents=[common],
                description="Unsupervised Bayesian decomposition of the multi-frequency sky "
                            "with probabilistic autoencoders.")
    p.add_argument("--version", action="version", version=f"galdecomp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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

    s = sub.add_parser("inspect", parents=[common], help="table of a catalog's maps, transforms and warnings",
                       description="Read a map catalog and print, per map: frequency, unit, kind, "
                                   "native nside, coverage, min/median/max, the preprocessing "
                                   "transform and warnings (near-duplicates, gaps, zeros).")
    s.add_argument("catalog", help="catalog YAML file")
    s.add_argument("--nside", type=_nside, help="working resolution (default: catalog's or lowest)")
    s.add_argument("--format", choices=["text", "markdown", "csv"], default="text")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("fit", parents=[common],
                       help="fit the probabilistic autoencoder to a catalog's maps or a table",
                       description="Fit the probabilistic autoencoder (decoder, adaptive noise, "
                                   "amortised encoder) to the maps of CATALOG, or to the rows of a "
                                   "table (--data FILE), and write latent features and diagnostics "
                                   "to RUN. Ctrl-C leaves a resumable run.")
    s.add_argument("catalog", nargs="?", help="catalog YAML file (or --data FILE)")
    s.add_argument("--data", metavar="FILE",
                   help="a table instead of a catalog: FILE.npy (rows x features), FILE.npz (key data, "
                        "optional names) or FILE.csv (header of feature names); NaN = missing")
    s.add_argument("--out", required=True, metavar="RUN", help="run folder")
    s.add_argument("--nside", type=_nside, help="working resolution (default: catalog's or lowest)")
    s.add_argument("--latent-dim", type=_positive_int, help="number of latent features (default 10)")
    s.add_argument("--covariance", choices=["diagonal", "fisher"],
                   help="latent posterior covariance (default diagonal)")
    s.add_argument("--beta", type=float, help="weight of the KL term (default 1)")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    s.add_argument("--max-epochs", type=_positive_int, help="training epochs at most (default 150)")
    s.add_argument("--posterior", choices=["amortised", "mgvi", "geovi"],
                   help="latent posterior: the encoder's (default), or NIFTy's MGVI/geoVI after "
                        "training (also on a finished run with --resume)")
    s.add_argument("--config", metavar="FILE", help="YAML configuration (e.g. a run's config.yaml)")
    s.add_argument("--resume", action="store_true", help="continue the run in RUN from its checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace an existing RUN")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("report", parents=[common], help="which latent feature is which physical component",
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

    s = sub.add_parser("run", parents=[common], help="the main job: simulate the default sky, fit it, report",
                       description="Simulate the built-in default sky, fit the autoencoder to it and "
                                   "write everything below OUT (default runs/main): OUT/sky, OUT/fit, "
                                   "and the report against the truth maps, OUT/fit/report.")
    s.add_argument("--config", metavar="FILE",
                   help="YAML with out, simulate: {nside, seed, morphology}, fit: {fit settings}")
    s.add_argument("--out", help="output folder (default from the config, else runs/main)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted main job")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_run)
    return p


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


def main(argv=None):
    """Run the command line; returns the exit status.

    Exit status 2: bad input (one line from rank 0, on every rank under MPI, as it is checked
    identically everywhere); 1: a failure of the environment (a write that failed, an unexpected
    error; under MPI it aborts the whole job); 128 + N: stopped by signal N after a checkpoint.
    """
    from .parallel import world

    from .logs import configure

    comm = world()
    configure(comm)
    parser = build_parser()
    debug = False
    try:
        args = parser.parse_args(argv)
        debug = getattr(args, "debug", False)
        if args.command is None:
            parser.print_help()
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("default" if comm.rank == 0 else "ignore")
            return args.func(args, comm)
    except InputError as e:
        if comm.rank == 0:
            print(f"galdecomp: error: {e}", file=sys.stderr)
        return 2
    except JobStopped as e:  # every rank stopped at the same step, after the checkpoint
        return 128 + e.signum
    except KeyboardInterrupt:
        print("galdecomp: interrupted", file=sys.stderr)
        if comm.size > 1:
            comm.abort(130)
        return 130
    except (WriteError, FloatingPointError) as e:
        print(f"galdecomp: error: {e}", file=sys.stderr)
        if comm.size > 1:
            comm.abort(1)
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        line = _unexpected(e)
        if comm.size == 1:
            print(f"galdecomp: error: {line}", file=sys.stderr)
            return 1
        print(f"galdecomp: error: rank {comm.rank} failed: aborting all {comm.size} ranks: {line}",
              file=sys.stderr)
        comm.abort(1)


if __name__ == "__main__":
    sys.exit(main())
