"""Every core of one process: forked workers compute a minibatch's row blocks, bitwise as one process."""
import os
import signal

import numpy as np
import pytest
import yaml

from conftest import fit_small_sky
from galdecomp.cli import main
from galdecomp.inference.config import resolve_config, with_former_defaults
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.inference.objective import ELBOObjective
from galdecomp.workers import ForkedWorkers, SharedArrays, WorkerError, available_cores, threads_of
from galdecomp.parallel import SerialComm


def objective(dtype="float32", covariance="diagonal", block_rows=128, C=7, P=900, seed=0, missing=0.05):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((P, C))
    data[rng.random((P, C)) < missing] = np.nan
    cfg = resolve_config({"training": {"dtype": dtype, "block_rows": block_rows}, "covariance": covariance,
                          "latent_dim": 3, "encoder": {"hidden": [16]}, "decoder": {"hidden": [16]}})
    model = Autoencoder.from_config(cfg, C, 0.01)
    return ELBOObjective(model, data, P), model.init_params(seed)


@pytest.mark.parametrize("dtype,covariance", [("float32", "diagonal"), ("float64", "fisher")])
def test_value_gradient_and_validation_do_not_depend_on_the_number_of_threads(dtype, covariance):
    rng = np.random.default_rng(5)
    rows, xi = np.sort(rng.choice(900, 600, replace=False)), rng.standard_normal((600, 3))
    valid, vxi = np.arange(0, 900, 2), rng.standard_normal((450, 3))
    results = []
    for n in (1, 2, 3):
        obj, params = objective(dtype, covariance)
        assert obj.start_workers(n, 600, 450) == n
        try:
            v, g, t = obj.value_and_gradient(params, rows, xi, beta=0.3)
            v2, t2 = obj.value(params, valid, vxi)
            results.append(np.concatenate([[v, t["nll"], t["kl"], v2, t2["nll"]], g,
                                           obj.validation(params, valid, vxi)]))
            if n > 1:  # the workers really computed blocks: one of theirs changed in shared memory
                assert np.any(obj._shared["gte"][1] != 0)
        finally:
            obj.close_workers()
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])
    obj, params = objective(dtype, covariance, block_rows=64)  # the blocks are part of the arithmetic
    v, g, _ = obj.value_and_gradient(params, rows, xi, beta=0.3)
    assert v == pytest.approx(results[0][0], rel=1e-5) and not np.array_equal(g, results[0][5:5 + g.size])


@pytest.mark.parametrize("n,batch,missing,room", [(2, 600, 0.05, 600), (3, 600, 0.0, 600), (2, 200, 0.05, 200),
                                                (2, 600, 0.05, 500)])
def test_shared_update_is_bitwise_the_gradient_and_adam_step_of_one_process(n, batch, missing, room):
    """descend: the workers' spans of the gradient and of Adam give one process's bits (batch
    200: two blocks of 128 and 72 rows; complete data: frozen indicator weights; a minibatch
    beyond the shared memory's ``room``: computed by this process)."""
    from galdecomp.inference.optimiser import Adam

    rng = np.random.default_rng(3)
    rows, xi = np.sort(rng.choice(900, batch, replace=False)), rng.standard_normal((batch, 3))
    ref, params = objective(missing=missing)
    assert (ref.frozen is None) == (missing > 0)
    rates = 1e-2 * rng.uniform(0.5, 2.0, params.size)
    one, x1 = Adam(params.size), params.copy()
    obj, _ = objective(missing=missing)
    assert obj.start_workers(n, room) == n and obj.splits_update
    shared, x2 = Adam(params.size), params.copy()
    try:
        for lr in (1e-2, rates, rates):
            v1, g, t1 = ref.value_and_gradient(x1, rows, xi, beta=0.3, extra=[2.0])
            x1 = one.step(x1, g, lr, frozen=ref.frozen)
            given, before = x2, x2.copy()
            v2, x2, t2, seconds = obj.descend(x2, rows, xi, shared, lr, beta=0.3, extra=[2.0])
            # a caller's own array is left as it was; the shared one returned is updated in place
            assert x2 is given or np.array_equal(given, before)
            assert v2 == v1 and t2["nll"] == t1["nll"] and t2["kl"] == t1["kl"] and list(t2["extra"]) == [2.0]
            assert np.array_equal(x2, x1) and seconds > 0
        assert np.array_equal(shared.m, one.m) and np.array_equal(shared.v, one.v) and shared.t == one.t == 3
        assert np.shares_memory(shared.m, obj._shared["adam_m"]) == (batch <= room)
    finally:
        obj.close_workers()
    assert not obj.splits_update and shared.m.base is None and np.array_equal(shared.m, one.m)


def test_calls_beyond_the_shared_memory_are_computed_here():
    obj, params = objective()
    ref = obj.value_and_gradient(params, np.arange(800), np.ones((800, 3)))[1]
    obj.start_workers(2, 300)
    try:
        assert np.array_equal(obj.value_and_gradient(params, np.arange(800), np.ones((800, 3)))[1], ref)
    finally:
        obj.close_workers()


