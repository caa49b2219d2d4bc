"""One feature, one component: post-hoc orthogonal rotations of the latent space, scored.

For each sky (``real``, ``realmorph``, ``demo`` as :func:`benchmarks.common.prepare` defines them) and seed,
the package's default fit (``benchmarks.science.bench_quality.galdecomp_fit``, 200 epochs; cached in
``--work/fits`` so re-scoring does not refit), and its features scored as bench_quality scores
them (``bench_quality.scores``: held-out R^2 of each template from all features by gradient
boosting, half-sky block split; best single-feature KSG MI per template) for:

- ``raw``: the posterior means;
- ``varimax``: the posterior means rotated by the varimax rotation (Kaiser-normalised) of the
  loading matrix ``A[c, l] = rms over the pixels of J_p[c, l] / sigma_c`` (decoder Jacobian at
  each pixel's posterior mean, noise standard deviation sigma;
  :func:`galdecomp.model.rotation.loadings`);
- ``varimax-stack``: the varimax rotation (not normalised) of the pixel-stacked whitened
  Jacobians (every pixel's C x L block one set of rows, on 2000 random pixels): the criterion
  of the rotated Jacobians themselves (the rms of ``A`` is not rotated with ``R``);
- ``varimax-used``, ``varimax-stack-used``, ``quartimax-used``: the same (quartimax: of ``A``)
  among the used features only (significance >= 0.1 nats/pixel, what the report calls used),
  the unused ones left alone (a rotation mixing an unused feature, posterior ~ N(0, 1) in every
  pixel, into a used one dilutes it); ``varimax-stack-used`` was ``--rotate varimax`` until
  2026-12-08;
- ``varimax-data-used``: what ``galdecomp fit --rotate varimax`` writes
  (:func:`galdecomp.products.latent_rotation.product_rotation`, 2000 evenly spaced pixels): the
  varimax of the stacked Jacobians in the standardised data's units (``J_p``, not ``J_p /
  sigma``) among the used features;
- ``svd-stack-used``, ``svd-data-used``: the right singular vectors of the stacked Jacobians
  (noise, data units) among the used features: the directions ordered by how much they move
  the data;
- ``ica``: the posterior means after FastICA (bench_quality's ``galdecomp-ica``);
- ``pca``, ``fastica``, ``nmf``: the linear baselines of the report
  (:func:`galdecomp.products.baselines.linear_baselines`) on the same preprocessed data, and
  ``best-linear``: per template the one of them with the largest best-single-component MI.

Also, as a sanity check of the rotations, the held-out R^2 of a linear regression of each
template on all features (``r2_lin``): unchanged by an orthogonal rotation.

Usage::

    nice -n 10 python -m benchmarks.science.bench_rotation                       # 3 skies x 3 seeds
    python -m benchmarks.science.bench_rotation --datasets demo --seeds 0 --epochs 5   # quick check
    python -m benchmarks.science.bench_rotation --summarise
    python -m benchmarks.science.bench_rotation --methods varimax-data-used   # re-score one method (fits cached)

Writes ``--out`` (default ``benchmarks/out/rotation``): ``rows.csv`` (one row per sky, method,
seed, template) and ``summary.md`` (median [min, max] over seeds).
"""
import argparse
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import Data, out_dir, prepare
from benchmarks.science import bench_quality as bq

ROTATIONS = ("varimax", "varimax-stack", "varimax-used", "varimax-stack-used", "quartimax-used", "svd-stack-used",
             "svd-data-used", "varimax-data-used")
LINEAR = ("pca", "fastica", "nmf")
STACK_PIXELS = 2000


# ------------------------------------------------------------------------------------ fits
def fit_path(work, ds, seed, epochs):
    return os.path.join(work, "fits", f"{ds}-s{seed}-e{epochs}.npz")


