"""Tests of the simulated multi-frequency sky (galdecomp.simulation)."""
import os

import healpy as hp
import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from galdecomp.errors import InputError
from galdecomp.simulation import (channel_table_path, load_channel_table, plot_overview,
                                  simulate_sky, write_simulated_sky)
from galdecomp.simulation.components import cmb_to_rj, rj_to_unit
from galdecomp.simulation.fields import sky_coords

NSIDE = 32


@pytest.fixture(scope="module")
def sky():
    return simulate_sky(NSIDE, seed=1)


def idx(sky, name):
    return sky.names.index(name)


def fractions(sky, component, names, mask):
    """Share of ``component`` in the sum of absolute noiseless contributions, per pixel in mask."""
    total = sum(np.abs(sky.components[k]) for k in sky.components)
    comp = sky.components[component]
    return {n: (comp[idx(sky, n)] / total[idx(sky, n)])[mask] for n in names}


def test_channel_table():
    table = load_channel_table()
    assert os.path.basename(channel_table_path()) == "channels.yaml"
    assert len(table) == 35
    assert len({ch["name"] for ch in table}) == 35
    freqs = [ch["frequency_hz"] for ch in table]
    assert min(freqs) == 2.2e7
    assert max(freqs) == pytest.approx(np.sqrt(100e9 * 300e9) * 2.417989242e14, rel=1e-5)
    kinds = [ch["kind"] for ch in table]
    assert kinds.count("counts") == 9
    for ch in table:
        assert (ch["noise"] > 0) if ch["kind"] == "intensity" else (ch["exposure"] > 0)


def test_channel_table_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GALDECOMP_DATA", str(tmp_path))
    (tmp_path / "channels.yaml").write_text(yaml.safe_dump(load_channel_table()[:3]))
    assert channel_table_path() == str(tmp_path / "channels.yaml")
    assert len(load_channel_table()) == 3


def test_deterministic_and_seed_dependent():
    a, b, c = simulate_sky(16, seed=3), simulate_sky(16, seed=3), simulate_sky(16, seed=4)
    assert np.array_equal(a.maps, b.maps)
    assert all(np.array_equal(a.truth[k][0], b.truth[k][0]) for k in a.truth)
    for i in range(len(a.channels)):
        assert not np.array_equal(a.maps[i], c.maps[i])
    assert not np.array_equal(a.truth["gas_column"][0], c.truth["gas_column"][0])


def test_large_scales_agree_between_resolutions():
    lo, hi = simulate_sky(16, seed=2), simulate_sky(32, seed=2)
    for name in ("gas_column", "cmb", "dust_temperature"):
        degraded = hp.ud_grade(hi.truth[name][0], 16)
        assert np.corrcoef(degraded, lo.truth[name][0])[0, 1] > 0.9, name


def test_shapes_units_counts(sky):
    npix = hp.nside2npix(NSIDE)
    assert sky.maps.shape == (35, npix) and np.all(np.isfinite(sky.maps))
    for ch, m in zip(sky.channels, sky.maps):
        if ch["kind"] == "counts":
            assert ch["unit"] == "counts"
            assert np.all(m >= 0) and np.array_equal(m, np.round(m))
        else:
            assert ch["unit"] in ("K_RJ", "K_CMB", "MJy/sr", "Rayleigh")
    assert np.min(sky.maps[idx(sky, "planck_100GHz")]) < 0  # CMB in K_CMB
    total = sum(sky.components[k] for k in sky.components)
    np.testing.assert_allclose(total, sky.expected, rtol=1e-12, atol=0)
    for name, (m, unit, desc, freq) in sky.truth.items():
        assert m.shape == (npix,) and np.all(np.isfinite(m)) and freq > 0 and unit and desc, name


def test_noise_level(sky):
    i = idx(sky, "planck_143GHz")
    resid = sky.maps[i] - sky.expected[i]
    assert np.std(resid) == pytest.approx(sky.channels[i]["noise"] * NSIDE / 64, rel=0.05)


