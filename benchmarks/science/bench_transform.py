"""Latent normalising transform: which density of the aggregate posterior Q(z) generates the
most realistic rows.

For every trained run folder given (``galdecomp fit ... --out RUN``): the model is rebuilt from
``RUN/checkpoint.npz``, the posterior moments of every pixel are computed, and the pixels are
split as the fit split them (``split_rows`` with the run's seed and validation fraction), so
the held-out pixels were seen neither by the autoencoder nor by the densities. Densities are
fitted to ``--draws`` draws per training pixel (:func:`gaussian_draws_per_row`):

- ``prior``: N(0, 1), no transform;
- ``gauss``: one full-covariance Gaussian;
- ``gmm-K``: scikit-learn Gaussian mixture with K full components;
- ``rbig-K`` / ``rbig-auto``: iterative Gaussianisation (:class:`GaussianisingTransform`) with
  random rotations, K layers or as many as its held-out stopping rule keeps (20 % of the
  training pixels held out inside the fit); ``pca-auto``: PCA rotations (the default), stopping
  rule.

Measured per method:

- ``logQ``: mean log-density of ``--draws`` posterior draws per held-out pixel (nats per draw,
  higher is better);
- ``FD``: Fréchet distance between ``--gen`` generated channel vectors ``d = f(z) + sigma eps``
  (z from the density) and the held-out real standardised channel vectors without missing
  channel; mean over ``--repeats`` generator seeds (its spread in parentheses). References:
  ``real-train`` (as many real training rows as held-out rows against the held-out rows: the
  measure's own finite-sample floor) and ``Q-train`` (z drawn from the training pixels'
  posteriors, the target every density tries to reproduce);
- ``ratio``: FD / FD(prior); ``KSmed``: median over channels of the two-sample KS statistic;
- fit time in seconds (one core).

Usage::

    python -m benchmarks.science.bench_transform /tmp/tx/demo-fit /tmp/tx/rm-fit

Prints a table per run and writes ``--out`` (default ``benchmarks/out/transform``)/summary.md.
"""
import argparse
import json
import os
import time

import numpy as np
import yaml

from benchmarks.common import load_average, out_dir, package_fingerprint
from galdecomp.catalog import read_catalog, working_nside
from galdecomp.inference.minibatches import split_rows
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.model.latent_transform import (GaussianDensity, GaussianisingTransform,
                                              GaussianMixtureDensity, gaussian_draws_per_row)
from galdecomp.sources import load_preprocessed
from galdecomp.products.sample_quality import frechet_distance, ks_per_feature


def load_run(run):
    """Model, parameters, standardised data and mask of a run folder."""
    with np.load(os.path.join(run, "checkpoint.npz"), allow_pickle=False) as f:
        cfg = json.loads(str(f["config"]))
        params = np.array(f["best_params"])
    with open(os.path.join(run, "config.yaml")) as f:
        catalog = yaml.safe_load(f)["catalog"]
    floor = np.genfromtxt(os.path.join(run, "noise.csv"), delimiter=",", names=True, dtype=None,
                          encoding="utf-8")["floor_standardised"].astype(float)
    cat = read_catalog(catalog)
    nside = working_nside(cat, cfg["nside"])
    _, _, data = load_preprocessed(cat, nside)
    model = Autoencoder.from_config(cfg, data.shape[1], floor)
    return cfg, model, params, data


