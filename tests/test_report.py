"""The science report: dependence statistics, block resampling, baselines, make_report, bad input."""
import csv
import os
import shutil
import warnings

import healpy as hp
import numpy as np
import pytest
import yaml

from conftest import write_catalog, write_map
from galdecomp.catalog import load_catalog
from galdecomp.cli import main
from galdecomp.errors import InputError
from galdecomp.fileio import write_healpix_fits
from galdecomp.products.baselines import linear_baselines
from galdecomp.products.dependence import (BlockResampler, block_ids, block_index, block_split,
                                           equivalent_correlation, gaussian_mi, heldout_r2,
                                           ksg_terms, match_features, mi_binned, mi_ksg)
from galdecomp.products.report import CORRELATION_COLUMNS, make_report

RHOS = [0.0, 0.5, 0.9, 0.98]


def gaussian_pair(rho, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, rho * x + np.sqrt(1 - rho ** 2) * rng.normal(size=n)


def field(nside, seed, fwhm_deg=5.0, slope=0.0):
    """An isotropic Gaussian random field, standardised (C_l ~ (l+1)^-slope, smoothed)."""
    ell = np.arange(3 * nside)
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hp.synfast((ell + 1.0) ** -slope, nside, fwhm=np.radians(fwhm_deg))
    return (m - m.mean()) / m.std()


# -- estimators -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", RHOS)
def test_ksg_against_gaussian_mi(rho):
    x, y = gaussian_pair(rho, 4000, seed=int(rho * 100))
    true = -0.5 * np.log(1 - rho ** 2)
    est = mi_ksg(x, np.exp(y), k=3, seed=0)       # MI is invariant under a monotone transform
    assert abs(est - true) < 0.04, (est, true)
    # the fast per-pixel terms are the same estimator
    assert max(0.0, ksg_terms(x, np.exp(y), 3, 0).mean()) == pytest.approx(est, abs=1e-12)
    assert equivalent_correlation(true) == pytest.approx(rho, abs=1e-12)


@pytest.mark.parametrize("rho", RHOS)
def test_binned_mi_against_gaussian_mi(rho):
    x, y = gaussian_pair(rho, 50000, seed=7 + int(rho * 100))
    true = -0.5 * np.log(1 - rho ** 2)
    est = mi_binned(x, y, bins=48)                 # ~20 pixels per occupied cell
    assert abs(est - true) < 0.03 + 0.04 * true, (est, true)


def test_binned_mi_is_biased_up_with_many_bins_on_few_pixels():
    x, y = gaussian_pair(0.0, 5000, seed=3)
    assert mi_binned(x, y, bins=512) > 1.0 > 0.05 > mi_ksg(x, y)


def test_correlations_and_missing_pixels():
    from scipy.stats import rankdata

    from galdecomp.products.dependence import pearson

    x, y = gaussian_pair(0.9, 3000, seed=5)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson(rankdata(x), rankdata(np.exp(y))) == pytest.approx(pearson(rankdata(x), rankdata(y)))
    assert np.isnan(pearson(np.ones(10), np.arange(10.0)))
    assert gaussian_mi(0.75) == pytest.approx(np.log(2)) and gaussian_mi(-0.2) == 0.0


def test_blocks_are_coarse_nested_pixels():
    nside = 16
    idx = block_index(nside)                       # nside_block 2: 48 blocks of 64 pixels
    assert idx.shape == (48, 64)
    assert np.array_equal(np.sort(idx.ravel()), np.arange(hp.nside2npix(nside)))
    assert np.all(hp.ring2nest(nside, idx) // 64 == np.arange(48)[:, None])
    assert np.all(block_ids(nside)[idx] == np.arange(48)[:, None])
    train, test = block_split(nside, np.ones(idx.size, bool), seed=1)
    assert train.sum() == test.sum() == idx.size // 2 and not (train & test).any()
    assert np.all(train[idx].all(axis=1) | test[idx].all(axis=1))   # whole blocks


# -- resampling -----------------------------------------------------------------------------------

def test_independent_smooth_fields_are_not_significant():
    res = BlockResampler(16, seed=0)                 # 48 blocks of ~29 deg
    a, b = field(16, 11, 8.0), field(16, 12, 8.0)
    assert res.pvalue(a, b) > 0.05
    mi, lo, hi = res.ksg(a, b)
    assert lo <= mi <= hi < 0.1
    # false-positive rate over 80 pairs of fields smoothed to 8 deg (2 pixels): nominal 5 %;
    # 2.5 % here, where a permutation of single pixels gives 15 %
    ps = np.array([res.pvalue(field(16, 100 + 2 * s, 8.0), field(16, 101 + 2 * s, 8.0)) for s in range(80)])
    assert np.mean(ps < 0.05) <= 0.1, ps


def test_rotation_test_is_calibrated_for_large_scale_fields():
    # C_l ~ (l+1)^-2: dominated by l < 5, larger than the blocks. Block permutation gives
    # p < 0.05 for 22 % of these 80 independent pairs, random rotations for 7.5 %.
    res = BlockResampler(16, seed=0)
    pairs = [(field(16, 300 + 2 * s, 0.0, 2.0), field(16, 301 + 2 * s, 0.0, 2.0)) for s in range(80)]
    p_rot = np.array([res.pvalue_rotation(a, b) for a, b in pairs])
    assert np.mean(p_rot < 0.05) <= 0.125, p_rot


def test_noisy_monotone_transform_is_matched():
    nside = 16
    rng = np.random.default_rng(4)
    templates = np.stack([field(nside, 21), field(nside, 22), field(nside, 23)])
    templates[1, :200] = np.nan                     # missing pixels, dropped pairwise
    features = np.stack([field(nside, 31), np.exp(templates[2]) + 0.3 * rng.normal(size=templates.shape[1]),
                         field(nside, 32)])
    features[1, -300:] = np.nan
    res = BlockResampler(nside, seed=0)
    mi = np.array([[res.ksg(f, t)[0] for t in templates] for f in features])
    assert (1, 2) in match_features(mi)
    assert mi[1, 2] > 0.8 and mi[1, 2] == mi.max()
    assert res.pvalue(features[1], templates[2]) <= 0.01
    assert res.pvalue_rotation(features[1], templates[2]) <= 0.01


def test_heldout_r2():
    nside = 16
    rng = np.random.default_rng(2)
    X = np.stack([field(nside, 41), field(nside, 42)], axis=1)
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2 + 0.1 * rng.normal(size=len(X))
    train, test = block_split(nside, np.ones(len(X), bool), seed=0)
    assert heldout_r2(X, y, train, test) > 0.7
    assert heldout_r2(np.stack([field(nside, 43)], axis=1), y, train, test) < 0.15


def test_baselines():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 2000)) + rng.normal(size=(1, 2000))
    data[2, :100] = np.nan
    comps, skipped = linear_baselines(data, 3, seed=0)
    assert set(comps) | set(skipped) == {"pca", "ica", "nmf"}
    for c in comps.values():
        assert c.shape == (3, 2000) and np.isfinite(c).all()
    v = comps["pca"].var(axis=1)
    assert np.all(np.diff(v) <= 0)


