"""Tests of the Fisher-metric latent posterior against finite differences and a linear decoder."""
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import gaussian_kl
from galdecomp.model import fisher as F
from galdecomp.model.mlp import n_params

B, L, C = 5, 3, 7
SIZES = [L, 8, 8, C]
ACTS = ["tanh", "softplus"]


def _setup(act, seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(n_params(sizes)) / np.sqrt(3.0)
    mu = rng.standard_normal((B, sizes[0]))
    inv_var = rng.uniform(0.5, 2.0, (B, sizes[-1])) * (rng.random((B, sizes[-1])) > 0.2)  # some channels masked
    return rng, SimpleNamespace(sizes=sizes, activation=act), theta, mu, inv_var


def _num_grad(f, x, eps=1e-5):
    """Central finite-difference gradient of the scalar f at x (any shape)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("act", ACTS)
def test_jacobian_forward_fd(act):
    _, dec, theta, mu, _ = _setup(act)
    y, J, _ = F.jacobian_forward(theta, SIZES, act, mu)
    assert y.shape == (B, C) and J.shape == (B, C, L)
    for l in range(L):
        e = 1e-5 * np.eye(L)[l]
        y_p, y_m = (F.jacobian_forward(theta, SIZES, act, mu + sgn * e)[0] for sgn in (1, -1))
        fd = (y_p - y_m) / 2e-5
        assert _rel(J[:, :, l], fd) < 1e-8


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("sizes", [SIZES, [L, 8, C], [L, C]])
def test_jacobian_backward_fd(act, sizes):
    rng, _, theta, mu, _ = _setup(act, sizes=sizes)
    g_y, g_J = rng.standard_normal((B, C)), rng.standard_normal((B, C, L))

    def loss(th, z):
        y, J, _ = F.jacobian_forward(th, sizes, act, z)
        return (g_y * y).sum() + (g_J * J).sum()

    g_theta, g_z = F.jacobian_backward(F.jacobian_forward(theta, sizes, act, mu)[2], g_y, g_J)
    assert _rel(g_theta, _num_grad(lambda t: loss(t, mu), theta)) < 1e-7
    assert _rel(g_z, _num_grad(lambda z: loss(theta, z), mu)) < 1e-7


def test_linear_algebra():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((B, 4, 6))
    M = A @ np.swapaxes(A, 1, 2) + np.eye(4)
    Lc = F.cholesky(M)
    assert np.allclose(F.inv_lower(Lc), np.linalg.inv(Lc), atol=1e-13)
    y, Y = rng.standard_normal((B, 4)), rng.standard_normal((B, 4, 2))
    assert np.allclose(F.solve_lower(Lc, y), np.linalg.solve(Lc, y[..., None])[..., 0], atol=1e-13)
    assert np.allclose(F.solve_lower(Lc, Y, trans=True), np.linalg.solve(np.swapaxes(Lc, 1, 2), Y), atol=1e-13)
    assert np.allclose(F.logdet(Lc), np.linalg.slogdet(M)[1])
    cov, std = F.covariance(M)
    assert np.allclose(cov, np.linalg.inv(M)) and np.allclose(std ** 2, np.diagonal(np.linalg.inv(M), 0, 1, 2))
    J, iv = rng.standard_normal((B, 6, 4)), rng.random((B, 6))
    assert np.allclose(F.metric(J, iv), np.einsum("bcl,bc,bcm->blm", J, iv, J) + np.eye(4))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("block_size,cache_rows", [(4096, 4096), (2, 0)])  # one block with cache; blocks, recomputed
def test_fisher_backward_fd(act, block_size, cache_rows):
    rng, dec, theta, mu, inv_var = _setup(act)
    xi = rng.standard_normal((B, L))
    g_z, g_kl = rng.standard_normal((B, L)), rng.standard_normal(B)
    post = F.FisherGaussian(block_size=block_size, cache_rows=cache_rows)

    def loss(m, th, iv):
        z, kl, _ = post.forward(m, xi, dec, th, iv)
        return (g_z * z).sum() + (g_kl * kl).sum()

    z, kl, ctx = post.forward(mu, xi, dec, theta, inv_var)
    g_mu, g_theta, g_iv = post.backward(ctx, g_z, g_kl)
    assert _rel(g_mu, _num_grad(lambda m: loss(m, theta, inv_var), mu)) < 1e-5
    assert _rel(g_theta, _num_grad(lambda t: loss(mu, t, inv_var), theta)) < 1e-5
    assert _rel(g_iv, _num_grad(lambda iv: loss(mu, theta, iv), inv_var)) < 1e-5

    # forward values against dense linear algebra
    _, J, _ = F.jacobian_forward(theta, SIZES, act, mu)
    M = np.einsum("bcl,bc,bcm->blm", J, inv_var, J) + np.eye(L)
    Lc = np.linalg.cholesky(M)
    assert np.allclose(z, mu + np.linalg.solve(np.swapaxes(Lc, 1, 2), xi[..., None])[..., 0])
    assert np.allclose(kl, gaussian_kl(mu, np.linalg.inv(M), np.zeros_like(mu), np.broadcast_to(np.eye(L), M.shape)))


@pytest.mark.parametrize("act", ACTS)
def test_float32_jacobian_passes_agree_with_float64(act):
    """``dtype="float32"``: the Jacobian passes in single precision, the metric, Cholesky, draws and
    KL in float64; value and every gradient within float32 rounding of the float64 family's."""
    rng, dec, theta, mu, inv_var = _setup(act)
    xi = rng.standard_normal((B, L))
    g_z, g_kl = rng.standard_normal((B, L)), rng.standard_normal(B)
    out = {}
    for dt in ("float64", "float32"):
        post = F.FisherGaussian(dtype=dt)
        z, kl, ctx = post.forward(mu, xi, dec, theta, inv_var)
        assert z.dtype == kl.dtype == np.float64 and ctx["caches"][0]["Jt"].dtype == np.dtype(dt)
        out[dt] = (z, kl) + tuple(g.astype(np.float64) for g in post.backward(ctx, g_z, g_kl))
    for a, b in zip(out["float32"], out["float64"]):
        assert 0 < _rel(a, b) < 1e-5 or np.array_equal(a, b)
    assert not np.array_equal(out["float32"][3], out["float64"][3])  # the decoder gradient is single precision
    # the products' moments stay float64 whatever the training dtype
    m32, m64 = (F.FisherGaussian(dtype=dt).mean_and_std(mu, dec, theta, inv_var)[1] for dt in ("float32", "float64"))
    assert np.array_equal(m32, m64)


def test_fisher_dtype_setting():
    """``training.fisher_dtype``: null follows ``training.dtype``; runs stored without it keep float64."""
    from galdecomp.errors import InputError
    from galdecomp.inference.config import resolve_config, with_former_defaults
    from galdecomp.model.autoencoder import Autoencoder

    cfg = resolve_config({"covariance": "fisher"}, {})
    assert cfg["training"]["fisher_dtype"] is None
    assert Autoencoder.from_config(cfg, C).posterior.dtype == np.dtype(cfg["training"]["dtype"]) == np.float32
    stored = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    stored["training"] = {k: v for k, v in cfg["training"].items() if k != "fisher_dtype"}
    old = with_former_defaults(stored)
    assert Autoencoder.from_config(old, C).posterior.dtype == np.float64
    with pytest.raises(InputError, match="fisher_dtype"):
        resolve_config({"covariance": "fisher", "training": {"fisher_dtype": "float16"}}, {})


def _linear_case(seed=5):
    """One-layer decoder f(z) = z W + b with data drawn from it: exact posterior in closed form."""
    rng = np.random.default_rng(seed)
    sizes = [L, C]
    theta = rng.standard_normal(n_params(sizes))
    W, b = theta[:L * C].reshape(L, C), theta[L * C:]
    inv_var = rng.uniform(0.5, 4.0, (B, C)) * (rng.random((B, C)) > 0.3)
    d = rng.standard_normal((B, L)) @ W + b + rng.standard_normal((B, C)) / np.sqrt(np.maximum(inv_var, 1e-12))
    prec = np.einsum("lc,bc,mc->blm", W, inv_var, W) + np.eye(L)  # W N^-1 W^T + 1
    cov = np.linalg.inv(prec)
    mean = np.einsum("blm,mc,bc->bl", cov, W, inv_var * (d - b))  # M^-1 W N^-1 (d - b)
    # the mean is the stationary point of the log posterior: W N^-1 (d - b - mean W) - mean = 0
    assert np.allclose(np.einsum("lc,bc->bl", W, inv_var * (d - b - mean @ W)), mean)
    return rng, SimpleNamespace(sizes=sizes, activation="tanh"), theta, inv_var, mean, cov, prec


def test_linear_decoder_exact():
    _, dec, theta, inv_var, mean, cov, prec = _linear_case()
    post = F.FisherGaussian()
    mu, cov_q = post.mean_and_cov(mean, dec, theta, inv_var)
    assert np.allclose(cov_q, cov, rtol=1e-12, atol=1e-14)
    kl_fisher = gaussian_kl(mu, cov_q, mean, cov)
    assert np.all(np.abs(kl_fisher) < 1e-12)
    # KL-optimal diagonal q for KL[q||p]: diag precision = diag(M); strictly worse (Hadamard's inequality)
    cov_diag = np.einsum("bl,lm->blm", 1.0 / np.diagonal(prec, 0, 1, 2), np.eye(L))
    kl_diag = gaussian_kl(mean, cov_diag, mean, cov)
    assert np.all(kl_diag > 1e-3)
    assert np.allclose(kl_diag, 0.5 * (np.log(np.diagonal(prec, 0, 1, 2)).sum(1) - np.linalg.slogdet(prec)[1]))
    # the diagonal precision is KL-optimal: perturbing it increases the KL
    for f in (0.9, 1.1):
        assert np.all(gaussian_kl(mean, cov_diag * f, mean, cov) > kl_diag)
    # and the Fisher analytic KL to the prior matches the exact posterior's
    _, kl, _ = post.forward(mean, np.zeros((B, L)), dec, theta, inv_var)
    assert np.allclose(kl, gaussian_kl(mean, cov, np.zeros((B, L)), np.broadcast_to(np.eye(L), cov.shape)))


def test_sample_covariance():
    rng, dec, theta, inv_var, mean, cov, _ = _linear_case()
    n = 200_000
    i = int(np.argmax(np.abs(cov[:, 0, 1:]).sum(1)))  # the row with the largest off-diagonal covariances
    mu, iv = np.repeat(mean[i:i + 1], n, 0), np.repeat(inv_var[i:i + 1], n, 0)
    z, _, _ = F.FisherGaussian().forward(mu, rng.standard_normal((n, L)), dec, theta, iv)
    S, Sig = np.cov(z.T), cov[i]
    se = np.sqrt((Sig ** 2 + np.outer(np.diag(Sig), np.diag(Sig))) / n)  # std. error of sample covariances
    assert np.all(np.abs(S - Sig) < 5 * se)
    assert np.all(np.abs(z.mean(0) - mean[i]) < 5 * np.sqrt(np.diag(Sig) / n))
    # the test can fail: the wrong square root (L^-1 xi, covariance L^-1 L^-T) is rejected
    Li = np.linalg.inv(np.linalg.cholesky(np.linalg.inv(Sig)))
    assert np.any(np.abs(Li @ Li.T - Sig) > 20 * se)


def test_registry():
    from galdecomp.model.families import POSTERIORS
    from galdecomp.model.posteriors import LatentPosterior
    assert POSTERIORS["fisher"] is F.FisherGaussian and issubclass(F.FisherGaussian, LatentPosterior)
    assert F.FisherGaussian().n_encoder_outputs(10) == 10
    assert POSTERIORS["fisher-scaled"] is F.ScaledFisherGaussian


@pytest.mark.parametrize("act", ACTS)
def test_against_mlp_class(act):
    """The shared MLP (output and forward-mode jvp) agrees with jacobian_forward; it works as the decoder."""
    from galdecomp.model.mlp import MLP

    rng, _, theta, mu, inv_var = _setup(act)
    mlp = MLP(SIZES, act)
    y, J, _ = F.jacobian_forward(theta, mlp.sizes, mlp.activation, mu)
    v = rng.standard_normal((B, L))
    y2, dy = mlp.jvp(theta, mu, d_x=v)
    assert np.allclose(y, y2, atol=1e-12) and np.allclose(np.einsum("bcl,bl->bc", J, v), dy, atol=1e-12)
    xi = rng.standard_normal((B, L))
    post = F.FisherGaussian()
    z1, kl1, _ = post.forward(mu, xi, mlp, theta, inv_var)
    z2, kl2, _ = post.forward(mu, xi, SimpleNamespace(sizes=SIZES, activation=act), theta, inv_var)
    assert np.array_equal(z1, z2) and np.array_equal(kl1, kl2)


@pytest.mark.parametrize("block_size,cache_rows", [(4096, 4096), (2, 0)])
def test_scaled_fisher_backward_fd(block_size, cache_rows):
    """P = c J^T N J + diag(D): gradients of samples and KL with respect to the encoder's mean,
    log c and log sqrt(D), the decoder and the noise, against finite differences."""
    rng, dec, theta, mu, inv_var = _setup("tanh", seed=3)
    enc = np.concatenate([mu, 0.3 * rng.standard_normal((B, 1)), 0.3 * rng.standard_normal((B, L))], axis=1)
    xi, g_z, g_kl = rng.standard_normal((B, L)), rng.standard_normal((B, L)), rng.standard_normal(B)
    post = F.ScaledFisherGaussian(block_size=block_size, cache_rows=cache_rows)
    assert post.n_encoder_outputs(L) == 2 * L + 1

    def loss(e, th, iv):
        z, kl, _ = post.forward(e, xi, dec, th, iv)
        return (g_z * z).sum() + (g_kl * kl).sum()

    _, _, ctx = post.forward(enc, xi, dec, theta, inv_var)
    g_enc, g_theta, g_iv = post.backward(ctx, g_z, g_kl)
    assert g_enc.shape == enc.shape
    assert _rel(g_enc, _num_grad(lambda e: loss(e, theta, inv_var), enc)) < 1e-5
    assert _rel(g_theta, _num_grad(lambda t: loss(enc, t, inv_var), theta)) < 1e-5
    assert _rel(g_iv, _num_grad(lambda iv: loss(enc, theta, iv), inv_var)) < 1e-5


def test_scaled_fisher_contains_the_fisher_and_the_diagonal_family():
    rng, dec, theta, mu, inv_var = _setup("tanh", seed=4)
    xi = rng.standard_normal((B, L))
    post = F.ScaledFisherGaussian()
    # log c = 0, log sqrt(D) = 0: the Fisher posterior
    z, kl, _ = post.forward(np.concatenate([mu, np.zeros((B, L + 1))], axis=1), xi, dec, theta, inv_var)
    z0, kl0, _ = F.FisherGaussian().forward(mu, xi, dec, theta, inv_var)
    assert np.allclose(z, z0, atol=1e-12) and np.allclose(kl, kl0, atol=1e-12)
    # c -> 0: the diagonal Gaussian N(mu, diag(exp(2 log_sigma)))
    log_sigma = 0.4 * rng.standard_normal((B, L))
    enc = np.concatenate([mu, np.full((B, 1), -60.0), -log_sigma], axis=1)  # D = sigma^-2
    z, kl, _ = post.forward(enc, xi, dec, theta, inv_var)
    from galdecomp.model.posteriors import DiagonalGaussian
    zd, kld, _ = DiagonalGaussian().forward(np.concatenate([mu, log_sigma], axis=1), xi)
    assert np.allclose(z, zd, atol=1e-12) and np.allclose(kl, kld, atol=1e-12)
    _, cov = post.mean_and_cov(enc, dec, theta, inv_var)
    assert np.allclose(cov, np.exp(2 * log_sigma)[:, :, None] * np.eye(L), atol=1e-12)
    assert np.allclose(post.mean_and_std(enc, dec, theta, inv_var)[1], np.exp(log_sigma), atol=1e-12)
