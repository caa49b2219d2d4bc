"""Latent normalising transforms (iterative Gaussianisation and baselines) and sample quality."""
import numpy as np
import pytest
from scipy import stats

from galdecomp.model.latent_transform import (GaussianDensity, GaussianisingTransform,
                                              GaussianMixtureDensity, gaussian_draws_per_row,
                                              load_density)
from galdecomp.products.sample_quality import frechet_distance, ks_per_feature


def banana(n, rng):
    """A curved, skewed 3-D distribution (far from Gaussian)."""
    a = rng.standard_normal((n, 3))
    x = a.copy()
    x[:, 1] = 0.5 * a[:, 1] + 0.5 * a[:, 0] ** 2 - 0.5
    x[:, 2] = np.sign(a[:, 2]) * np.abs(a[:, 2]) ** 1.5 + 0.3 * a[:, 0]
    return x


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    z = banana(20000, rng)
    return GaussianisingTransform.fit(z, seed=0), z, banana(20000, rng)


def test_inverse_exact_on_training_and_tails(fitted):
    T, z, _ = fitted
    assert T.n_layers >= 3
    np.testing.assert_allclose(T.inverse(T.forward(z)), z, atol=1e-8, rtol=0)
    far = np.random.default_rng(5).standard_normal((500, 3)) * 20.0     # far outside the knots
    assert np.abs(far).max() > 2 * np.abs(z).max()
    np.testing.assert_allclose(T.inverse(T.forward(far)), far, atol=1e-8, rtol=0)
    u = np.random.default_rng(6).standard_normal((500, 3)) * 10.0
    np.testing.assert_allclose(T.forward(T.inverse(u)), u, atol=1e-8, rtol=0)


def test_log_det_matches_numerical_jacobian(fitted):
    T, z, _ = fitted
    pts = np.concatenate([z[:4], [[4.0, -3.0, 6.0], [-5.0, 8.0, -7.0]]])
    h = 1e-6
    for p in pts:
        J = np.empty((3, 3))
        for j in range(3):
            e = np.zeros(3)
            e[j] = h
            J[:, j] = (T.forward((p + e)[None]) - T.forward((p - e)[None]))[0] / (2 * h)
        num = np.log(abs(np.linalg.det(J)))
        assert T.log_det_jacobian(p[None])[0] == pytest.approx(num, abs=1e-5)


def test_gaussianises_banana_and_beats_gaussian(fitted):
    T, z, held = fitted
    u = T.forward(held)
    ks = [stats.kstest(u[:, j], "norm").statistic for j in range(3)]
    assert max(ks) < 0.03
    np.testing.assert_allclose(np.cov(u, rowvar=False), np.eye(3), atol=0.06)
    # the raw banana is not close to N(0, 1): the test can fail
    assert max(stats.kstest(held[:, j], "norm").statistic for j in range(3)) > 0.05
    lg = GaussianDensity.fit(z).log_density(held).mean()
    lt = T.log_density(held).mean()
    assert lt > lg + 0.3
    # kept layers: up to the best held-out log-density (within the stopping tolerance 1e-3)
    assert T.validation_curve[T.n_layers] >= T.validation_curve.max() - 1e-3
    assert len(T.validation_curve) > T.n_layers + 1       # the rule stopped after trying more
    # samples look like the data
    s = T.sample(20000, np.random.default_rng(3))
    assert ks_per_feature(s, held)[0].max() < 0.03
    assert frechet_distance(s, held) < 0.02


def test_log_density_normalised_1d():
    rng = np.random.default_rng(1)
    z = rng.gamma(2.0, size=(5000, 1))
    T = GaussianisingTransform.fit(z, seed=1)
    grid = np.linspace(-30, 60, 200001)[:, None]
    mass = np.exp(T.log_density(grid)).sum() * (grid[1, 0] - grid[0, 0])
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_round_trip_arrays(tmp_path, fitted):
    T, z, _ = fitted
    rng = np.random.default_rng(2)
    models = [T, GaussianDensity.fit(z), GaussianMixtureDensity.fit(z[:3000], n_components=3)]
    for m in models:
        np.savez(tmp_path / "t.npz", **m.to_arrays())
        with np.load(tmp_path / "t.npz") as f:
            m2 = load_density(dict(f))
        assert type(m2) is type(m)
        np.testing.assert_array_equal(m2.log_density(z[:100]), m.log_density(z[:100]))
        np.testing.assert_array_equal(m2.sample(50, np.random.default_rng(4)),
                                      m.sample(50, np.random.default_rng(4)))
        if hasattr(m, "inverse"):
            np.testing.assert_array_equal(m2.forward(z[:100]), m.forward(z[:100]))
    with pytest.raises(ValueError):
        GaussianDensity.from_arrays(T.to_arrays())


def test_gaussian_baseline_exact():
    rng = np.random.default_rng(3)
    C = np.array([[2.0, 0.6], [0.6, 0.5]])
    z = rng.multivariate_normal([1.0, -2.0], C, size=4000)
    g = GaussianDensity.fit(z)
    np.testing.assert_allclose(g.inverse(g.forward(z)), z, atol=1e-12)
    np.testing.assert_allclose(g.log_density(z[:10]),
                               stats.multivariate_normal(g.mean, g.cov).logpdf(z[:10]), rtol=1e-12)


def test_gaussian_draws_per_row():
    rng = np.random.default_rng(4)
    P, L, n = 3, 2, 20000
    mean = rng.standard_normal((P, L))
    std = rng.uniform(0.1, 1.0, (P, L))
    z = gaussian_draws_per_row(mean, std, n, rng).reshape(P, n, L)
    np.testing.assert_allclose(z.mean(1), mean, atol=0.03)
    np.testing.assert_allclose(z.std(1), std, rtol=0.03)
    A = rng.standard_normal((P, L, L))
    cov = A @ A.transpose(0, 2, 1) + 0.1 * np.eye(L)
    z = gaussian_draws_per_row(mean, cov, n, rng).reshape(P, n, L)
    for p in range(P):
        np.testing.assert_allclose(np.cov(z[p], rowvar=False), cov[p], atol=0.1 * np.abs(cov[p]).max())


def test_frechet_distance():
    rng = np.random.default_rng(5)
    C = np.diag([1.0, 2.0, 0.5, 1.0])
    x = rng.multivariate_normal(np.zeros(4), C, size=50000)
    y = rng.multivariate_normal(np.zeros(4), C, size=50000)
    assert frechet_distance(x, y) < 0.01
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert frechet_distance(x, y + shift) == pytest.approx((shift ** 2).sum(), rel=0.02)
    # covariance term: N(0, 1) vs N(0, 4) in 1-D -> (2 - 1)^2
    assert frechet_distance(x[:, :1] / 1.0, 2 * y[:, :1]) == pytest.approx(1.0, rel=0.05)
    stat, p = ks_per_feature(x, y + shift)
    assert stat.shape == (4,) and p[2] > 1e-3 and p[0] < 1e-10