# -- make_report on a small run -------------------------------------------------------------------

TEMPLATES = ["thermal_dust_353GHz", "synchrotron_408MHz", "cmb"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """nside-8 simulated sky, a 3-epoch fit with 4 features, and feature_02 replaced by a noisy
    monotone transform of the dust template; a catalog of three truth templates."""
    base = tmp_path_factory.mktemp("report")
    sky, run = base / "sky", base / "run"
    assert main(["simulate", "--nside", "8", "--out", str(sky), "--no-plot"]) == 0
    assert main(["fit", str(sky / "catalog.yaml"), "--out", str(run), "--max-epochs", "3",
                 "--latent-dim", "4"]) == 0
    truth = yaml.safe_load((sky / "truth" / "catalog.yaml").read_text())
    entries = [dict(e, file=str(sky / "truth" / e["file"])) for e in truth["maps"] if e["name"] in TEMPLATES]
    (base / "templates").mkdir()
    templates = write_catalog(base / "templates", entries)
    ts = load_catalog(templates)
    dust = np.log(ts.values[ts.names.index("thermal_dust_353GHz")])
    z = (dust - dust.mean()) / dust.std()
    feats = np.array(hp.read_map(str(run / "latent_mean.fits"), field=None))
    feats[1] = np.tanh(z) + 0.05 * np.random.default_rng(0).normal(size=z.size)
    write_healpix_fits(str(run / "latent_mean.fits"), feats, [f"feature_{i:02d}" for i in range(1, 5)], "1")
    return run, templates


@pytest.fixture(scope="module")
def report(small_run):
    run, templates = small_run
    os.makedirs(run / "report")
    (run / "report" / "stale.txt").write_text("from an earlier report")
    messages = []
    return make_report(str(run), templates, progress=messages.append), messages


def read_csv(path):
    with open(path) as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def test_report_files_and_columns(small_run, report):
    run, _ = small_run
    res, messages = report
    out = run / "report"
    assert res["out"] == str(out) and messages
    assert not (out / "stale.txt").exists()              # the folder was replaced
    cols, rows = read_csv(out / "correlations.csv")
    assert cols == CORRELATION_COLUMNS == ["method", "feature", "template", "pearson", "spearman", "mi_binned",
                                           "mi_ksg", "mi_ksg_low", "mi_ksg_high", "p_value"]
    assert [m for m in dict.fromkeys(r["method"] for r in rows)] == ["galdecomp", "pca", "ica", "nmf"]
    assert len(rows) == 4 * 4 * 3
    assert {r["feature"] for r in rows if r["method"] == "ica"} == {"ica_01", "ica_02", "ica_03", "ica_04"}
    assert {r["feature"] for r in rows if r["method"] == "galdecomp"} == {f"feature_0{i}" for i in range(1, 5)}
    assert {r["template"] for r in rows} == set(TEMPLATES)
    for r in rows:
        v = {k: float(r[k]) for k in CORRELATION_COLUMNS[3:]}
        assert all(np.isfinite(list(v.values()))), r
        assert -1 <= v["pearson"] <= 1 and 0 <= v["mi_ksg_low"] <= v["mi_ksg"] + 1e-9
        assert v["mi_ksg"] <= v["mi_ksg_high"] + 1e-9 and 0 < v["p_value"] <= 1
    scols, srows = read_csv(out / "summary.csv")
    assert scols[:3] == ["template", "method", "best_feature"] and len(srows) == 3 * 4
    assert {"mi_ksg", "abs_pearson", "r2_all_features", "r2_all_channels", "matched_feature"} <= set(scols)
    md = (out / "report.md").read_text()
    assert "plots/mi_heatmap.png" in md and "feature_01" in md
    for t in TEMPLATES:
        for f in (f"hist2d_{t}.png", f"maps_{t}.png"):
            assert (out / "plots" / f).is_file() and f"plots/{f}" in md
    assert (out / "plots" / "mi_heatmap.png").is_file()


def test_report_finds_the_planted_feature(report):
    res, _ = report
    s = next(r for r in res["summary"] if r["method"] == "galdecomp" and r["template"] == "thermal_dust_353GHz")
    assert s["best_feature"] == s["matched_feature"] == "feature_02"
    assert s["mi_ksg"] > 0.8 and s["p_value"] <= 0.01 and s["abs_pearson"] > 0.8
    assert res["matches"]["galdecomp"]["thermal_dust_353GHz"] == "feature_02"
    assert s["r2_all_channels"] > 0.8


# -- bad input ------------------------------------------------------------------------------------

def test_run_without_latent_maps(tmp_path, small_run):
    _, templates = small_run
    (tmp_path / "config.yaml").write_text("catalog: /nowhere.yaml\n")
    with pytest.raises(InputError, match=r"no latent maps \(latent_mean.fits\)") as e:
        make_report(str(tmp_path), templates)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(InputError, match="run folder not found"):
        make_report(str(tmp_path / "none"), templates)
    assert not (tmp_path / "report").exists()


def test_template_with_no_pixel_in_common(tmp_path, small_run):
    run, _ = small_run
    cut = tmp_path / "run"
    cut.mkdir()
    shutil.copy(run / "config.yaml", cut / "config.yaml")
    feats = np.array(hp.read_map(str(run / "latent_mean.fits"), field=None))
    north = hp.pix2vec(8, np.arange(hp.nside2npix(8)))[2] > 0
    feats[:, north] = hp.UNSEEN                        # the run has no valid pixel in the north
    write_healpix_fits(str(cut / "latent_mean.fits"), feats, [f"feature_{i:02d}" for i in range(1, 5)], "1")
    m = np.where(north, 1.0 + np.arange(north.size) % 3, hp.UNSEEN)
    write_map(tmp_path / "north.fits", m)
    write_map(tmp_path / "all.fits", np.linspace(1, 2, north.size))
    cat = write_catalog(tmp_path, [dict(name="everywhere", file="all.fits", frequency_hz=1e9, unit="K"),
                                   dict(name="north_only", file="north.fits", frequency_hz=1e9, unit="K")])
    with pytest.raises(InputError, match="map 'north_only': no pixel in common with the run") as e:
        make_report(str(cut), cat)
    assert "catalog.yaml" in str(e.value)
    assert not (cut / "report").exists()


def test_broken_templates_catalog(tmp_path, small_run):
    run, _ = small_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("maps: [unclosed\n")
    with pytest.raises(InputError, match="bad.yaml"):
        make_report(str(run), str(bad))
    folder = tmp_path / "t"
    folder.mkdir()
    from astropy.io import fits

    col = fits.Column(name="T", format="D", array=np.arange(12 * 8 * 8 + 5, dtype=float))  # not a HEALPix size
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([col])]).writeto(folder / "odd.fits")
    cat = write_catalog(folder, [dict(name="odd", file="odd.fits", frequency_hz=1e9, unit="K")])
    with pytest.raises(InputError, match=r"map 'odd' \(.*odd.fits\): not a HEALPix map"):
        make_report(str(run), cat)
    with pytest.raises(InputError, match="bins"):
        make_report(str(run), cat, bins=0)


