"""Known answer: with a linear decoder the exact latent posterior is Gaussian.

For f(z) = z W + b and noise N, p(z | d) = N((W N^-1 W^T + 1)^-1 W N^-1 (d - b), (W N^-1 W^T + 1)^-1).
Both encoders are trained end to end; each is compared with the exact posterior of its own
learned decoder and noise.
"""
import numpy as np
import pytest
from conftest import gaussian_kl

from galdecomp.inference.config import resolve_config
from galdecomp.inference.training import TrainingState
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.model.mlp import unpack_params
from galdecomp.inference.fitting import fit_rows

L, C, P = 2, 6, 3000


@pytest.fixture(scope="module")
def linear_data():
    rng = np.random.default_rng(7)
    W = rng.normal(size=(L, C))
    sigma = rng.uniform(0.3, 0.6, C)
    return rng.standard_normal((P, L)) @ W + 0.3 + sigma * rng.standard_normal((P, C))


def train(data, covariance):
    cfg = resolve_config({"latent_dim": L, "covariance": covariance, "decoder": {"hidden": []},
                          "encoder": {"hidden": [32, 32]}, "noise": {"floor": 0.0},
                          "training": {"batch_size": 200, "max_epochs": 60}})
    model = Autoencoder.from_config(cfg, C)
    state = fit_rows(model, data, TrainingState(model.init_params(0), cfg["training"]["learning_rate"], 0), cfg)
    return model, state.best_params


def exact_posterior(model, params, data):
    (W, b), = unpack_params(model.split(params)[1], model.decoder.sizes)
    ninv = 1.0 / model.sigma(params) ** 2
    cov = np.linalg.inv((W * ninv) @ W.T + np.eye(L))
    return (data - b) @ (ninv[:, None] * W.T) @ cov, np.broadcast_to(cov, (len(data), L, L))


def test_fisher_encoder_matches_exact_posterior_and_beats_diagonal(linear_data):
    kls = {}
    for cov_type in ("fisher", "diagonal"):
        model, params = train(linear_data, cov_type)
        mask = np.ones_like(linear_data, bool)
        mean_q, cov_q = model.posterior_moments(params, linear_data, mask, full_cov=True)
        mean_p, cov_p = exact_posterior(model, params, linear_data)
        if cov_type == "fisher":
            # M = W N^-1 W^T + 1 does not depend on z: the covariance is exact
            np.testing.assert_allclose(cov_q, cov_p, rtol=1e-10, atol=1e-12)
            # the amortised mean is close to the exact one (in posterior standard deviations)
            shift = (mean_q - mean_p) / np.sqrt(np.diagonal(cov_p, 0, 1, 2))
            assert np.sqrt(np.mean(shift ** 2)) < 0.3
        kls[cov_type] = float(np.mean(gaussian_kl(mean_q, cov_q, mean_p, cov_p)))
    assert kls["fisher"] < kls["diagonal"], kls
