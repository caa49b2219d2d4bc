"""The simulated sky with real spatial templates (`galdecomp simulate --morphology DIR`)."""
import os

import healpy as hp
import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from conftest import ROOT, realsky, write_catalog, write_map
from galdecomp.catalog import read_catalog, read_map
from galdecomp.cli import main
from galdecomp.errors import InputError
from galdecomp.simulation import resolve_morphology, simulate_sky
from galdecomp.simulation.fields import sky_coords
from galdecomp.simulation.morphology import fit_template, morphology_from_config

NSIDE = 32


def real_dir(nside):
    return os.path.dirname(realsky(nside))


def template(nside, name):
    cat = read_catalog(realsky(nside))
    return read_map(next(e for e in cat.maps if e.name == name), NSIDE)[0]


@pytest.fixture(scope="module")
def real_sky():
    return simulate_sky(NSIDE, seed=1, morphology=real_dir(32))


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("galdecomp: error:"), err
    for n in needles:
        assert n in err, (n, err)


# -- with the real maps (../shared) --------------------------------------------------------------

def test_name_rule_on_the_real_catalog(real_sky):
    assert {c: u["map"] for c, u in real_sky.galaxy.morphology.items()} == {
        "gas_column": "hi4pi_NHI", "dust_tau353": "sfd98_EBV", "emission_measure": "wham_halpha",
        "synchrotron_408MHz": "gsm2008_408MHz", "xray_em_halo": "rosat_R45_3-4keV"}
    assert real_sky.morphology_source == realsky(32)


def test_truth_follows_the_templates(real_sky):
    gas = real_sky.truth["gas_column"][0]
    assert spearmanr(gas, template(32, "hi4pi_NHI"))[0] > 0.9
    for truth, name in [("dust_tau353", "sfd98_EBV"), ("emission_measure", "wham_halpha"),
                        ("synchrotron_408MHz", "gsm2008_408MHz"), ("xray_em_halo", "rosat_R45_3-4keV")]:
        t = template(32, name)
        ok = np.isfinite(t) & (t > 0)
        assert spearmanr(real_sky.truth[truth][0][ok], t[ok])[0] > 0.9, truth
    # the channels see them: the hadronic gamma rays and the 545 GHz dust follow gas and dust
    i = real_sky.names.index("planck_545GHz")
    assert spearmanr(real_sky.expected[i], template(32, "sfd98_EBV"))[0] > 0.9
    # the median brightness is the model's: scaled templates, same physics
    default = simulate_sky(NSIDE, seed=1)
    for name in ("gas_column", "synchrotron_408MHz", "xray_em_halo"):
        assert np.median(real_sky.truth[name][0]) == pytest.approx(np.median(default.truth[name][0]), rel=0.2)


def test_truth_complete_and_channels_finite(real_sky):
    for name, (m, *_) in real_sky.truth.items():
        assert np.all(np.isfinite(m)), name
    for name in ("gas_column", "dust_tau353", "emission_measure", "synchrotron_408MHz", "xray_em_halo"):
        assert np.all(real_sky.truth[name][0] > 0), name
    assert np.all(np.isfinite(real_sky.maps))
    assert real_sky.galaxy.morphology["xray_em_halo"]["filled"] > 0  # ROSAT gaps


def test_fallback_to_random_fields():
    """Components without a template keep the built-in random fields, for the same seed."""
    morph = resolve_morphology(real_dir(32), {"gas": "hi4pi_NHI"})
    sky, default = simulate_sky(NSIDE, seed=2, morphology=morph), simulate_sky(NSIDE, seed=2)
    assert list(sky.galaxy.morphology) == ["gas_column"]
    for name in ("synchrotron_408MHz", "emission_measure", "xray_em_halo", "xray_em_local_bubble",
                 "cmb", "sync_beta", "cr_density", "inverse_compton_1GeV"):
        assert np.array_equal(sky.truth[name][0], default.truth[name][0]), name
    assert not np.array_equal(sky.truth["gas_column"][0], default.truth["gas_column"][0])
    # the dust without its own template still follows the (now real) gas
    assert spearmanr(sky.truth["dust_tau353"][0], template(32, "hi4pi_NHI"))[0] > 0.9