def truncated(T, k):
    return GaussianisingTransform(T.rotations[:k], T.knots_x[:k], T.knots_y[:k], T.knots_d[:k])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--draws", type=int, default=8, help="posterior draws per pixel")
    ap.add_argument("--gen", type=int, default=20000, help="generated rows per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gmm", default="4,16,32", help="GMM component counts")
    ap.add_argument("--layers", default="5,20,80", help="fixed layer counts of iterative Gaussianisation")
    ap.add_argument("--out", default=out_dir("transform"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = [f"# Latent transform benchmark\n",
             f"`python -m benchmarks.science.bench_transform {' '.join(args.runs)}` --draws {args.draws} "
             f"--gen {args.gen} --repeats {args.repeats}; {package_fingerprint()}; load {load_average()}\n"]
    for run in args.runs:
        t0 = time.perf_counter()
        cfg, model, params, data = load_run(run)
        mask = np.isfinite(data)
        data0 = np.where(mask, data, 0.0)
        mean, cov = model.posterior_moments(params, data0, mask, full_cov=True)
        P, L = mean.shape
        tr, va = split_rows(P, cfg["training"]["validation_fraction"], cfg["seed"])
        rng = np.random.default_rng(0)
        z_tr = gaussian_draws_per_row(mean[tr], cov[tr], args.draws, rng)
        groups = np.repeat(np.arange(len(tr)), args.draws)
        z_va = gaussian_draws_per_row(mean[va], cov[va], args.draws, rng)
        complete = mask.all(1)
        real_va = data[va][complete[va]]
        real_tr = data[tr][complete[tr]]
        sig = model.sigma(params)
        print(f"{run}: {P} pixels x {data.shape[1]} channels, L={L}; {len(tr)} training / {len(va)} held-out "
              f"pixels ({len(real_va)} complete); {len(z_tr)} fitting draws; loaded in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

        def generate(z, r):
            return model.decode(params, z) + sig * r.standard_normal((len(z), len(sig)))

        def fd_of(sampler):
            fds, kss = [], []
            for rep in range(args.repeats):
                r = np.random.default_rng(100 + rep)
                d = generate(sampler(args.gen, r), r)
                fds.append(frechet_distance(d, real_va))
                kss.append(np.median(ks_per_feature(d, real_va)[0]))
            return np.mean(fds), np.std(fds), np.mean(kss)

        rows = []
        # references
        r = np.random.default_rng(7)
        ref = [frechet_distance(real_tr[r.choice(len(real_tr), len(real_va), replace=False)], real_va)
               for _ in range(args.repeats)]
        rows.append(("real-train (floor)", np.nan, np.mean(ref), np.std(ref), np.nan, np.nan, np.nan, ""))
        fd = fd_of(lambda n, r: z_tr[r.choice(len(z_tr), n)])
        rows.append(("Q-train (target)", np.nan, *fd, np.nan, np.nan, ""))

        def rbig(rotation):
            return lambda: GaussianisingTransform.fit(z_tr, seed=0, groups=groups, rotation=rotation)

        models = [("prior", lambda: GaussianDensity.standard(L)),
                  ("gauss", lambda: GaussianDensity.fit(z_tr))]
        models += [(f"gmm-{k}", lambda k=k: GaussianMixtureDensity.fit(z_tr, seed=0, n_components=k))
                   for k in map(int, args.gmm.split(","))]
        models += [("rbig-auto", rbig("random")), ("pca-auto", rbig("pca"))]
        fixed = sorted(map(int, args.layers.split(",")))
        fd_prior = None
        for name, make in models:
            t1 = time.perf_counter()
            m = make()
            ft = time.perf_counter() - t1
            lq = m.log_density(z_va).mean()
            fd = fd_of(m.sample)
            fd_prior = fd_prior or fd[0]
            note = f"{m.n_layers} layers" if isinstance(m, GaussianisingTransform) else ""
            rows.append((name, lq, *fd, fd[0] / fd_prior, ft, note))
            print(f"  {name:12s} logQ {lq:9.3f}  FD {fd[0]:8.3f}  fit {ft:6.1f}s {note}", flush=True)
        # fixed layer counts: one fit without stopping, truncated
        t1 = time.perf_counter()
        big = GaussianisingTransform.fit(z_tr, seed=0, groups=groups, max_layers=fixed[-1], tol=-np.inf,
                                         rotation="random")
        ft = time.perf_counter() - t1
        for k in fixed:
            m = truncated(big, k)
            lq = m.log_density(z_va).mean()
            fd = fd_of(m.sample)
            rows.append((f"rbig-{k}", lq, *fd, fd[0] / fd_prior, ft * k / fixed[-1], "fit time pro rata"))
            print(f"  rbig-{k:<7d} logQ {lq:9.3f}  FD {fd[0]:8.3f}", flush=True)

        head = f"\n## {run}\n\n{P} pixels x {data.shape[1]} channels, L = {L}; {len(tr)} training / " \
               f"{len(va)} held-out pixels ({len(real_va)} complete rows); {len(z_tr)} fitting draws\n"
        table = ["| method | held-out logQ (nats/draw) | FD | FD / FD(prior) | median KS | fit s | note |",
                 "|---|---|---|---|---|---|---|"]
        for name, lq, f, fs, ks, ratio, ft, note in rows:
            fmt = lambda v, s: "" if not np.isfinite(v) else s.format(v)  # noqa: E731
            table.append(f"| {name} | {fmt(lq, '{:.3f}')} | {f:.3f} (±{fs:.3f}) | {fmt(ratio, '{:.2f}')} | "
                         f"{fmt(ks, '{:.3f}')} | {fmt(ft, '{:.1f}')} | {note} |")
        print(head + "\n".join(table), flush=True)
        lines += [head, *table, ""]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out, 'summary.md')}")


if __name__ == "__main__":
    main()
