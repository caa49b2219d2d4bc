"""How many features the data support: significance and validation ELBO against the number of features.

For each sky and each number of latent features L, one fit (``galdecomp.pipeline.fit_catalog``,
what ``galdecomp fit CATALOG --latent-dim L --max-epochs E --seed S`` runs; every other setting
the default) and, from it:

- the best validation ELBO (median over the validation pixels, nats/pixel: the statistic that
  selects the kept parameters);
- the significance of every feature (``significance.csv``: log-likelihood lost per pixel when
  the feature is set to its prior mean), in significance order;
- the features at or above :data:`galdecomp.products.run_outputs.UNUSED_NATS_PER_ROW`
  (0.1 nats/pixel: the others are reported as unused).

Skies: ``demo`` (the simulated default sky of ``galdecomp run``, seed 0, at ``--nside``,
written into a scratch folder) and ``realsky32`` (the real maps,
``$GALDECOMP_SHARED/data/realsky32/catalog.yaml``, default ``../shared``). L larger than a
sky's channels is skipped. Run folders go to a scratch folder, removed at the end.

Writes ``--out`` (default ``bench_features``): ``features.csv`` (one row per fit) and
``features.md`` (the table of benchmarks/README.md).

Usage::

    python -m benchmarks.science.bench_features                                  # 2 skies x L = 2..12, 60 epochs
    python -m benchmarks.science.bench_features --skies demo --latent-dims 2,6 --epochs 5   # quick check
"""
import argparse
import csv
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import fit, load_average, package_fingerprint, shared_dir, simulate

COLUMNS = ["sky", "latent_dim", "epochs", "best_validation_elbo", "features_used", "significance_per_pixel",
           "seconds"]


def one_fit(catalog, run_dir, L, epochs, seed, threads):
    """One fit; returns its row of features.csv (without ``sky``)."""
    from galdecomp.products.run_outputs import unused_features

    training = {"max_epochs": epochs}
    if threads:
        training["threads"] = threads
    t0 = time.perf_counter()
    res = fit(catalog, run_dir, latent_dim=L, seed=seed, training=training)
    seconds = time.perf_counter() - t0
    with open(os.path.join(run_dir, "significance.csv"), newline="") as f:
        sig = np.array([float(r["delta_loglike_per_pixel"]) for r in csv.DictReader(f)])
    return dict(latent_dim=L, epochs=res["state"].epoch, best_validation_elbo=-res["state"].best_val,
                features_used=int((~unused_features(sig)).sum()),
                significance_per_pixel=" ".join(f"{s:.3g}" for s in sig), seconds=seconds)


def markdown(rows):
    lines = ["| sky | L | epochs | best validation ELBO [nats/pixel] | features >= 0.1 nats/pixel | "
             "significance per feature [nats/pixel] | s |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['sky']} | {r['latent_dim']} | {r['epochs']} | {r['best_validation_elbo']:.3f} | "
                     f"{r['features_used']} | {r['significance_per_pixel']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skies", default="demo,realsky32", help="comma-separated: demo, realsky32")
    p.add_argument("--latent-dims", default="2,4,6,8,10,12", help="comma-separated numbers of features")
    p.add_argument("--epochs", type=int, default=60, help="training epochs at most per fit (default 60)")
    p.add_argument("--nside", type=int, default=32, help="nside of the demo sky (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fits (default 0)")
    p.add_argument("--threads", type=int, default=None, help="training.threads (default: every core)")
    p.add_argument("--out", default="bench_features", help="folder of features.csv and features.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from galdecomp.catalog import read_catalog

    dims = [int(x) for x in args.latent_dims.split(",")]
    scratch = tempfile.mkdtemp(prefix="bench_features_")
    rows = []
    try:
        for sky in args.skies.split(","):
            if sky == "demo":
                catalog = simulate(os.path.join(scratch, "demo"), args.nside, seed=0)
            elif sky == "realsky32":
                catalog = os.path.join(shared_dir(), "data", "realsky32", "catalog.yaml")
            else:
                p.error(f"unknown sky {sky!r}")
            C = len(read_catalog(catalog).maps)
            for L in dims:
                if L > C:
                    print(f"{sky}: L = {L} skipped ({C} channels)", file=sys.stderr)
                    continue
                r = dict(sky=sky, **one_fit(catalog, os.path.join(scratch, f"{sky}_{L}"), L, args.epochs,
                                            args.seed, args.threads))
                rows.append(r)
                print(f"{sky} L={L}: ELBO {r['best_validation_elbo']:.3f}, {r['features_used']} used, "
                      f"significance {r['significance_per_pixel']} ({r['seconds']:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "features.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    with open(os.path.join(args.out, "features.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"{package_fingerprint()}; load average {load_average()}; epochs {args.epochs}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
