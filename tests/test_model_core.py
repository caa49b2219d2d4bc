"""Model core: MLP kernels, NIFTy operators, noise model, posteriors, amortised ELBO."""
import itertools
import logging

import numpy as np
import nifty8 as ift
import pytest

from galdecomp.model import noise
from galdecomp.model.elbo import AmortisedELBO, ELBOSettings
from galdecomp.model.likelihood import GaussianLikelihood
from galdecomp.model.mlp import MLP, blas_threads, unpack_params
from galdecomp.model.operators import (DecoderLikelihood, MaskedGaussianEnergy, MLPOperator,
                                       NoiseInvVar)
from galdecomp.model.families import POSTERIORS
from galdecomp.model.posteriors import DiagonalGaussian

P, C, L = 23, 5, 3


@pytest.fixture(autouse=True)
def _seed():
    ift.random.push_sseq_from_seed(11)
    yield
    ift.random.pop_sseq()


def _problem(seed=0, missing=0.25):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((P, C))
    mask = rng.random((P, C)) > missing
    data[~mask] = np.nan
    return rng, data, mask


def _pos(op, rng, scale=1.0):
    return ift.MultiField.from_dict({k: ift.makeField(op.domain[k], scale * rng.standard_normal(
        op.domain[k].shape)) for k in op.domain.keys()})


class _SlowPathLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.hits = []

    def emit(self, record):
        if "SlowPartialConstantOperator" in record.getMessage():
            self.hits.append(record.getMessage())


def _assert_fast_constants(op, loc):
    """Every proper subset of keys held constant gives the operator's own class back."""
    log = _SlowPathLog()
    ift.logger.addHandler(log)
    try:
        keys = op.domain.keys()
        for n in range(1, len(keys)):
            for cst in itertools.combinations(keys, n):
                _, op0 = op.simplify_for_constant_input(loc.extract_by_keys(cst))
                assert type(op0) is type(op), type(op0)
                assert set(op0.domain.keys()) == set(keys) - set(cst)
                var = loc.extract(op0.domain)
                np.testing.assert_allclose(op0(var).val, op(loc).val, rtol=1e-14)
    finally:
        ift.logger.removeHandler(log)
    assert not log.hits
    # NIFTy's generic wrapper would be an _OpChain ending in an InsertionOperator
    from nifty8.operators.operator import _OpChain
    assert not isinstance(op0, _OpChain)


