"""The science report of a run: how the latent features relate to known templates.

``make_report(RUN, TEMPLATES)`` compares every latent feature of a run, and the components of
linear baselines (PCA, ICA, NMF) of the same data, with every map of a template catalog, and
writes RUN/report/: correlations.csv, summary.csv, report.md and plots/.
"""
import hashlib
import os
import re
import time
import warnings

import numpy as np
import yaml

from ..catalog import load_catalog, unseen_to_nan
from ..errors import InputError
from ..fileio import atomic_output_dir, check_output_dir, write_text
from ..preprocessing import Preprocessor
from .baselines import METHODS as BASELINES
from .baselines import component_names, linear_baselines
from .dependence import (INTERVAL, BlockResampler, _corr, block_index,
                         block_split, equivalent_correlation, gaussian_mi, heldout_r2,
                         match_features, mi_binned)
from .run_outputs import UNUSED_NATS_PER_ROW, feature_support, unused_features
from .tables import format_table

__all__ = ["make_report", "compute_report", "write_report", "read_run", "CORRELATION_COLUMNS", "SUMMARY_COLUMNS", "METHODS"]

#: Pixels of the subsample for the KSG estimate, its bootstrap and the permutation test.
KSG_PIXELS = 4096
#: Neighbours of the KSG estimator.
KSG_K = 3
#: Block-bootstrap replicates and block permutations.
N_BOOT, N_PERM = 1000, 199
#: Training and test pixels of the gradient-boosting R^2 at most (random, within each half).
R2_TRAIN_PIXELS, R2_TEST_PIXELS = 4096, 8192
#: Pixels a template must share with the run.
MIN_COMMON = 20
#: Bins per axis of the 2-D histograms.
HIST_BINS = 256

METHODS = ("galdecomp",) + BASELINES
CORRELATION_COLUMNS = ["method", "feature", "template", "pearson", "spearman", "mi_binned", "mi_ksg",
                       "mi_ksg_low", "mi_ksg_high", "p_value"]
SUMMARY_COLUMNS = ["template", "method", "best_feature", "mi_ksg", "mi_ksg_low", "mi_ksg_high",
                   "equivalent_correlation", "abs_pearson", "mi_binned", "p_value", "p_value_rotation",
                   "r2_all_features",
                   "mi_gauss_all_features", "r2_all_channels", "mi_gauss_all_channels",
                   "matched_feature", "matched_mi_ksg"]


def _read_maps(path):
    """All columns of a HEALPix FITS file as (n, npix) RING with NaN, and the column names."""
    import healpy as hp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maps, header = hp.read_map(path, field=None, h=True, dtype=np.float64)
    except Exception as e:  # healpy/astropy raise many types for non-HEALPix files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable HEALPix map ({msg})") from None
    maps = np.atleast_2d(np.array(maps, dtype=np.float64))
    unseen_to_nan(maps)
    header = dict(header)
    names = [str(header.get(f"TTYPE{i + 1}", f"feature_{i + 1:02d}")) for i in range(len(maps))]
    return maps, names


def read_run(run_dir):
    """Read what the report needs from a run folder.

    Parameters
    ----------
    run_dir : str

    Returns
    -------
    dict
        ``features`` (L, npix) latent posterior means, RING, NaN where missing; ``names``
        (feature_01, ...); ``nside``; ``catalog`` (input catalog path from config.yaml);
        ``config`` (dict); ``significance`` (rows of significance.csv, [] if absent).

    Raises
    ------
    InputError
        No folder, no latent_mean.fits, an unreadable map or config.yaml.
    """
    import csv

    import healpy as hp

    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: run folder not found")
    path = os.path.join(run_dir, "latent_mean.fits")
    if not os.path.isfile(path):
        raise InputError(f"{run_dir}: no latent maps (latent_mean.fits) — run galdecomp fit first")
    features, names = _read_maps(path)
    cfg_path = os.path.join(run_dir, "config.yaml")
    try:
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"{cfg_path}: not found (the run's configuration names its input catalog)") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise InputError(f"{cfg_path}: not valid YAML") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("catalog"), str):
        raise InputError(f"{cfg_path}: no 'catalog' entry (the path of the run's input catalog)")
    sig = []
    sig_path = os.path.join(run_dir, "significance.csv")
    if os.path.isfile(sig_path):
        with open(sig_path) as f:
            sig = list(csv.DictReader(f))
    return dict(features=features, names=names, nside=hp.npix2nside(features.shape[1]),
                catalog=cfg["catalog"], config=cfg, significance=sig)


