"""report.md of a run's report: the tables, what each statistic means, and the caveats."""
import os

import numpy as np

from .latent_rotation import ROTATION_NAMES
from .report_figures import feature_labeller, fmt
from .run_outputs import UNUSED_NATS_PER_ROW, feature_support
from .tables import format_table

__all__ = ["STATS_TEXT", "report_markdown", "notes_text"]

#: What each statistic of the report is (``str.format`` fields: bins, null_binned, k, lo, hi,
#: n_boot, n_perm, pmin).
STATS_TEXT = """\
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


def report_markdown(info, corr, summary, matches, sig, figures):
    L = len(info["names"])
    lines = [f"# galdecomp report: {os.path.basename(info['run_dir'])}", "",
             f"- run: `{info['run_dir']}` — {L} latent features, nside {info['nside']}, "
             f"{info['n_pixels']} pixels with valid features",
             f"- input catalog: `{info['catalog']}` — {info['n_channels']} channels "
             f"(for the baselines and the R^2 ceiling)",
             f"- templates: `{info['templates_catalog']}` — {len(info['templates'])} maps, each "
             f"transformed as in its catalog entry (log / asinh / linear) and standardised",
             f"- latent features rotated: {info.get('rotation', 'none')} — "
             f"{ROTATION_NAMES.get(info.get('rotation'), info.get('rotation'))}"
             + (" (RUN/rotation.csv)" if info.get("rotation", "none") != "none" else ""),
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
    label = feature_labeller(info.get("unused", set()))
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
                         delta_loglike_per_pixel=fmt(float(s.get("delta_loglike_per_pixel", "nan"))),
                         best_template=b.get("template", "–"), mi_ksg=fmt(b.get("mi_ksg")),
                         pearson=fmt(b.get("pearson"), "+.3f"),
                         matched_template=matched.get(s.get("feature"), "–")))
    lines += [format_table(rows, list(rows[0]), "markdown")] if rows else []
    lines += ["## Templates: the best galdecomp feature", ""]
    by = {(s["template"], s["method"]): s for s in summary}
    rows = []
    for t in info["templates"]:
        s = by[(t, "galdecomp")]
        rows.append(dict(template=t, best_feature=label(s["best_feature"]),
                         mi_ksg=f"{fmt(s['mi_ksg'])} [{fmt(s['mi_ksg_low'])}, {fmt(s['mi_ksg_high'])}]",
                         equiv_r=fmt(s["equivalent_correlation"], ".3f"),
                         abs_pearson=fmt(s["abs_pearson"], ".3f"),
                         mi_binned=fmt(s["mi_binned"]), p_value=fmt(s["p_value"]),
                         p_rotation=fmt(s["p_value_rotation"]),
                         r2_all_features=fmt(s["r2_all_features"], ".3f"),
                         r2_all_channels=fmt(s["r2_all_channels"], ".3f")))
    lines += [format_table(rows, list(rows[0]), "markdown"),
              "## Methods compared", "",
              "Best single-component KSG MI [nats] and R^2 from all components, per method; the last "
              "column is the ceiling from all input channels.", ""]
    rows = []
    for t in info["templates"]:
        r = {"template": t}
        for m in info["methods"]:
            r[f"mi {m}"] = fmt(by[(t, m)]["mi_ksg"])
        for m in info["methods"]:
            r[f"R2 {m}"] = fmt(by[(t, m)]["r2_all_features"], ".3f")
        r["R2 channels"] = fmt(by[(t, info["methods"][0])]["r2_all_channels"], ".3f")
        rows.append(r)
    mean = {"template": "**mean**"}
    for c in list(rows[0])[1:]:
        vals = [float(r[c]) for r in rows if r[c] != "–"]
        mean[c] = fmt(np.mean(vals), ".3f") if vals else "–"
    lines += [format_table(rows + [mean], list(rows[0]), "markdown")]
    lines += ["## One-to-one matching", "",
              "Features matched to templates maximising the total KSG MI (Hungarian algorithm), galdecomp:", ""]
    cm = {(r["method"], r["feature"], r["template"]): r for r in corr}
    rows = [dict(feature=label(f), template=t, mi_ksg=fmt(cm[("galdecomp", f, t)]["mi_ksg"]),
                 pearson=fmt(cm[("galdecomp", f, t)]["pearson"], "+.3f"),
                 p_value=fmt(cm[("galdecomp", f, t)]["p_value"]))
            for t, f in sorted(matches["galdecomp"].items(), key=lambda kv: kv[1])]
    lines += [format_table(rows, ["feature", "template", "mi_ksg", "pearson", "p_value"], "markdown")]
    lines += ["## Figures", "", "![KSG MI of every galdecomp feature and template](plots/mi_heatmap.png)", ""]
    lines += ["Baselines: " + ", ".join(f"[{m}](plots/mi_heatmap_{m}.png)" for m in info["methods"][1:]), ""]
    for t, (maps_png, hist_png) in figures.items():
        lines += [f"### {t}", "", f"![{t} and its best feature](plots/{maps_png})", "",
                  f"![2-D histogram of {t} against its best feature](plots/{hist_png})", ""]
    lines += ["## Notes", "", info["notes"], ""]
    return "\n".join(lines)


def notes_text(info, null_binned, bins):
    return (
        f"- The KSG estimate, its interval and the p-value use a subsample of {info['ksg_pixels']} of the "
        f"{info['n_pixels']} pixels (KSG on all pixels of every pair would take minutes); neighbouring "
        f"pixels of smooth maps carry little extra information, and `benchmarks/speed/bench_report.py` prints "
        f"the difference from the all-pixel estimate for a few pairs.\n"
        f"- The bootstrap keeps the KSG neighbour counts of the subsample fixed (a bootstrap that recomputes "
        f"them would put duplicated pixels at distance 0 and inflate the MI); for independent samples its "
        f"spread agrees with the true scatter of the estimator to ~20 %.\n"
        f"- Blocks are the coarse HEALPix pixels at nside {info['nside_block']}. Block permutation breaks "
        f"the dependence between maps but keeps each map's structure inside a block; two maps that both "
        f"follow Galactic latitude are dependent in this sense. It treats blocks as independent: for maps "
        f"correlated over a block or more it is anti-conservative (independent Gaussian fields smoothed "
        f"to 20 degrees FWHM at nside 16 gave p < 0.05 in ~26 % of pairs; see `benchmarks/speed/bench_report.py "
        f"--calibration`), and the bootstrap interval is then too narrow (68 % intervals covered the truth "
        f"in 79 % of pairs at 5 degrees, 54 % at 20 degrees). The rotation test (p_value_rotation) keeps "
        f"all spatial correlations and stayed at <= 5 % false positives.\n"
        f"- p-values are not corrected for the {len(info['names']) * len(info['templates'])} tests "
        f"per method.\n"
        f"- Milosevic et al. (2021) report MI 1.72 nats (512-bin histogram) and Pearson 0.98 between a "
        f"feature and the Planck dust map. A {bins}-bin plug-in MI is biased upward on few pixels "
        f"(median {null_binned:.2f} nats here on block-permuted, independent pairs), so compare their "
        f"Pearson with abs_pearson and mi_ksg with -log(1 - 0.98^2)/2 = 1.61 nats.")