def test_write_and_read(tmp_path):
    sky = simulate_sky(16, seed=5)
    out = tmp_path / "sim"
    out.mkdir()
    write_simulated_sky(sky, str(out))
    text = (out / "catalog.yaml").read_text()
    cat = yaml.safe_load(text)
    assert text.startswith("#") and "seed 5" in text
    assert cat["nside"] == 16 and len(cat["maps"]) == 35
    for entry, ch, values in zip(cat["maps"], sky.channels, sky.maps):
        assert {"name", "file", "frequency_hz", "unit", "kind"} <= entry.keys()
        assert entry["name"] == ch["name"] and entry["file"] == f"maps/{ch['name']}.fits"
        assert isinstance(entry["frequency_hz"], float) and entry["frequency_hz"] > 0
        m, header = hp.read_map(str(out / entry["file"]), h=True, dtype=np.float64)
        header = dict(header)
        assert np.array_equal(m, values)
        assert header["FREQ_HZ"] == entry["frequency_hz"] and header["BUNIT"] == entry["unit"]
        assert header["KIND"] == entry["kind"] and header["SIMSEED"] == 5
        assert header["ORDERING"] == "RING" and header["COORDSYS"] == "G"
    truth = yaml.safe_load((out / "truth" / "catalog.yaml").read_text())
    assert truth["nside"] == 16 and [e["name"] for e in truth["maps"]] == list(sky.truth)
    for entry in truth["maps"]:
        m = hp.read_map(str(out / "truth" / entry["file"]), dtype=np.float64)
        assert np.array_equal(m, sky.truth[entry["name"]][0])
        assert isinstance(entry["unit"], str) and entry["frequency_hz"] > 0
    with pytest.raises(InputError):
        write_simulated_sky(sky, str(out))  # not empty
    with pytest.raises(InputError):
        write_simulated_sky(sky, str(tmp_path / "missing"))


def test_unit_conversions():
    # Planck HFI band-averaged: 1 K_CMB = 287.45 MJy/sr at 353 GHz, 58.04 MJy/sr at 545 GHz;
    # the monochromatic values differ by a few per cent.
    for freq, mjy in [(353e9, 287.45), (545e9, 58.04)]:
        assert rj_to_unit(freq, "MJy/sr") / rj_to_unit(freq, "K_CMB") == pytest.approx(mjy, rel=0.05)
    assert cmb_to_rj(1e9) == pytest.approx(1.0, rel=1e-3)


def test_cmb(sky):
    cmb = sky.truth["cmb"][0]
    assert 40e-6 < np.std(cmb) < 120e-6
    i = idx(sky, "planck_143GHz")
    np.testing.assert_allclose(sky.components["cmb"][i], cmb, rtol=1e-12)


def test_dust_dominates_submm(sky):
    _, b = sky_coords(NSIDE)
    names = ["planck_545GHz", "planck_857GHz", "dirbe_1250GHz", "dirbe_2140GHz", "dirbe_3000GHz",
             "dirbe_5000GHz"]
    for name, f in fractions(sky, "thermal_dust", names, np.abs(b) > 20).items():
        assert np.median(f) > 0.9 and np.percentile(f, 5) > 0.8, name


def test_synchrotron_dominates_low_frequencies(sky):
    _, b = sky_coords(NSIDE)
    names = ["radio_22MHz", "radio_45MHz", "radio_150MHz", "radio_408MHz"]
    for name, f in fractions(sky, "synchrotron", names, np.abs(b) > 20).items():
        assert np.median(f) > 0.9 and np.percentile(f, 5) > 0.8, name