def _unused(sig):
    """Names of the features marked unused by significance.csv's rows (none without it)."""
    if not sig:
        return set()
    per = [float(r.get("delta_loglike_per_pixel", "nan")) for r in sig]
    return {r["feature"] for r, u in zip(sig, unused_features(per)) if u}


def _labeller(unused):
    """``label(feature)``: the feature's name, with `` (unused)`` if it is unused."""
    return lambda f: f"{f} (unused)" if f in unused else f


def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _num(v, digits=6):
    return float(f"{v:.{digits}g}") if np.isfinite(v) else float("nan")


class _Ranks:
    """Ranks of a map over a pixel mask, computed once per (map, mask)."""

    def __init__(self):
        self.cache = {}

    def __call__(self, tag, v, mask):
        from scipy.stats import rankdata

        key = (tag, hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest())
        if key not in self.cache:
            self.cache[key] = rankdata(v[mask])
        return self.cache[key]


def _pair_rows(method, names, maps, templates, T, resampler, bins, ranks):
    """Rows of correlations.csv for one method: every (feature, template) pair."""
    rows = []
    for j, tname in enumerate(templates):
        y = T[j]
        for i, fname in enumerate(names):
            x = maps[i]
            m = np.isfinite(x) & np.isfinite(y)
            mi, lo, hi = resampler.ksg(x, y, KSG_K)
            rows.append(dict(method=method, feature=fname, template=tname,
                             pearson=_corr(x[m], y[m]) if m.sum() > 1 else np.nan,
                             spearman=_corr(ranks((method, i), x, m), ranks(("template", j), y, m))
                             if m.sum() > 1 else np.nan,
                             mi_binned=mi_binned(x[m], y[m], bins), mi_ksg=mi, mi_ksg_low=lo,
                             mi_ksg_high=hi, p_value=resampler.pvalue(x, y)))
    return rows


def _null_binned(x, y, idx, perm, bins):
    """mi_binned of ``x`` against ``y`` with its blocks (rows of ``idx``) permuted: no dependence."""
    yp = np.empty_like(y)
    yp[idx] = y[idx][perm]
    return mi_binned(x, yp, bins)


# -- figures --------------------------------------------------------------------------------------

def _plot_hist2d(x, y, xlabel, ylabel, title, path):
    from matplotlib.colors import LogNorm

    from ..figures import pyplot, save_figure

    plt = pyplot()
    m = np.isfinite(x) & np.isfinite(y)
    h, xe, ye = np.histogram2d(x[m], y[m], bins=HIST_BINS)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(np.ma.masked_equal(h.T, 0), origin="lower", aspect="auto", cmap="viridis",
                   extent=(xe[0], xe[-1], ye[0], ye[-1]), norm=LogNorm(), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="pixels")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _plot_heatmap(mi, rows, cols, title, path, annotate=True):
    from ..figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * len(cols), 1.6 + 0.36 * len(rows)))
    im = ax.imshow(mi, cmap="magma", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, label="KSG MI [nats]", fraction=0.03)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    vmax = np.nanmax(mi) if np.isfinite(mi).any() else 1.0
    for (i, j), v in np.ndenumerate(mi if annotate else np.empty((0, 0))):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                    color="black" if v > 0.6 * vmax else "white")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# -- report.md ------------------------------------------------------------------------------------