def cached_fit(data, ds, seed, epochs, work, log=None):
    """The default fit of ``data`` at ``seed`` (read from the cache, else trained and cached):
    dict(model, params, cfg, seconds)."""
    from galdecomp.inference.config import resolve_config
    from galdecomp.model.autoencoder import Autoencoder
    from galdecomp.sources import noise_floor

    path = fit_path(work, ds, seed, epochs)
    if os.path.isfile(path):
        with np.load(path) as f:
            cfg = resolve_config(json.loads(str(f["cfg"])))
            model = Autoencoder.from_config(cfg, data.data.shape[1], noise_floor(data.pre, data.dataset, cfg))
            return dict(model=model, params=f["params"], cfg=cfg, seconds=float(f["seconds"]))
    settings = {"training": {"max_epochs": epochs}} if epochs != 200 else {}
    res = bq.galdecomp_fit(data, seed, settings, log=log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", params=res["params"], cfg=json.dumps(res["cfg"]), seconds=res["seconds"])
    os.replace(path + ".tmp.npz", path)
    return res


# ------------------------------------------------------------------------------------ features
def rotations(model, params, data, mean, seed):
    """Orthogonal rotations (L, L) of the latent space, by name, from the fit's loadings; ``-used``:
    among the used features only (significance >= 0.1 nats/pixel), the others left alone."""
    from galdecomp.model.rotation import embedded, loadings, oriented, orthomax, stacked_loadings, varimax
    from galdecomp.products.latent_rotation import product_rotation
    from galdecomp.products.run_outputs import feature_significance, unused_features

    mask = np.isfinite(data)
    sig = feature_significance(model, params, np.where(mask, data, 0.0), mask, mean) / len(mean)
    used = ~unused_features(sig)
    A = loadings(model, params, mean)
    rng = np.random.default_rng([seed, 24])
    sub = np.sort(rng.choice(len(mean), min(STACK_PIXELS, len(mean)), replace=False))
    S = stacked_loadings(model, params, mean[sub], noise_units=True)
    Su, Sd = S[:, used], stacked_loadings(model, params, mean[sub])[:, used]
    Au = A[:, used]

    def svd(M):
        return embedded(oriented(np.linalg.svd(M, full_matrices=False)[2].T, M), used)

    return {"varimax": oriented(varimax(A), A),
            "varimax-stack": oriented(varimax(S, normalize=False), A),
            "varimax-used": embedded(oriented(varimax(Au), Au), used),
            "varimax-stack-used": embedded(oriented(varimax(Su, normalize=False), Su), used),
            "quartimax-used": embedded(oriented(orthomax(Au, 0.0), Au), used),
            "svd-stack-used": svd(Su), "svd-data-used": svd(Sd),
            "varimax-data-used": product_rotation(model, params, mean, used)}


def feature_sets(data, fit, seed, methods=None):
    """Features (P, k) NESTED of every method (or of ``methods``), by name, and the rotations."""
    from sklearn.decomposition import FastICA

    from galdecomp.products.baselines import linear_baselines

    model, params = fit["model"], fit["params"]
    mask = np.isfinite(data.data)
    mean, _ = model.posterior_moments(params, np.where(mask, data.data, 0.0), mask)
    out = {"raw": mean}
    rots = rotations(model, params, data.data, mean, seed)
    out.update({k: mean @ R for k, R in rots.items()})
    if methods is None or "ica" in methods:
        out["ica"] = FastICA(mean.shape[1], whiten="unit-variance", random_state=seed,
                             max_iter=1000).fit_transform(mean)
    if methods is None or set(methods) & set(LINEAR):
        lin, _ = linear_baselines(data.data.T, mean.shape[1], seed)
        out.update({("fastica" if k == "ica" else k): v.T for k, v in lin.items()})
    return {k: v for k, v in out.items() if methods is None or k in methods}, rots


def linear_r2(F, y, train, test):
    """Held-out R^2 of a least-squares fit of ``y`` on ``[F, 1]`` (rotation invariant)."""
    ok = np.isfinite(y) & np.isfinite(F).all(axis=1)
    tr, te = train & ok, test & ok
    X = np.column_stack([F, np.ones(len(F))])
    coef = np.linalg.lstsq(X[tr], y[tr], rcond=None)[0]
    r = y[te] - X[te] @ coef
    return float(1.0 - r @ r / np.sum((y[te] - y[te].mean()) ** 2))


def score_fit(data, ds, seed, fit, rows_path, methods=None):
    """Score every method's (or ``methods``') features of one fit; rows appended to ``rows_path``
    (a later row of the same sky, method, seed and template replaces an earlier one)."""
    from galdecomp.products.dependence import block_split

    t0 = time.perf_counter()
    sets, rots = feature_sets(data, fit, seed, methods)
    valid = data.ring(data.complete)
    new = not os.path.exists(rows_path)
    with open(rows_path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["dataset", "method", "seed", "template", "r2", "mi_ksg", "r2_lin", "active"])
        for name, F in sets.items():
            Fr = np.where(valid[:, None], data.ring(F), np.nan)
            active, sc = bq.scores(Fr, data, valid)
            for j, t in enumerate(data.template_names):
                y = np.where(valid, data.T[j], np.nan)
                train, test = block_split(data.nside, np.isfinite(y), 0)
                w.writerow([ds, name, seed, t, sc[t]["r2"], sc[t]["mi"], linear_r2(Fr, y, train, test), active])
            print(f"{ds} seed {seed} {name}: mean R2 {np.mean([v['r2'] for v in sc.values()]):.4f}, "
                  f"mean MI {np.mean([v['mi'] for v in sc.values()]):.3f}", flush=True)
    perm = {k: round(float(np.abs(R).max(axis=0).min()), 3) for k, R in rots.items()}
    print(f"{ds} seed {seed}: scored in {time.perf_counter() - t0:.0f} s; smallest largest |entry| of a "
          f"rotation's column (1: a signed permutation of the raw features) {perm}", flush=True)


# ------------------------------------------------------------------------------------ summary
METHODS = ("raw",) + ROTATIONS + ("ica", "best-linear")
SHOWN = ("raw", "varimax-data-used", "best-linear")


def _med(v, fmt):
    v = np.asarray([x for x in v if np.isfinite(x)])
    if v.size == 0:
        return ""
    return f"{np.median(v):{fmt}} [{v.min():{fmt}}, {v.max():{fmt}}]" if v.size > 1 else f"{v[0]:{fmt}}"


def _table(rows):
    """{(dataset, method, seed, template): (r2, mi, r2_lin)} with ``best-linear`` added: per
    template and seed the linear baseline of largest best-component MI."""
    tab = {(r["dataset"], r["method"], r["seed"], r["template"]): tuple(float(r[k]) for k in ("r2", "mi_ksg", "r2_lin"))
           for r in rows}
    for ds, _, seed, t in list(tab):
        got = [tab[(ds, m, seed, t)] for m in LINEAR if (ds, m, seed, t) in tab]
        if got:
            tab[(ds, "best-linear", seed, t)] = max(got, key=lambda x: x[1])
    return tab


def _cells(tab, ds, m, seeds, temps):
    """``R^2 / MI`` median [min, max] over seeds of the mean over ``temps``; the linear R^2's range."""
    have = [s for s in seeds if (ds, m, s, temps[0]) in tab]
    r2, mi = ([np.mean([tab[(ds, m, s, u)][i] for u in temps]) for s in have] for i in (0, 1))
    return f"{_med(r2, '.3f')} / {_med(mi, '.2f')}"


def _ratio(tab, ds, seeds, t, m=SHOWN[1]):
    """Median [min, max] over seeds of the best single-feature MI of ``m`` over the best linear
    component's, template ``t``."""
    have = [s for s in seeds if (ds, m, s, t) in tab and (ds, "best-linear", s, t) in tab]
    return _med([tab[(ds, m, s, t)][1] / tab[(ds, "best-linear", s, t)][1] for s in have], ".2f")


def summarise(rows_path):
    """Markdown tables of rows.csv: per sky, the mean over templates for every method, then per
    template raw / the package's varimax / the best linear component; median [min, max] over seeds."""
    with open(rows_path) as f:
        tab = _table(list(csv.DictReader(f)))
    out = []
    label = dict(zip(METHODS, METHODS), **{"varimax-data-used": "varimax-data-used (--rotate varimax)"})
    for ds in dict.fromkeys(k[0] for k in tab):
        seeds = sorted({k[2] for k in tab if k[0] == ds})
        temps = list(dict.fromkeys(k[3] for k in tab if k[0] == ds))
        dev = [abs(tab[(ds, m, s, t)][2] - tab[(ds, "raw", s, t)][2]) for m in ROTATIONS for s in seeds
               for t in temps if (ds, m, s, t) in tab]
        out += [f"\n#### {ds} ({len(seeds)} seeds, {len(temps)} templates)\n",
                "| features | mean R^2 / mean best-feature MI |", "|---|---|"]
        out += [f"| {label[m]} | {_cells(tab, ds, m, seeds, temps)} |" for m in METHODS
                if any((ds, m, s, temps[0]) in tab for s in seeds)]
        out += [f"\n(linear-regression R^2 of the rotated features minus the raw ones: at most "
                f"{max(dev) if dev else float('nan'):.1e})\n",
                "| template | raw | varimax (--rotate varimax) | best linear component | MI varimax / best linear |",
                "|---|---|---|---|---|"]
        out += [f"| {t} | " + " | ".join(_cells(tab, ds, m, seeds, [t]) for m in SHOWN) + f" | {_ratio(tab, ds, seeds, t)} |"
                for t in temps]
    out.append("\n(cells: held-out R^2 from all features (gradient boosting) / best single-feature KSG MI "
               "in nats; median [min, max] over seeds)")
    return "\n".join(out)


def write_summary(rows_path, out):
    text = summarise(rows_path)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)


