"""Orthogonal rotations of the latent space (galdecomp.model.rotation)."""
import numpy as np
import pytest
from scipy.stats import special_ortho_group

from galdecomp.model.autoencoder import Autoencoder
from galdecomp.model.likelihood import GaussianLikelihood
from galdecomp.model.settings import Architecture
from galdecomp.model.rotation import (embedded, jacobians, loadings, oriented, orthomax, rotate_moments,
                                      stacked_loadings, stacked_varimax, varimax, whitened_jacobians)


def planted(C=24, L=4, seed=0):
    """A simple-structure loading matrix (one non-zero per row, every column used) and a randomly
    rotated copy."""
    rng = np.random.default_rng(seed)
    A = np.zeros((C, L))
    A[np.arange(C), np.arange(C) % L] = rng.uniform(0.5, 2.0, C) * rng.choice([-1, 1], C)
    Q = special_ortho_group.rvs(L, random_state=seed + 1)
    return A, A @ Q


def matched(B, A):
    """``B``'s columns signed and permuted to match ``A``'s."""
    corr = (B / np.linalg.norm(B, axis=0)).T @ (A / np.linalg.norm(A, axis=0))
    idx = np.argmax(np.abs(corr), axis=0)
    assert len(set(idx)) == A.shape[1]
    return B[:, idx] * np.sign(corr[idx, np.arange(A.shape[1])])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.0])
def test_orthomax_recovers_planted_simple_structure(normalize, gamma):
    A, M = planted()
    R = orthomax(M, gamma, normalize)
    assert np.allclose(R @ R.T, np.eye(4), atol=1e-12)
    assert np.allclose(matched(M @ R, A), A, atol=1e-8)


def test_varimax_leaves_simple_structure_alone():
    A, _ = planted(seed=3)
    R = varimax(A)
    assert np.allclose(matched(A @ R, A), A, atol=1e-10)


def test_oriented_signs_and_orders_columns():
    A, M = planted(seed=5)
    R = oriented(varimax(M), M)
    B = M @ R
    assert np.all(B.sum(axis=0) >= 0)
    power = np.sum(B ** 2, axis=0)
    assert np.all(np.diff(power) <= 1e-12)
    assert np.allclose(R @ R.T, np.eye(4))


@pytest.fixture
def small_model():
    model = Autoencoder(6, 3, Architecture(decoder_hidden=(8, 8), encoder_hidden=(8,)), GaussianLikelihood(0.05))
    params = model.init_params(7)
    params[model.slices["noise"]] = np.linspace(-1, 1, 6)
    rng = np.random.default_rng(2)
    return model, params, rng.standard_normal((50, 3)), rng.standard_normal((50, 6))


def test_rotated_decoder_reproduces_the_model(small_model):
    model, params, z, _ = small_model
    R = special_ortho_group.rvs(3, random_state=4)
    z_rot = z @ R                                   # z' = R^T z, row-wise
    assert np.allclose(model.decode(params, z_rot @ R.T), model.decode(params, z), atol=1e-12)
    J = whitened_jacobians(model, params, z)
    # the Jacobian in rotated coordinates is J R
    eps = 1e-6
    fd = (model.decode(params, (z_rot + eps * np.eye(3)[1]) @ R.T)
          - model.decode(params, (z_rot - eps * np.eye(3)[1]) @ R.T)) / (2 * eps)
    assert np.allclose((J @ R)[:, :, 1] * model.sigma(params), fd, atol=1e-7)


def test_loadings_are_rms_of_the_whitened_jacobians(small_model):
    model, params, z, _ = small_model
    J = whitened_jacobians(model, params, z)
    assert np.allclose(loadings(model, params, z, block=7), np.sqrt(np.mean(J ** 2, axis=0)))
    assert np.array_equal(stacked_loadings(model, params, z, noise_units=True)[6:12], J[1])
    assert np.allclose(stacked_loadings(model, params, z)[6:12], J[1] * model.sigma(params)[:, None], atol=1e-14)
    assert np.array_equal(stacked_loadings(model, params, z), jacobians(model, params, z).reshape(-1, 3))


