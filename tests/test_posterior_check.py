"""galdecomp posterior-check: importance sampling of p(z | d) against known answers, and the CLI.

With a linear decoder f(z) = z W + b and Gaussian noise N the exact posterior is
N((W N^-1 W^T + 1)^-1 W N^-1 (d - b), (W N^-1 W^T + 1)^-1): a q equal to it has constant
importance weights (KL 0, ESS 1), a q twice as wide has KL = L (3 - log 4) / 2.
"""
import os
import types

import numpy as np
import pytest

from conftest import fit_small_sky
from galdecomp.cli import main
from galdecomp.products.posterior_check import (COLUMNS, MCMC_COLUMNS, SUMMARY_COLUMNS, check_pixels,
                                                 importance_check, q_candidates, summarise)
from galdecomp.inference.trained import TrainedModel
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.model.settings import Architecture
from galdecomp.model.mlp import unpack_params

L, C, P = 2, 6, 60


@pytest.fixture(scope="module")
def linear():
    model = Autoencoder(C, L, Architecture(decoder_hidden=(), encoder_hidden=(8,), covariance="fisher"))
    params = model.init_params(3)
    params[model.slices["noise"]] = np.random.default_rng(1).uniform(-1.0, 0.0, C)  # sigma 0.18 .. 0.5
    (W, b), = unpack_params(model.split(params)[1], model.decoder.sizes)
    sigma = model.sigma(params)
    rng = np.random.default_rng(2)
    data = rng.standard_normal((P, L)) @ W + b + sigma * rng.standard_normal((P, C))
    mask = np.ones((P, C), bool)
    mask[::7, 2] = False  # some rows miss a channel: their posterior is exact with it left out
    ninv = mask / sigma ** 2
    cov = np.linalg.inv(np.einsum("lc,pc,kc->plk", W, ninv, W) + np.eye(L))
    mean = np.einsum("pc,pc,lc,plk->pk", data - b, ninv, W, cov)
    return model, params, data, mask, mean, cov


def test_exact_q_has_zero_kl_and_full_ess(linear):
    model, params, data, mask, mean, cov = linear
    r = importance_check(model, params, data, mask, mean, cov, 500, np.random.default_rng(0), block_rows=4000)
    assert np.all(np.abs(r["kl"]) < 0.02) and np.all(r["ess_fraction"] > 0.99)
    np.testing.assert_allclose(r["std_ratio"], 1.0, atol=0.1)
    assert abs(np.median(r["coverage_68"]) - 0.68) < 0.05
    assert np.median(r["shift_sigma_rms"]) < 0.1


def test_too_wide_q_has_the_analytic_kl(linear):
    model, params, data, mask, mean, cov = linear
    r = importance_check(model, params, data, mask, mean, 4.0 * cov, 4000, np.random.default_rng(1))
    exact = 0.5 * L * (3.0 - np.log(4.0))  # KL[N(m, 4S) || N(m, S)]
    assert np.median(r["kl"]) == pytest.approx(exact, rel=0.1)
    np.testing.assert_allclose(np.median(r["std_ratio"]), 2.0, rtol=0.1)
    assert np.median(r["coverage_68"]) > 0.95  # q's 68 % region holds nearly all of p
    shifted = importance_check(model, params, data, mask, mean + np.sqrt(np.diagonal(cov, 0, 1, 2)), cov, 2000,
                               np.random.default_rng(2))
    assert np.median(shifted["kl"]) > 0.3 and np.median(shifted["shift_sigma_rms"]) > 0.8


def test_laplace_is_exact_for_a_linear_decoder(linear):
    model, params, data, mask, mean, cov = linear
    tm = TrainedModel(model, params, types.SimpleNamespace(names=[f"c{i}" for i in range(C)]), {},
                      ["1"] * C, dict(kind="table"))
    qs = q_candidates(tm, data, mask)
    assert list(qs) == ["fisher", "diagonal", "laplace"]
    np.testing.assert_allclose(qs["fisher"][2], cov, rtol=1e-8)  # M = W N^-1 W^T + 1 at any z
    np.testing.assert_allclose(qs["laplace"][1], mean, atol=1e-6)
    rows, mrows = check_pixels(tm, data, mask, draws=500, seed=0, mcmc_steps=4000)
    assert len(rows) == 3 * P and set(rows[0]) == set(COLUMNS)
    summ = {s["q"]: s for s in summarise(rows)}
    assert summ["laplace"]["kl"] < 0.02 and summ["laplace"]["ess_fraction"] > 0.99
    assert summ["diagonal"]["kl"] > summ["laplace"]["kl"]
    assert all(set(s) == set(SUMMARY_COLUMNS) for s in summ.values())
    # the Metropolis chains agree with the exact posterior (Laplace = exact here)
    lap = [r for r in mrows if r["q"] == "laplace"]
    assert len(mrows) == 3 * P and set(mrows[0]) == set(MCMC_COLUMNS)
    assert np.median([r["q_shift_vs_mcmc"] for r in lap]) < 0.15
    assert abs(np.median([r["q_std_ratio_vs_mcmc"] for r in lap]) - 1) < 0.1
    assert 0.15 < np.median([r["acceptance"] for r in lap]) < 0.7


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = fit_small_sky(tmp_path_factory.mktemp("pcheck"), "--max-epochs", "4", "--latent-dim", "3")
    return root


def test_cli_writes_the_tables_and_plot(run, capsys):
    out = run / "check"
    assert main(["posterior-check", str(run / "run"), "--pixels", "15", "--draws", "300", "--out", str(out),
                 "--mcmc-steps", "200"]) == 0
    assert sorted(os.listdir(out)) == ["mcmc_check.csv", "posterior_check.csv", "posterior_check.png",
                                       "posterior_check_summary.csv"]
    import csv

    rows = list(csv.DictReader(open(out / "posterior_check.csv")))
    assert len(rows) == 45 and {r["q"] for r in rows} == {"diagonal", "fisher", "laplace"}
    assert all(np.isfinite(float(r["kl"])) and 0 < float(r["ess_fraction"]) <= 1 for r in rows)
    text = capsys.readouterr().out
    assert "laplace" in text and "posterior_check_summary.csv" in text


@pytest.mark.parametrize("argv, message", [
    (["posterior-check", "{root}/nope", "--pixels", "5", "--out", "{root}/x"], "run folder not found"),
    (["posterior-check", "{root}/run", "--pixels", "5", "--out", "{root}/sky"], "output folder exists"),
    (["posterior-check", "{root}/run", "--pixels", "0", "--out", "{root}/x"], "positive integer"),
])
def test_cli_errors_are_one_line(run, capsys, argv, message):
    assert main([a.format(root=run) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("galdecomp: error: ") and message in err[0]
    assert not os.path.exists(run / "x")
