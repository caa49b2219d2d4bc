"""The posterior moments and the products of a fit work in row blocks: standard deviations (P, L)
unless the covariances (P, L, L) are asked for, the same numbers whatever the blocks, and a peak
memory below that of one (P, L, L) array (issue 23, item 5)."""
import tracemalloc

import numpy as np
import pytest

from galdecomp.inference.mgvi import amortisation_gap
from galdecomp.inference.trained import TrainedModel
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.model.likelihood import GaussianLikelihood
from galdecomp.model.settings import Architecture
from galdecomp.products.generate import draws_from_moments, encoder_draws
from galdecomp.products.run_outputs import compute_products

L, C = 10, 12


def small_model(covariance, seed=0):
    model = Autoencoder(C, L, Architecture(decoder_hidden=(16,), encoder_hidden=(16,), covariance=covariance),
                        GaussianLikelihood(0.01))
    params = model.init_params(seed) * 0.3
    return model, params


def rows(P, seed=1, missing=0.1):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((P, C))
    mask = rng.random((P, C)) > missing
    return np.where(mask, data, 0.0), mask


class _Identity:
    """A preprocessor whose physical units are the standardised ones."""

    def inverse(self, values):
        return np.asarray(values, float)


def _cfg(covariance):
    return {"covariance": covariance}


def _old_products(model, params, data, mask, cov, covariance, samples=None):
    """The products as computed before the blocks: from the covariances of all rows."""
    mean = model.posterior_moments(params, data, mask, full_cov=True)[0]
    enc_std = np.sqrt(np.einsum("pii->pi", cov))
    if samples is not None:
        gap = amortisation_gap(mean, cov, samples)
        post_mean, post_std = gap["mean"], gap["std"]
    else:
        post_mean, post_std = mean, enc_std
    return mean, enc_std, post_mean, post_std


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
def test_std_by_default_covariance_on_request_and_any_blocks_agree(covariance):
    model, params = small_model(covariance)
    data, mask = rows(1000)
    mean, std = model.posterior_moments(params, data, mask)
    assert mean.shape == (1000, L) and std.shape == (1000, L)
    mean_f, cov = model.posterior_moments(params, data, mask, full_cov=True)
    assert cov.shape == (1000, L, L)
    # the same numbers, bitwise, as the diagonal of the covariances
    np.testing.assert_array_equal(mean, mean_f)
    np.testing.assert_array_equal(std, np.sqrt(np.einsum("pii->pi", cov)))
    # covariances of a few rows only
    pick = np.array([0, 3, 511, 512, 999])
    m3, s3, at = model.posterior_moments(params, data, mask, block=512, cov_rows=pick)
    assert at.shape == (len(pick), L, L)
    # blocked (odd block sizes) against one block
    for block in (7, 512, 4096):
        mb, sb = model.posterior_moments(params, data, mask, block=block)
        mb_f, cb = model.posterior_moments(params, data, mask, block=block, full_cov=True)
        np.testing.assert_allclose(mb, mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(sb, std, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cb, cov, rtol=0, atol=1e-12)
    np.testing.assert_allclose(at, cov[pick], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(at, model.posterior_moments(params, data, mask, block=512, full_cov=True)[1][pick])
    np.testing.assert_array_equal(s3, model.posterior_moments(params, data, mask, block=512)[1])


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
def test_trained_model_encode_returns_std_unless_asked(covariance):
    model, params = small_model(covariance)
    from galdecomp.preprocessing import Preprocessor

    tm = TrainedModel(model, params, Preprocessor([], [f"c{i}" for i in range(C)]), {}, ["1"] * C,
                      dict(kind="table", path="x"))
    data, mask = rows(300)
    y = np.where(mask, data, np.nan)
    mean, std = tm.encode(y, standardised=True)
    assert std.shape == (300, L)
    mean2, cov = tm.encode(y, standardised=True, full_cov=True)
    assert cov.shape == (300, L, L)
    np.testing.assert_array_equal(std, np.sqrt(np.einsum("pii->pi", cov)))
    # aggregate-posterior draws in blocks are the draws from all covariances at once
    pick = np.arange(0, 300, 7)
    z0, g0 = draws_from_moments(mean2, cov, pick, 5)
    z1, g1 = encoder_draws(tm, y, pick, 5, block=64)
    np.testing.assert_allclose(z1, z0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(encoder_draws(tm, y, pick, 5)[0], z0)  # same blocks: bitwise
    np.testing.assert_array_equal(g0, g1)


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
@pytest.mark.parametrize("with_samples", [False, True])
def test_products_in_blocks_equal_those_from_all_covariances(covariance, with_samples):
    model, params = small_model(covariance, seed=2)
    P = 900
    data, mask = rows(P, seed=3)
    nan_data = np.where(mask, data, np.nan)
    mean, std = model.posterior_moments(params, data, mask)
    cov = model.posterior_moments(params, data, mask, full_cov=True)[1]
    samples = None
    if with_samples:
        xi = np.random.default_rng(4).standard_normal((1, P, L))
        samples = np.concatenate([mean + 0.5 * std * xi, mean - 0.5 * std * xi])
    ref = _old_products(model, params, data, mask, cov, covariance, samples)
    for block in (8192, 100):
        out = compute_products(_Identity(), model, params, nan_data, mean, std, _cfg(covariance), samples,
                               block=block)
        order, loc = out["order"], out["rows"]
        tol = dict(rtol=0, atol=0) if block == 8192 else dict(rtol=0, atol=1e-12)
        np.testing.assert_allclose(loc["mean"], ref[2][:, order], **tol)
        np.testing.assert_allclose(loc["std"], ref[3][:, order], **tol)
        if covariance == "fisher":
            iu = np.triu_indices(L)
            assert loc["cov"].shape == (P, L * (L + 1) // 2)
            np.testing.assert_allclose(loc["cov"], cov[:, order][:, :, order][:, iu[0], iu[1]], **tol)
        else:
            assert "cov" not in loc
        if with_samples:
            gap = amortisation_gap(mean, cov, samples)
            np.testing.assert_allclose(loc["ratio"], gap["std_ratio"][:, order], **tol)
            np.testing.assert_allclose(loc["shift"], gap["shift"][:, order], **tol)
            np.testing.assert_allclose(loc["enc_std"], std[:, order], **tol)


def _peak(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
def test_peak_memory_does_not_scale_with_a_dense_covariance(covariance):
    """With blocks of 1024 rows, neither the moments nor the products allocate a (P, L, L) array."""
    model, params = small_model(covariance)
    P = 40000
    data, mask = rows(P, seed=5, missing=0.0)
    dense = P * L * L * 8  # 32 MB
    peak = _peak(lambda: model.posterior_moments(params, data, mask, block=1024))
    # outputs 2 x (P, L), the encoder input and one block's intermediates
    assert peak < 0.4 * dense, (peak, dense)
    assert _peak(lambda: model.posterior_moments(params, data, mask, block=1024, full_cov=True)) > dense
    mean, std = model.posterior_moments(params, data, mask, block=1024)
    nan_data = data.copy()
    peak = _peak(lambda: compute_products(_Identity(), model, params, nan_data, mean, std, _cfg(covariance),
                                          block=1024))
    # outputs: mean, std (P, L), recon, resid (P, C) and for the Fisher covariance the upper
    # triangles (P, L (L + 1) / 2); the former products made two (P, L, L) copies
    out = P * 8 * (2 * L + 4 * C + (L * (L + 1) // 2 if covariance == "fisher" else 0))
    assert peak < out + 0.25 * dense, (peak, out, dense)