def test_cmb_dominates_70_to_143GHz_at_high_latitude(sky):
    _, b = sky_coords(NSIDE)
    hi = np.abs(b) > 40
    for name in ["planck_70GHz", "planck_100GHz", "planck_143GHz"]:
        i = idx(sky, name)
        cmb = sky.components["cmb"][i][hi]
        rest = sky.expected[i][hi] - cmb
        assert np.sqrt(np.mean(rest ** 2)) < 0.5 * np.std(cmb), name


def test_free_free_absorbs_22MHz_in_inner_plane(sky):
    l, b = sky_coords(NSIDE)
    ratio = sky.expected[idx(sky, "radio_22MHz")] / sky.expected[idx(sky, "radio_408MHz")]
    inner, high = (np.abs(b) < 2) & (np.abs(l) < 30), np.abs(b) > 40
    assert np.median(ratio[inner]) < 0.75 * np.median(ratio[high])


def test_gamma_rays_trace_gas_times_cosmic_rays(sky):
    expected_hadronic = sky.galaxy.n_h * sky.galaxy.cr_density
    for name in ["fermi_0p3_1GeV", "fermi_1_3GeV"]:
        assert spearmanr(expected_hadronic, sky.maps[idx(sky, name)])[0] > 0.7, name
    l, b = sky_coords(NSIDE)
    low = sky.maps[idx(sky, "fermi_1_3GeV")]
    inner = (np.abs(b) < 3) & (np.abs(l) < 30)
    assert np.median(low[inner]) > 20 * np.median(low[np.abs(b) > 40])
    top = sky.maps[idx(sky, "fermi_100_300GeV")]
    assert np.mean(top <= 1) > 0.9


def test_xray_absorbed_by_gas(sky):
    _, b = sky_coords(NSIDE)
    low_lat, high = np.abs(b) < 30, np.abs(b) > 40
    soft = sky.maps[idx(sky, "rosat_0p25keV")]
    assert spearmanr(sky.galaxy.n_h[low_lat], soft[low_lat])[0] < -0.5
    assert spearmanr(sky.galaxy.n_h, soft)[0] < -0.7
    assert np.median(soft[high]) > 20  # tens to hundreds of counts
    # transmission of the extragalactic background: the softest band is the most absorbed
    cxb = sky.components["xray_background"]
    trans = [np.median(cxb[idx(sky, n)][np.abs(b) < 3]) / np.median(cxb[idx(sky, n)][high])
             for n in ["rosat_0p25keV", "rosat_0p75keV", "rosat_1p5keV"]]
    assert trans[0] < trans[1] < trans[2] < 1


def test_halpha_from_emission_measure_attenuated(sky):
    em, ebv = sky.truth["emission_measure"][0], sky.truth["ebv"][0]
    halpha = sky.components["halpha"][idx(sky, "halpha")]
    intrinsic = em / (2.75 * 0.7 ** 0.9)
    tau = 2.5 * ebv / 1.086
    np.testing.assert_allclose(halpha, intrinsic * (1 - np.exp(-tau)) / tau, rtol=1e-6)
    atten = halpha / intrinsic
    assert np.all(atten <= 1) and spearmanr(ebv, atten)[0] < -0.99


def test_spectral_parameters_in_range(sky):
    beta = sky.truth["sync_beta"][0]
    t_dust, beta_dust = sky.truth["dust_temperature"][0], sky.truth["dust_beta"][0]
    assert -3.2 <= beta.min() and beta.max() <= -2.4 and beta.std() > 0.03
    assert 14 <= t_dust.min() and t_dust.max() <= 26 and 17 < np.median(t_dust) < 21
    assert 1.3 <= beta_dust.min() and beta_dust.max() <= 1.9
    n_h = sky.truth["gas_column"][0]
    assert 5e19 < np.median(n_h) < 2e21 and n_h.max() > 1e22


def test_plot_overview(tmp_path):
    sky = simulate_sky(8, seed=0)
    path = tmp_path / "overview.png"
    plot_overview(sky, str(path), xsize=80)
    assert path.stat().st_size > 10000