# -- MLP kernels ------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["tanh", "softplus"])
@pytest.mark.parametrize("block_size", [4, 4096])
def test_mlp_vjp_jvp_finite_differences(activation, block_size):
    rng = np.random.default_rng(1)
    m = MLP([4, 7, 6, 3], activation, block_size=block_size)
    theta = m.init_scales() * rng.standard_normal(m.n_params)
    x = rng.standard_normal((11, 4))
    g_y = rng.standard_normal((11, 3))
    dth, dx = rng.standard_normal(m.n_params), rng.standard_normal(x.shape)
    eps = 1e-6
    num = (m.forward(theta + eps * dth, x + eps * dx) - m.forward(theta - eps * dth, x - eps * dx)) / (2 * eps)
    y, dy = m.jvp(theta, x, dth, dx)
    np.testing.assert_allclose(y, m.forward(theta, x), rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(dy, num, rtol=1e-6, atol=1e-8)
    y2, g_th, g_x = m.vjp(theta, x, g_y)
    np.testing.assert_allclose(y2, y, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.sum(g_y * dy), g_th @ dth + np.sum(g_x * dx), rtol=1e-12)
    np.testing.assert_allclose(m.jvp(theta, x, dth, None)[1] + m.jvp(theta, x, None, dx)[1], dy,
                               rtol=1e-12, atol=1e-14)
    # callable cotangent = fused loss; selective outputs
    _, g_th2, g_x2 = m.vjp(theta, x, lambda yb, sl: g_y[sl])
    np.testing.assert_allclose(g_th2, g_th, rtol=1e-14)
    np.testing.assert_allclose(g_x2, g_x, rtol=1e-14)
    yn, g_th3, g_xn = m.vjp(theta, x, g_y, want_x=False, return_y=False)
    assert yn is None and g_xn is None
    np.testing.assert_allclose(g_th3, g_th, rtol=1e-14)


def test_mlp_layout_and_scales():
    m = MLP([3, 4, 2])
    assert m.n_params == 3 * 4 + 4 + 4 * 2 + 2
    sc = m.init_scales()
    (W0, b0), (W1, b1) = unpack_params(sc, m.sizes)
    assert np.allclose(W0, 1 / np.sqrt(3)) and np.allclose(W1, 1 / np.sqrt(4))
    assert np.allclose(b0, 0.1) and np.allclose(b1, 0.1)
    theta = np.arange(m.n_params, dtype=float)
    x = np.random.default_rng(0).standard_normal((5, 3))
    (W0, b0), (W1, b1) = unpack_params(theta * 1e-2, m.sizes)
    ref = np.tanh(x @ W0 + b0) @ W1 + b1
    np.testing.assert_allclose(m.forward(theta * 1e-2, x), ref, rtol=1e-14)


def test_mlp_passes_leave_theta_alone_and_return_fresh_gradients():
    """The layers are views of theta (no copies): a pass must not write into it, and the
    gradient it returns must be a new array each call."""
    rng = np.random.default_rng(4)
    m = MLP([5, 16, 3])
    theta = m.init_scales() * rng.standard_normal(m.n_params)
    keep = theta.copy()
    x, g_y = rng.standard_normal((40, 5)), rng.standard_normal((40, 3))
    _, g1, _ = m.vjp(theta, x, g_y)
    _, g2, _ = m.vjp(theta, x, g_y)
    np.testing.assert_array_equal(theta, keep)
    assert g1 is not g2 and not np.shares_memory(g1, theta)
    np.testing.assert_array_equal(g1, g2)


def test_blas_threads_limits_and_restores():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        with blas_threads(1):
            assert {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"} == {1}
        assert {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"} == {2}
        with threadpoolctl.threadpool_limits(1, user_api="blas"), blas_threads(1):  # already 1: left as is
            assert {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"} == {1}


def test_mlp_float32_agrees_with_float64():
    rng = np.random.default_rng(2)
    sizes = [10, 64, 64, 35]
    m64, m32 = MLP(sizes, block_size=300), MLP(sizes, block_size=300, dtype=np.float32)
    theta = m64.init_scales() * rng.standard_normal(m64.n_params)
    x, g_y = rng.standard_normal((1000, 10)), rng.standard_normal((1000, 35))
    d_th, d_x = rng.standard_normal(m64.n_params), rng.standard_normal(x.shape)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    for a, b in zip(m32.vjp(theta, x, g_y), m64.vjp(theta, x, g_y)):
        assert a.dtype == np.float64
        assert rel(a, b) < 1e-5
    for a, b in zip(m32.jvp(theta, x, d_th, d_x), m64.jvp(theta, x, d_th, d_x)):
        assert rel(a, b) < 1e-5


# -- noise model ------------------------------------------------------------------------------
def test_noise_model_derivatives():
    rng = np.random.default_rng(3)
    s, floor = rng.standard_normal(C), np.abs(rng.standard_normal(C)) * 0.1
    kw = dict(floor=floor, sigma0=0.5, tau=1.3)
    np.testing.assert_allclose(noise.sigma(s, **kw) ** 2,
                               floor ** 2 + (0.5 * np.exp(1.3 * s)) ** 2, rtol=1e-14)
    w, dw = noise.d_inv_var_ds(s, **kw)
    eps = 1e-6
    num = (noise.inv_var(s + eps, **kw) - noise.inv_var(s - eps, **kw)) / (2 * eps)
    np.testing.assert_allclose(w, 1 / noise.variance(s, **kw), rtol=1e-14)
    np.testing.assert_allclose(dw, num, rtol=1e-7)
    num = (np.log(noise.variance(s + eps, **kw)) - np.log(noise.variance(s - eps, **kw))) / (2 * eps)
    np.testing.assert_allclose(noise.d_log_var_ds(s, **kw), num, rtol=1e-7)
    assert np.all(np.isfinite(noise.inv_var(np.array([-1e4, 1e4]), floor=0.1)))
    op = NoiseInvVar(ift.UnstructuredDomain(C), floor, 0.5, 1.3)
    ift.extra.check_operator(op, ift.makeField(op.domain, s), ntries=3)


def test_likelihood_noise_gradient_finite_differences():
    rng, data, mask = _problem(4)
    lik = MaskedGaussianEnergy(data, mask, GaussianLikelihood(0.05, tau=0.7))
    loc = _pos(lik, rng)
    g = lik(ift.Linearization.make_var(loc)).gradient["noise"].val
    s0 = loc["noise"].val
    eps = 1e-6
    for c in range(C):
        e = np.zeros(C)
        e[c] = eps
        up = lik(ift.MultiField.from_dict({"prediction": loc["prediction"],
                                           "noise": ift.makeField(lik.domain["noise"], s0 + e)}))
        dn = lik(ift.MultiField.from_dict({"prediction": loc["prediction"],
                                           "noise": ift.makeField(lik.domain["noise"], s0 - e)}))
        np.testing.assert_allclose((up.val - dn.val) / (2 * eps), g[c], rtol=1e-6, atol=1e-8)


# -- NIFTy operators --------------------------------------------------------------------------
@pytest.mark.parametrize("row", [ift.HPSpace(2), ift.UnstructuredDomain(13)])
def test_mlp_operator(row):
    rng = np.random.default_rng(5)
    op = MLPOperator(MLP([3, 6, 4], block_size=5), row, "latent", "weights")
    assert op.target.shape == (row.shape[0], 4)
    loc = _pos(op, rng)
    ift.extra.check_operator(op, loc, ntries=3)
    _assert_fast_constants(op, loc)


def test_masked_gaussian_energy():
    rng, data, mask = _problem(6)
    lik = MaskedGaussianEnergy(data, mask, GaussianLikelihood(0.05))
    loc = _pos(lik, rng)
    ift.extra.check_operator(lik, loc, ntries=3)
    _assert_fast_constants(lik, loc)
    # explicit value: 0.5 sum m [r^2/sigma^2 + log(2 pi sigma^2)]
    f, s = loc["prediction"].val, loc["noise"].val
    var = noise.variance(s, 0.05)
    ref = 0.5 * np.sum(np.where(mask, (np.nan_to_num(data) - f) ** 2 / var + np.log(2 * np.pi * var), 0))
    np.testing.assert_allclose(lik(loc).val, ref, rtol=1e-13)


def test_decoder_likelihood_matches_composition():
    rng, data, mask = _problem(7)
    row = ift.HPSpace(1)
    data, mask = data[:12], mask[:12]
    dl = DecoderLikelihood(MLP([L, 8, C], block_size=5), data, mask, GaussianLikelihood(0.05), row_domain=row)
    loc = _pos(dl, rng)
    ift.extra.check_operator(dl, loc, ntries=3)
    _assert_fast_constants(dl, loc)
    lik = MaskedGaussianEnergy(data, mask, GaussianLikelihood(0.05), row_domain=row)
    comp = lik @ (dl.mlp_operator.ducktape_left("prediction")
                  + ift.FieldAdapter(lik.domain["noise"], "noise").ducktape_left("noise"))
    a, b = dl(ift.Linearization.make_var(loc)), comp(ift.Linearization.make_var(loc))
    np.testing.assert_allclose(a.val.val, b.val.val, rtol=1e-13)
    for k in loc.keys():
        np.testing.assert_allclose(a.gradient[k].val, b.gradient[k].val, rtol=1e-11, atol=1e-12)
    # MGVI metric J^T F J equals the one NIFTy builds for the composition
    v = _pos(dl, rng)
    ma = dl(ift.Linearization.make_var(loc, True)).metric(v)
    mb = comp(ift.Linearization.make_var(loc, True)).metric(v)
    for k in v.keys():
        np.testing.assert_allclose(ma[k].val, mb[k].val, rtol=1e-12, atol=1e-12)
    # float32 fused pass agrees with float64
    dl32 = DecoderLikelihood(MLP([L, 8, C], block_size=5, dtype=np.float32), data, mask,
                             GaussianLikelihood(0.05), row_domain=row)
    c = dl32(ift.Linearization.make_var(loc))
    np.testing.assert_allclose(c.val.val, a.val.val, rtol=1e-5)
    for k in loc.keys():
        ga, gc = a.gradient[k].val, c.gradient[k].val
        assert np.linalg.norm(gc - ga) / np.linalg.norm(ga) < 1e-5


def test_masking_ignores_missing_values():
    rng, data, mask = _problem(8)
    data2 = data.copy()
    data2[~mask] = 1e3 * rng.standard_normal((~mask).sum())
    dec, enc = MLP([L, 8, C]), MLP([2 * C, 8, 2 * L])
    xi = rng.standard_normal((P, L))
    pairs = [(MaskedGaussianEnergy(data, mask), MaskedGaussianEnergy(data2, mask)),
             (DecoderLikelihood(dec, data, mask), DecoderLikelihood(dec, data2, mask)),
             (AmortisedELBO(data, mask, xi, enc, dec, "diagonal"),
              AmortisedELBO(data2, mask, xi, enc, dec, "diagonal"))]
    for a, b in pairs:
        loc = _pos(a, rng, 0.5)
        la, lb = a(ift.Linearization.make_var(loc)), b(ift.Linearization.make_var(loc))
        assert np.isfinite(la.val.val)
        assert la.val.val == lb.val.val
        for k in loc.keys():
            np.testing.assert_array_equal(la.gradient[k].val, lb.gradient[k].val)
    # an observed value does change it
    data3 = np.nan_to_num(data)
    data3[mask.nonzero()[0][0], mask.nonzero()[1][0]] += 1.0
    assert MaskedGaussianEnergy(data3, mask)(loc_ := _pos(pairs[0][0], rng)).val != \
        MaskedGaussianEnergy(data, mask)(loc_).val


# -- posteriors and ELBO ----------------------------------------------------------------------
def test_diagonal_posterior_backward():
    rng = np.random.default_rng(9)
    post = POSTERIORS["diagonal"]()
    assert isinstance(post, DiagonalGaussian) and post.n_encoder_outputs(L) == 2 * L
    e, xi = rng.standard_normal((6, 2 * L)), rng.standard_normal((6, L))
    gz, gkl = rng.standard_normal((6, L)), rng.standard_normal(6)
    z, kl, ctx = post.forward(e, xi, None, None, None)
    ge, gth, g_inv_var = post.backward(ctx, gz, gkl)
    assert gth is None and g_inv_var is None
    de, eps = rng.standard_normal(e.shape), 1e-6
    zp, klp, _ = post.forward(e + eps * de, xi, None, None, None)
    zm, klm, _ = post.forward(e - eps * de, xi, None, None, None)
    num = np.sum(gz * (zp - zm)) / (2 * eps) + gkl @ (klp - klm) / (2 * eps)
    np.testing.assert_allclose(np.sum(ge * de), num, rtol=1e-7)
    mean, cov = post.mean_and_cov(e)
    np.testing.assert_allclose(mean, e[:, :L])
    np.testing.assert_allclose(np.diagonal(cov, axis1=1, axis2=2), np.exp(2 * e[:, L:]))
    # KL vs Monte Carlo-free closed form for one row
    mu, sd = e[0, :L], np.exp(e[0, L:])
    np.testing.assert_allclose(kl[0], 0.5 * np.sum(mu ** 2 + sd ** 2 - 1 - np.log(sd ** 2)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_amortised_elbo(dtype):
    rng, data, mask = _problem(10)
    xi = rng.standard_normal((P, L))
    enc = MLP([2 * C, 8, 2 * L], block_size=6, dtype=dtype)
    dec = MLP([L, 7, C], block_size=4, dtype=dtype)
    el = AmortisedELBO(data, mask, xi, enc, dec, "diagonal", GaussianLikelihood(0.05),
                       ELBOSettings(beta=0.7, n_total=500))
    loc = _pos(el, rng, 0.5)
    if dtype == np.float64:
        ift.extra.check_operator(el, loc, ntries=3, metric_sampling=False)
        _assert_fast_constants(el, loc)
    t = el.terms(loc, per_row=True)
    np.testing.assert_allclose(t["value"], t["nll"] + 0.7 * t["kl"] + t["prior"], rtol=1e-14)
    np.testing.assert_allclose(t["nll_rows"].mean(), t["nll"], rtol=1e-12)
    np.testing.assert_allclose(t["kl_rows"].mean(), t["kl"], rtol=1e-12)
    np.testing.assert_allclose(el.evaluate(loc), el(loc).val, rtol=1e-14)
    np.testing.assert_allclose(el(ift.Linearization.make_var(loc)).val.val, el(loc).val, rtol=1e-12)
    # explicit value with numpy; the encoder's second half of inputs: 1 where missing (default)
    # or the mask itself (runs before the fourth fit-quality pass)
    th_e = enc.init_scales() * loc["encoder"].val
    th_d = dec.init_scales() * loc["decoder"].val
    for mask_input, indicator in (("missing", ~mask), ("observed", mask)):
        op = el if mask_input == "missing" else AmortisedELBO(data, mask, xi, enc, dec, "diagonal", GaussianLikelihood(0.05),
                                                              ELBOSettings(beta=0.7, n_total=500, mask_input=mask_input))
        eo = MLP(enc.sizes).forward(th_e, np.concatenate([np.where(mask, data, 0), indicator], 1))
        mu, sd = eo[:, :L], np.exp(eo[:, L:])
        f = MLP(dec.sizes).forward(th_d, mu + sd * xi)
        var = noise.variance(loc["noise"].val, 0.05)
        nll = 0.5 * np.sum(np.where(mask, (np.nan_to_num(data) - f) ** 2 / var + np.log(2 * np.pi * var), 0))
        kl = 0.5 * np.sum(mu ** 2 + sd ** 2 - 1 - 2 * eo[:, L:])
        prior = 0.5 * (loc["decoder"].val @ loc["decoder"].val + loc["noise"].val @ loc["noise"].val)
        rtol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(op(loc).val, (nll + 0.7 * kl) / P + prior / 500, rtol=rtol)
    # another batch: validation evaluation and with_batch agree
    rng2, d2, m2 = _problem(11)
    xi2 = rng2.standard_normal((P, L))
    np.testing.assert_allclose(el.evaluate(loc, d2, m2, xi2), el.with_batch(d2, m2, xi2)(loc).val,
                               rtol=1e-14)


def test_elbo_float32_gradient_agrees():
    rng, data, mask = _problem(12)
    xi = rng.standard_normal((P, L))
    grads = []
    for dt in (np.float64, np.float32):
        el = AmortisedELBO(data, mask, xi, MLP([2 * C, 16, 2 * L], dtype=dt),
                           MLP([L, 16, C], dtype=dt), DiagonalGaussian(), GaussianLikelihood(0.05))
        loc = _pos(el, np.random.default_rng(0), 0.5)
        grads.append(el(ift.Linearization.make_var(loc)).gradient)
    for k in grads[0].keys():
        a, b = grads[1][k].val, grads[0][k].val
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_without_missing_entries_skip_the_indicator_inputs_exactly(dtype):
    """``sparse_inputs``: a block whose indicator columns are all 0 computes the first layer
    without them, with the same results and zero gradient for their weights: bitwise in float64;
    in float32 to the last bit or so, as a BLAS may add the first layer's products in another
    order without the zero columns (OpenBLAS 0.3.31's Haswell sgemm kernel on an AMD EPYC:
    1 ulp of the output)."""
    C = 6
    full = MLP([2 * C, 16, 5], dtype=dtype, block_size=64)
    skip = MLP([2 * C, 16, 5], dtype=dtype, block_size=64, sparse_inputs=slice(C, 2 * C))
    rng = np.random.default_rng(2)
    theta = 0.3 * rng.standard_normal(full.n_params)
    x = np.concatenate([rng.standard_normal((150, C)), np.zeros((150, C))], axis=1)
    x[70, C + 1] = 1.0  # the second block has a missing entry: computed in full
    g = rng.standard_normal((150, 5))
    y0, g0, _ = full.vjp(theta, x, g, want_x=False)
    y1, g1, _ = skip.vjp(theta, x, g, want_x=False)
    f0, f1 = full.forward(theta, x), skip.forward(theta, x)
    if dtype == np.float64:
        assert np.array_equal(y0, y1) and np.array_equal(g0, g1) and np.array_equal(f0, f1)
    else:
        ulp = np.finfo(np.float32).eps
        for a, b in ((y0, y1), (g0, g1), (f0, f1)):
            assert np.max(np.abs(a - b)) <= 4 * ulp * np.max(np.abs(a))
    x[70, C + 1] = 0.0
    _, g2, _ = skip.vjp(theta, x, g, want_x=False)
    W0 = unpack_params(g2, skip.sizes)[0][0]
    assert np.all(W0[C:] == 0) and np.any(W0[:C] != 0)
