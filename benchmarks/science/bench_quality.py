"""Fit quality: galdecomp's default fit against a plain PyTorch VAE, over seeds, on three skies.

Data sets (``--datasets``):

- ``real``: the 18 maps of ``realsky64`` that are neither dust nor HI (GSM2008 x11, WMAP V/W,
  WHAM H-alpha, ROSAT 3/4 keV, Fermi 2FHL x3), nside 64; held-out templates HI4PI N_HI,
  SFD E(B-V), Planck13 E(B-V) (never seen by the fits);
- ``demo``: the built-in simulated sky of ``runs/demo.yaml`` (nside 64, seed 0) with its truth
  maps as templates;
- ``realmorph``: the real-morphology simulated sky of ``runs/realmorph.yaml`` (nside 64, seed 0,
  gas/dust/H-alpha/synchrotron/hot-gas morphology from realsky64) with its truth maps;
- ``lowsnr``: the realmorph sky with Gaussian noise added to its 12 microwave channels (23-353
  GHz), 1.6 times the CMB's rms in each (``benchmarks.common.prepare_lowsnr``): the CMB near the
  noise, its R^2 from all 35 channels ~0.75 (realmorph: 0.98). Not in the default ``--datasets``.

Methods (``--methods``):

- ``galdecomp``: the package's default fit (``fit_rows`` with the resolved default
  configuration, what ``galdecomp fit CATALOG --out RUN`` trains), optionally changed by
  ``--set key.sub=value`` (YAML values) for ablations; features = posterior means;
- ``torch``: the peer a user would write: a PyTorch VAE, encoder and decoder 2x128 tanh,
  learned per-channel log sigma (start 0, no floor), analytic KL, Adam lr 2e-3 with cosine
  annealing, batch 1024, 200 epochs; its own preprocessing (log for positive maps, else
  asinh(x / std), then standardised); pixels with a missing channel dropped;
- ``torch-same``: the same network and optimiser trained on galdecomp's preprocessed data (its
  validation ELBO is comparable with galdecomp's);
- ``pca``: PCA with as many components as latent features, on galdecomp's preprocessed data.

Per data set, method and seed: validation -ELBO per pixel, mean and median over the pixels (32
draws per pixel, on the complete pixels among galdecomp's validation pixels of that seed, which
torch-same also holds out, of galdecomp's preprocessed data; galdecomp and torch-same only; one
anomalous pixel can dominate the mean), active features (std over pixels of the posterior mean > 0.1), held-out R^2
of every template from the features (gradient boosting, half-sky block split, as the report;
``ceiling``: from all input channels), the best single-feature KSG MI per template, wall time of
training, and the training time until galdecomp's median validation pixel beat the peer's final
one (``torch-same`` run first in the same invocation; every 5th epoch's parameters checked).
The validation -ELBO is also given with only the likelihood terms of the channels that are not
photon counts (``without counts``; the encoders still see every channel): a Gaussian density on
sparse counts (mostly zeros) rewards a fit for predicting single photons, which galdecomp's
Poisson noise floor forbids and the peer does not; the time to the peer uses that ELBO.
R^2 and MI use the pixels valid for every method (the peer drops incomplete pixels).

Usage::

    python -m benchmarks.science.bench_quality                                 # all data sets, 3 seeds
    python -m benchmarks.science.bench_quality --datasets real --seeds 0 --methods galdecomp,torch
    python -m benchmarks.science.bench_quality --datasets real --set training.learning_rate=0.003 --tag lr3e-3

Writes ``--out`` (default ``benchmarks/out/quality``): ``rows.csv`` (one row per data set,
method, seed, template) and ``summary.md`` (medians and ranges over seeds).
"""
import argparse
import copy
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np
import yaml

from benchmarks.common import EVAL_DRAWS, Data, fit_torch_peer, out_dir, prepare, with_entries

ACTIVE_STD = 0.1
KSG_PIXELS = 4096


