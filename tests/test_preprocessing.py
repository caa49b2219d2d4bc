"""Per-channel transforms: choice, standardisation and exact inversion."""
import numpy as np
import pytest

from conftest import realsky
from galdecomp.catalog import load_catalog
from galdecomp.datasets.table import DataSet
from galdecomp.errors import InputError
from galdecomp.preprocessing import ChannelTransform, Preprocessor


@pytest.mark.parametrize("kind", ["log", "asinh", "linear"])
def test_transform_round_trip(kind):
    rng = np.random.default_rng(3)
    x = np.exp(rng.normal(size=1000) * 3)
    tr = ChannelTransform.fit(x, kind)
    y = tr.forward(x)
    assert tr.kind == kind
    assert abs(y.mean()) < 1e-10 and abs(y.std() - 1) < 1e-10
    np.testing.assert_allclose(tr.inverse(y), x, rtol=1e-10, atol=1e-13 * x.max())


def test_auto_picks_log_for_positive_and_asinh_otherwise():
    rng = np.random.default_rng(0)
    assert ChannelTransform.fit(np.exp(rng.normal(size=100))).kind == "log"
    assert ChannelTransform.fit(rng.normal(size=100)).kind == "asinh"
    counts = rng.poisson(0.5, size=1000).astype(float)
    tr = ChannelTransform.fit(counts)
    assert tr.kind == "asinh" and tr.scale > 0
    np.testing.assert_allclose(tr.inverse(tr.forward(counts)), counts, atol=1e-12)


def test_forced_log_on_nonpositive_values_is_an_input_error():
    with pytest.raises(InputError, match="'cmb'.*log"):
        ChannelTransform.fit(np.array([-1.0, 1.0, 2.0]), "log", "cmb")


def test_derivative_matches_finite_differences():
    x = np.array([0.5, 2.0, 30.0])
    for kind in ["log", "asinh", "anscombe", "linear"]:
        tr = ChannelTransform(kind, scale=1.7, mean=0.3, std=2.0)
        h = 1e-6 * x
        fd = (tr.forward(x + h) - tr.forward(x - h)) / (2 * h)
        np.testing.assert_allclose(tr.derivative(x), fd, rtol=1e-6)


def test_preprocessor_round_trip_on_real_data_and_serialisation():
    d = load_catalog(realsky(32))
    pre = Preprocessor.fit(d)
    y = pre.forward(d.values)
    assert np.all(np.isnan(y) == ~d.observed)
    obs = d.observed
    np.testing.assert_allclose(np.nanmean(y, axis=1), 0, atol=1e-8)
    pre2 = Preprocessor.from_dict(pre.to_dict())
    back = pre2.inverse(y)
    np.testing.assert_allclose(back[obs], d.values[obs], rtol=1e-9, atol=1e-12 * np.nanmax(np.abs(d.values)))
    kinds = {n: t.kind for n, t in zip(pre.names, pre.transforms)}
    assert kinds["wmap7yr_V"] == "asinh" and kinds["hi4pi_NHI"] == "log"
    assert kinds["fermi2fhl_50-171GeV"] == "anscombe"  # photon counts (KIND card)


def test_noise_to_standardised_units():
    x = np.array([1.0, 2.0, 4.0])
    tr = ChannelTransform.fit(x, "log")
    # median |dy/dx| = median(1/x) / std
    assert tr.slope == pytest.approx(0.5 / np.std(np.log(x)))
    pre = Preprocessor([tr, tr], ["a", "b"])
    np.testing.assert_allclose(pre.noise_to_standardised([0.1, np.nan]), [0.1 * tr.slope, 0.0])


def test_poisson_noise_of_counts_is_the_known_noise():
    """Anscombe channels without a catalog noise get their Poisson noise (1 / std) as known
    noise; a catalog noise wins; other channels and ``poisson_floor: false`` get none."""
    from galdecomp.inference.config import resolve_config
    from galdecomp.sources import noise_floor

    rng = np.random.default_rng(3)
    x = np.stack([rng.poisson(0.3, 2000), rng.poisson(5.0, 2000), rng.uniform(1, 2, 2000)]).astype(float)
    ds = DataSet(values=x, observed=np.ones(x.shape, bool), names=["a", "b", "c"], units=["counts"] * 2 + ["K"])
    ds.kinds = ["counts", "counts", "intensity"]
    pre = Preprocessor.fit(ds)
    std = np.array([np.std(2 * np.sqrt(v + 0.375)) for v in x[:2]])
    np.testing.assert_allclose(pre.poisson_noise(), [1 / std[0], 1 / std[1], 0.0])
    ds.noise = np.array([np.nan, 2.0, np.nan])
    cfg = resolve_config({"noise": {"floor": 0.0}})
    np.testing.assert_allclose(noise_floor(pre, ds, cfg),
                               [1 / std[0], 2.0 * pre.transforms[1].slope, 0.0])
    cfg["noise"]["poisson_floor"] = False
    np.testing.assert_allclose(noise_floor(pre, ds, cfg), [0.0, 2.0 * pre.transforms[1].slope, 0.0])


def test_counts_scale_is_at_least_one_photon():
    rng = np.random.default_rng(2)
    x = rng.poisson(0.02, size=5000).astype(float)
    assert ChannelTransform.fit(x).scale < 0.1
    ds = DataSet(values=x[None], observed=np.ones((1, x.size), bool), names=["g"], units=["counts"])
    ds.kinds = ["counts"]
    ds.transforms = ["asinh"]
    assert Preprocessor.fit(ds).transforms[0].scale == 1.0


def test_anscombe_for_counts_stabilises_poisson_noise():
    """auto picks anscombe for counts; Poisson noise then has unit variance at any rate >~ 1."""
    rng = np.random.default_rng(4)
    rate = np.repeat([2.0, 10.0, 100.0, 1000.0], 20000)
    x = rng.poisson(rate).astype(float)
    tr = ChannelTransform.fit(x, counts=True)
    assert tr.kind == "anscombe"
    t = tr.forward(x) * tr.std  # the transform before standardisation (up to the mean)
    for r in np.unique(rate):
        assert abs(np.std(t[rate == r]) - 1.0) < 0.05
    np.testing.assert_allclose(tr.inverse(tr.forward(x)), x, atol=1e-9)
    with pytest.raises(InputError, match="anscombe"):
        ChannelTransform.fit(np.array([-1.0, 2.0]), "anscombe", "c")


@pytest.mark.parametrize("rule", ["mad", "std", 3.0])
def test_asinh_scale_rules(rule):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(4000) * 2.0 + rng.exponential(50.0, 4000) * (rng.random(4000) < 0.1)
    tr = ChannelTransform.fit(x, "asinh", asinh_scale=rule)
    expect = {"mad": 1.4826 * np.median(np.abs(x - np.median(x))), "std": np.std(x)}.get(rule, rule)
    assert tr.scale == pytest.approx(expect)
    np.testing.assert_allclose(tr.inverse(tr.forward(x)), x, atol=1e-9)


def test_inspect_warns_of_sparse_counts(capsys):
    """`galdecomp inspect` of the real maps: the sparse Fermi count maps get their zero fraction
    and their Poisson noise relative to the map's spread (the known noise of the fit)."""
    import csv
    import io

    from galdecomp.cli import main

    assert main(["inspect", realsky(32), "--format", "csv"]) == 0
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    w = rows["fermi2fhl_585-2100GeV"]["warnings"]
    assert "zero counts" in w and "Poisson noise" in w
    assert float(w.split("Poisson noise ")[1].split("x")[0]) > 1
    assert "Poisson noise" not in rows["wham_halpha"]["warnings"]
