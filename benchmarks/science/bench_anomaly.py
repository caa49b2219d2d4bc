"""Anomaly maps: ROC AUC of each score for anomalies injected into a sky the run never saw.

Per sky (``demo``: the built-in simulated sky; ``realmorph``: the same with real morphologies
from ``--morphology``) and seed: simulate the sky at ``--nside`` and fit a run on it with the CLI
(``galdecomp simulate``, ``galdecomp fit --max-epochs E --seed S``); then, in a copy of the maps,
inject one kind of anomaly at a time, write it as a new catalog and score it with the trained
run (:func:`galdecomp.products.anomaly.run_anomaly`, what ``galdecomp anomaly RUN --catalog C``
runs). Amplitudes are in units of the run's noise sigma_c of each channel (standardised units,
added to the standardised data and converted back to physical units, so a log channel gets a
multiplicative change):

- ``source``: 50 compact sources at random positions, each the centre pixel (amplitude A) and its
  4 edge neighbours (A/2); spectrum ``A sigma_c exp(3 (t_c - 1))``, ``t_c`` = log-frequency
  rank in [0, 1] (rising across all 35 channels, radio to gamma rays); A ~ s U(1.5, 4) for each
  scale s of ``--scales``;
- ``line``: 50 compact sources as above with ``A sigma_c`` in two adjacent channels in the
  middle of the frequency range only; A ~ s U(2, 5);
- ``calibration``: one channel (``--cal-channel``) multiplied by each of ``--cal-factors`` (physical
  units) in a disc of radius ``--cal-radius`` degrees at a random position.

Positives are the injected pixels, negatives all others; ROC AUC per score
(``sklearn.metrics.roc_auc_score``), also the fraction of positives above the 99th percentile of
the negatives (``tpr@1%``).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.science.bench_anomaly --morphology /work/shared/data/realsky32 --seeds 0 1

Writes ``--out`` (default ``benchmarks/out/anomaly``): ``rows.csv`` and ``summary.md``.
"""
import argparse
import copy
import csv
import os
import sys
import time

import healpy as hp
import numpy as np
import yaml

from benchmarks import common
from galdecomp.catalog import read_catalog
from galdecomp.fileio import write_healpix_fits
from galdecomp import load
from galdecomp.products.anomaly import load_rows, residual_scale, run_anomaly

KINDS = ("source", "line", "calibration")


def compact_sources(nside, n, rng):
    """Centre pixels and (centre + 4 edge neighbours, weight) of ``n`` sources; NESTED."""
    centres = rng.choice(hp.nside2npix(nside), n, replace=False)
    nb = hp.get_all_neighbours(nside, centres, nest=True)[[0, 2, 4, 6]]  # SW, NW, NE, SE: edge-sharing
    pix = np.concatenate([centres, nb.ravel()])
    weight = np.concatenate([np.ones(n), np.full(nb.size, 0.5)])
    src = np.concatenate([np.arange(n), np.tile(np.arange(n), 4)])
    keep = pix >= 0
    return pix[keep], weight[keep], src[keep]