# ------------------------------------------------------------------------------------ methods
def galdecomp_fit(data, seed, settings, log=None):
    """The package's default fit on ``data`` (what ``galdecomp fit`` trains), with overrides."""
    from galdecomp.inference.config import resolve_config
    from galdecomp.inference.training import TrainingState
    from galdecomp.model.autoencoder import Autoencoder
    from galdecomp.inference.fitting import fit_rows
    from galdecomp.sources import noise_floor

    cfg = resolve_config(settings, {"seed": seed})
    C = data.data.shape[1]
    model = Autoencoder.from_config(cfg, C, noise_floor(data.pre, data.dataset, cfg))
    state = TrainingState(model.init_params(cfg["seed"]), cfg["training"]["learning_rate"], cfg["seed"])
    snapshots = {}

    def keep_every_fifth(st):  # parameters at every 5th epoch's end, for the time to the peer's ELBO
        if st.batch == 0 and st.epoch % 5 == 0:
            snapshots[st.epoch] = st.params.copy()

    t0 = time.perf_counter()
    fit_rows(model, data.data, state, cfg, log=log, checkpoint=keep_every_fifth)
    seconds = time.perf_counter() - t0
    mask = np.isfinite(data.data)
    mean, _ = model.posterior_moments(state.best_params, np.where(mask, data.data, 0.0), mask)
    return dict(features=mean, seconds=seconds, model=model, params=state.best_params, cfg=cfg,
                history=state.history, epochs=state.epoch, last_params=state.params, snapshots=snapshots)


def peer_transform(x):
    """The peer's preprocessing of one channel: log if positive, else asinh(x / std); standardised."""
    ok = np.isfinite(x)
    t = np.log(x) if np.nanmin(x) > 0 else np.arcsinh(x / np.nanstd(x))
    return (t - np.nanmean(t[ok])) / np.nanstd(t[ok])


def galdecomp_at_peer(data, weights, rows):
    """galdecomp's objective (no noise floor) evaluated at the peer's trained weights.

    The peer's networks are copied into a galdecomp model of the same widths (encoder input
    ``[d * m, 1 - m]`` with zero weights on the missing-indicator half; excitations = weights / scales; noise
    excitation from the peer's log sigma). Separates a worse objective from a worse optimiser.
    """
    from galdecomp.inference.config import resolve_config
    from galdecomp.model.autoencoder import Autoencoder
    from galdecomp.model.mlp import unpack_params

    C = data.data.shape[1]
    cfg = resolve_config({"decoder": {"hidden": [128, 128]}, "encoder": {"hidden": [128, 128]},
                          "noise": {"floor": 0.0}})
    model = Autoencoder.from_config(cfg, C, 0.0)
    params = np.zeros(model.n_params)
    for part, net, scales in (("encoder", model.encoder, model.enc_scales),
                              ("decoder", model.decoder, model.dec_scales)):
        theta = np.zeros(net.n_params)
        for k, ((W, b), (Wp, bp)) in enumerate(zip(unpack_params(theta, net.sizes), weights[part[:3]])):
            W[:Wp.shape[0]] = Wp
            b[...] = bp
        params[model.slices[part]] = theta / scales
    params[model.slices["noise"]] = (weights["log_sigma"] - np.log(model.sigma0)) / model.tau
    return galdecomp_validation(dict(model=model, params=params), data, rows)[0]


def galdecomp_validation(res, data, rows, channels=None):
    """galdecomp's validation -ELBO per pixel on ``rows`` (NESTED), EVAL_DRAWS draws each: mean and
    median over the rows; with the boolean ``channels``, only their likelihood terms (the encoder
    still sees every channel)."""
    model, params = res["model"], res["params"]
    d = data.data[rows]
    mask = np.isfinite(d)
    mask_lh = mask if channels is None else mask & channels[None, :]
    d0 = np.where(mask, d, 0.0)
    mean, cov = model.posterior_moments(params, d0, mask, full_cov=True)
    chol = np.linalg.cholesky(cov)
    L = model.latent_dim
    op = model.elbo(d0, mask, np.zeros((len(rows), L)), len(rows))  # the posterior family's own KL
    kl = op.terms(model.position(params, op.domain), per_row=True)["kl_rows"]
    xi = np.random.default_rng(12345).standard_normal((EVAL_DRAWS, len(rows), L))
    nll = np.zeros(len(rows))
    for k in range(EVAL_DRAWS):
        nll += model.nll_rows(params, d0, mask_lh, mean + np.einsum("pij,pj->pi", chol, xi[k])) / EVAL_DRAWS
    per_row = nll + kl
    return float(np.mean(per_row)), float(np.median(per_row))