# ------------------------------------------------------------------------------------ driver
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="real,realmorph,demo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--fit-only", action="store_true", help="only train (and cache) the fits")
    ap.add_argument("--summarise", action="store_true", help="only write summary.md from --out/rows.csv")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "galdecomp-bench-rotation"))
    ap.add_argument("--out", default=out_dir("rotation"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--methods", help="score only these methods (comma-separated; default all)")
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    rows_path = os.path.join(a.out, "rows.csv")
    if a.summarise:
        return write_summary(rows_path, a.out)
    log = None if a.quiet else (lambda m: print("   ", m, file=sys.stderr, flush=True))
    seeds = [int(s) for s in a.seeds.split(",")]
    for ds in a.datasets.split(","):
        data = Data(*prepare(ds, a.work))
        for seed in seeds:
            t0 = time.perf_counter()
            fit = cached_fit(data, ds, seed, a.epochs, a.work, log)
            print(f"{ds} seed {seed}: fit {fit['seconds']:.0f} s ({time.perf_counter() - t0:.0f} s here)", flush=True)
            if not a.fit_only:
                score_fit(data, ds, seed, fit, rows_path, a.methods.split(",") if a.methods else None)
    if not a.fit_only:
        write_summary(rows_path, a.out)


if __name__ == "__main__":
    main()