_STATS = """\
- **pearson**: linear correlation coefficient of the (transformed) feature and template over
  their common pixels; its sign is arbitrary for PCA and ICA components.
- **spearman**: correlation of the ranks, i.e. of any monotone relation; unaffected by the
  template transform.
- **mi_binned**: plug-in mutual information [nats] of a {bins} x {bins} equal-width histogram; biased
  upward by up to ~(occupied cells)/(2 N) on N pixels (here ~{null_binned:.2f} nats on block-permuted maps).
- **mi_ksg**: Kraskov-Stoegbauer-Grassberger k-nearest-neighbour MI [nats] (k = {k}, scikit-learn),
  nearly unbiased; for a Gaussian pair it equals -log(1 - r^2)/2 (r = 0.98 gives 1.61 nats).
- **mi_ksg_low, mi_ksg_high**: {lo:g}-{hi:g} % block-bootstrap interval of mi_ksg: coarse
  sky blocks of the per-pixel KSG terms resampled with replacement ({n_boot} replicates).
- **p_value**: block-permutation test of independence ({n_perm} permutations of the coarse blocks of
  the template; statistic: MI of equal-count bins); the smallest possible value is {pmin:.3g}.
- **p_value_rotation** (summary.csv): the same statistic against {n_perm} random rigid rotations of the
  template ("spin test"), which keep its large-scale structure; calibrated where blocks are not.
- **equivalent_correlation**: sqrt(1 - exp(-2 mi_ksg)), the |r| of a Gaussian pair with that MI,
  to compare the MI with |pearson| (equal when the relation is linear and Gaussian).
- **r2_all_features**: out-of-sample R^2 of the template predicted from all features of a method by
  gradient boosting, trained on half of the coarse sky blocks and scored on the other half.
- **r2_all_channels**: the same from all preprocessed input channels: the ceiling of what any
  decomposition of these data can recover; mi_gauss_* = -log(1 - R^2)/2 (0 if R^2 <= 0).
"""


def _fmt(v, spec=".3g"):
    return format(v, spec) if isinstance(v, (int, float, np.floating)) and np.isfinite(v) else "–"


def _markdown(info, corr, summary, matches, sig, figures):
    L = len(info["names"])
    lines = [f"# galdecomp report: {os.path.basename(info['run_dir'])}", "",
             f"- run: `{info['run_dir']}` — {L} latent features, nside {info['nside']}, "
             f"{info['n_pixels']} pixels with valid features",
             f"- input catalog: `{info['catalog']}` — {info['n_channels']} channels "
             f"(for the baselines and the R^2 ceiling)",
             f"- templates: `{info['templates_catalog']}` — {len(info['templates'])} maps, each "
             f"transformed as in its catalog entry (log / asinh / linear) and standardised",
             f"- methods: {', '.join(info['methods'])}"
             + "".join(f"; {m} skipped: {why}" for m, why in info["skipped"].items()),
             f"- KSG, bootstrap and permutations on {info['ksg_pixels']} pixels (the same "
             f"positions in each of {info['n_blocks']} coarse blocks at nside {info['nside_block']}); "
             f"pearson, spearman and mi_binned on all common pixels", "",
             "## Statistics", "", info["stats_text"], ]
    best = {}
    for r in corr:
        if r["method"] == "galdecomp" and np.isfinite(r["mi_ksg"]):
            b = best.get(r["feature"])
            if b is None or r["mi_ksg"] > b["mi_ksg"]:
                best[r["feature"]] = r
    matched = {f: t for t, f in matches.get("galdecomp", {}).items()}
    label = _labeller(info.get("unused", set()))
    lines += ["## Feature ranking", "",
              "By significance (RUN/significance.csv: log-likelihood lost when the feature is set to "
              "its prior mean), with the template each feature depends on most. A feature below "
              f"{UNUSED_NATS_PER_ROW:g} nats/pixel is marked unused.", ""]
    if sig:
        lines += [feature_support([float(s.get("delta_loglike_per_pixel", "nan")) for s in sig]) + ".", ""]
    rows = []
    for s in sig or [dict(feature=n, rank=i + 1) for i, n in enumerate(info["names"])]:
        b = best.get(s.get("feature"), {})
        rows.append(dict(rank=s.get("rank", ""), feature=label(s.get("feature", "")),
                         delta_loglike_per_pixel=_fmt(float(s.get("delta_loglike_per_pixel", "nan"))),
                         best_template=b.get("template", "–"), mi_ksg=_fmt(b.get("mi_ksg")),
                         pearson=_fmt(b.get("pearson"), "+.3f"),
                         matched_template=matched.get(s.get("feature"), "–")))
    lines += [format_table(rows, list(rows[0]), "markdown")] if rows else []
    lines += ["## Templates: the best galdecomp feature", ""]
    by = {(s["template"], s["method"]): s for s in summary}
    rows = []
    for t in info["templates"]:
        s = by[(t, "galdecomp")]
        rows.append(dict(template=t, best_feature=label(s["best_feature"]),
                         mi_ksg=f"{_fmt(s['mi_ksg'])} [{_fmt(s['mi_ksg_low'])}, {_fmt(s['mi_ksg_high'])}]",
                         equiv_r=_fmt(s["equivalent_correlation"], ".3f"),
                         abs_pearson=_fmt(s["abs_pearson"], ".3f"),
                         mi_binned=_fmt(s["mi_binned"]), p_value=_fmt(s["p_value"]),
                         p_rotation=_fmt(s["p_value_rotation"]),
                         r2_all_features=_fmt(s["r2_all_features"], ".3f"),
                         r2_all_channels=_fmt(s["r2_all_channels"], ".3f")))
    lines += [format_table(rows, list(rows[0]), "markdown"),
              "## Methods compared", "",
              "Best single-component KSG MI [nats] and R^2 from all components, per method; the last "
              "column is the ceiling from all input channels.", ""]
    rows = []
    for t in info["templates"]:
        r = {"template": t}
        for m in info["methods"]:
            r[f"mi {m}"] = _fmt(by[(t, m)]["mi_ksg"])
        for m in info["methods"]:
            r[f"R2 {m}"] = _fmt(by[(t, m)]["r2_all_features"], ".3f")
        r["R2 channels"] = _fmt(by[(t, info["methods"][0])]["r2_all_channels"], ".3f")
        rows.append(r)
    mean = {"template": "**mean**"}
    for c in list(rows[0])[1:]:
        vals = [float(r[c]) for r in rows if r[c] != "–"]
        mean[c] = _fmt(np.mean(vals), ".3f") if vals else "–"
    lines += [format_table(rows + [mean], list(rows[0]), "markdown")]
    lines += ["## One-to-one matching", "",
              "Features matched to templates maximising the total KSG MI (Hungarian algorithm), galdecomp:", ""]
    cm = {(r["method"], r["feature"], r["template"]): r for r in corr}
    rows = [dict(feature=label(f), template=t, mi_ksg=_fmt(cm[("galdecomp", f, t)]["mi_ksg"]),
                 pearson=_fmt(cm[("galdecomp", f, t)]["pearson"], "+.3f"),
                 p_value=_fmt(cm[("galdecomp", f, t)]["p_value"]))
            for t, f in sorted(matches["galdecomp"].items(), key=lambda kv: kv[1])]
    lines += [format_table(rows, ["feature", "template", "mi_ksg", "pearson", "p_value"], "markdown")]
    lines += ["## Figures", "", "![KSG MI of every galdecomp feature and template](plots/mi_heatmap.png)", ""]
    lines += ["Baselines: " + ", ".join(f"[{m}](plots/mi_heatmap_{m}.png)" for m in info["methods"][1:]), ""]
    for t, (maps_png, hist_png) in figures.items():
        lines += [f"### {t}", "", f"![{t} and its best feature](plots/{maps_png})", "",
                  f"![2-D histogram of {t} against its best feature](plots/{hist_png})", ""]
    lines += ["## Notes", "", info["notes"], ""]
    return "\n".join(lines)