def test_run_whose_input_catalog_is_gone(tmp_path, small_run):
    run, templates = small_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("report", "plots"))
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["catalog"] = str(tmp_path / "gone.yaml")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match="gone.yaml.*input catalog of the run"):
        make_report(str(moved), templates)


def test_report_cli_bad_run_is_one_line_exit_2(tmp_path, capsys):
    from galdecomp.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "t.yaml").write_text("maps: []\n")
    assert main(["report", str(tmp_path / "run"), "--templates", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no latent maps" in err


# -- features the data do not use -----------------------------------------------------------------

def two_component_sky(folder, nside=16, channels=8, seed=0):
    """``channels`` maps, each a random linear mix of two smooth fields plus 5 % noise; a
    catalog of the maps and one of the two fields (templates)."""
    rng = np.random.default_rng(seed)
    fields = np.array([field(nside, seed + k, fwhm_deg=10.0, slope=2.0) for k in range(2)])
    mix = rng.normal(size=(channels, 2))
    os.makedirs(folder / "templates")
    entries = []
    for c in range(channels):
        write_map(folder / f"c{c}.fits", mix[c] @ fields + 0.05 * rng.normal(size=fields.shape[1]))
        entries.append(dict(name=f"c{c}", file=f"c{c}.fits", frequency_hz=1e9 * (c + 1), unit="K",
                            transform="linear"))
    tentries = []
    for k, f in enumerate(fields):
        write_map(folder / "templates" / f"field{k}.fits", f)
        tentries.append(dict(name=f"field{k}", file=f"field{k}.fits", frequency_hz=1e9, unit="1",
                             transform="linear"))
    return write_catalog(folder, entries), write_catalog(folder / "templates", tentries)


def test_features_beyond_the_sky_s_components_are_marked_unused(tmp_path, capsys):
    catalog, templates = two_component_sky(tmp_path)
    run = tmp_path / "run"
    assert main(["fit", catalog, "--out", str(run), "--latent-dim", "5", "--max-epochs", "60"]) == 0
    line = "3 of 5 features carry < 0.1 nats/pixel (features 3, 4, 5): the data support about 2"
    assert line in capsys.readouterr().err
    _, sig = read_csv(run / "significance.csv")
    per = [float(r["delta_loglike_per_pixel"]) for r in sig]
    assert min(per[:2]) > 1.0 and max(per[2:]) < 0.1
    make_report(str(run), templates)
    md = (run / "report" / "report.md").read_text()
    assert line + "." in md
    for f in ("feature_03", "feature_04", "feature_05"):
        assert f"{f} (unused)" in md
    assert "feature_01 (unused)" not in md and "feature_02 (unused)" not in md


def test_feature_support_line():
    from galdecomp.products.run_outputs import UNUSED_NATS_PER_ROW, feature_support, unused_features

    assert UNUSED_NATS_PER_ROW == 0.1
    assert unused_features([2.0, 0.1, 0.099, -0.01]).tolist() == [False, False, True, True]
    assert feature_support([3.0, 1.0]) == "all 2 features carry >= 0.1 nats/pixel"
    assert feature_support([3.0, 0.02], "row") == ("1 of 2 features carry < 0.1 nats/row (feature 2): "
                                                   "the data support about 1")
