"""Reconstruction of missing channels: exact for a linear decoder; the CLI on a small sky."""
import inspect
import os

import healpy as hp
import numpy as np
import pytest

import galdecomp
from conftest import fit_small_sky
from galdecomp.cli import main
from galdecomp.inference.config import resolve_config
from galdecomp.inference.predictive import predictive
from galdecomp.inference.trained import TrainedModel
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.model.mlp import unpack_params
from galdecomp.preprocessing import ChannelTransform, Preprocessor

L, C = 2, 6


def linear_model(seed=0):
    """A TrainedModel with a linear decoder f(z) = z W + b, known noise and identity preprocessing."""
    rng = np.random.default_rng(seed)
    cfg = resolve_config({"latent_dim": L, "decoder": {"hidden": []}, "encoder": {"hidden": [8]},
                          "noise": {"floor": 0.0}})
    model = Autoencoder.from_config(cfg, C)
    params = model.init_params(0)
    theta = rng.normal(size=model.decoder.n_params)
    params[model.slices["decoder"]] = theta / model.dec_scales
    sigma = rng.uniform(0.2, 0.5, C)
    params[model.slices["noise"]] = np.log(sigma / model.sigma0) / model.tau
    pre = Preprocessor([ChannelTransform("linear") for _ in range(C)], [f"c{i}" for i in range(C)])
    tm = TrainedModel(model, params, pre, cfg, ["1"] * C, dict(kind="table"))
    (W, b), = unpack_params(theta, model.decoder.sizes)
    return tm, W, b, sigma