# ------------------------------------------------------------------------------------ scores
def scores(F_ring, data, valid_ring, seed=0):
    """Active features, held-out R^2 and best KSG MI per template for features (npix, k) in RING."""
    from galdecomp.products.dependence import block_split, heldout_r2, mi_ksg

    Fv = np.where(valid_ring[:, None], F_ring, np.nan)
    active = int(np.sum(np.nanstd(Fv, axis=0) > ACTIVE_STD))
    rng = np.random.default_rng([seed, 91])
    sub = np.sort(rng.choice(np.nonzero(valid_ring)[0], min(KSG_PIXELS, int(valid_ring.sum())), replace=False))
    out = {}
    for j, t in enumerate(data.template_names):
        y = np.where(valid_ring, data.T[j], np.nan)
        train, test = block_split(data.nside, np.isfinite(y), 0)
        r2 = heldout_r2(Fv, y, train, test, 0)
        ok = sub[np.isfinite(y[sub])]
        mi = max(mi_ksg(Fv[ok, k], y[ok]) for k in range(Fv.shape[1]))
        out[t] = dict(r2=r2, mi=mi)
    return active, out


# ------------------------------------------------------------------------------------ summary
def summarise(rows_path):
    """Markdown tables of rows.csv: per data set, medians [min, max] over seeds for each method."""
    import collections

    with open(rows_path) as f:
        rows = list(csv.DictReader(f))
    out = []

    def num(x):
        try:
            return float(x)
        except (TypeError, ValueError):
            return np.nan

    def to_peer(rr):
        v = [r.get("seconds_to_peer_elbo") or "" for r in rr]
        if v and all(x == "never" for x in v):
            return "never"
        return med([num(x) for x in v], ".0f") + (f" ({v.count('never')} never)" if "never" in v else "")

    def med(v, fmt):
        v = np.array([x for x in v if np.isfinite(x)])
        if v.size == 0:
            return ""
        return f"{np.median(v):{fmt}} [{v.min():{fmt}}, {v.max():{fmt}}]" if v.size > 1 else f"{v[0]:{fmt}}"

    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds]
        methods = list(dict.fromkeys((r["method"], r["tag"]) for r in rs))
        label = {m: m[0] + (f"[{m[1]}]" if m[1] else "") for m in methods}
        templates = list(dict.fromkeys(r["template"] for r in rs))
        per = collections.defaultdict(lambda: collections.defaultdict(list))
        run = collections.defaultdict(dict)
        for r in rs:
            k = (r["method"], r["tag"])
            per[k][r["template"]].append((num(r["r2"]), num(r["mi_ksg"])))
            run[k][r["seed"]] = r
        out.append(f"\n### {ds}\n")
        out.append("| method | seeds | active features | validation -ELBO/pixel | median -ELBO/pixel "
                   "| without counts: -ELBO / median | mean R^2 | mean R^2 / ceiling "
                   "| templates with R^2 >= torch and >= PCA | mean best-feature MI | train s | s to peer median ELBO |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        ceil = {t: np.mean([x[0] for x in per[("ceiling", "")][t]]) for t in templates}
        seeds_of = {m: sorted(run[m]) for m in methods}
        for m in methods:
            if m[0] == "ceiling":
                continue
            by_seed = {sd: [(num(r["r2"]), num(r["mi_ksg"])) for r in rs if (r["method"], r["tag"]) == m
                            and r["seed"] == sd] for sd in seeds_of[m]}
            mean_r2 = [np.mean([x[0] for x in v]) for v in by_seed.values()]
            ratio = [np.mean([x[0] for x in v]) / np.mean(list(ceil.values())) for v in by_seed.values()]
            mean_mi = [np.mean([x[1] for x in v]) for v in by_seed.values()]
            beats = ""
            torch_key, pca_key = ("torch", ""), ("pca", "")
            if torch_key in per and pca_key in per and m[0] not in ("torch", "pca"):
                n = sum(np.median([x[0] for x in per[m][t]]) >= max(np.median([x[0] for x in per[torch_key][t]]),
                                                                    np.median([x[0] for x in per[pca_key][t]]))
                        for t in templates)
                beats = f"{n}/{len(templates)}"
            rr = list(run[m].values())
            out.append(f"| {label[m]} | {len(rr)} | {med([num(r['active']) for r in rr], '.0f')} "
                       f"| {med([num(r['val_neg_elbo']) for r in rr], '.2f')} "
                       f"| {med([num(r.get('val_median_neg_elbo')) for r in rr], '.2f')} "
                       f"| {med([num(r.get('val_neg_elbo_intensity')) for r in rr], '.2f')} / "
                       f"{med([num(r.get('val_median_neg_elbo_intensity')) for r in rr], '.2f')} | {med(mean_r2, '.4f')} "
                       f"| {med(ratio, '.3f')} | {beats} | {med(mean_mi, '.3f')} "
                       f"| {med([num(r['seconds']) for r in rr], '.0f')} "
                       f"| {to_peer(rr)} |")
        out.append("")
        out.append("| template | ceiling | " + " | ".join(label[m] for m in methods if m[0] != "ceiling") + " |")
        out.append("|---|---|" + "---|" * (len(methods) - 1))
        for t in templates:
            cells = [med([x[0] for x in per[m][t]], ".3f") + " / " + med([x[1] for x in per[m][t]], ".2f")
                     for m in methods if m[0] != "ceiling"]
            out.append(f"| {t} | {ceil[t]:.3f} | " + " | ".join(cells) + " |")
        out.append("\n(cells: held-out R^2 / best single-feature KSG MI in nats; median [min, max] over seeds)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ driver
def parse_set(items):
    cfg = {}
    for it in items or []:
        key, val = it.split("=", 1)
        d = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(val)
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="real,demo,realmorph")
    ap.add_argument("--methods", default="galdecomp,torch,torch-same,pca")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", help="galdecomp setting key.sub=value (YAML value)")
    ap.add_argument("--catalog-set", action="append",
                    help="catalog entry setting key=value for every input map (e.g. asinh_scale=std)")
    ap.add_argument("--tag", default="default", help="label of the galdecomp variant in the tables")
    ap.add_argument("--torch-epochs", type=int, default=200)
    ap.add_argument("--torch-threads", type=int, default=2, help="PyTorch threads (the package runs 1 BLAS thread)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "galdecomp-bench-quality"))
    ap.add_argument("--out", default=out_dir("quality"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--save-features", metavar="DIR",
                    help="also write each fit's features (RING, NaN where invalid) as DIR/DATASET-METHOD[TAG]-sSEED.npy "
                         "and the templates as DIR/DATASET-templates.npz")
    ap.add_argument("--summarise", action="store_true", help="only write summary.md from --out/rows.csv")
    ap.add_argument("--counts-as-before", action="store_true",
                    help="ablation: photon counts log/asinh as before 2026-12-04, not anscombe")
    a = ap.parse_args(argv)
    if a.counts_as_before:
        from galdecomp.preprocessing import ChannelTransform

        fit = ChannelTransform.fit.__func__

        def old_fit(cls, x, kind="auto", name="channel", counts=False, asinh_scale="mad"):
            if kind == "auto" and counts:
                v = np.asarray(x, float)
                kind = "log" if np.nanmin(v) > 0 else "asinh"
            return fit(cls, x, kind, name, counts, asinh_scale)

        ChannelTransform.fit = classmethod(old_fit)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    rows_path = os.path.join(a.out, "rows.csv")
    if a.summarise:
        text = summarise(rows_path)
        with open(os.path.join(a.out, "summary.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    if "torch" in a.methods:
        import torch

        torch.set_num_threads(a.torch_threads)
    methods = a.methods.split(",")
    settings = parse_set(a.set)
    log = None if a.quiet else (lambda m: print("   ", m, file=sys.stderr, flush=True))
    new_file = not os.path.exists(rows_path)
    fcsv = open(rows_path, "a", newline="")
    w = csv.writer(fcsv)
    if new_file:
        w.writerow(["dataset", "method", "tag", "seed", "template", "r2", "mi_ksg", "active", "val_neg_elbo",
                    "seconds", "epochs", "settings", "seconds_to_peer_elbo", "val_median_neg_elbo",
                    "val_neg_elbo_intensity", "val_median_neg_elbo_intensity"])
    for ds in a.datasets.split(","):
        inputs, templates = prepare(ds, a.work)
        inputs = with_entries(inputs, parse_set(a.catalog_set), a.work)
        data = Data(inputs, templates)
        L = 10
        # pixels valid for every method: complete input rows and valid features
        valid_ring = data.ring(data.complete)
        from galdecomp.inference.minibatches import split_rows


        def validation_rows(seed):
            """The complete pixels among galdecomp's validation rows at ``seed`` (held out by both fits)."""
            _, v = split_rows(len(data.data), 0.1, seed)
            return v[data.complete[v]]

        Xc = data.data[data.complete]
        pos_in_complete = np.cumsum(data.complete) - 1
        X_ring = data.ring(np.where(np.isfinite(data.data), data.data, np.nan))
        _, sc = scores(X_ring, data, valid_ring)
        for t, v in sc.items():
            w.writerow([ds, "ceiling", "", "", t, v["r2"], v["mi"], "", "", "", "", ""])
        print(f"{ds}: {len(data.data)} pixels x {data.data.shape[1]} channels, "
              f"{int(data.complete.sum())} complete; ceiling R2 "
              + ", ".join(f"{t} {v['r2']:.3f}" for t, v in sc.items()), flush=True)
        if a.save_features:
            os.makedirs(a.save_features, exist_ok=True)
            np.savez(os.path.join(a.save_features, f"{ds}-templates.npz"), T=data.T, valid=valid_ring,
                     names=np.array(data.template_names), nside=data.nside, X=X_ring)
        peer_val = {}
        for seed in seeds:
            val_rows = validation_rows(seed)
            for m in methods:
                t0 = time.perf_counter()
                val, val_med, epochs, tag, to_peer, val_ch = "", "", "", "", "", ("", "")
                if m == "galdecomp":
                    res = galdecomp_fit(data, seed, copy.deepcopy(settings), log=log)
                    F = res["features"]
                    val, val_med = galdecomp_validation(res, data, val_rows)
                    val_ch = galdecomp_validation(res, data, val_rows, data.intensity)
                    last, last_med = galdecomp_validation(dict(res, params=res["last_params"]), data, val_rows)
                    key = "validation_median" if res["cfg"]["training"]["select"] == "median" else "validation_elbo"
                    best_epoch = 1 + int(np.argmax([h[key] for h in res["history"]]))
                    print(f"{ds} galdecomp[{a.tag}] seed {seed}: parameters of the kept epoch "
                          f"({best_epoch}) {val:.3f} (median {val_med:.3f}); of the last epoch "
                          f"{last:.3f} (median {last_med:.3f})", flush=True)
                    epochs, tag = res["epochs"], a.tag
                    if seed in peer_val:  # training time until the median validation pixel, without
                        # the count channels, beat the peer's final one (every 5th epoch checked)
                        t_cum = np.cumsum([h["seconds"] for h in res["history"]])
                        to_peer = "never"
                        for ep in sorted(res["snapshots"]):
                            v = galdecomp_validation(dict(res, params=res["snapshots"][ep]), data, val_rows,
                                                     data.intensity)[1]
                            if v <= peer_val[seed]:
                                to_peer = round(float(t_cum[ep - 1]), 1)
                                break
                elif m in ("torch", "torch-same"):
                    if m == "torch":
                        phys = data.physical[data.complete]
                        Xp = np.stack([peer_transform(phys[:, c]) for c in range(phys.shape[1])], axis=1)
                    else:
                        Xp = Xc
                    res = fit_torch_peer(Xp, seed, L, epochs=a.torch_epochs, valid=pos_in_complete[val_rows]
                                    if m == "torch-same" else None, log=log, channels=data.intensity)
                    F = np.full((len(data.data), L), np.nan)
                    F[data.complete] = res["features"]
                    val, val_med = ("", "") if res["validation"] is None else res["validation"]
                    val_ch = res["validation_channels"] or ("", "")
                    if m == "torch-same":
                        peer_val[seed] = val_ch[1]
                        at_peer = galdecomp_at_peer(data, res["weights"], val_rows)
                        print(f"{ds} seed {seed}: galdecomp objective at the peer's weights "
                              f"{at_peer:.3f} (peer's own evaluation {val:.3f})", flush=True)
                    epochs = a.torch_epochs
                elif m == "pca":
                    from sklearn.decomposition import PCA

                    F = np.full((len(data.data), L), np.nan)
                    F[data.complete] = PCA(L, random_state=seed).fit_transform(Xc)
                    res = dict(seconds=time.perf_counter() - t0)
                else:
                    raise SystemExit(f"unknown method {m}")
                if a.save_features:
                    np.save(os.path.join(a.save_features, f"{ds}-{m}{'[' + tag + ']' if tag else ''}-s{seed}.npy"),
                            data.ring(F))
                active, sc = scores(data.ring(F), data, valid_ring)
                for t, v in sc.items():
                    w.writerow([ds, m, tag, seed, t, v["r2"], v["mi"], active, val, round(res["seconds"], 1),
                                epochs, json.dumps(settings) if m == "galdecomp" else "", to_peer, val_med,
                                val_ch[0], val_ch[1]])
                if m == "galdecomp":  # the same features after an ICA rotation of the posterior means
                    from sklearn.decomposition import FastICA

                    ok = np.isfinite(F).all(1)
                    Fi = np.full_like(F, np.nan)
                    Fi[ok] = FastICA(F.shape[1], whiten="unit-variance", random_state=seed,
                                     max_iter=1000).fit_transform(F[ok])
                    _, sci = scores(data.ring(Fi), data, valid_ring)
                    for t, v in sci.items():
                        w.writerow([ds, "galdecomp-ica", tag, seed, t, v["r2"], v["mi"], active, "", "", "", ""])
                    print(f"{ds} galdecomp-ica[{tag}] seed {seed}: mean MI "
                          f"{np.mean([v['mi'] for v in sci.values()]):.3f}", flush=True)
                fcsv.flush()
                r2s = [v["r2"] for v in sc.values()]
                print(f"{ds} {m}{'[' + tag + ']' if tag else ''} seed {seed}: active {active}, "
                      f"val -ELBO {val if val == '' else f'{val:.3f} (median {val_med:.3f})'}"
                      + (f", without counts {val_ch[0]:.3f} (median {val_ch[1]:.3f})" if val_ch[0] != "" else "")
                      + f", mean R2 {np.mean(r2s):.4f}, "
                      f"min R2 {min(r2s):.3f}, mean MI {np.mean([v['mi'] for v in sc.values()]):.3f}, "
                      f"{res['seconds']:.0f} s, epochs {epochs}"
                      + (f", seconds to the peer's ELBO {to_peer}" if to_peer != "" else ""), flush=True)
    fcsv.close()
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(summarise(rows_path) + "\n")
    print(f"tables: {os.path.join(a.out, 'summary.md')}")


if __name__ == "__main__":
    main()