def test_deterministic_for_a_seed(real_sky):
    again = simulate_sky(NSIDE, seed=1, morphology=real_dir(32))
    assert np.array_equal(again.maps, real_sky.maps)
    assert all(np.array_equal(again.truth[k][0], real_sky.truth[k][0]) for k in real_sky.truth)
    other = simulate_sky(NSIDE, seed=3, morphology=real_dir(32))
    # the templated amplitude (HI4PI has no gaps) has the same structure (the scale follows the
    # seed's model median), spectral parameters vary
    ratio = other.truth["gas_column"][0] / real_sky.truth["gas_column"][0]
    assert np.allclose(ratio, ratio[0], rtol=1e-12)
    assert not np.array_equal(other.truth["dust_temperature"][0], real_sky.truth["dust_temperature"][0])
    assert not np.array_equal(other.maps[0], real_sky.maps[0])


def test_preset_resolves():
    path = os.path.join(ROOT, "runs", "realmorph.yaml")
    realsky(64)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    morph = morphology_from_config(cfg["simulate"]["morphology"], os.path.dirname(path))
    assert morph.rule == "explicit" and morph.catalog == os.path.abspath(realsky(64))
    assert len(morph.templates) == 5


def test_simulate_command_nside64(tmp_path, capsys):
    out = tmp_path / "sky"
    assert main(["simulate", "--nside", "64", "--morphology", real_dir(64), "--out", str(out),
                 "--no-plot"]) == 0
    text = (out / "truth" / "catalog.yaml").read_text()
    assert "gas_column <- hi4pi_NHI" in text
    truth = yaml.safe_load(text)
    assert truth["nside"] == 64 and len(truth["maps"]) == 24
    gas = hp.read_map(str(out / "truth" / "gas_column.fits"), dtype=np.float64)
    assert hp.get_nside(gas) == 64 and np.all(np.isfinite(gas))


# -- without ../shared: a synthetic morphology catalog -------------------------------------------

@pytest.fixture
def synthetic(tmp_path):
    """nside-16 templates: an HI-like disk with a hole, an X-ray map with a stripe of zeros."""
    nside = 16
    l, b = sky_coords(nside)
    gas = 1e20 / np.sqrt(np.sin(np.radians(b)) ** 2 + 0.01) * (1.5 + np.cos(np.radians(l)))
    gas[(l > 30) & (l < 60) & (b > 20) & (b < 50)] = hp.UNSEEN
    xray = 100 + 50 * np.cos(np.radians(2 * l)) * np.cos(np.radians(b))
    xray[np.abs(l - 100) < 4] = 0.0
    write_map(tmp_path / "hi.fits", gas)
    write_map(tmp_path / "x.fits", xray)
    write_map(tmp_path / "other.fits", np.ones(hp.nside2npix(nside)))
    write_catalog(tmp_path, [
        dict(name="survey_NHI", file="hi.fits", frequency_hz=1.42e9, unit="cm-2"),
        dict(name="rosat_like_0.75keV", file="x.fits", frequency_hz=1.8e17, unit="cts"),
        dict(name="something_else", file="other.fits", frequency_hz=1e9, unit="K")])
    return tmp_path, gas, xray


def test_synthetic_templates(synthetic):
    folder, gas, xray = synthetic
    morph = resolve_morphology(str(folder))
    assert morph.rule == "names"
    assert {c: e.name for c, e in morph.templates.items()} == {
        "gas_column": "survey_NHI", "xray_em_halo": "rosat_like_0.75keV"}
    sky = simulate_sky(16, seed=0, morphology=morph)
    default = simulate_sky(16, seed=0)
    for name, t in [("gas_column", gas), ("xray_em_halo", xray)]:
        ok = (t != hp.UNSEEN) & (t > 0)
        m = sky.truth[name][0]
        assert np.all(np.isfinite(m)) and np.all(m > 0), name
        ratio = m[ok] / t[ok]
        # valid pixels: the template times one factor, matched to the model's median there
        assert np.allclose(ratio, ratio[0], rtol=1e-9), name
        assert np.median(m[ok]) == pytest.approx(np.median(default.truth[name][0][ok]), rel=1e-9)
        assert sky.galaxy.morphology[name]["filled"] == int((~ok).sum()) > 0, name
    assert np.array_equal(sky.truth["synchrotron_408MHz"][0], default.truth["synchrotron_408MHz"][0])