# -- the recipe -----------------------------------------------------------------------------------

def make_report(run_dir, templates_catalog, out=None, bins=512, seed=0, progress=None):
    """Compare the latent features of a run, and linear baselines, with template maps.

    :func:`compute_report`, then :func:`write_report`; parameters as :func:`compute_report`.

    Returns
    -------
    dict
        As :func:`compute_report`'s result, with ``paths`` (file name -> path in ``out``) and
        the ``write`` and ``total`` timings.
    """
    t0 = time.perf_counter()
    result, parts = compute_report(run_dir, templates_catalog, out, bins, seed, progress)
    result["paths"] = write_report(result, parts, progress)
    result["timings"]["write"] = time.perf_counter() - t0 - sum(result["timings"].values())
    result["timings"]["total"] = sum(result["timings"].values())
    return result


def compute_report(run_dir, templates_catalog, out=None, bins=512, seed=0, progress=None):
    """Compare the latent features of a run, and linear baselines, with template maps (no files written).

    Every (method, feature, template) with method in galdecomp (the latent posterior means),
    pca, ica, nmf (of the run's preprocessed input channels, same pixels, as many components
    as features; NMF skipped if it does not converge) gets: Pearson, Spearman, binned MI,
    KSG MI with a block-bootstrap interval and a block-permutation p-value. Per template and
    method: the best feature, the held-out R^2 of the template from all features, the ceiling
    R^2 from all input channels, and the one-to-one feature-template matching.

    Parameters
    ----------
    run_dir : str
        Run folder written by ``galdecomp fit`` (latent_mean.fits, config.yaml,
        significance.csv).
    templates_catalog : str
        Map catalog of the templates; read at the run's nside, each map transformed as its
        entry says and standardised; missing pixels dropped pair by pair.
    out : str, optional
        Report folder, default RUN/report; replaced if it exists (built atomically).
    bins : int
        Bins per axis of ``mi_binned``.
    seed : int
        Seed of the KSG jitter, bootstrap, permutations, ICA/NMF and the R^2 split.
    progress : callable, optional
        Called with progress messages.

    Returns
    -------
    result : dict
        ``out`` (the report folder to write); ``correlations`` (rows of correlations.csv);
        ``summary`` (rows of summary.csv); ``matches`` ({method: {template: feature}});
        ``methods`` (the methods computed); ``skipped`` ({method: reason});
        ``nside``; ``n_pixels`` (pixels with valid features); ``ksg_pixels`` (subsample size);
        ``timings`` (stage -> seconds).
    parts : dict
        What :func:`write_report` needs besides: ``info``, ``methods`` (name -> (feature names,
        maps)), ``templates`` (DataSet), ``T`` (standardised templates), ``cm`` (correlation
        rows by (method, feature, template)), ``significance``.

    Raises
    ------
    InputError
        No latent maps in the run, a bad templates or input catalog, a template sharing fewer
        than MIN_COMMON pixels with the run, bad ``bins``.
    """
    say = progress or (lambda msg: None)
    clock, timings = time.perf_counter(), {}

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now

    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise InputError(f"bins: must be an integer >= 2, got {bins!r}")
    run_dir = os.path.abspath(run_dir)
    run = read_run(run_dir)
    out = os.path.abspath(out or os.path.join(run_dir, "report"))
    check_output_dir(out, overwrite=True)
    nside, names, F = run["nside"], run["names"], run["features"]
    valid = np.isfinite(F).all(axis=0)
    if not valid.any():
        raise InputError(f"{os.path.join(run_dir, 'latent_mean.fits')}: no pixel with valid features")
    say(f"templates {templates_catalog} at nside {nside}")
    tset = load_catalog(templates_catalog, nside=nside)
    T = Preprocessor.fit(tset).forward(tset.values)
    T[:, ~valid] = np.nan
    for name, c in zip(tset.names, np.isfinite(T).sum(axis=1)):
        if c < MIN_COMMON:
            what = "no pixel" if c == 0 else f"only {c} pixels"
            raise InputError(f"{templates_catalog}: map '{name}': {what} in common with the run "
                             f"{run_dir} (at least {MIN_COMMON} needed)")
    say(f"input channels of the run ({run['catalog']})")
    try:
        inputs = load_catalog(run["catalog"], nside=nside,
                              fwhm_arcmin=((run["config"] or {}).get("data") or {}).get("fwhm_arcmin"))
    except InputError as e:
        raise InputError(f"{e} (input catalog of the run {run_dir})") from None
    X = Preprocessor.fit(inputs).forward(inputs.values)
    X[:, ~valid] = np.nan
    lap("load")

    say(f"linear baselines (PCA, ICA, NMF) with {len(names)} components")
    comps, skipped = linear_baselines(X[:, valid], len(names), seed=seed, log=say)
    methods = {"galdecomp": (names, F)}
    for m, c in comps.items():
        full = np.full((len(c), F.shape[1]), np.nan)
        full[:, valid] = c
        methods[m] = (component_names(m, len(c)), full)
    lap("baselines")

    res = BlockResampler(nside, KSG_PIXELS, N_BOOT, N_PERM, seed)
    ranks, corr = _Ranks(), []
    for m, (mnames, maps) in methods.items():
        say(f"{m}: {len(mnames)} x {len(tset.names)} pairs (KSG on {res.n_pixels} pixels)")
        corr += _pair_rows(m, mnames, maps, tset.names, T, res, bins, ranks)
    lap("pairs")

    say("held-out R^2 from all features and all channels (gradient boosting)")
    r2 = {}
    for j, t in enumerate(tset.names):
        train, test = block_split(nside, np.isfinite(T[j]), seed)
        r2[(t, "channels")] = heldout_r2(X.T, T[j], train, test, seed, R2_TRAIN_PIXELS, R2_TEST_PIXELS)
        for m, (_, maps) in methods.items():
            r2[(t, m)] = heldout_r2(maps.T, T[j], train, test, seed, R2_TRAIN_PIXELS, R2_TEST_PIXELS)
    lap("r2")

    cm = {(r["method"], r["feature"], r["template"]): r for r in corr}
    matches, summary = _summary(methods, tset.names, T, cm, r2, res)
    idx = block_index(nside)
    null_binned = float(np.nanmedian([_null_binned(F[names.index(s["best_feature"])],
                                                   T[tset.names.index(s["template"])], idx, res.perms[0], bins)
                                      for s in summary if s["method"] == "galdecomp"]))
    lap("summary")

    info = dict(run_dir=run_dir, names=names, nside=nside, n_pixels=int(valid.sum()),
                catalog=run["catalog"], n_channels=inputs.n_features, templates=tset.names,
                templates_catalog=os.path.abspath(templates_catalog), methods=list(methods),
                skipped=skipped, ksg_pixels=res.n_pixels, n_blocks=res.index.shape[0],
                nside_block=res.nside_block)
    info["unused"] = _unused(run["significance"])
    info["stats_text"] = _STATS.format(bins=bins, null_binned=null_binned, k=KSG_K, lo=INTERVAL[0],
                                       hi=INTERVAL[1], n_boot=N_BOOT, n_perm=N_PERM, pmin=1 / (1 + N_PERM))
    info["notes"] = _notes(info, null_binned, bins)
    result = dict(out=out, correlations=corr, summary=summary, matches=matches, methods=list(methods),
                  skipped=skipped, nside=nside, n_pixels=int(valid.sum()), ksg_pixels=res.n_pixels,
                  timings=timings)
    parts = dict(info=info, methods=methods, templates=tset, T=T, cm=cm, significance=run["significance"])
    return result, parts


