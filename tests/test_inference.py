"""Training on simulated truth: learned noise, ELBO improvement, determinism, config validation."""
import numpy as np
import pytest

from galdecomp.errors import InputError
from galdecomp.inference.config import resolve_config
from galdecomp.inference.minibatches import epoch_order, split_rows
from galdecomp.inference.optimiser import Adam
from galdecomp.inference.training import TrainingState
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.inference.objective import ELBOObjective
from galdecomp.model.mlp import MLP
from galdecomp.inference.fitting import fit_rows


def simulated_truth(P=6000, L=3, C=12, seed=42):
    """Rows from a known non-linear generative model with known per-channel noise."""
    rng = np.random.default_rng(seed)
    truth = MLP([L, 16, C], "tanh")
    clean = truth.forward(truth.init_scales() * rng.standard_normal(truth.n_params), rng.standard_normal((P, L)))
    clean = (clean - clean.mean(0)) / clean.std(0)
    sigma = np.exp(rng.uniform(np.log(0.1), np.log(0.4), C))
    return clean + sigma * rng.standard_normal((P, C)), sigma


def small_config(**training):
    t = {"batch_size": 256, "max_epochs": 200, "learning_rate": 1e-2, "patience": 40}
    t.update(training)
    return resolve_config({"latent_dim": 3, "decoder": {"hidden": [32, 32]}, "encoder": {"hidden": [64, 64]},
                           "noise": {"floor": 0.0}, "training": t})


def test_learned_noise_recovers_truth_and_elbo_improves():
    data, sigma = simulated_truth()
    cfg = small_config()
    model = Autoencoder.from_config(cfg, data.shape[1])
    state = TrainingState(model.init_params(0), cfg["training"]["learning_rate"], 0)
    _, valid = split_rows(len(data), cfg["training"]["validation_fraction"], 0)
    obj = ELBOObjective(model, data, len(data) - valid.size)
    xi = np.random.default_rng(0).standard_normal((valid.size, 3))
    elbo_init = -obj.value(state.params, valid, xi)[0]
    fit_rows(model, data, state, cfg)
    elbo_end = -obj.value(state.best_params, valid, xi)[0]
    ratio = model.sigma(state.best_params) / sigma
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    # per row: from the broad initial noise (sigma0 = 0.5) to close to the noise-limited optimum
    optimum = -np.sum(np.log(np.sqrt(2 * np.pi * np.e) * sigma))
    assert elbo_end > elbo_init + 0.5 * (optimum - elbo_init), (elbo_init, elbo_end, optimum)


def test_training_is_deterministic_for_a_seed():
    data, _ = simulated_truth(P=1500)
    cfg = small_config(max_epochs=3)
    out = []
    for _ in range(2):
        model = Autoencoder.from_config(cfg, data.shape[1])
        st = TrainingState(model.init_params(cfg["seed"]), 1e-2, cfg["seed"])
        out.append(fit_rows(model, data, st, cfg).params)
    np.testing.assert_array_equal(out[0], out[1])


def test_indicator_weights_are_frozen_exactly_when_no_entry_is_missing(monkeypatch):
    """On complete rows the encoder's indicator weights get a zero gradient at every step (so
    Adam skips them, ``ELBOObjective.frozen``); one missing entry unfreezes them."""
    data, _ = simulated_truth(P=600)
    cfg = small_config(max_epochs=3)
    model = Autoencoder.from_config(cfg, data.shape[1])
    obj, params = ELBOObjective(model, data, 600), model.init_params(0)
    C, H = data.shape[1], cfg["encoder"]["hidden"][0]
    assert obj.frozen == slice(C * H, 2 * C * H)
    rows, xi = np.arange(0, 600, 3), np.random.default_rng(1).standard_normal((200, 3))
    g = obj.value_and_gradient(params, rows, xi)[1]
    assert not g[obj.frozen].any() and g[:C * H].all()
    spoiled = data.copy()
    spoiled[7, 2] = np.nan
    obj = ELBOObjective(model, spoiled, 600)
    assert obj.frozen is None and obj.value_and_gradient(params, np.arange(200), xi)[1][C * H:2 * C * H].any()
    # a fit with the frozen weights skipped ends where the full update ends, bit for bit
    out = []
    for skip in (True, False):
        if not skip:
            step = Adam.step
            monkeypatch.setattr(Adam, "step", lambda self, x, g, lr, part=slice(None), frozen=None:
                                step(self, x, g, lr, part))
        st = TrainingState(model.init_params(0), 1e-2, 0)
        out.append(fit_rows(model, data, st, cfg))
    np.testing.assert_array_equal(out[0].params, out[1].params)
    np.testing.assert_array_equal(out[0].adam.v, out[1].adam.v)


