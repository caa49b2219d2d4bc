"""Beams: maps declared at different resolutions brought to a common target resolution."""
import os

import healpy as hp
import numpy as np
import pytest
import yaml

from conftest import write_catalog, write_map
from galdecomp.catalog import MIN_COVERAGE, load_catalog, smooth_to
from galdecomp.cli import main

NSIDE = 64


def sky_field(nside=NSIDE, seed=3):
    """A band-limited random field with power on every scale up to 3 nside - 1 (white spectrum)."""
    np.random.seed(seed)
    return hp.synfast(np.ones(3 * nside), nside, lmax=3 * nside - 1)


def two_beams_catalog(folder, target=None, gap=False):
    """One sky observed through a 60' and a 120' beam: two channels ``a = s * B60`` and
    ``b = 2 s * B120 + 10``; returns the catalog path."""
    s = sky_field()
    a = hp.smoothing(s, fwhm=np.radians(1.0))
    b = 2 * hp.smoothing(s, fwhm=np.radians(2.0)) + 10
    if gap:
        a[hp.query_disc(NSIDE, hp.ang2vec(0.0, 30.0, lonlat=True), np.radians(20))] = hp.UNSEEN
    write_map(os.path.join(folder, "a.fits"), a)
    write_map(os.path.join(folder, "b.fits"), b)
    entries = [dict(name="a", file="a.fits", frequency_hz=1e9, unit="K", transform="linear", fwhm_arcmin=60),
               dict(name="b", file="b.fits", frequency_hz=2e9, unit="K", transform="linear", fwhm_arcmin=120)]
    return write_catalog(folder, entries)


def corr(x, y):
    ok = np.isfinite(x) & np.isfinite(y)
    return np.corrcoef(x[ok], y[ok])[0, 1]


def test_one_sky_through_two_beams_is_one_feature_after_smoothing(tmp_path):
    cat = two_beams_catalog(tmp_path)
    raw = load_catalog(cat)
    assert raw.fwhm_arcmin == [60.0, 120.0] and raw.target_fwhm_arcmin is None
    assert corr(*raw.values) < 0.9  # the beams differ: not one feature as observed
    common = load_catalog(cat, fwhm_arcmin=120)
    assert corr(*common.values) > 0.999
    np.testing.assert_array_equal(common.values[1], raw.values[1])  # already at the target: untouched
    coarser = load_catalog(cat, fwhm_arcmin=180)
    assert corr(*coarser.values) > 0.999


def test_no_target_and_no_beams_leaves_the_maps_bitwise(small_catalog):
    cat, maps, _ = small_catalog
    d = load_catalog(cat, fwhm_arcmin=30)  # no map declares a beam: nothing is smoothed
    for m, v in zip(maps, d.values):
        np.testing.assert_array_equal(v, m)


def test_normalised_convolution_keeps_a_masked_patch_missing_and_unbiased():
    nside, centre = NSIDE, hp.ang2vec(0.0, 30.0, lonlat=True)
    m = np.full(hp.nside2npix(nside), 5.0)
    hole = np.zeros(m.size, bool)
    hole[hp.query_disc(nside, centre, np.radians(20))] = True
    m[hole] = np.nan
    out = smooth_to(m, 60.0, 180.0)  # kernel sqrt(180^2 - 60^2) = 170'
    ok = np.isfinite(out)
    np.testing.assert_allclose(out[ok], 5.0, rtol=1e-3)  # no leak of zeros from the gap
    dist = np.degrees(np.arccos(np.clip(centre @ np.array(hp.pix2vec(nside, np.arange(m.size))), -1, 1)))
    assert not ok[dist < 17].any()  # deep inside the gap: still missing
    assert ok[dist > 23].all()      # outside it: kept
    naive = hp.smoothing(np.where(hole, 0.0, m), fwhm=np.radians(170 / 60))
    assert naive[(dist > 20) & (dist < 22)].min() < 4.0  # what zero-filling would have given
    assert 0 < MIN_COVERAGE < 1