def test_stacked_varimax_is_of_the_data_units_jacobians_not_the_noise(small_model):
    # the rotation of `fit --rotate varimax` does not depend on the learned noise, and it is the
    # varimax of the stacked Jacobians in the standardised data's units among the used features
    model, params, z, _ = small_model
    used = np.array([True, False, True])
    R = stacked_varimax(model, params, z, used)
    noisier = params.copy()
    noisier[model.slices["noise"]] = np.linspace(1, -1, 6)  # other noise levels, another order
    assert not np.allclose(model.sigma(noisier), model.sigma(params))
    assert np.allclose(stacked_varimax(model, noisier, z, used), R, atol=1e-12)
    S = stacked_loadings(model, params, z)[:, used]
    assert np.allclose(R, embedded(oriented(varimax(S, normalize=False), S), used), atol=1e-12)
    Sn = stacked_loadings(model, params, z, noise_units=True)[:, used]
    assert not np.allclose(R, embedded(oriented(varimax(Sn, normalize=False), Sn), used), atol=1e-3)


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
def test_rotated_std_is_the_diagonal_of_the_rotated_covariance(small_model, covariance):
    model, params, _, d = small_model
    model = Autoencoder(6, 3, Architecture(decoder_hidden=(8, 8), encoder_hidden=(8,), covariance=covariance),
                        GaussianLikelihood(0.05))
    mask = np.ones_like(d, bool)
    mean, cov = model.posterior_moments(params, d, mask, full_cov=True)
    _, std = model.posterior_moments(params, d, mask)
    R = special_ortho_group.rvs(3, random_state=9)
    expect = np.stack([R.T @ S @ R for S in cov])
    m2, s2 = rotate_moments(R, mean, std if covariance == "diagonal" else cov)[:2]
    assert np.allclose(m2, mean @ R)
    assert np.allclose(s2, np.sqrt(np.diagonal(expect, axis1=1, axis2=2)))
    c3 = rotate_moments(R, mean, cov)[2]
    assert np.allclose(c3, expect)


def test_embedded_rotates_the_used_features_only():
    R = special_ortho_group.rvs(2, random_state=0)
    used = np.array([False, True, False, True])
    E = embedded(R, used)
    z = np.arange(8.0).reshape(2, 4)
    assert np.allclose(E @ E.T, np.eye(4))
    assert np.array_equal((z @ E)[:, ~used], z[:, ~used])
    assert np.allclose((z @ E)[:, used], z[:, used] @ R)


# -- galdecomp fit --rotate ------------------------------------------------------------------------

def _truth_templates(root, names=("thermal_dust_353GHz", "synchrotron_408MHz", "cmb")):
    import yaml

    from conftest import write_catalog

    truth = yaml.safe_load((root / "sky" / "truth" / "catalog.yaml").read_text())
    entries = [dict(e, file=str(root / "sky" / "truth" / e["file"])) for e in truth["maps"] if e["name"] in names]
    (root / "templates").mkdir()
    return write_catalog(root / "templates", entries)


