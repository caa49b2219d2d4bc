"""The map catalog and loader: orderings, partial maps, regrading, missing values, real data."""
import healpy as hp
import numpy as np
import pytest

from conftest import realsky, write_catalog, write_map
from galdecomp.catalog import load_catalog, read_catalog


def test_ring_and_nested_files_give_the_same_data(tmp_path):
    nside = 8
    m = np.arange(hp.nside2npix(nside), dtype=float) + 1.0
    write_map(tmp_path / "ring.fits", m)
    write_map(tmp_path / "nest.fits", hp.reorder(m, r2n=True), nest=True)
    cat = write_catalog(tmp_path, [dict(name="r", file="ring.fits", frequency_hz=1e9, unit="K"),
                                   dict(name="n", file="nest.fits", frequency_hz=1e9, unit="K")])
    d = load_catalog(cat)
    assert d.values.shape == (2, hp.nside2npix(nside))
    np.testing.assert_array_equal(d.values[0], m)
    np.testing.assert_array_equal(d.values[1], m)
    dn = load_catalog(cat, nest=True)
    np.testing.assert_array_equal(dn.values[0], hp.reorder(m, r2n=True))


def test_partial_map_and_missing_values(tmp_path):
    nside = 8
    npix = hp.nside2npix(nside)
    full = np.linspace(1, 2, npix)
    part = full.copy()
    part[: npix // 4] = hp.UNSEEN
    write_map(tmp_path / "part.fits", part, partial=True)
    bad = full.copy()
    bad[[3, 5, 7]] = [np.nan, np.inf, hp.UNSEEN]
    write_map(tmp_path / "bad.fits", bad)
    cat = write_catalog(tmp_path, [dict(name="p", file="part.fits", frequency_hz=1e9, unit="K"),
                                   dict(name="b", file="bad.fits", frequency_hz=1e9, unit="K")])
    d = load_catalog(cat)
    assert not d.observed[0, : npix // 4].any() and d.observed[0, npix // 4:].all()
    np.testing.assert_allclose(d.values[0, npix // 4:], full[npix // 4:])
    assert list(np.flatnonzero(~d.observed[1])) == [3, 5, 7]
    assert np.isnan(d.values[1, [3, 5, 7]]).all()


def test_regrade_averages_intensity_and_sums_counts(tmp_path):
    rng = np.random.default_rng(0)
    hi = rng.poisson(3.0, hp.nside2npix(16)).astype(float)
    write_map(tmp_path / "i.fits", hi)
    write_map(tmp_path / "c.fits", hi)
    write_map(tmp_path / "lo.fits", np.ones(hp.nside2npix(8)))
    cat = write_catalog(tmp_path, [dict(name="i", file="i.fits", frequency_hz=1e9, unit="K"),
                                   dict(name="c", file="c.fits", frequency_hz=1e9, unit="counts",
                                        kind="counts"),
                                   dict(name="lo", file="lo.fits", frequency_hz=1e9, unit="K")])
    d = load_catalog(cat)  # default: the lowest nside
    assert d.nside == 8 and d.native_nside == [16, 16, 8]
    children = hp.reorder(hi, r2n=True).reshape(-1, 4)
    np.testing.assert_allclose(hp.reorder(d.values[0], r2n=True), children.mean(1))
    np.testing.assert_allclose(hp.reorder(d.values[1], r2n=True), children.sum(1))
    assert d.values[1].sum() == hi.sum()
    d16 = load_catalog(cat, nside=16)  # upgrading is allowed too
    assert d16.nside == 16 and np.allclose(d16.values[2], 1.0)


def test_counts_kind_defaults_from_unit(small_catalog, tmp_path):
    write_map(tmp_path / "n.fits", np.ones(hp.nside2npix(8)))
    cat = write_catalog(tmp_path, [dict(name="n", file="n.fits", frequency_hz=1e20, unit="counts")])
    assert load_catalog(cat).kinds == ["counts"]


def test_field_selects_a_column(tmp_path):
    npix = hp.nside2npix(4)
    write_map(tmp_path / "multi.fits", [np.full(npix, 1.0), np.full(npix, 2.0)], columns=["A", "B"])
    cat = write_catalog(tmp_path, [dict(name="b", file="multi.fits", frequency_hz=1e9, unit="K",
                                        field=1)])
    assert np.all(load_catalog(cat).values == 2.0)


def test_catalog_nside_sets_working_resolution(small_catalog):
    path, maps, entries = small_catalog
    cat = write_catalog(__import__("os").path.dirname(path), entries, nside=4)
    assert read_catalog(cat).nside == 4
    assert load_catalog(cat).nside == 4


def test_realsky32_loads_without_edits():
    d = load_catalog(realsky(32))
    assert d.values.shape == (23, hp.nside2npix(32))
    assert d.nside == 32
    names = d.names
    # negative WMAP values, Fermi counts with zeros, ROSAT gaps are all kept as they are
    assert np.nanmin(d.values[names.index("wmap7yr_V")]) < 0
    fermi = d.values[names.index("fermi2fhl_585-2100GeV")]
    assert (fermi == 0).mean() > 0.5 and d.kinds[names.index("fermi2fhl_585-2100GeV")] == "counts"
    assert (~d.observed[names.index("rosat_R45_3-4keV")]).sum() > 0
    assert d.observed.sum(0).min() >= 22  # a pixel missing a channel is kept


def test_realsky64_regrades_to_32_and_conserves_counts():
    d64 = load_catalog(realsky(64))
    d32 = load_catalog(realsky(64), nside=32)
    i = d64.names.index("fermi2fhl_50-171GeV")
    assert d32.values[i].sum() == pytest.approx(d64.values[i].sum())
    j = d64.names.index("hi4pi_NHI")
    assert np.nanmean(d32.values[j]) == pytest.approx(np.nanmean(d64.values[j]), rel=1e-10)


def test_reading_with_a_communicator_gives_the_same_block(small_catalog):
    """With a communicator rank 0 reads and scatters (one process here: the same block)."""
    from galdecomp.catalog import load_catalog
    from galdecomp.parallel import SerialComm

    path, maps, _ = small_catalog
    seen = []
    a = load_catalog(path, nest=True, pixels=slice(100, 300))
    b = load_catalog(path, nest=True, pixels=slice(100, 300), comm=SerialComm(),
                     on_channel=lambda i, full, kind: seen.append((i, full.size)))
    np.testing.assert_array_equal(a.values, b.values)
    assert a.kinds == b.kinds and a.native_nside == b.native_nside and a.values.shape == (3, 200)
    assert seen == [(0, 768), (1, 768), (2, 768)]