def test_a_gap_in_a_channel_stays_a_gap_after_smoothing(tmp_path):
    cat = two_beams_catalog(tmp_path, gap=True)
    raw, common = load_catalog(cat), load_catalog(cat, fwhm_arcmin=120)
    lost = raw.observed[0] & ~common.observed[0]
    gained = ~raw.observed[0] & common.observed[0]
    assert (~common.observed[0]).sum() > 0.8 * (~raw.observed[0]).sum()
    assert lost.sum() + gained.sum() < 0.1 * (~raw.observed[0]).sum() + 50
    assert corr(*common.values) > 0.999


def test_a_map_coarser_than_the_target_is_refused(tmp_path, capsys):
    cat = two_beams_catalog(tmp_path)
    assert main(["inspect", cat, "--fwhm-arcmin", "90"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("galdecomp: error: map 'b'"), err
    assert "coarser than the target resolution 90" in err and "b.fits" in err
    run = tmp_path / "run"
    assert main(["fit", cat, "--out", str(run), "--fwhm-arcmin", "90", "--latent-dim", "1"]) == 2
    assert "coarser" in capsys.readouterr().err and not run.exists()  # nothing written


@pytest.mark.parametrize("value", ["0", "-3", "nan", "x"])
def test_a_bad_target_or_beam_is_one_line(tmp_path, capsys, value):
    cat = two_beams_catalog(tmp_path)
    assert main(["inspect", cat, "--fwhm-arcmin", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fwhm-arcmin" in err
    doc = yaml.safe_load(open(cat))
    doc["maps"][0]["fwhm_arcmin"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "map 'a': fwhm_arcmin must be a positive number" in err


def test_inspect_shows_the_beams_and_warns_when_they_differ(tmp_path, capsys):
    cat = two_beams_catalog(tmp_path)
    assert main(["inspect", cat, "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    header, a, b = out.strip().splitlines()
    cols = header.split(",")
    assert "fwhm_arcmin" in cols and "frame" in cols
    i = cols.index("fwhm_arcmin")
    assert float(a.split(",")[i]) == 60 and float(b.split(",")[i]) == 120
    assert "beams differ by more than a pixel" in err and "finest 'a'" in err and "coarsest 'b'" in err
    assert main(["inspect", cat, "--fwhm-arcmin", "120"]) == 0
    out, err = capsys.readouterr()
    assert "smoothed to fwhm 120 arcmin" in out and "beams differ" not in err


def test_fit_stores_the_target_and_resume_reconstruct_anomaly_use_it(tmp_path, capsys):
    from galdecomp import load

    cat = two_beams_catalog(tmp_path)
    run = tmp_path / "run"
    small = ["--latent-dim", "1", "--threads", "1"]
    assert main(["fit", cat, "--out", str(run), "--fwhm-arcmin", "120", "--max-epochs", "2", *small]) == 0
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["data"]["fwhm_arcmin"] == 120
    assert hp.read_map(str(run / "latent_mean.fits"), h=True)[1]  # written
    # resumed without the option: the stored target, else the data would differ (fingerprint)
    assert main(["fit", cat, "--out", str(run), "--resume", "--max-epochs", "3"]) == 0
    other = tmp_path / "other.yaml"  # a configuration without the target: the run's is kept
    other.write_text(yaml.safe_dump({"latent_dim": 1, "training": {"max_epochs": 4, "schedule_epochs": 2, "threads": 1}}))
    assert main(["fit", cat, "--out", str(run), "--resume", "--config", str(other)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["fwhm_arcmin"] == 120
    capsys.readouterr()
    assert main(["fit", cat, "--out", str(run), "--resume", "--max-epochs", "4", "--fwhm-arcmin", "150"]) == 2
    assert "other data" in capsys.readouterr().err
    trained = load(str(run))
    np.testing.assert_array_equal(trained.load_rows(), load_catalog(cat, nest=True, fwhm_arcmin=120).values.T)
    assert main(["anomaly", str(run), "--out", str(tmp_path / "an")]) == 0
    assert main(["reconstruct", str(run), "--catalog", cat, "--out", str(tmp_path / "rec"), "--samples", "4",
                 "--fwhm-arcmin", "150"]) == 0
    assert "the run was trained at fwhm 120 arcmin" in capsys.readouterr().err