def write_report(result, parts, progress=None):
    """Write the report folder of :func:`compute_report`'s result (atomically).

    Returns
    -------
    dict
        File name -> path: correlations.csv, summary.csv, report.md, plots.
    """
    say = progress or (lambda msg: None)
    out, corr, summary = result["out"], result["correlations"], result["summary"]
    paths = {}
    say(f"writing {out}")
    with atomic_output_dir(out, overwrite=True) as tmp:
        pdir = os.path.join(tmp, "plots")
        os.makedirs(pdir)
        crow = [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in corr]
        srow = [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in summary]
        write_text(os.path.join(tmp, "correlations.csv"), format_table(crow, CORRELATION_COLUMNS, "csv"))
        write_text(os.path.join(tmp, "summary.csv"), format_table(srow, SUMMARY_COLUMNS, "csv"))
        say("plots")
        figures = _figures(pdir, parts["methods"], parts["templates"], parts["T"], summary, parts["cm"],
                           parts["info"].get("unused", set()))
        write_text(os.path.join(tmp, "report.md"),
                   _markdown(parts["info"], corr, summary, result["matches"], parts["significance"], figures))
        for f in ["correlations.csv", "summary.csv", "report.md"]:
            paths[f] = os.path.join(out, f)
        paths["plots"] = os.path.join(out, "plots")
    return paths


