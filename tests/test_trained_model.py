"""The trained model as an object (galdecomp.load) and the likelihood / prior families."""
import os

import healpy as hp
import nifty8 as ift
import numpy as np
import pytest

import galdecomp
from galdecomp.catalog import load_catalog, read_catalog
from galdecomp.cli import main
from galdecomp.errors import InputError
from galdecomp.inference.conditional import latent_map
from galdecomp.inference.trained import TrainedModel
from galdecomp.inference.minibatches import split_rows
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.inference.objective import ELBOObjective
from galdecomp.model.settings import Architecture
from galdecomp.model.fisher import FisherGaussian
from galdecomp.model.likelihood import GaussianLikelihood
from galdecomp.model.mlp import MLP, unpack_params
from galdecomp.model.operators import MaskedGaussianEnergy
from galdecomp.model.prior import STANDARD_NORMAL

FAST = ["--max-epochs", "4", "--latent-dim", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A diagonal, a Fisher and a scaled-Fisher run on a small simulated sky with missing pixels."""
    root = tmp_path_factory.mktemp("trained")
    sky = root / "sky"
    assert main(["simulate", "--nside", "8", "--out", str(sky), "--no-plot"]) == 0
    out = {}
    for cov in ("diagonal", "fisher", "fisher-scaled"):
        out[cov] = str(root / cov)
        assert main(["fit", str(sky / "catalog.yaml"), "--out", out[cov], "--covariance", cov] + FAST) == 0
    return str(sky / "catalog.yaml"), out


def sky_rows(model):
    """The run's data, rows x channels in physical units (NESTED, as the fit reads them)."""
    ds = load_catalog(read_catalog(model.data["path"]), nside=model.data["nside"], nest=True)
    return ds.values.T


@pytest.mark.parametrize("cov", ["diagonal", "fisher", "fisher-scaled"])
def test_load_reproduces_the_latent_maps_exactly(runs, cov):
    model = galdecomp.load(runs[1][cov])
    assert model.data["kind"] == "sky" and model.data["nside"] == 8
    from galdecomp.model.rotation import rotate_moments

    mean, cov_ = model.encode(sky_rows(model), full_cov=True)
    mean, std_ = rotate_moments(model.rotation, mean, cov_)[:2]  # the run's maps are of the rotated latents
    fits = np.array(hp.read_map(os.path.join(runs[1][cov], "latent_mean.fits"), field=None, nest=True))
    np.testing.assert_array_equal(fits.T, mean[:, model.feature_order].astype(fits.dtype))
    std = np.array(hp.read_map(os.path.join(runs[1][cov], "latent_std.fits"), field=None, nest=True))
    np.testing.assert_allclose(std.T, std_[:, model.feature_order], rtol=1e-6)


def test_decode_and_units_round_trip(runs):
    model = galdecomp.load(runs[1]["diagonal"])
    d = sky_rows(model)[:50]
    np.testing.assert_allclose(model.physical(model.standardise(d)), d, rtol=1e-9, atol=1e-12)
    z = np.zeros((2, model.latent_dim))
    np.testing.assert_allclose(model.decode(z), model.physical(model.decode(z, physical=False)))
    s = model.sample(400, np.random.default_rng(0))
    assert s["physical"].shape == (400, model.n_features) and np.isfinite(s["physical"]).all()
    # with noise, the spread around f(z) is the model's sigma
    resid = s["standardised"] - model.decode(s["z"], physical=False)
    np.testing.assert_allclose(resid.std(0), model.sigma, rtol=0.25)


def test_score_rows_sum_to_the_training_objective(runs):
    model = galdecomp.load(runs[1]["diagonal"])
    y = model.standardise(sky_rows(model))
    rows = split_rows(len(y), 0.1, 0)[1]
    xi = np.random.default_rng(5).standard_normal((len(rows), model.latent_dim))
    obj = ELBOObjective(model.model, y, len(y) - len(rows))
    value, terms = obj.value(model.params, rows, xi)
    sc = model.score_rows(y[rows], standardised=True, xi=xi)
    prior = ELBOObjective(model.model, y, len(y) - len(rows))._op.terms(
        model.model.position(model.params, obj._op.domain), y[rows], None, xi)["prior"]
    assert np.isclose(-sc["elbo"].mean() + prior, value, rtol=1e-10)
    assert np.isclose(sc["nll"].mean(), terms["nll"]) and np.isclose(sc["kl"].mean(), terms["kl"])
    assert np.all(sc["chi2"] >= 0) and np.all(sc["n_observed"] <= model.n_features)


def test_condition_agrees_with_the_fisher_posterior_on_full_data(runs):
    model = galdecomp.load(runs[1]["fisher"])
    d = sky_rows(model)
    d = d[np.isfinite(d).all(1)][:300]
    res = model.condition(d)
    assert res["converged"].all()
    enc_mean = model.encode(d)[0]
    # the covariance at the MAP is the Fisher family's M^-1 there
    y, m = model._rows(d, None, False)
    _, cov_at_map = FisherGaussian().mean_and_cov(res["mean"], model.model.decoder, model.model.split(model.params)[1],
                                                  m / model.sigma ** 2)
    np.testing.assert_allclose(res["cov"], cov_at_map, rtol=1e-8, atol=1e-12)
    # the amortised Fisher posterior (4 epochs of training) is close to the MAP in posterior sigmas
    shift = (enc_mean - res["mean"]) / res["std"]
    assert np.median(np.abs(shift)) < 1.0
    # and the MAP has the lower energy
    e = lambda z: model.model.nll_rows(model.params, y, m, z) - STANDARD_NORMAL.log_density(z)
    assert np.all(e(res["mean"]) <= e(enc_mean) + 1e-9)


def test_condition_is_exact_for_a_linear_decoder():
    rng = np.random.default_rng(3)
    L, C, P = 3, 7, 200
    dec = MLP([L, C])
    theta = rng.normal(size=dec.n_params)
    (W, b), = unpack_params(theta, dec.sizes)
    sigma = rng.uniform(0.2, 0.5, C)
    data = rng.standard_normal((P, L)) @ W + b + sigma * rng.standard_normal((P, C))
    mask = rng.random((P, C)) > 0.3
    w = mask / sigma ** 2
    res = latent_map(dec, theta, np.where(mask, data, 0.0), w, np.zeros((P, L)), tol=1e-9)
    assert res["converged"].all()
    prec = np.einsum("lc,pc,kc->plk", W, w, W) + np.eye(L)
    cov = np.linalg.inv(prec)
    mean = np.einsum("plk,pk->pl", cov, (w * (np.where(mask, data, 0.0) - b)) @ W.T)
    np.testing.assert_allclose(res["mean"], mean, atol=1e-8)
    np.testing.assert_allclose(res["cov"], cov, rtol=1e-10)


def test_a_run_of_the_previous_release_loads(runs, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(runs[1]["diagonal"], old)
    os.unlink(old / "model.npz")
    a, b = galdecomp.load(runs[1]["diagonal"]), galdecomp.load(str(old))
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.model.floor, b.model.floor)
    np.testing.assert_array_equal(a.feature_order, b.feature_order)
    assert a.units == b.units and a.data == b.data
    os.unlink(old / "noise.csv")
    with pytest.raises(InputError, match="has not finished"):
        galdecomp.load(str(old))
    with pytest.raises(InputError, match="not a galdecomp run folder"):
        galdecomp.load(str(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="model.npz: not a galdecomp model"):
        galdecomp.load(str(tmp_path / "bad"))


# -- the families against the fused kernels --------------------------------------------------

def small_problem(seed=0, B=40, C=5, L=3):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(B, C))
    mask = rng.random((B, C)) > 0.25
    return rng, data, mask, rng.normal(size=(B, C)), 0.3 * rng.normal(size=C)


def test_gaussian_likelihood_equals_the_fused_energy():
    rng, data, mask, pred, s = small_problem()
    floor = np.full(data.shape[1], 0.05)
    lh = GaussianLikelihood(floor, 0.5, 1.0)
    op = MaskedGaussianEnergy(np.where(mask, data, np.nan), mask, GaussianLikelihood(floor, 0.5, 1.0))
    x = ift.MultiField.from_dict({"prediction": ift.makeField(op.domain["prediction"], pred),
                                  "noise": ift.makeField(op.domain["noise"], s)})
    lin = op(ift.Linearization.make_var(x, want_metric=True))
    assert np.isclose(lin.val.val, lh.nll_rows(data, mask, pred, s).sum(), rtol=1e-12)
    grad = lin.jac.adjoint(ift.Field.scalar(1.0))
    np.testing.assert_allclose(grad["prediction"].val, lh.grad_pred(data, mask, pred, s), rtol=1e-12)
    probe = ift.from_random(op.domain["prediction"])
    met = lin.metric(ift.MultiField.from_dict({"prediction": probe,
                                               "noise": ift.full(op.domain["noise"], 0.0)}))
    np.testing.assert_allclose(met["prediction"].val, lh.metric_weights(mask, s) * probe.val, rtol=1e-12)
    ift.extra.check_operator(op, x, ntries=3)


@pytest.mark.parametrize("covariance", ["diagonal", "fisher"])
def test_per_row_elbo_terms_are_the_families(covariance):
    rng, data, mask, _, _ = small_problem(1)
    model = Autoencoder(data.shape[1], 3, Architecture((8,), (8,), covariance=covariance), GaussianLikelihood(0.02))
    params = model.init_params(2)
    xi = rng.standard_normal((len(data), 3))
    op = model.elbo(data, mask, xi, len(data))
    t = op.terms(model.position(params, op.domain), per_row=True)
    th_e, th_d, s = model.split(params)
    enc = model.encoder.forward(th_e, np.concatenate([np.where(mask, data, 0), ~mask], 1))  # 1 where missing
    z, kl, _ = model.posterior.forward(enc, xi, model.decoder, th_d, mask / model.sigma(params) ** 2)
    np.testing.assert_allclose(t["nll_rows"], model.likelihood.nll_rows(data, mask, model.decode(params, z), s),
                               rtol=1e-10)
    mean, cov = model.posterior.mean_and_cov(enc, model.decoder, th_d, mask / model.sigma(params) ** 2)
    # KL[N(mean, cov) || N(0, 1)] in closed form, independent of the families' code
    L = mean.shape[1]
    ref = 0.5 * (np.trace(cov, axis1=1, axis2=2) + (mean ** 2).sum(1) - L - np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(t["kl_rows"], ref, rtol=1e-10)
    np.testing.assert_allclose(kl, ref, rtol=1e-10)


def test_standard_normal_prior():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4))
    from scipy.stats import multivariate_normal

    np.testing.assert_allclose(STANDARD_NORMAL.log_density(z), multivariate_normal(np.zeros(4)).logpdf(z))
    mu, ls = rng.normal(size=(6, 4)), 0.3 * rng.normal(size=(6, 4))
    kl, d_mu, d_ls = STANDARD_NORMAL.kl_diagonal(mu, ls)
    eps = 1e-6
    num = (STANDARD_NORMAL.kl_diagonal(mu, ls + eps)[0] - STANDARD_NORMAL.kl_diagonal(mu, ls - eps)[0]) / (2 * eps)
    np.testing.assert_allclose(num, d_ls.sum(1), rtol=1e-6)
    Li = np.zeros((6, 4, 4))
    Li[:, np.arange(4), np.arange(4)] = np.exp(ls)  # M = diag(exp(-2 ls)) = Lc Lc^T, Lc^-1 = diag(exp(ls))
    np.testing.assert_allclose(STANDARD_NORMAL.kl_precision(mu, Li, -2 * ls.sum(1))[0], kl, rtol=1e-12)