@pytest.mark.parametrize("n,bs", [(44237, 1024), (1000, 100), (1099, 100), (250, 100), (99, 100)])
def test_stratified_minibatches_use_every_row_once_and_span_the_table(n, bs):
    rows = np.sort(np.random.default_rng(1).choice(10 * n, n, replace=False))
    order = epoch_order(np.random.default_rng(0), rows, bs, "stratified")
    np.testing.assert_array_equal(np.sort(order), rows)
    q = max(1, n // bs)
    bounds = (np.arange(bs + 1) * n) // bs          # the strata: bs runs of consecutive rows
    stratum = np.searchsorted(bounds, np.searchsorted(rows, order), "right") - 1
    if q >= 2:
        for b in range(q - 1):                      # one row of every stratum per minibatch
            np.testing.assert_array_equal(np.sort(stratum[b * bs:(b + 1) * bs]), np.arange(bs))
    # another generator state gives another order
    assert not np.array_equal(order, epoch_order(np.random.default_rng(1), rows, bs, "stratified"))


@pytest.mark.parametrize("ranks", [2, 3, 16])
def test_stratified_minibatches_give_every_rank_its_share_of_each_step(ranks):
    """Rows held in contiguous blocks: each rank's rows of a minibatch are its share to within
    two rows (a rank's block cuts at most two strata), whatever the number of ranks, so no rank
    waits for one with more rows; shuffled minibatches are off by several sqrt(share)."""
    n, bs = 44237, 1024
    rows = np.arange(n)
    edges = (np.arange(ranks + 1) * n) // ranks
    spread = {}
    for kind in ("stratified", "shuffled"):
        order = epoch_order(np.random.default_rng(5), rows, bs, kind)
        steps = [order[b * bs:(b + 1) * bs] for b in range(n // bs - 1)]
        counts = np.array([np.histogram(s, edges)[0] for s in steps])
        spread[kind] = np.abs(counts - bs / ranks).max()
    assert spread["stratified"] < 2, spread
    assert spread["shuffled"] > 1.5 * np.sqrt(bs / ranks), spread


def test_adam_minimises_a_quadratic():
    opt, x = Adam(3), np.array([3.0, -2.0, 1.0])
    for _ in range(2000):
        x = opt.step(x, 2 * x, 0.05)
    assert np.abs(x).max() < 1e-3


@pytest.mark.parametrize("n,per_parameter", [(50, False), (2 * Adam.CHUNK + 7, True)])
def test_adam_equals_the_textbook_update_bitwise(n, per_parameter):
    """The buffered update, chunk after chunk, does the textbook arithmetic in the textbook order."""
    rng = np.random.default_rng(3)
    opt, x = Adam(n), rng.standard_normal(n)
    lr = 1e-2 * rng.uniform(0.5, 2.0, n) if per_parameter else 1e-2
    m, v, xr = np.zeros(n), np.zeros(n), x.copy()
    for t in range(1, 30):
        g = rng.standard_normal(n)
        x = opt.step(x, g, lr)
        m = 0.9 * m + (1 - 0.9) * g
        v = 0.999 * v + (1 - 0.999) * g * g
        xr = xr - (m / (1 - 0.9 ** t)) * lr / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_array_equal(x, xr)
    np.testing.assert_array_equal(opt.m, m)
    np.testing.assert_array_equal(opt.v, v)


@pytest.mark.parametrize("blocks", [[slice(0, 2 * Adam.CHUNK + 7)],
                                    [slice(0, 9000), slice(9000, 2 * Adam.CHUNK + 7)]])
def test_adam_skips_frozen_parameters_bitwise(blocks):
    """Parameters whose gradient is always 0 keep zero moments and an exactly zero step: skipping
    them gives the same bits as updating them, on the whole vector and on ranks' blocks that cut
    the frozen range."""
    n, frozen = 2 * Adam.CHUNK + 7, slice(5000, Adam.CHUNK + 3000)
    rng = np.random.default_rng(5)
    full, skip, x = Adam(n), Adam(n), rng.standard_normal(n)
    lr = 1e-2 * rng.uniform(0.5, 2.0, n)
    xs = x.copy()
    for _ in range(15):
        g = rng.standard_normal(n)
        g[frozen] = 0.0
        x = full.step(x, g, lr)
        new = []
        for b in blocks:
            skip.t = full.t - 1
            new.append(skip.step(xs, g[b], lr, part=b, frozen=frozen))
        xs = np.concatenate(new)
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(skip.m, full.m)
    np.testing.assert_array_equal(skip.v, full.v)
    assert not full.m[frozen].any() and full.m[:5000].all()


def test_adam_on_blocks_equals_adam_on_the_whole_vector_bitwise():
    """Under MPI each rank updates its block of the parameters: the blocks' updates, put
    together, are the whole vector's update, bit for bit (per-parameter learning rates too)."""
    rng = np.random.default_rng(4)
    whole, x, lr = Adam(50), rng.standard_normal(50), 1e-2 * rng.uniform(0.5, 2.0, 50)
    parts, xb = Adam(50), x.copy()
    blocks = [slice(0, 17), slice(17, 34), slice(34, 50)]
    for _ in range(20):
        g = rng.standard_normal(50)
        x = whole.step(x, g, lr)
        new = []
        for b in blocks:  # one optimiser step, block by block, as the ranks take it
            parts.t = whole.t - 1
            new.append(parts.step(xb, g[b], lr, part=b))
        xb = np.concatenate(new)
    np.testing.assert_array_equal(xb, x)
    np.testing.assert_array_equal(parts.m, whole.m)
    np.testing.assert_array_equal(parts.v, whole.v)


@pytest.mark.parametrize("bad,needle", [({"latent_dim": 0}, "latent_dim"), ({"covariance": "full"}, "covariance"),
                                        ({"training": {"batch_size": -1}}, "batch_size"),
                                        ({"decoder": {"hidden": [64, "x"]}}, "hidden"),
                                        ({"noise": {"sigma0": 0}}, "sigma0"), ({"bogus": 1}, "bogus"),
                                        ({"noise": {"poisson_floor": "yes"}}, "poisson_floor"),
                                        ({"encoder": {"mask_input": "mask"}}, "mask_input"),
                                        ({"training": {"minibatches": "random"}}, "minibatches")])
def test_config_validation(bad, needle):
    with pytest.raises(InputError, match=needle):
        resolve_config(bad)


def test_runs_of_the_previous_release_resume_with_their_settings(tmp_path):
    """A config.yaml written before the 2026-12-04 settings resumes with the values of then."""
    import yaml

    from galdecomp.inference.config import DEFAULTS, resolve_config
    from galdecomp.run import RunFolder

    old = resolve_config()
    del old["encoder"]["output_scale"], old["training"]["schedule"], old["training"]["kl_warmup_epochs"]
    del old["training"]["schedule_epochs"], old["training"]["step_on"], old["training"]["select"]
    del old["noise"]["poisson_floor"], old["encoder"]["mask_input"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"catalog": "x.yaml", **old}))
    cfg = resolve_config(RunFolder(str(tmp_path)).stored_config())
    assert cfg["training"]["schedule"] == "plateau" and cfg["training"]["kl_warmup_epochs"] == 0
    assert cfg["encoder"]["output_scale"] == 0.1
    assert cfg["encoder"]["mask_input"] == "observed" and DEFAULTS["encoder"]["mask_input"] == "missing"
    assert cfg["training"]["step_on"] == "excitations" and cfg["training"]["select"] == "mean"
    assert cfg["noise"]["poisson_floor"] is False and DEFAULTS["noise"]["poisson_floor"] is True
    assert DEFAULTS["training"]["schedule"] == "cosine"
    assert DEFAULTS["training"]["step_on"] == "weights" and DEFAULTS["training"]["select"] == "median"


def test_one_anomalous_validation_row_does_not_pick_the_kept_parameters():
    """The median validation ELBO (the default selection statistic) ignores one row the model
    cannot fit, which dominates the mean; both are the per-row values' mean and median."""
    data, _ = simulated_truth(P=800)
    cfg = small_config(max_epochs=1)
    model = Autoencoder.from_config(cfg, data.shape[1])
    params = model.init_params(0)
    rows = np.arange(0, 800, 8)
    xi = np.random.default_rng(1).standard_normal((rows.size, 3))
    obj = ELBOObjective(model, data, 700)
    op = obj._energy(rows, xi)
    t = op.terms(model.position(params, op.domain), per_row=True)
    per_row = t["nll_rows"] + t["kl_rows"]
    mean, median = obj.validation(params, rows, xi)
    np.testing.assert_allclose([mean, median], [per_row.mean(), np.median(per_row)], rtol=1e-12)
    spoiled = data.copy()
    spoiled[rows[3]] = 1e3  # a bright compact source in one validation pixel
    mean2, median2 = ELBOObjective(model, spoiled, 700).validation(params, rows, xi)
    assert mean2 > mean + 100 and abs(median2 - median) < 0.05 * abs(median)
    with pytest.raises(InputError, match="select"):
        resolve_config({"training": {"select": "best"}})
    with pytest.raises(InputError, match="step_on"):
        resolve_config({"training": {"step_on": "gradients"}})


@pytest.mark.parametrize("step_on", ["weights", "excitations"])
def test_first_adam_step_has_the_learning_rate_in_the_chosen_units(step_on):
    """Adam's first step moves every parameter by the learning rate: on the weights and log sigma
    (``step_on: weights``, as an optimiser on plain weights does) or on the excitations; on
    complete data, the weights of the encoder's missing-indicator inputs do not move."""
    data, _ = simulated_truth(P=600)
    lr = 1e-3
    cfg = small_config(max_epochs=1, batch_size=10 ** 6, learning_rate=lr, step_on=step_on,
                       kl_warmup_epochs=0, schedule="plateau")
    model = Autoencoder.from_config(cfg, data.shape[1])
    p0 = model.init_params(0)
    state = fit_rows(model, data, TrainingState(p0, lr, 0), cfg)
    (e0, d0, s0), (e1, d1, s1) = model.split(p0), model.split(state.params)
    # complete rows: the encoder's missing-indicator inputs are 0, their weights get no gradient
    C, H = data.shape[1], model.encoder.sizes[1]
    indicator = np.zeros(model.n_params, bool)
    indicator[model.slices["encoder"].start + C * H:model.slices["encoder"].start + 2 * C * H] = True
    assert np.all(state.params[indicator] == p0[indicator])
    keep = ~indicator[model.slices["encoder"]]
    if step_on == "weights":
        steps = [np.abs(e1 - e0)[keep], np.abs(d1 - d0), np.abs(model.tau * (s1 - s0))]
    else:
        steps = [np.abs(state.params - p0)[~indicator]]
    for st in steps:
        moved = st[st > 0]
        assert moved.size > 0.9 * st.size
        np.testing.assert_allclose(np.median(moved), lr, rtol=1e-3)