def _summary(methods, templates, T, cm, r2, res):
    """One-to-one matches ({method: {template: feature}}) and the rows of summary.csv."""
    matches, rows = {}, []
    g2 = {k: (v, gaussian_mi(v)) for k, v in r2.items()}
    for m, (mnames, maps) in methods.items():
        mi = np.array([[cm[(m, f, t)]["mi_ksg"] for t in templates] for f in mnames])
        matches[m] = {templates[j]: mnames[i] for i, j in match_features(mi)}
        for j, t in enumerate(templates):
            b = cm[(m, mnames[int(np.argmax(np.where(np.isfinite(mi[:, j]), mi[:, j], -np.inf)))], t)]
            mf = matches[m].get(t, "")
            rows.append(dict(template=t, method=m, best_feature=b["feature"], mi_ksg=b["mi_ksg"],
                             mi_ksg_low=b["mi_ksg_low"], mi_ksg_high=b["mi_ksg_high"],
                             equivalent_correlation=float(equivalent_correlation(b["mi_ksg"])),
                             abs_pearson=abs(b["pearson"]), mi_binned=b["mi_binned"], p_value=b["p_value"],
                             p_value_rotation=res.pvalue_rotation(maps[mnames.index(b["feature"])], T[j]),
                             r2_all_features=g2[(t, m)][0], mi_gauss_all_features=g2[(t, m)][1],
                             r2_all_channels=g2[(t, "channels")][0],
                             mi_gauss_all_channels=g2[(t, "channels")][1],
                             matched_feature=mf, matched_mi_ksg=cm[(m, mf, t)]["mi_ksg"] if mf else np.nan))
    return matches, rows