def test_a_failing_or_dying_worker_is_reported_and_the_parent_carries_on():
    shared = SharedArrays({"x": ((4,), np.float64)})

    def kernel(k):
        if shared["x"][3] == 1 and k == 1:
            raise ValueError("bad block")
        if shared["x"][3] == 2 and k == 1:
            os._exit(3)
        shared["x"][k] = 10 + k

    pool = ForkedWorkers(3, kernel)
    try:
        pool.run()
        assert list(shared["x"][:3]) == [10, 11, 12]
        shared["x"][3] = 1
        with pytest.raises(WorkerError, match=r"worker process 1: ValueError: bad block"):
            pool.run()
        shared["x"][3] = 2
        with pytest.raises(WorkerError, match=r"worker process 1 \(pid \d+\) died"):
            pool.run()
    finally:
        pids = [w[0] for w in pool._workers]
        pool.close()
    for pid in pids:  # every worker was waited for
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_workers_ignore_the_signals_that_stop_a_job():
    shared = SharedArrays({"pid": ((2,), np.int64)})

    def kernel(k):
        shared["pid"][k] = os.getpid()

    with ForkedWorkers(2, kernel) as pool:
        pool.run()
        os.kill(int(shared["pid"][1]), signal.SIGTERM)
        os.kill(int(shared["pid"][1]), signal.SIGINT)
        shared["pid"][1] = 0
        pool.run()  # still there
        assert shared["pid"][1] > 0


def test_threads_setting():
    assert threads_of({"threads": None}, SerialComm()) == available_cores()
    assert threads_of({"threads": 3}, SerialComm()) == 3

    class TwoRanks(SerialComm):
        size = 2

    assert threads_of({"threads": 3}, TwoRanks()) == 1
    obj, _ = objective()

    class Ranks(SerialComm):
        size = 2
    obj.comm = Ranks()
    assert obj.start_workers(2, 100) == 1  # a rank never forks
    cfg = with_former_defaults({"training": {"dtype": "float64"}, "encoder": {}})
    assert cfg["training"]["block_rows"] == 1024  # runs written before blocks resume as they were


def test_fit_with_two_threads_is_bitwise_the_one_thread_fit(tmp_path, capsys):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    fit_small_sky(tmp_path / "one", "--max-epochs", "2", "--latent-dim", "3", "--threads", "1")
    err1 = capsys.readouterr().err
    fit_small_sky(tmp_path / "two", "--max-epochs", "2", "--latent-dim", "3", "--threads", "2")
    err2 = capsys.readouterr().err
    assert "1 thread per process, 1 MPI rank, float32 kernels" in err1
    assert "2 threads (this process and 1 forked worker) per process, 1 MPI rank, float32 kernels" in err2
    a = np.load(tmp_path / "one" / "run" / "checkpoint.npz")
    b = np.load(tmp_path / "two" / "run" / "checkpoint.npz")
    for key in ("params", "best_params", "adam_m", "adam_v"):
        assert np.array_equal(a[key], b[key]), key
    # the latent transform was fitted by a forked worker while this process wrote the products
    ta, tb = (np.load(tmp_path / r / "run" / "latent_transform.npz") for r in ("one", "two"))
    assert sorted(ta) == sorted(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert (tmp_path / "two" / "run" / "latent_mean.fits").read_bytes() == \
        (tmp_path / "one" / "run" / "latent_mean.fits").read_bytes()
    cfg = yaml.safe_load((tmp_path / "two" / "run" / "config.yaml").read_text())
    assert cfg["training"]["threads"] == 2 and cfg["training"]["dtype"] == "float32"
    # a resumed run may use another number of threads (and ends where the run would)
    assert main(["fit", str(tmp_path / "one" / "sky" / "catalog.yaml"), "--out", str(tmp_path / "one" / "run"),
                 "--resume", "--max-epochs", "3", "--threads", "2"]) == 0


def test_mgvi_on_two_cores_takes_the_rows_in_two_shares(tmp_path, capsys):
    """MGVI/geoVI on N cores: N processes, each on a contiguous share of the pixels, as N MPI
    ranks (MGVI's draws are keyed by pixel index, so the samples nearly agree with one core's)."""
    import shutil

    import healpy as hp

    root = tmp_path / "a"
    root.mkdir()
    fit_small_sky(root, "--max-epochs", "20", "--latent-dim", "3")
    sky, run = str(root / "sky" / "catalog.yaml"), root / "run"
    shutil.copytree(run, tmp_path / "two")
    capsys.readouterr()
    assert main(["fit", sky, "--out", str(run), "--resume", "--posterior", "mgvi", "--threads", "1"]) == 0
    assert main(["fit", sky, "--out", str(tmp_path / "two"), "--resume", "--posterior", "mgvi", "--threads", "2"]) == 0
    err = capsys.readouterr().err
    assert "the rows in 2 shares on 2 cores" in err and err.count("mgvi iteration 1/") == 2  # one line per run
    a, b = (np.array(hp.read_map(str(r / "latent_samples.fits"), field=None)) for r in (run, tmp_path / "two"))
    sd = np.tile(np.array(hp.read_map(str(run / "latent_std.fits"), field=None)), (a.shape[0] // 3, 1))
    d = np.abs(a - b) / sd
    assert np.median(d) < 1e-4 and np.quantile(d, 0.99) < 0.05


def test_no_more_workers_than_blocks(tmp_path, capsys):
    """As many threads as blocks in the largest minibatch."""
    obj, _ = objective(block_rows=128)
    try:
        assert obj.start_workers(4, 200) == 2  # 200 rows: two blocks
        assert obj.start_workers(4, 100) == 1  # one block: this process alone
    finally:
        obj.close_workers()
    (tmp_path / "r").mkdir()
    fit_small_sky(tmp_path / "r", "--max-epochs", "1", "--latent-dim", "3", "--threads", "4")
    err = capsys.readouterr().err
    assert "2 threads (this process and 1 forked worker)" in err
    assert "4 cores, 2 used: a minibatch has at most 2 blocks of 512 rows" in err
