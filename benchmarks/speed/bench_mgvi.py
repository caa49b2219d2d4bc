"""MGVI / geoVI posteriors: exact block-diagonal metric vs NIFTy's conjugate gradients, against
the amortised fit, in ONE run.

For each ``--nside``: the simulated sky (``galdecomp simulate``, seed 0, written to a scratch
folder) is fitted with the default settings (``galdecomp.pipeline.fit_catalog``, amortised
posterior: what ``galdecomp fit CATALOG --out RUN --nside N`` runs; its wall time is the
reference), then the posterior step of ``galdecomp fit ... --resume --posterior mgvi|geovi`` is
timed alone (``latent_posterior_samples`` with the run's decoder, noise, data and encoder means;
default settings: 2 antithetic pairs, 3 iterations) with ``solver="block"`` (the package's
default) and, up to ``--cg-max-nside``, ``solver="cg"`` (NIFTy's ``optimize_kl`` with conjugate
gradients, the code before the block metric). Where both run, the block solver is also run with
NIFTy's draws (``draws="nifty"``, the random numbers of the CG path) and the largest difference of
the samples from the CG path's is printed in units of the samples' std.

``--catalog`` fits that catalog instead of the simulated sky (e.g. the 18 real maps), and
``--cpu`` reports process CPU time of the posterior step instead of wall time (the fit stays
wall time), for runs on a shared machine.

Usage::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.speed.bench_mgvi --nside 32 64 --cg-max-nside 32
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m benchmarks.speed.bench_mgvi --nside 32 64 --cg-max-nside 0 \
        --catalog real64_inputs.yaml
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import fit, show_progress, simulate
from galdecomp import pipeline
from galdecomp.inference import mgvi


class _Captured(Exception):
    pass


def posterior_inputs(catalog, run):
    """The arguments the pipeline gives ``latent_posterior_samples`` on ``run`` (resume, mgvi)."""
    box = {}
    orig = mgvi.latent_posterior_samples

    def capture(*args, **kw):
        box["args"], box["kw"] = args, kw
        raise _Captured

    mgvi.latent_posterior_samples = capture
    try:
        pipeline.fit_catalog(catalog, run, overrides={"posterior": {"method": "mgvi"}}, resume=True)
    except _Captured:
        pass
    finally:
        mgvi.latent_posterior_samples = orig
    args, kw = box["args"], box["kw"]
    kw.pop("log", None)
    kw.update(n_samples=args[6], iterations=args[7])
    return args[:5], kw


CLOCK = time.perf_counter


def timed(f, *a, **kw):
    t = CLOCK()
    out = f(*a, **kw)
    return CLOCK() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nside", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--cg-max-nside", type=int, default=32)
    ap.add_argument("--catalog", help="fit this catalog instead of the simulated sky")
    ap.add_argument("--cpu", action="store_true", help="posterior step: process CPU time, not wall time")
    args = ap.parse_args()
    global CLOCK
    import logging

    logging.getLogger("NIFTy8").setLevel(logging.ERROR)
    print(f"load average {os.getloadavg()[0]:.2f}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    tmp = tempfile.mkdtemp(prefix="bench_mgvi_")
    try:
        if args.catalog:
            catalog = os.path.abspath(args.catalog)
        else:
            catalog = os.path.join(tmp, "sky", "catalog.yaml")
            show_progress()  # as the command line galdecomp simulate did before the fits
            simulate(os.path.join(tmp, "sky"), max(args.nside))
        rows = []
        for nside in args.nside:
            run = os.path.join(tmp, f"run{nside}")
            CLOCK = time.perf_counter
            t_fit, _ = timed(fit, catalog, run, nside=nside)
            a, kw = posterior_inputs(catalog, run)
            CLOCK = time.process_time if args.cpu else time.perf_counter
            res = {"amortised fit": t_fit}
            for method in ("mgvi", "geovi"):
                res[f"{method} block"], s_blk = timed(mgvi.latent_posterior_samples, *a, method=method, **kw)
                if nside <= args.cg_max_nside:
                    res[f"{method} cg"], s_cg = timed(mgvi.latent_posterior_samples, *a, method=method,
                                                      solver="cg", **kw)
                    _, s_nf = timed(mgvi.latent_posterior_samples, *a, method=method, draws="nifty", **kw)
                    d = np.abs(s_nf - s_cg) / s_cg.std(0)
                    print(f"nside {nside} {method}: |block - cg| / sample std (same draws): median "
                          f"{np.median(d):.1e}, 99 % {np.quantile(d, 0.99):.1e}, max {d.max():.1e}")
                print(f"nside {nside}: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.items()), flush=True)
            rows.append((nside, res))
        cols = ["amortised fit", "mgvi block", "mgvi cg", "geovi block", "geovi cg"]
        print("\n| nside | pixels | " + " | ".join(cols) + " |")
        for nside, res in rows:
            print(f"| {nside} | {12 * nside ** 2} | " + " | ".join(
                f"{res[k]:.1f} s" if k in res else "-" for k in cols) + " |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