def _figures(pdir, methods, tset, T, summary, cm, unused=frozenset()):
    """All PNGs (galdecomp features in ``unused`` labelled so); returns {template: (maps png, hist2d png)}."""
    from .plots import mollview_grid

    names, F = methods["galdecomp"]
    label = _labeller(unused)
    for m, (mnames, _) in methods.items():
        mi = np.array([[cm[(m, f, t)]["mi_ksg"] for t in tset.names] for f in mnames])
        rows = [label(f) for f in mnames] if m == "galdecomp" else mnames
        _plot_heatmap(mi, rows, tset.names, f"{m}: KSG mutual information [nats]",
                      os.path.join(pdir, "mi_heatmap.png" if m == "galdecomp" else f"mi_heatmap_{m}.png"),
                      annotate=m == "galdecomp")
    figures = {}
    for j, (t, tr) in enumerate(zip(tset.names, tset.transforms)):
        s = next(r for r in summary if r["template"] == t and r["method"] == "galdecomp")
        f = s["best_feature"]
        x = F[names.index(f)]
        r = cm[("galdecomp", f, t)]
        text = f"MI {_fmt(r['mi_ksg'], '.2f')} nats, r {_fmt(r['pearson'], '+.2f')}"
        maps_png, hist_png = f"maps_{_safe(t)}.png", f"hist2d_{_safe(t)}.png"
        mollview_grid(np.stack([T[j], x]), [f"{t} ({tr}, standardised)", f"{label(f)} ({text})"],
                      os.path.join(pdir, maps_png), ncols=2)
        _plot_hist2d(x, T[j], f"{label(f)} (posterior mean)", f"{t} ({tr}, standardised)",
                     f"{t} vs {label(f)}: {text}", os.path.join(pdir, hist_png))
        figures[t] = (maps_png, hist_png)
    return figures


def _notes(info, null_binned, bins):
    return (
        f"- The KSG estimate, its interval and the p-value use a subsample of {info['ksg_pixels']} of the "
        f"{info['n_pixels']} pixels (KSG on all pixels of every pair would take minutes); neighbouring "
        f"pixels of smooth maps carry little extra information, and `benchmarks/bench_report.py` prints "
        f"the difference from the all-pixel estimate for a few pairs.\n"
        f"- The bootstrap keeps the KSG neighbour counts of the subsample fixed (a bootstrap that recomputes "
        f"them would put duplicated pixels at distance 0 and inflate the MI); for independent samples its "
        f"spread agrees with the true scatter of the estimator to ~20 %.\n"
        f"- Blocks are the coarse HEALPix pixels at nside {info['nside_block']}. Block permutation breaks "
        f"the dependence between maps but keeps each map's structure inside a block; two maps that both "
        f"follow Galactic latitude are dependent in this sense. It treats blocks as independent: for maps "
        f"correlated over a block or more it is anti-conservative (independent Gaussian fields smoothed "
        f"to 20 degrees FWHM at nside 16 gave p < 0.05 in ~26 % of pairs; see `benchmarks/bench_report.py "
        f"--calibration`), and the bootstrap interval is then too narrow (68 % intervals covered the truth "
        f"in 79 % of pairs at 5 degrees, 54 % at 20 degrees). The rotation test (p_value_rotation) keeps "
        f"all spatial correlations and stayed at <= 5 % false positives.\n"
        f"- p-values are not corrected for the {len(info['names']) * len(info['templates'])} tests "
        f"per method.\n"
        f"- Milosevic et al. (2021) report MI 1.72 nats (512-bin histogram) and Pearson 0.98 between a "
        f"feature and the Planck dust map. A {bins}-bin plug-in MI is biased upward on few pixels "
        f"(median {null_binned:.2f} nats here on block-permuted, independent pairs), so compare their "
        f"Pearson with abs_pearson and mi_ksg with -log(1 - 0.98^2)/2 = 1.61 nats.")