@pytest.mark.parametrize("method", ["varimax", "none"])
def test_fit_rotate_writes_the_rotated_maps_and_the_report_says_so(tmp_path, method):
    import healpy as hp

    from conftest import fit_small_sky
    from galdecomp import load
    from galdecomp.products.report import make_report

    root = fit_small_sky(tmp_path, "--max-epochs", "8", "--latent-dim", "4", "--rotate", method)
    run = root / "run"
    tm = load(str(run))
    R, order = tm.rotation, tm.feature_order
    assert np.allclose(R @ R.T, np.eye(4))
    assert (run / "rotation.csv").exists() == (method != "none")
    assert np.array_equal(R, np.eye(4)) == (method == "none")
    mean = np.array(hp.read_map(str(run / "latent_mean.fits"), field=None, nest=True))
    std = np.array(hp.read_map(str(run / "latent_std.fits"), field=None, nest=True))
    maps = tm.encode_maps(str(root / "sky" / "catalog.yaml"))
    assert np.allclose(maps.mean, mean, atol=1e-6) and np.allclose(maps.std, std, atol=1e-6)
    raw_mean, raw_std = tm.encode(tm.load_rows())
    rot_mean, rot_std = rotate_moments(R, raw_mean, raw_std)
    assert np.allclose(mean, rot_mean[:, order].T, atol=1e-6)
    assert np.allclose(std, rot_std[:, order].T, atol=1e-6)
    # the same model: decoding the rotated maps in the model's own latents gives the reconstruction
    z_rot = np.empty((mean.shape[1], 4))
    z_rot[:, order] = mean.T
    recon = np.array(hp.read_map(str(run / "reconstruction.fits"), field=None, nest=True))
    assert np.allclose(tm.decode(z_rot @ R.T), recon.T, rtol=1e-5, atol=1e-6 * np.abs(recon).max())
    res = make_report(str(run), _truth_templates(root))
    assert res["rotation"] == method
    assert f"- latent features rotated: {method} — " in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
def test_products_of_the_rotated_features(covariance):
    from galdecomp.products.run_outputs import compute_products, feature_significance
    from test_memory import _Identity, rows, small_model

    model, params = small_model(covariance, seed=2)
    params = model.init_params(2)                        # a decoder strong enough to use every feature
    params[model.slices["noise"]] = -2.0
    data, mask = rows(600, seed=3)
    mean, std = model.posterior_moments(params, data, mask)
    cov = model.posterior_moments(params, data, mask, full_cov=True)[1]
    cfg = {"covariance": covariance, "rotation": {"method": "varimax"}}
    out = compute_products(_Identity(), model, params, np.where(mask, data, np.nan), mean, std, cfg, block=100)
    R, order, loc = out["rotation"], out["order"], out["rows"]
    assert np.allclose(R @ R.T, np.eye(len(R))) and not np.allclose(R, np.eye(len(R)))
    rcov = np.einsum("li,plm,mj->pij", R, cov, R)
    np.testing.assert_allclose(loc["mean"], (mean @ R)[:, order], atol=1e-12)
    np.testing.assert_allclose(loc["std"], np.sqrt(np.einsum("pii->pi", rcov))[:, order], atol=1e-12)
    np.testing.assert_allclose(out["significance"],
                               feature_significance(model, params, data, mask, mean @ R, rotation=R))
    assert np.allclose(loc["recon"], model.decode(params, mean))  # the model's own reconstruction
    if covariance == "fisher":
        iu = np.triu_indices(len(R))
        np.testing.assert_allclose(loc["cov"], rcov[:, order][:, :, order][:, iu[0], iu[1]], atol=1e-12)


def test_resume_with_another_rotation_rewrites_the_maps_and_rotation_csv(tmp_path):
    import healpy as hp

    from conftest import fit_small_sky
    from galdecomp import load
    from galdecomp.cli import main

    root = fit_small_sky(tmp_path, "--max-epochs", "4", "--latent-dim", "3", "--rotate", "varimax")
    run = root / "run"
    assert (run / "rotation.csv").exists()
    assert main(["fit", str(root / "sky" / "catalog.yaml"), "--out", str(run), "--resume", "--rotate", "none"]) == 0
    tm = load(str(run))
    assert not (run / "rotation.csv").exists() and np.array_equal(tm.rotation, np.eye(3))
    mean = np.array(hp.read_map(str(run / "latent_mean.fits"), field=None, nest=True))
    np.testing.assert_allclose(mean, tm.encode(tm.load_rows())[0][:, tm.feature_order].T, atol=1e-6)