def inject(model, values, freqs, kind, rng, args, scale=1.0):
    """Anomalous copy of ``values`` (P, C physical, NESTED) and the boolean mask of injected pixels."""
    P, C = values.shape
    nside = hp.npix2nside(P)
    out = values.copy()
    pos = np.zeros(P, bool)
    order = np.argsort(freqs, kind="stable")
    t = np.empty(C)
    t[order] = np.linspace(0.0, 1.0, C)
    if kind == "calibration":
        c = model.names.index(args.cal_channel)
        vec = hp.ang2vec(rng.uniform(0, 360), np.degrees(np.arcsin(rng.uniform(-1, 1))), lonlat=True)
        disc = hp.query_disc(nside, vec, np.radians(args.cal_radius), nest=True)
        factor = scale
        out[disc, c] *= factor
        pos[disc] = np.isfinite(values[disc, c])
        return out, pos, f"{args.cal_channel} x{factor:g} in {pos.sum()} pixels"
    pix, weight, src = compact_sources(nside, args.n_sources, rng)
    if kind == "source":
        amp = scale * rng.uniform(1.5, 4.0, args.n_sources)
        shape = np.exp(3.0 * (t - 1.0))
        what = f"rising spectrum in all channels, A ~ {scale:g} x U(1.5, 4) sigma"
    else:
        amp = scale * rng.uniform(2.0, 5.0, args.n_sources)
        shape = np.zeros(C)
        mid = order[C // 2: C // 2 + 2]
        shape[mid] = 1.0
        what = f"line in {model.names[mid[0]]} + {model.names[mid[1]]}, A ~ {scale:g} x U(2, 5) sigma"
    # several sources may share a pixel: add their offsets
    delta = np.zeros((P, C))
    np.add.at(delta, pix, (amp[src] * weight)[:, None] * (shape * model.sigma)[None, :])
    hit = np.flatnonzero(np.abs(delta).sum(axis=1) > 0)
    y = model.standardise(values[hit])
    out[hit] = np.where(np.isfinite(y), model.physical(y + delta[hit]), values[hit])
    pos[hit] = True
    return out, pos, f"{args.n_sources} sources in {len(hit)} pixels, {what}"


def write_catalog(sky_catalog, names, kinds, values, folder):
    """Write ``values`` (P, C, NESTED) as a catalog like ``sky_catalog`` in ``folder``."""
    with open(sky_catalog) as f:
        doc = yaml.safe_load(f)
    os.makedirs(os.path.join(folder, "maps"), exist_ok=True)
    entries = {e["name"]: e for e in doc["maps"]}
    maps = []
    for c, name in enumerate(names):
        e = copy.deepcopy(entries[name])
        e.update(file=f"maps/{name}.fits", kind=kinds[c])
        e.pop("field", None)
        m = np.where(np.isfinite(values[:, c]), values[:, c], hp.UNSEEN)
        write_healpix_fits(os.path.join(folder, e["file"]), m, name, e["unit"], nest=True)
        maps.append(e)
    doc["maps"] = maps
    path = os.path.join(folder, "catalog.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def auc_rows(scores, pos):
    from sklearn.metrics import roc_auc_score

    rows = {}
    for k, s in scores.items():
        ok = np.isfinite(s)
        thr = np.percentile(s[ok & ~pos], 99)
        rows[k] = dict(auc=float(roc_auc_score(pos[ok], s[ok])), tpr1=float(np.mean(s[ok & pos] > thr)))
    return rows


def prepare(sky, seed, args):
    """Simulate the sky and fit the run (kept in --work and reused)."""
    base = os.path.join(args.work, f"{sky}_nside{args.nside}_e{args.epochs}_s{seed}")
    os.makedirs(base, exist_ok=True)
    cat, run = os.path.join(base, "sky", "catalog.yaml"), os.path.join(base, "run")
    if not os.path.isfile(cat):
        common.simulate(os.path.dirname(cat), args.nside, seed,
                        morphology=os.path.abspath(args.morphology) if sky == "realmorph" else None)
    fit_s = 0.0
    if not os.path.isfile(os.path.join(run, "model.npz")):
        t0 = time.perf_counter()
        common.fit(cat, run, max_epochs=args.epochs, seed=seed)
        fit_s = time.perf_counter() - t0
    return base, cat, run, fit_s


def held_out_coverage(model, values, sky, seed):
    """Per channel, the fraction of the residuals of half of the clean sky's pixels within +-1
    in the trained noise's units and in the units calibrated on the other half (rows of dicts)."""
    half = np.random.default_rng([seed, 55]).permutation(len(values))
    fit_rows, test_rows = half[:len(values) // 2], half[len(values) // 2:]
    scale, _ = residual_scale(model, values[fit_rows])
    y = model.standardise(values[test_rows])
    m = np.isfinite(y)
    r = np.abs(y - model.decode(model.encode(y, m, standardised=True)[0], physical=False)) / model.sigma
    with np.errstate(invalid="ignore"):
        model_cov = np.nanmean(np.where(m, r <= 1, np.nan), axis=0)
        cal_cov = np.nanmean(np.where(m, r <= scale, np.nan), axis=0)
    return [dict(sky=sky, seed=seed, channel=c, model=float(a), calibrated=float(b), factor=float(f))
            for c, a, b, f in zip(model.names, model_cov, cal_cov, scale)]


def coverage_lines(coverage):
    """Markdown: per sky, the held-out 68 % coverage over channels and seeds, both noise units."""
    lines = ["| sky | noise | channel-seed pairs | median | min | max | within 0.683 +- 0.03 |", "|---|---|---|---|---|---|---|"]
    for sky in dict.fromkeys(r["sky"] for r in coverage):
        for key in ("model", "calibrated"):
            v = np.array([r[key] for r in coverage if r["sky"] == sky])
            lines.append(f"| {sky} | {key} | {v.size} | {np.median(v):.3f} | {v.min():.3f} | {v.max():.3f} | "
                         f"{int((np.abs(v - 0.6827) <= 0.03).sum())} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skies", default="demo,realmorph")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--nside", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--morphology", default=os.path.join(common.shared_dir(), "data", "realsky32"))
    ap.add_argument("--n-sources", type=int, default=50)
    ap.add_argument("--cal-channel", default="planck_545GHz")
    ap.add_argument("--cal-factors", type=float, nargs="+", default=[1.1, 1.2, 1.3],
                    help="calibration factors (one injection each)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                    help="amplitude scales of the source and line injections (one injection each)")
    ap.add_argument("--cal-radius", type=float, default=15.0)
    ap.add_argument("--noise", nargs="+", default=["calibrated"], choices=["calibrated", "model"],
                    help="residual units to compare (galdecomp anomaly --noise); with two, score names get "
                         "/calibrated or /model")
    ap.add_argument("--work", default="/tmp/galdecomp_bench_anomaly")
    ap.add_argument("--out", default=common.out_dir("anomaly"))
    args = ap.parse_args()
    common.show_progress()
    os.makedirs(args.out, exist_ok=True)
    rows, coverage = [], []
    for sky in args.skies.split(","):
        for seed in args.seeds:
            base, cat, run, fit_s = prepare(sky, seed, args)
            model = load(run)
            values, nside, _ = load_rows(model, cat)
            c = read_catalog(cat)
            freqs = np.array([e.frequency_hz for e in c.maps])[[c.names.index(n) for n in model.names]]
            kinds = [c.maps[c.names.index(n)].kind or "intensity" for n in model.names]
            coverage += held_out_coverage(model, values, sky, seed)
            for k, kind in enumerate(KINDS):
                for scale in (args.cal_factors if kind == "calibration" else args.scales):
                    rng = np.random.default_rng([seed, 101, k])  # same positions for every scale
                    bad, pos, what = inject(model, values, freqs, kind, rng, args, scale)
                    tag = f"{kind}_x{scale:g}"
                    acat = write_catalog(cat, model.names, kinds, bad, os.path.join(base, f"anomalous_{tag}"))
                    new = []
                    for noise in args.noise:
                        t0 = time.perf_counter()
                        res = run_anomaly(run, os.path.join(base, f"scores_{tag}"), catalog=acat, overwrite=True,
                                          progress=lambda m: None, noise=noise)
                        score_s = time.perf_counter() - t0
                        suffix = f"/{noise}" if len(args.noise) > 1 else ""
                        new += [dict(sky=sky, seed=seed, kind=kind, scale=scale, score=name + suffix, auc=r["auc"],
                                     tpr_at_1pct=r["tpr1"], positives=int(pos.sum()), injected=what,
                                     fit_s=round(fit_s, 1), score_s=round(score_s, 2))
                                for name, r in auc_rows(res["scores"], pos).items()]
                    rows += new
                    best = max(new, key=lambda r: r["auc"])
                    print(f"{sky} seed {seed} {kind} x{scale:g}: {what}; best {best['score']} AUC {best['auc']:.3f}",
                          file=sys.stderr, flush=True)
    cols = list(rows[0])
    with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    scores = list(dict.fromkeys(r["score"] for r in rows))
    skies = args.skies.split(",")

    def table(key, fmt):
        out = ["| sky | kind | level | " + " | ".join(scores) + " | best |", "|---|---|---|" + "---|" * (len(scores) + 1)]
        for sky in skies:
            for kind in KINDS:
                for scale in (args.cal_factors if kind == "calibration" else args.scales):
                    sel = [r for r in rows if r["sky"] == sky and r["kind"] == kind and r["scale"] == scale]
                    lo = {sc: min(r[key] for r in sel if r["score"] == sc) for sc in scores}
                    hi = {sc: max(r[key] for r in sel if r["score"] == sc) for sc in scores}
                    cells = [fmt(lo[sc]) if fmt(lo[sc]) == fmt(hi[sc]) else f"{fmt(lo[sc])}-{fmt(hi[sc])}"
                             for sc in scores]
                    best = max(scores, key=lambda sc: lo[sc])
                    out.append(f"| {sky} | {kind} | {scale:g} | " + " | ".join(cells) + f" | {best} |")
        return out

    what = {}
    for r in rows:
        what.setdefault((r["kind"], r["scale"]), r["injected"].split(", ", 1)[-1] if r["kind"] != "calibration"
                        else r["injected"].split(" in ")[0])
    lines = [f"# Anomaly maps: ROC AUC (min-max over seeds {' '.join(map(str, args.seeds))})", "",
             f"`{' '.join(sys.argv)}`; nside {args.nside}, {args.epochs} epochs; "
             f"{common.package_fingerprint()}; load {common.load_average()}", "",
             "Injected (level: the amplitude scale of source and line, A in units of the run's noise "
             "sigma of each channel; the factor of calibration):", ""]
    lines += [f"- {kind} x{scale:g}: {w}" for (kind, scale), w in what.items()]
    lines += [""] + table("auc", lambda x: f"{x:.3f}")
    lines += ["", "Fraction of injected pixels above the 99th percentile of the clean ones (tpr at 1 % fpr):", ""]
    lines += table("tpr_at_1pct", lambda x: f"{x:.2f}")
    lines += ["", "Residuals within +-1 on half of each clean sky's pixels (68 % interval of the posterior-mean "
              "residual), the calibration measured on the other half:", ""] + coverage_lines(coverage)
    with open(os.path.join(args.out, "coverage.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(coverage[0]))
        w.writeheader()
        w.writerows(coverage)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
