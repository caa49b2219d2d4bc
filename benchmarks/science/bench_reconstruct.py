"""Reconstruction of held-out channels: accuracy against regressions, and calibration.

For each sky (the demo sky, the real-morphology sky and the real maps, nside 32) and seed:
simulate (not the real maps), fit with the CLI's defaults (``--max-epochs`` as given), then
``galdecomp reconstruct`` with every channel of the sky's held-out list hidden and half of each
pixel's other channels hidden, once per ``--noise`` mode (``model``: the trained noise;
``recalibrated``: the noise re-estimated at the MAP; ``calibrated``: that and each channel's
predictive levels recalibrated on hidden entries of the run's own data). Writes
``benchmarks/out/reconstruct/rows.csv`` and ``summary.md``.

Calibration diagnostics per held-out channel (to tell the noise model from the posterior):
``resid_rms``: RMS of ``(d - f(z_MAP)) / sigma`` with ``z_MAP`` conditioned on all channels (1 if
the learned noise matches the residuals at the MAP; below 1: sigma too large, intervals too wide).

Usage::

    python -m benchmarks.science.bench_reconstruct [--skies demo,realmorph,real] [--seeds 0,1,2] [--max-epochs 100]
"""
import argparse
import csv
import os
import time

import numpy as np

from benchmarks import common
from galdecomp.inference.predictive import CALIBRATION_ROWS

HOLDOUT = ["planck_545GHz", "rosat_0p75keV", "fermi_1_3GeV", "halpha", "radio_408MHz", "wmap_W_94GHz"]
#: held-out channels of the real maps (``benchmarks.common.prepare_real``'s inputs at nside 32)
HOLDOUT_REAL = ["wham_halpha", "rosat_R45_3-4keV", "wmap7yr_W", "gsm2008_408MHz", "fermi2fhl_50-171GeV"]
NOISE_MODES = ("model", "recalibrated", "calibrated")


def one(sky, seed, args, work):
    import galdecomp
    from galdecomp.catalog import load_catalog, read_catalog

    sky_dir, fit_dir, rec_dir = (os.path.join(work, f"{sky}-{seed}-{k}") for k in ("sky", "fit", "rec"))
    holdout = HOLDOUT
    if sky == "real":
        catalog = common.prepare_real(work, 32)[0]
        holdout = HOLDOUT_REAL
    else:
        catalog = os.path.join(sky_dir, "catalog.yaml")
        if not os.path.isfile(catalog):
            morphology = os.path.join(args.shared, "data", "realsky32") if sky == "realmorph" else None
            common.simulate(sky_dir, 32, seed, morphology=morphology and os.path.abspath(morphology))
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(fit_dir, "model.npz")):
        common.fit(catalog, fit_dir, seed=seed, max_epochs=args.max_epochs)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    from galdecomp.products.reconstruct import reconstruct_sky

    trained = galdecomp.load(fit_dir)
    results = {}
    for noise in args.noise.split(","):
        results[noise] = reconstruct_sky(trained, catalog, rec_dir, holdout=holdout,
                                         hide_fraction=0.5, n_draws=args.draws, seed=seed, overwrite=True,
                                         noise=noise, calibration_rows=args.calibration_rows)
    t_rec = (time.perf_counter() - t0) / len(results)
    # noise-model diagnostic: residuals at the MAP given all channels, in units of sigma
    ds = load_catalog(read_catalog(trained.data["path"]), nside=trained.data["nside"], nest=True)
    y = trained.standardise(ds.values.T)
    full = trained.condition(y, standardised=True)
    r = (y - trained.decode(full["mean"], physical=False)) / trained.sigma
    rms = np.sqrt(np.nanmean(r ** 2, axis=0))
    rows = []
    for noise, res in results.items():
        for row in res["holdout"]:
            c = trained.names.index(row["channel"]) if row["channel"] in trained.names else None
            rows.append(dict(sky=sky, seed=seed, noise=noise, **row,
                             resid_rms=float(rms[c]) if c is not None else float("nan"),
                             sigma_ratio=float(res["sigma"][c] / trained.sigma[c]) if c is not None else float("nan"),
                             fit_s=round(t_fit, 1), reconstruct_s=round(t_rec, 1)))
    return rows


def summarise(rows, path):
    lines = ["| sky | channel | noise | RMSE model | RMSE median | RMSE linear | RMSE boosting | 68% coverage | "
             "95% coverage | resid RMS at MAP | recalibrated / model sigma |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["sky"], r["channel"], r["noise"]) for r in rows})
    for sky, ch, noise in keys:
        rr = [r for r in rows if r["sky"] == sky and r["channel"] == ch and r["noise"] == noise]
        med = lambda k: float(np.median([float(r[k]) for r in rr]))
        lines.append(f"| {sky} | {ch} | {noise} | {med('rmse_standardised'):.3f} | {med('rmse_median'):.3f} | "
                     f"{med('rmse_linear'):.3f} | "
                     f"{med('rmse_boosting'):.3f} | {100 * med('coverage_68'):.1f}% | {100 * med('coverage_95'):.1f}% | "
                     f"{med('resid_rms'):.2f} | {med('sigma_ratio'):.2f} |")
    text = "\n".join(lines) + f"\n\nmedians over seeds {sorted({r['seed'] for r in rows})}\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skies", default="demo,realmorph,real")
    ap.add_argument("--noise", default=",".join(NOISE_MODES), help="noise modes of reconstruct (comma-separated)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--calibration-rows", type=int, default=CALIBRATION_ROWS,
                    help="pixels per channel of the PIT calibration (default: reconstruct's)")
    ap.add_argument("--shared", default=common.shared_dir())
    ap.add_argument("--out", default=common.out_dir("reconstruct"))
    args = ap.parse_args(argv)
    os.environ["GALDECOMP_SHARED"] = os.path.abspath(args.shared)  # common.prepare_real's real-sky catalogs too
    common.show_progress()
    os.makedirs(os.path.join(args.out, "work"), exist_ok=True)
    rows = []
    for sky in args.skies.split(","):
        for seed in map(int, args.seeds.split(",")):
            rows += one(sky, seed, args, os.path.join(args.out, "work"))
            with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            print(summarise(rows, os.path.join(args.out, "summary.md")), flush=True)


if __name__ == "__main__":
    main()