def test_condition_with_mgvi_samples(runs):
    model = galdecomp.load(runs[1]["diagonal"])
    d = sky_rows(model)[:100]
    res = model.condition(d, n_samples=2)
    assert res["samples"].shape == (4, 100, model.latent_dim)
    # MGVI samples start at the MAP with the same metric: centred on it, spread like the Laplace std
    assert np.median(np.abs(res["samples"].mean(0) - res["mean"]) / res["std"]) < 0.3
    assert 0.5 < np.median(res["samples"].std(0) / res["std"]) < 1.5


# -- the user-level API: encode_maps, galdecomp.fit, sample's default ------------------------------

def test_encode_maps_gives_the_run_s_latent_maps(runs):
    catalog, run = runs[0], runs[1]["diagonal"]
    model = galdecomp.load(run)
    fits = np.array(hp.read_map(os.path.join(run, "latent_mean.fits"), field=None, nest=True))
    std = np.array(hp.read_map(os.path.join(run, "latent_std.fits"), field=None, nest=True))
    out = model.encode_maps(catalog)
    assert out.nest and out.nside == 8 and out.names == [f"feature_{i:02d}" for i in (1, 2, 3)]
    assert out.mean.shape == out.std.shape == (3, hp.nside2npix(8))
    np.testing.assert_array_equal(out.latent_index, model.feature_order)
    np.testing.assert_array_equal(out.mean.astype(fits.dtype), fits)
    np.testing.assert_allclose(out.std, std, rtol=1e-6)
    # the same maps as arrays (RING, as healpy reads them): a dict by channel name, or (C, npix)
    ring = load_catalog(catalog, nside=8).values
    by_name = dict(zip(model.names, ring))
    for given in (by_name, ring, np.where(np.isnan(ring), hp.UNSEEN, ring)):
        np.testing.assert_array_equal(model.encode_maps(given).mean, out.mean)
    r = model.encode_maps(by_name, nest=False)
    assert not r.nest
    np.testing.assert_array_equal(hp.reorder(r.mean, r2n=True), out.mean)
    np.testing.assert_array_equal(model.encode_maps(hp.reorder(ring, r2n=True), input_nest=True).std, out.std)
    # a channel left out: an error, or missing everywhere with allow_missing
    part = {k: v for k, v in by_name.items() if k != model.names[0]}
    with pytest.raises(InputError, match=f"no map for channel '{model.names[0]}'"):
        model.encode_maps(part)
    some = model.encode_maps(part, allow_missing=True)
    gone = ring.copy()
    gone[0] = np.nan
    np.testing.assert_array_equal(some.mean, model.encode_maps(gone).mean)
    with pytest.raises(InputError, match="'nope' is not a channel of the run"):
        model.encode_maps({**by_name, "nope": ring[0]})
    with pytest.raises(InputError, match="not a full HEALPix map"):
        model.encode_maps(ring[:, :100])
    model.data = dict(kind="table", path="x.npy")
    with pytest.raises(InputError, match="fitted to a table, not to maps"):
        model.encode_maps(ring)