def test_fit_template_fills_gaps_from_neighbours():
    nside = 16
    npix = hp.nside2npix(nside)
    model = np.full(npix, 2.0)
    raw = np.full(npix, 10.0)
    l, b = sky_coords(nside)
    raw[b > 0] = 30.0  # north three times brighter than south
    hole = hp.query_disc(nside, hp.ang2vec(90, 60, lonlat=True), np.radians(10))
    raw[hole] = np.nan
    raw[5] = 0.0
    out, scale, n_filled = fit_template(model, raw)
    assert n_filled == hole.size + 1
    assert scale == pytest.approx(2.0 / np.median(raw[np.isfinite(raw) & (raw > 0)]))
    # the hole in the north is filled at the northern level (from the valid neighbours)
    assert np.allclose(out[hole], 30.0 * scale, rtol=0.05)
    assert np.all(np.isfinite(out)) and np.all(out > 0)


def test_explicit_mapping_and_shared_path(synthetic, monkeypatch):
    folder, _, _ = synthetic
    morph = morphology_from_config({"dir": folder.name, "hot_gas": "something_else", "gas": None},
                                   base=str(folder.parent))
    assert morph.rule == "explicit" and list(morph.templates) == ["xray_em_halo"]
    monkeypatch.setenv("GALDECOMP_SHARED", str(folder.parent))
    morph = morphology_from_config(f"$GALDECOMP_SHARED/{folder.name}")
    assert morph.catalog == str(folder / "catalog.yaml") and morph.rule == "names"


def test_bad_morphology_input(synthetic, tmp_path, capsys):
    folder, _, _ = synthetic
    out = tmp_path / "sim"
    base = ["simulate", "--nside", "8", "--out", str(out), "--no-plot"]
    assert main(base + ["--morphology", str(tmp_path / "missing")]) == 2
    one_line_error(capsys, "missing", "morphology folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(base + ["--morphology", str(empty)]) == 2
    one_line_error(capsys, str(empty), "no catalog.yaml")
    assert main(base + ["--morphology", str(folder), "--template", "gas=hi4pi_NHI"]) == 2
    one_line_error(capsys, "catalog.yaml", "gas", "no map named 'hi4pi_NHI'")
    assert main(base + ["--morphology", str(folder), "--template", "clouds=survey_NHI"]) == 2
    one_line_error(capsys, "catalog.yaml", "unknown component 'clouds'")
    nomatch = tmp_path / "nomatch"
    nomatch.mkdir()
    write_map(nomatch / "a.fits", np.ones(hp.nside2npix(8)))
    write_catalog(nomatch, [dict(name="a", file="a.fits", frequency_hz=1e9, unit="K")])
    assert main(base + ["--morphology", str(nomatch)]) == 2
    one_line_error(capsys, "catalog.yaml", "no map name matches")
    write_map(nomatch / "a.fits", np.zeros(hp.nside2npix(8)))
    assert main(base + ["--morphology", str(nomatch), "--template", "gas=a"]) == 2
    one_line_error(capsys, "map 'a'", "no positive value")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".sim")]
    with pytest.raises(InputError, match="dir"):
        morphology_from_config({"gas": "survey_NHI"})


def test_run_config_missing_morphology_folder(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"out": str(tmp_path / "job"),
                                   "simulate": {"nside": 8, "morphology": "no/such/folder"}}))
    assert main(["run", "--config", str(cfg)]) == 2
    one_line_error(capsys, str(tmp_path / "no" / "such" / "folder"), "not found")
    assert not (tmp_path / "job").exists()
    cfg.write_text(yaml.safe_dump({"out": str(tmp_path / "job"), "simulate": {"nside": 8, "morph": "x"}}))
    assert main(["run", "--config", str(cfg)]) == 2
    one_line_error(capsys, "simulate", "unknown setting(s) morph")
    assert not (tmp_path / "job").exists()
