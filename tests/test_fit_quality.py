"""Known-answer fit quality: independent sources through a fixed non-linear mixing.

K independent latent sources are mixed non-linearly into C channels with known Gaussian noise.
With the default settings the fit must keep at least K active latent features (posterior means
varying with std > 0.1 over the rows) and learn each channel's noise sigma within 20 %.
"""
import numpy as np
import pytest

from galdecomp.inference.config import resolve_config
from galdecomp.inference.training import TrainingState
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.pipeline import fit_rows

K, C, N, L = 4, 20, 12000, 8


def mixed_sources(seed=0):
    """Rows d = g(s) + n: s ~ N(0, 1)^K, g a fixed 2-layer tanh mixing, n with known sigma per channel."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((N, K))
    A = rng.standard_normal((K, 16)) / np.sqrt(K)
    B = rng.standard_normal((16, C)) / 4.0
    clean = np.tanh(1.5 * s @ A) @ B + 0.3 * (s @ rng.standard_normal((K, C)) / np.sqrt(K))
    mu, sd = clean.mean(0), clean.std(0)
    sigma = np.linspace(0.05, 0.3, C)        # known noise, in units of each channel's clean spread
    data = (clean - mu) / sd + sigma * rng.standard_normal((N, C))
    return data, sigma, s


@pytest.fixture(scope="module")
def fitted():
    data, sigma, s = mixed_sources()
    cfg = resolve_config({"latent_dim": L, "noise": {"floor": 0.0}}, {"seed": 1})
    model = Autoencoder.from_config(cfg, C, 0.0)
    state = TrainingState(model.init_params(cfg["seed"]), cfg["training"]["learning_rate"], cfg["seed"])
    fit_rows(model, data, state, cfg)
    mask = np.ones(data.shape, bool)
    mean, _ = model.posterior_moments(state.best_params, data, mask)
    return dict(model=model, params=state.best_params, mean=mean, sigma=sigma, s=s, data=data)


def test_keeps_all_sources_active(fitted):
    active = int(np.sum(fitted["mean"].std(axis=0) > 0.1))
    assert active >= K, f"only {active} active features for {K} independent sources"


def test_learned_noise_matches_truth(fitted):
    learned = fitted["model"].sigma(fitted["params"])
    ratio = learned / fitted["sigma"]
    assert np.all(np.abs(ratio - 1) < 0.2), f"learned/true sigma per channel: {np.round(ratio, 2)}"


def test_features_hold_the_sources(fitted):
    """Every source is predictable from the features (linear regression R^2 > 0.9)."""
    F = np.column_stack([fitted["mean"], np.ones(N)])
    for k in range(K):
        y = fitted["s"][:, k]
        coef, *_ = np.linalg.lstsq(F, y, rcond=None)
        r2 = 1 - np.var(y - F @ coef) / np.var(y)
        assert r2 > 0.9, f"source {k}: R^2 {r2:.3f} from the features"


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
def test_training_energy_gradient_on_real_minibatch(covariance):
    """The full training energy (default networks, adaptive noise, KL weight of a warm-up step)
    on a minibatch of real maps with missing channels, against finite differences."""
    import nifty8 as ift

    from conftest import realsky
    from galdecomp.catalog import read_catalog
    from galdecomp.pipeline import load_preprocessed, noise_floor

    cat = read_catalog(realsky(32))
    data_set, pre, data = load_preprocessed(cat, 32)
    rows = np.r_[np.nonzero(~np.isfinite(data).all(1))[0][:16], np.arange(0, 12288, 257)[:48]]
    cfg = resolve_config({"covariance": covariance}, {})
    model = Autoencoder.from_config(cfg, data.shape[1], noise_floor(pre, data_set, cfg))
    d = data[rows]
    mask = np.isfinite(d)
    assert not mask.all()
    xi = np.random.default_rng(3).standard_normal((len(rows), model.latent_dim))
    op = model.elbo(np.where(mask, d, 0.0), mask, xi, n_total=10000).with_batch(
        np.where(mask, d, 0.0), mask, xi, beta=0.3)
    params = model.init_params(4) + 0.3 * np.random.default_rng(5).standard_normal(model.n_params)
    ift.extra.check_operator(op, model.position(params, op.domain), ntries=2, metric_sampling=False)