def test_fit_in_python_is_the_command_line_fit(runs, tmp_path):
    catalog, run = runs
    cli = galdecomp.load(run["diagonal"])
    model = galdecomp.fit(catalog, tmp_path / "py", max_epochs=4, latent_dim=3, covariance="diagonal")
    assert isinstance(model, TrainedModel)
    np.testing.assert_array_equal(model.params, cli.params)
    np.testing.assert_array_equal(model.feature_order, cli.feature_order)
    assert os.path.isfile(tmp_path / "py" / "latent_mean.fits")
    # the run's own config.yaml names its catalog and settings: the same fit again
    again = galdecomp.fit(os.path.join(run["diagonal"], "config.yaml"), str(tmp_path / "again"))
    np.testing.assert_array_equal(again.params, cli.params)
    with pytest.raises(InputError, match="exists"):
        galdecomp.fit(catalog, tmp_path / "py", max_epochs=4, latent_dim=3)
    with pytest.raises(InputError, match="unknown setting 'latent_dims'"):
        galdecomp.fit(catalog, tmp_path / "bad", latent_dims=3)


def test_sample_defaults_to_the_latent_transform(runs):
    model = galdecomp.load(runs[1]["diagonal"])
    assert model.transform is not None
    a = model.sample(50, np.random.default_rng(1))
    np.testing.assert_array_equal(a["z"], model.sample(50, np.random.default_rng(1), source="transformed")["z"])
    model.transform = None
    np.testing.assert_array_equal(model.sample(50, np.random.default_rng(1))["z"],
                                  model.sample(50, np.random.default_rng(1), source="prior")["z"])
