"""Speed of ``make_report`` and the effect of the KSG pixel subsample (not a test).

For each nside: simulate the default sky, fit it for a few epochs (both in a temporary
folder), time ``make_report`` against the truth templates stage by stage, then compare the
KSG MI of a few (feature, template) pairs on the report's subsample with the KSG MI on all
pixels and on a 4x larger subsample.

Usage: ``python -m benchmarks.speed.bench_report [--nside 64 128] [--epochs 3] [--keep DIR]``,
``python -m benchmarks.speed.bench_report --run RUN --templates CATALOG`` for an existing run, or
``python -m benchmarks.speed.bench_report --calibration``: false-positive rates of the block-permutation
and rotation p-values and coverage of the bootstrap interval on Gaussian random fields.
"""
import argparse
import os
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from benchmarks.common import fit, show_progress, simulate  # noqa: E402  (after the BLAS threads)


def _timed(f, *args, **kw):
    t = time.perf_counter()
    f(*args, **kw)
    return time.perf_counter() - t


def subsample_effect(run, templates, report, n_pairs=8):
    """KSG MI on the report's subsample, a 4x larger one and all pixels, for a few pairs."""
    import numpy as np

    from galdecomp.catalog import load_catalog
    from galdecomp.preprocessing import Preprocessor
    from galdecomp.products.dependence import BlockResampler, ksg_terms
    from galdecomp.products.report import KSG_PIXELS, read_run

    r = read_run(run)
    tset = load_catalog(templates, nside=r["nside"])
    T = Preprocessor.fit(tset).forward(tset.values)
    rows = sorted((s for s in report["summary"] if s["method"] == "galdecomp"), key=lambda s: -s["mi_ksg"])
    picks = rows[: n_pairs // 2] + rows[len(rows) // 2: len(rows) // 2 + n_pairs - n_pairs // 2]
    big = BlockResampler(r["nside"], 4 * KSG_PIXELS, n_boot=200, n_perm=1)
    print(f"\nKSG MI [nats] on the report subsample ({report['ksg_pixels']} px), on {big.n_pixels} px "
          f"and on all {report['n_pixels']} px (seed 0):")
    print(f"{'template':24s} {'feature':11s} {'subsample [16-84%]':>24s} {'4x':>7s} {'all':>7s} "
          f"{'sub-all':>8s}  all-px s")
    diffs = []
    for s in picks:
        x, y = r["features"][r["names"].index(s["best_feature"])], T[tset.names.index(s["template"])]
        ok = np.isfinite(x) & np.isfinite(y)
        t = time.perf_counter()
        full = max(0.0, float(ksg_terms(x[ok], y[ok]).mean()))
        dt = time.perf_counter() - t
        b = big.ksg(x, y)[0]
        diffs.append(s["mi_ksg"] - full)
        print(f"{s['template'][:24]:24s} {s['best_feature']:11s} {s['mi_ksg']:7.3f} "
              f"[{s['mi_ksg_low']:6.3f},{s['mi_ksg_high']:6.3f}] {b:7.3f} {full:7.3f} "
              f"{s['mi_ksg'] - full:+8.3f}  {dt:6.2f}")
    d = np.array(diffs)
    print(f"subsample - all pixels: mean {d.mean():+.3f}, max |.| {np.abs(d).max():.3f} nats")


def calibration(nside=16, n_pairs=120, rho=0.8):
    """Null calibration of the p-values and coverage of the bootstrap interval on Gaussian fields.

    Independent pairs of isotropic fields (``healpy.synfast``): fraction of p < 0.05 for block
    permutation and rotations. Correlated pairs ``b = rho a + sqrt(1 - rho^2) c``: fraction of
    the 16-84 % block-bootstrap intervals of the KSG MI containing ``-log(1 - rho^2) / 2``.
    """
    import warnings

    import healpy as hp
    import numpy as np

    from galdecomp.products.dependence import BlockResampler

    res = BlockResampler(nside, n_perm=199, seed=0)
    ell = np.arange(3 * nside)
    true = -0.5 * np.log(1 - rho ** 2)
    print(f"\nCalibration at nside {nside} ({res.index.shape[0]} blocks of {res.index.shape[1]} px), "
          f"{n_pairs} field pairs per row:")
    print(f"{'fields':22s} {'P(p_block<.05)':>15s} {'P(p_rot<.05)':>13s} {'68% interval coverage':>22s}")
    white = np.ones(ell.size)
    for name, cl, fwhm in [("white, fwhm 5 deg", white, 5.0), ("white, fwhm 10 deg", white, 10.0),
                           ("white, fwhm 20 deg", white, 20.0), ("C_l ~ (l+1)^-2", 1.0 / (ell + 1.0) ** 2, 0.0)]:
        pb, pr, cover = [], [], []
        for s in range(n_pairs):
            np.random.seed(1000 + s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a, b, c = (hp.synfast(cl, nside, fwhm=np.radians(fwhm)) for _ in range(3))
            a, b, c = ((m - m.mean()) / m.std() for m in (a, b, c))
            pb.append(res.pvalue(a, b))
            pr.append(res.pvalue_rotation(a, b))
            _, lo, hi = res.ksg(a, rho * a + np.sqrt(1 - rho ** 2) * c)
            cover.append(lo <= true <= hi)
        print(f"{name:22s} {np.mean(np.array(pb) < 0.05):15.3f} {np.mean(np.array(pr) < 0.05):13.3f} "
              f"{np.mean(cover):22.3f}")


def bench(nside, epochs, work, run=None, templates=None):
    from galdecomp.products.report import make_report

    if run is None:
        sky, run = os.path.join(work, f"sky{nside}"), os.path.join(work, f"run{nside}")
        show_progress()  # as the command line did
        t_sim = _timed(simulate, sky, nside)
        t_fit = _timed(fit, os.path.join(sky, "catalog.yaml"), run, max_epochs=epochs)
        templates = os.path.join(sky, "truth", "catalog.yaml")
        print(f"nside {nside}: simulate {t_sim:.1f} s, fit ({epochs} epochs) {t_fit:.1f} s", flush=True)
    t0 = time.perf_counter()
    rep = make_report(run, templates, progress=lambda m: print(f"  [{time.perf_counter() - t0:6.1f}s] {m}",
                                                              flush=True))
    wall = time.perf_counter() - t0
    n = len(rep["correlations"])
    stages = ", ".join(f"{k} {v:.1f}" for k, v in rep["timings"].items() if k != "total")
    print(f"nside {rep['nside']}: make_report {wall:.1f} s for {n} pairs ({len(rep['methods'])} methods), "
          f"{rep['n_pixels']} pixels, KSG subsample {rep['ksg_pixels']}\n  stages [s]: {stages}", flush=True)
    subsample_effect(run, templates, rep)
    return wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nside", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--epochs", type=int, default=3,
                    help="fit epochs (the report's speed does not depend on them)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    ap.add_argument("--run", help="existing run folder (with --templates)")
    ap.add_argument("--templates", help="templates catalog for --run")
    ap.add_argument("--calibration", action="store_true",
                    help="only the null calibration of the p-values and the interval coverage")
    args = ap.parse_args()
    if args.calibration:
        calibration()
        return
    if args.run:
        if not args.templates:
            ap.error("--run needs --templates")
        bench(None, None, None, args.run, args.templates)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        walls = {n: bench(n, args.epochs, work) for n in args.nside}
    print("\nmake_report wall time: " + ", ".join(f"nside {n}: {w:.1f} s" for n, w in walls.items()))


if __name__ == "__main__":
    main()
