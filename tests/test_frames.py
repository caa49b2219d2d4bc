"""Frames: a map's COORDSYS read, rotated to the catalog's frame (or refused), outputs stamped."""
import os

import healpy as hp
import numpy as np
import pytest
from astropy.io import fits

from conftest import write_catalog
from galdecomp.catalog import load_catalog, to_frame
from galdecomp.cli import main

NSIDE = 64


def smooth_sky(nside=NSIDE, seed=5):
    """A smooth positive Galactic field (structure on degree scales and up)."""
    np.random.seed(seed)
    ell = np.arange(3 * nside)
    return 10 + hp.synfast(1.0 / (1 + ell) ** 2, nside, lmax=3 * nside - 1, fwhm=np.radians(3))


def write(path, m, coord):
    hp.write_map(str(path), m, coord=coord, overwrite=True, dtype=np.float64)
    return os.path.basename(str(path))


def frames_catalog(folder, hole=False, **top):
    """A Galactic map ``g`` and its equatorial copy ``c`` (rotated with healpy, written with
    COORDSYS C; with ``hole``, a disc of it UNSEEN); returns the catalog path and the arrays."""
    g = smooth_sky()
    c = hp.Rotator(coord=["G", "C"]).rotate_map_alms(g, use_pixel_weights=False)
    if hole:
        c[hp.query_disc(NSIDE, hp.ang2vec(120.0, 40.0, lonlat=True), np.radians(15))] = hp.UNSEEN
    entries = [dict(name="g", file=write(os.path.join(folder, "g.fits"), g, "G"), frequency_hz=1e9, unit="K"),
               dict(name="c", file=write(os.path.join(folder, "c.fits"), c, "C"), frequency_hz=2e9, unit="K")]
    path = write_catalog(folder, entries)
    if top:
        import yaml

        doc = yaml.safe_load(open(path))
        doc.update(top)
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
    return path, g, c


def corr(x, y):
    ok = np.isfinite(x) & np.isfinite(y)
    return np.corrcoef(x[ok], y[ok])[0, 1]


def test_an_equatorial_copy_is_rotated_back_to_the_galactic_map(tmp_path):
    cat, g, c = frames_catalog(tmp_path)
    d = load_catalog(cat)
    assert d.coord == "G" and d.frames == ["G", "C"]
    np.testing.assert_array_equal(d.values[0], g)  # already in the catalog's frame: untouched
    assert corr(g, c) < 0.9                         # as written, the copy is another sky
    assert corr(d.values[0], d.values[1]) > 0.99
    assert np.abs(d.values[1] - g).max() < 0.05 * np.ptp(g)


def test_masked_pixels_stay_masked_through_a_rotation(tmp_path):
    cat, g, c = frames_catalog(tmp_path, hole=True)
    d = load_catalog(cat)
    centre_g = hp.Rotator(coord=["C", "G"])(hp.ang2vec(120.0, 40.0, lonlat=True))
    dist = np.degrees(np.arccos(np.clip(centre_g @ np.array(hp.pix2vec(NSIDE, np.arange(g.size))), -1, 1)))
    assert not d.observed[1][dist < 14].any()
    assert d.observed[1][dist > 16].all()
    ok = d.observed[1]
    assert np.abs(d.values[1][ok] - g[ok]).max() < 0.05 * np.ptp(g)  # no zeros smeared in at the edge
    assert np.nanmin(d.values[1]) > 0.5 * g.min()


def test_to_frame_keeps_a_map_without_gaps_and_round_trips():
    g = smooth_sky()
    back = to_frame(to_frame(g, "G", "E"), "E", "G")
    assert corr(g, back) > 0.999
    np.testing.assert_array_equal(to_frame(g, "G", "G"), g)


def test_a_map_in_another_frame_is_refused_without_rotation(tmp_path, capsys):
    cat, _, _ = frames_catalog(tmp_path, rotate_frames=False)
    assert main(["inspect", cat]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("galdecomp: error: map 'c'"), err
    assert "c.fits" in err and "in frame C (equatorial" in err and "catalog's frame G (Galactic)" in err
    run = tmp_path / "run"
    assert main(["fit", cat, "--out", str(run), "--latent-dim", "1"]) == 2
    assert not run.exists()


@pytest.mark.parametrize("coordsys, frame, needle", [("H", None, "COORDSYS 'H' is not a known frame"),
                                                     ("G", "horizon", "frame: 'horizon' is not a frame")])
def test_unknown_frames_are_one_line_errors(tmp_path, capsys, coordsys, frame, needle):
    cat, _, _ = frames_catalog(tmp_path, **({"frame": frame} if frame else {}))
    fits.setval(str(tmp_path / "c.fits"), "COORDSYS", value=coordsys, ext=1)
    assert main(["inspect", cat]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_inspect_shows_each_frame(tmp_path, capsys):
    cat, _, _ = frames_catalog(tmp_path)
    assert main(["inspect", cat, "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    rows = [line.split(",") for line in out.strip().splitlines()]
    i = rows[0].index("frame")
    assert [r[i] for r in rows[1:]] == ["G", "C"]
    assert "rotated from frame C to G" in rows[2][-1]
    assert "rotated to the catalog's frame G: c (C)" in err


def test_outputs_carry_the_catalog_frame(tmp_path, capsys):
    """An equatorial catalog: the maps without COORDSYS are taken to be in it, the products say C."""
    nside = 16
    np.random.seed(1)
    entries = []
    for i in range(3):
        m = 10 + hp.synfast(np.ones(3 * nside), nside) + i
        hp.write_map(str(tmp_path / f"m{i}.fits"), m, overwrite=True, dtype=np.float64)  # no COORDSYS
        entries.append(dict(name=f"m{i}", file=f"m{i}.fits", frequency_hz=1e9 * (i + 1), unit="K"))
    cat = write_catalog(tmp_path, entries)
    with open(cat, "a") as f:
        f.write("frame: equatorial\n")
    run = tmp_path / "run"
    assert main(["fit", cat, "--out", str(run), "--max-epochs", "1", "--latent-dim", "1", "--threads", "1"]) == 0
    assert "no COORDSYS, taken to be in the catalog's frame C: m0, m1, m2" in capsys.readouterr().err
    assert fits.getheader(str(run / "latent_mean.fits"), 1)["COORDSYS"] == "C"
    assert main(["anomaly", str(run), "--out", str(tmp_path / "an"), "--top", "5"]) == 0
    assert fits.getheader(str(tmp_path / "an" / "anomaly.fits"), 1)["COORDSYS"] == "C"
    # the top list's coordinates are Galactic: the pixel centres rotated from C
    import csv

    top = list(csv.DictReader(open(tmp_path / "an" / "anomaly_top.csv")))
    pix = np.array([int(r["pixel"]) for r in top])
    lon, lat = hp.Rotator(coord=["C", "G"])(*hp.pix2ang(nside, pix, nest=True, lonlat=True), lonlat=True)
    np.testing.assert_allclose([float(r["b_deg"]) for r in top], lat, atol=1e-3)