def test_linear_decoder_predictive_is_exact_and_calibrated():
    tm, W, b, sigma = linear_model()
    np.testing.assert_allclose(tm.sigma, sigma)
    rng = np.random.default_rng(1)
    P = 4000
    data = rng.standard_normal((P, L)) @ W + b + sigma * rng.standard_normal((P, C))
    mask = np.ones((P, C), bool)
    mask[:, :2] = False                         # two channels never seen
    mask[: P // 2] &= rng.random((P // 2, C)) > 0.5   # and half the rest hidden in half the pixels
    pred = predictive(tm, data, mask, n_draws=400, rng=np.random.default_rng(2))
    # exact predictive: N(W^T m + b, W^T S W + sigma^2) with the exact Gaussian posterior (m, S)
    w = mask / sigma ** 2
    S = np.linalg.inv(np.einsum("lc,pc,kc->plk", W, w, W) + np.eye(L))
    m = np.einsum("plk,pk->pl", S, (w * (np.where(mask, data, 0) - b)) @ W.T)
    np.testing.assert_allclose(pred["latent_mean"], m, atol=1e-6)
    mean = m @ W + b
    std = np.sqrt(np.einsum("lc,plk,kc->pc", W, S, W) + sigma ** 2)
    assert np.max(np.abs(pred["mean"] - mean) / std) < 0.3          # Monte Carlo error of 400 draws
    assert np.median(np.abs(pred["std"] / std - 1)) < 0.05
    hidden = ~mask
    inside68 = (data >= pred["p16"]) & (data <= pred["p84"])
    inside95 = (data >= pred["p02"]) & (data <= pred["p98"])
    assert abs(inside68[hidden].mean() - 0.683) < 0.02, inside68[hidden].mean()
    assert abs(inside95[hidden].mean() - 0.95) < 0.015, inside95[hidden].mean()
    # pixels missing half their channels are calibrated too
    half = hidden[: P // 2] & ~np.isin(np.arange(C), [0, 1])
    assert abs(inside68[: P // 2][half].mean() - 0.683) < 0.03


def test_extra_noise_and_gain_widen_the_predictive():
    tm, W, b, sigma = linear_model(3)
    rng = np.random.default_rng(4)
    data = rng.standard_normal((500, L)) @ W + b + 5.0
    mask = np.ones_like(data, bool)
    base = predictive(tm, data, mask, n_draws=200, rng=np.random.default_rng(0))
    noisy = predictive(tm, data, mask, extra_noise=np.full(C, 1.0), n_draws=200, rng=np.random.default_rng(0))
    gain = predictive(tm, data, mask, gain_sigma=np.full(C, 0.2), n_draws=200, rng=np.random.default_rng(0))
    assert np.all(np.median(noisy["std"] / base["std"], 0) > 1.5)
    assert np.all(np.median(gain["std"] / base["std"], 0) > 1.05)
    # noisier observations pull the latent posterior less: wider latent posterior
    assert np.all(noisy["latent_std"] > base["latent_std"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = fit_small_sky(tmp_path_factory.mktemp("rec"), "--max-epochs", "6", "--latent-dim", "4")
    return root


def test_reconstruct_cli_writes_every_channel_and_scores_holdouts(run, tmp_path, capsys):
    out = tmp_path / "rec"
    cat = str(run / "sky" / "catalog.yaml")
    assert main(["reconstruct", str(run / "run"), "--catalog", cat, "--out", str(out), "--holdout",
                 "planck_545GHz", "--samples", "50"]) == 0
    text = capsys.readouterr().out
    assert "planck_545GHz: RMSE" in text
    trained = galdecomp.load(str(run / "run"))
    for k in ["mean", "std", "p50", "p16", "p84", "p02", "p98"]:
        m = np.array(hp.read_map(str(out / f"reconstruction_{k}.fits"), field=None, nest=True))
        assert m.shape == (trained.n_features, hp.nside2npix(8)) and np.isfinite(m).all()
    lo, hi = (np.array(hp.read_map(str(out / f"reconstruction_{k}.fits"), field=None)) for k in ("p16", "p84"))
    assert np.all(lo <= hi)
    rows = np.genfromtxt(out / "holdout.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert str(rows["channel"]) == "planck_545GHz"
    assert 0 < float(rows["coverage_68"]) <= float(rows["coverage_95"]) <= 1
    assert (out / "plots" / "holdout.png").is_file() and (out / "latent_mean.fits").is_file()
    cal = np.genfromtxt(out / "calibration.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert list(cal["channel"]) == trained.names           # the default noise is calibrated
    held = np.array(trained.names) == "planck_545GHz"      # the one channel predicted: the one calibrated
    assert cal["entries"][held][0] == hp.nside2npix(8) and np.all(cal["entries"][~held] == 0)  # all < 4096 rows
    c = cal[held][0]
    assert 0 < c["raw_coverage_68"] <= c["raw_coverage_95"] <= 1
    assert c["level_p02"] < c["level_p16"] < c["level_p50"] < c["level_p84"] < c["level_p98"]


def test_the_cli_calibrates_on_the_library_default_number_of_entries():
    from galdecomp.cli_options import build_parser
    from galdecomp.inference.predictive import CALIBRATION_ROWS
    from galdecomp.products.reconstruct import reconstruct_sky

    args = build_parser().parse_args(["reconstruct", "RUN", "--catalog", "C", "--out", "D"])
    assert args.calibration_rows == CALIBRATION_ROWS == 4096
    assert inspect.signature(reconstruct_sky).parameters["calibration_rows"].default == CALIBRATION_ROWS


def test_reconstruct_bad_input(run, tmp_path, capsys):
    cat = str(run / "sky" / "catalog.yaml")
    assert main(["reconstruct", str(run / "run"), "--catalog", cat, "--out", str(tmp_path / "a"),
                 "--holdout", "nope"]) == 2
    assert "nope: not a channel of the run" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "missing"), "--catalog", cat, "--out", str(tmp_path / "b")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_recalibrated_noise_is_unbiased_for_the_true_model():
    """Residuals at the MAP are smaller than the noise (the latents absorb L of the C degrees of
    freedom); the leverage correction undoes that, so the true sigma comes back."""
    tm, W, b, sigma = linear_model(5)
    rng = np.random.default_rng(6)
    data = rng.standard_normal((6000, L)) @ W + b + sigma * rng.standard_normal((6000, C))
    r = data - tm.decode(tm.condition(data)["mean"])
    assert np.all(r.std(0) < sigma)                     # the raw MAP residuals are biased low
    np.testing.assert_allclose(tm.recalibrated_sigma(data), sigma, rtol=0.05)


def test_predictive_and_recalibration_condition_the_rows_in_chunks(monkeypatch):
    """Only one chunk of rows' Laplace covariances is held at a time; the results are those of
    one call on all rows (the chunks cut nothing that couples rows)."""
    from galdecomp.inference import predictive as predictive_module

    tm, W, b, sigma = linear_model()
    rng = np.random.default_rng(4)
    data = rng.standard_normal((300, L)) @ W + b + sigma * rng.standard_normal((300, C))
    mask = rng.random((300, C)) > 0.3
    whole = predictive(tm, data, mask, n_draws=20, rng=np.random.default_rng(0), block=16)
    sig = tm.recalibrated_sigma(data, mask)
    held = []
    orig = tm.condition

    def condition(y, *a, **k):
        held.append(len(y))
        return orig(y, *a, **k)

    monkeypatch.setattr(tm, "condition", condition)
    monkeypatch.setattr(predictive_module, "CONDITION_ROWS", 64)
    chunked = predictive(tm, data, mask, n_draws=20, rng=np.random.default_rng(0), block=16)
    assert held == [64, 64, 64, 64, 44]
    for k in ("mean", "std", "latent_mean", "latent_std"):
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tm.recalibrated_sigma(data, mask), sig, rtol=1e-10)


def test_pit_only_gives_the_pit_of_the_whole_predictive():
    """``pit_only`` (what pit_calibration asks for) leaves out the summaries in physical units,
    and its PIT values are those of the whole predictive from the same draws (one block: the
    whole predictive draws its extra noise only after the block's PIT)."""
    tm, W, b, sigma = linear_model(3)
    rng = np.random.default_rng(5)
    data = rng.standard_normal((40, L)) @ W + b + sigma * rng.standard_normal((40, C))
    mask = rng.random((40, C)) > 0.4
    truth = np.where(mask, np.nan, tm.standardise(data))
    whole = predictive(tm, data, mask, n_draws=50, rng=np.random.default_rng(1), truth=truth)
    only = predictive(tm, data, mask, n_draws=50, rng=np.random.default_rng(1), truth=truth, pit_only=True)
    assert set(only) == {"latent_mean", "latent_std", "converged", "pit"}
    np.testing.assert_array_equal(only["pit"], whole["pit"])
    assert np.isfinite(only["pit"][~mask]).all() and np.isnan(only["pit"][mask]).all()


def test_pit_calibration_corrects_heavy_tailed_noise():
    """Student-t noise (3 degrees of freedom) of the model's variance: the Gaussian predictive's
    68 % intervals are too wide (~0.8 coverage) while its 95 % ones are about right; recalibrated
    on entries of other rows hidden one channel at a time, both levels come right on new rows."""
    from galdecomp.inference.predictive import pit_calibration

    tm, W, b, sigma = linear_model(7)
    rng = np.random.default_rng(8)

    def rows(n):
        t = rng.standard_t(3, (n, C)) / np.sqrt(3.0)       # unit variance, heavy tails
        return rng.standard_normal((n, L)) @ W + b + sigma * t

    pit = pit_calibration(tm, rows(3000), n_rows=1500, n_draws=400, rng=np.random.default_rng(9))
    assert pit.shape == (C, 1500) and np.all((pit > 0) & (pit < 1))
    data = rows(3000)
    mask = np.ones(data.shape, bool)
    mask[:, 0] = False
    mask[np.arange(len(data)), rng.integers(1, C, len(data))] = False   # and one more channel per row
    hidden = ~mask
    for calibration, ok68 in ((None, lambda c: c > 0.75), (pit, lambda c: abs(c - 0.683) < 0.025)):
        pred = predictive(tm, data, mask, n_draws=400, rng=np.random.default_rng(10), calibration=calibration)
        c68 = ((data >= pred["p16"]) & (data <= pred["p84"]))[hidden].mean()
        c95 = ((data >= pred["p02"]) & (data <= pred["p98"]))[hidden].mean()
        assert ok68(c68), (calibration is None, c68)
        assert abs(c95 - 0.95) < 0.02, (calibration is None, c95)
        assert np.all(pred["p16"] <= pred["p50"]) and np.all(pred["p50"] <= pred["p84"])
