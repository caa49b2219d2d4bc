"""The science report of a run: how the latent features relate to known templates.

``make_report(RUN, TEMPLATES)`` compares every latent feature of a run, and the components of
linear baselines (PCA, ICA, NMF) of the same data, with every map of a template catalog, and
writes RUN/report/: correlations.csv, summary.csv, report.md and plots/.
"""
import hashlib
import os
import time
import warnings

import numpy as np

from ..catalog import load_catalog, unseen_to_nan
from ..errors import InputError
from ..fileio import atomic_output_dir, check_output_dir, write_text
from ..preprocessing import Preprocessor
from .baselines import METHODS as BASELINES
from .baselines import component_names, linear_baselines
from .dependence import (INTERVAL, BlockResampler, pearson, block_index,
                         block_split, equivalent_correlation, gaussian_mi, heldout_r2,
                         match_features, mi_binned)
from .run_outputs import unused_features
from .latent_rotation import read_rotation
from .report_figures import write_figures
from .report_markdown import STATS_TEXT, notes_text, report_markdown
from ..run import RunFolder
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
        ``config`` (dict); ``significance`` (rows of significance.csv, [] if absent);
        ``rotation``: the rotation of the latent maps (rotation.csv's method, ``none`` without it).

    Raises
    ------
    InputError
        No folder, no latent_mean.fits, an unreadable map or config.yaml.
    """
    import csv

    import healpy as hp

    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: run folder not found")
    run = RunFolder(run_dir)
    path = run.array("latent_mean", ".fits")
    if not os.path.isfile(path):
        raise InputError(f"{run_dir}: no latent maps ({os.path.basename(path)}) — run galdecomp fit first")
    features, names = _read_maps(path)
    cfg = run.read_config_file()
    sig = []
    if run.has("significance"):
        with open(run.path("significance")) as f:
            sig = list(csv.DictReader(f))
    return dict(features=features, names=names, nside=hp.npix2nside(features.shape[1]),
                catalog=cfg["catalog"], config=cfg, significance=sig, rotation=read_rotation(run.path("rotation")))


def _unused(sig):
    """Names of the features marked unused by significance.csv's rows (none without it)."""
    if not sig:
        return set()
    per = [float(r.get("delta_loglike_per_pixel", "nan")) for r in sig]
    return {r["feature"] for r, u in zip(sig, unused_features(per)) if u}


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
                             pearson=pearson(x[m], y[m]) if m.sum() > 1 else np.nan,
                             spearman=pearson(ranks((method, i), x, m), ranks(("template", j), y, m))
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


def _compared_maps(run, run_dir, templates_catalog, valid, say):
    """The templates (DataSet ``tset`` and standardised ``T``) and the run's input channels
    (DataSet ``inputs`` and standardised ``X``), both NaN outside ``valid``, at the run's nside."""
    nside = run["nside"]
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
    return tset, T, inputs, X


def _heldout_r2s(methods, templates, T, X, nside, seed):
    """Held-out R^2 of each template from all channels (``(t, "channels")``) and from all
    features of each method (``(t, method)``), on the same sky-block split per template."""
    r2 = {}
    for j, t in enumerate(templates):
        train, test = block_split(nside, np.isfinite(T[j]), seed)
        r2[(t, "channels")] = heldout_r2(X.T, T[j], train, test, seed, R2_TRAIN_PIXELS, R2_TEST_PIXELS)
        for m, (_, maps) in methods.items():
            r2[(t, m)] = heldout_r2(maps.T, T[j], train, test, seed, R2_TRAIN_PIXELS, R2_TEST_PIXELS)
    return r2


def _methods(names, F, X, valid, seed, say):
    """The compared methods, name -> (feature names, maps (K, npix), NaN outside ``valid``): the
    run's features ``F`` and the linear baselines of the input channels ``X`` with as many
    components; and the baselines skipped, name -> reason."""
    say(f"linear baselines (PCA, ICA, NMF) with {len(names)} components")
    comps, skipped = linear_baselines(X[:, valid], len(names), seed=seed, log=say)
    methods = {"galdecomp": (names, F)}
    for m, c in comps.items():
        full = np.full((len(c), F.shape[1]), np.nan)
        full[:, valid] = c
        methods[m] = (component_names(m, len(c)), full)
    return methods, skipped


def _median_null_binned(summary, names, F, templates, T, nside, perm, bins):
    """Median binned MI of each template's best galdecomp feature against the block-permuted
    template: the plug-in estimator's bias on independent pairs."""
    idx = block_index(nside)
    return float(np.nanmedian([_null_binned(F[names.index(s["best_feature"])],
                                            T[templates.index(s["template"])], idx, perm, bins)
                               for s in summary if s["method"] == "galdecomp"]))


def _add_texts(info, null_binned, bins):
    """``info``'s ``stats_text`` (what each statistic is) and ``notes`` (its caveats) for report.md."""
    info["stats_text"] = STATS_TEXT.format(bins=bins, null_binned=null_binned, k=KSG_K, lo=INTERVAL[0],
                                       hi=INTERVAL[1], n_boot=N_BOOT, n_perm=N_PERM, pmin=1 / (1 + N_PERM))
    info["notes"] = notes_text(info, null_binned, bins)


def _lap_clock(timings):
    """``lap(stage)``: record in ``timings`` the seconds since the previous lap (or since now)."""
    clock = [time.perf_counter()]

    def lap(stage):
        now = time.perf_counter()
        timings[stage], clock[0] = now - clock[0], now

    return lap


def compute_report(run_dir, templates_catalog, out=None, bins=512, seed=0, progress=None):
    """Compare the latent features of a run, and linear baselines, with template maps (no files written).

    Every (method, feature, template), method galdecomp (the latent posterior means) or pca,
    ica, nmf (of the run's preprocessed input channels, as many components as features; NMF
    skipped if it does not converge): Pearson, Spearman, binned MI, KSG MI with a block-bootstrap
    interval and a block-permutation p-value. Per template and method: the best feature, the
    held-out R^2 from all features, the ceiling R^2 from all input channels, the matching.

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
        maps)), ``templates`` (DataSet), ``template_maps`` (standardised), ``rows_by_pair``
        (correlation rows by (method, feature, template)), ``significance``.

    Raises
    ------
    InputError
        No latent maps in the run, a bad templates or input catalog, a template sharing fewer
        than MIN_COMMON pixels with the run, bad ``bins``.
    """
    say = progress or (lambda msg: None)
    timings = {}
    lap = _lap_clock(timings)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise InputError(f"bins: must be an integer >= 2, got {bins!r}")
    run_dir = os.path.abspath(run_dir)
    run = read_run(run_dir)
    out = os.path.abspath(out or RunFolder(run_dir).path("report"))
    check_output_dir(out, overwrite=True)
    nside, names, F = run["nside"], run["names"], run["features"]
    valid = np.isfinite(F).all(axis=0)
    if not valid.any():
        raise InputError(f"{RunFolder(run_dir).array('latent_mean', '.fits')}: no pixel with valid features")
    tset, T, inputs, X = _compared_maps(run, run_dir, templates_catalog, valid, say)
    lap("load")
    methods, skipped = _methods(names, F, X, valid, seed, say)
    lap("baselines")
    res = BlockResampler(nside, KSG_PIXELS, N_BOOT, N_PERM, seed)
    ranks, corr = _Ranks(), []
    for m, (mnames, maps) in methods.items():
        say(f"{m}: {len(mnames)} x {len(tset.names)} pairs (KSG on {res.n_pixels} pixels)")
        corr += _pair_rows(m, mnames, maps, tset.names, T, res, bins, ranks)
    lap("pairs")

    say("held-out R^2 from all features and all channels (gradient boosting)")
    r2 = _heldout_r2s(methods, tset.names, T, X, nside, seed)
    lap("r2")

    cm = {(r["method"], r["feature"], r["template"]): r for r in corr}
    matches, summary = _summary(methods, tset.names, T, cm, r2, res)
    null_binned = _median_null_binned(summary, names, F, tset.names, T, nside, res.perms[0], bins)
    lap("summary")

    info = dict(run_dir=run_dir, names=names, nside=nside, n_pixels=int(valid.sum()),
                catalog=run["catalog"], n_channels=inputs.n_features, templates=tset.names,
                templates_catalog=os.path.abspath(templates_catalog), methods=list(methods),
                skipped=skipped, ksg_pixels=res.n_pixels, n_blocks=res.index.shape[0],
                nside_block=res.nside_block, unused=_unused(run["significance"]), rotation=run["rotation"])
    _add_texts(info, null_binned, bins)
    result = dict(out=out, correlations=corr, summary=summary, matches=matches, methods=list(methods),
                  rotation=run["rotation"],
                  skipped=skipped, nside=nside, n_pixels=int(valid.sum()), ksg_pixels=res.n_pixels,
                  timings=timings)
    parts = dict(info=info, methods=methods, templates=tset, template_maps=T, rows_by_pair=cm, significance=run["significance"])
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
        pdir = os.path.join(tmp, RunFolder.FILES["plots"])
        os.makedirs(pdir)
        crow = [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in corr]
        srow = [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in summary]
        write_text(RunFolder.report_file(tmp, "correlations"), format_table(crow, CORRELATION_COLUMNS, "csv"))
        write_text(RunFolder.report_file(tmp, "summary"), format_table(srow, SUMMARY_COLUMNS, "csv"))
        say("plots")
        figures = write_figures(pdir, parts["methods"], parts["templates"], parts["template_maps"], summary,
                                parts["rows_by_pair"], parts["info"].get("unused", set()))
        write_text(RunFolder.report_file(tmp, "report"),
                   report_markdown(parts["info"], corr, summary, result["matches"], parts["significance"], figures))
        for f in RunFolder.REPORT_FILES.values():
            paths[f] = os.path.join(out, f)
        paths["plots"] = os.path.join(out, RunFolder.FILES["plots"])
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
