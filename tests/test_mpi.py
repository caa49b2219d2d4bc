"""Pixel-sharded MPI: 2 ranks equal 1 rank, kill and resume on another rank count, failures abort."""
import os
import shutil
import signal
import subprocess
import sys
import time

import healpy as hp
import numpy as np
import pytest

from galdecomp.cli import main
from galdecomp.errors import InputError
from galdecomp.parallel import SerialComm, row_block

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def mpirun(n, args, **kw):
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "galdecomp"] + args,
                          capture_output=True, text=True, env=ENV, timeout=600, **kw)


def fit_with_wrapped_gradient(body, fit_args, timeout=300):
    """``galdecomp fit`` on 2 ranks with ``ELBOObjective.value_and_gradient`` wrapped: ``body``
    (Python lines) sees ``self, args, kw``, the call count ``n`` and ``rank``, and returns."""
    code = ("import os, signal, sys, numpy as np, galdecomp.inference.objective as a\n"
            "from galdecomp.parallel import world\n"
            "from galdecomp.cli import main\n"
            "orig, calls = a.ELBOObjective.value_and_gradient, []\n"
            "def wrapped(self, *args, **kw):\n"
            "    calls.append(1)\n"
            "    n, rank = len(calls), world().rank\n"
            + "".join(f"    {line}\n" for line in body.strip().splitlines())
            + "a.ELBOObjective.value_and_gradient = wrapped\n"
            f"sys.exit(main(['fit'] + {list(fit_args)!r}))\n")
    return subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def maps(path):
    return np.array(hp.read_map(str(path), field=None))


def wait_for_the_ranks_to_end(run, timeout=60):
    """The ranks run in sessions of their own and end a moment after mpiexec: wait until they have
    released the run folder's lock (a resume before would be refused as a second writer)."""
    import fcntl

    deadline = time.time() + timeout
    with open(run / ".galdecomp.lock") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                assert time.time() < deadline, "the ranks of the killed job did not end"
                time.sleep(0.05)


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpisky") / "sim"
    assert main(["simulate", "--nside", "32", "--out", str(out), "--no-plot"]) == 0
    return str(out / "catalog.yaml")


@pytest.fixture(scope="module", params=["shuffled", "stratified"])
def one_and_two_ranks(sky, tmp_path_factory, request):
    """The same fit on 1 rank and on 2 (``training.minibatches`` as the parameter): the two run
    folders and the 2-rank job's process (its stderr and stdout) and log file."""
    tmp = tmp_path_factory.mktemp(f"ranks-{request.param}")
    cfg = tmp / "cfg.yaml"
    # float64 kernels: float32 rounding (1e-7) in another order grows past 1e-8 within a few epochs
    cfg.write_text(f"training: {{minibatches: {request.param}, dtype: float64}}\n")
    args = ["--nside", "16", "--max-epochs", "6", "--latent-dim", "4", "--config", str(cfg)]
    assert main(["fit", sky, "--out", str(tmp / "k1")] + args) == 0
    p = mpirun(2, ["fit", sky, "--out", str(tmp / "k2"), "--log-file", str(tmp / "k2.log")] + args)
    assert p.returncode == 0, p.stderr
    return tmp / "k1", tmp / "k2", p, tmp / "k2.log"


def test_two_ranks_equal_one(one_and_two_ranks):
    k1, k2, _, _ = one_and_two_ranks
    a, b = maps(k1 / "latent_mean.fits"), maps(k2 / "latent_mean.fits")
    assert np.max(np.abs(a - b)) <= 1e-8 * np.max(np.abs(a))
    np.testing.assert_allclose(maps(k2 / "reconstruction.fits"), maps(k1 / "reconstruction.fits"), rtol=1e-8)
    assert (k2 / "latent_transform.npz").is_file() and (k2 / "model.npz").is_file()


def test_two_ranks_speak_through_rank_0_once(one_and_two_ranks):
    _, _, p, log = one_and_two_ranks
    assert "on 2 MPI ranks" in p.stderr
    assert log.read_text().splitlines() == [ln for ln in p.stderr.splitlines() if ln.startswith("[galdecomp")]
    assert p.stdout.count("run folder:") == 1  # outputs and messages from rank 0 only


def test_last_rank_fits_the_latent_transform_while_rank_0_writes(one_and_two_ranks):
    _, _, p, _ = one_and_two_ranks
    assert "fitted on rank 1 meanwhile" in p.stderr


def test_training_time_line_covers_both_ranks(one_and_two_ranks):
    """Where the training time went, from both ranks, in one line of rank 0, every item of which
    benchmarks/scaling/bench_scaling.py reads."""
    from benchmarks.scaling.bench_scaling import step_costs

    _, _, p, _ = one_and_two_ranks
    line, = [ln for ln in p.stderr.splitlines() if "training time" in ln]
    assert "(min-max over 2 ranks): per step [ms] gradient on the rank's rows " in line
    assert "reduce-scatter with the wait for the slowest rank" in line and "checkpoints 0.00-" in line  # rank 1 writes none
    assert len(step_costs(line)) == line.count(", ") + 2  # items: comma-separated, plus the "; per epoch" one


def test_each_rank_runs_one_blas_thread():
    """Without OMP/OPENBLAS_NUM_THREADS set, a rank's BLAS runs one thread for the whole job (the
    ranks' pools would compete for the node's cores)."""
    env = {k: v for k, v in ENV.items() if not k.endswith("_NUM_THREADS")}
    code = ("import numpy as np\n"
            "from threadpoolctl import threadpool_info\n"
            "from galdecomp.parallel import world\n"
            "comm = world()\n"
            "threads = max(p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas')\n"
            "every = comm.gather_rows(np.array([[threads]], float))  # printed by rank 0 alone\n"
            "if comm.rank == 0:\n"
            "    print(f'{comm.size} ranks: ' + ' '.join(str(int(t)) for t in every.ravel()) + ' BLAS threads')\n")
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "2 ranks: 1 1 BLAS threads", p.stdout


def test_killed_run_resumes_on_another_rank_count(sky, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("training: {dtype: float64}\n")  # equal to 1e-8 across rank counts (float32: 1e-7 steps)
    args = ["--max-epochs", "25", "--latent-dim", "4", "--seed", "2", "--config", str(cfg)]
    run = tmp_path / "killed"
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "galdecomp", "fit", sky,
                             "--out", str(run)] + args, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # kill once a few epochs are checkpointed
            if (run / "history.csv").exists() or proc.poll() is not None:
                break
            ck = run / "checkpoint.npz"
            if ck.exists():
                try:
                    with np.load(ck) as f:
                        if int(f["epoch"]) >= 3:
                            break
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate()
    wait_for_the_ranks_to_end(run)
    with np.load(run / "checkpoint.npz") as f:
        assert not bool(f["done"]) and int(f["epoch"]) >= 3, "the run was not interrupted mid-way"
    assert not (run / "latent_mean.fits").exists()
    assert main(["fit", sky, "--out", str(run), "--resume"]) == 0           # resumed on 1 rank
    assert main(["fit", sky, "--out", str(tmp_path / "whole")] + args) == 0  # uninterrupted
    a, b = maps(tmp_path / "whole" / "latent_mean.fits"), maps(run / "latent_mean.fits")
    assert np.max(np.abs(a - b)) <= 1e-8 * np.max(np.abs(a))


@pytest.mark.parametrize("method", ["mgvi", "geovi"])
def test_mgvi_on_two_ranks_equals_one(sky, tmp_path, method):
    """MGVI/geoVI draws are keyed by global pixel index: 1 and 2 ranks give the same samples (nearly)."""
    run = tmp_path / "k1"
    assert main(["fit", sky, "--out", str(run), "--nside", "8", "--max-epochs", "40", "--latent-dim", "3"]) == 0
    shutil.copytree(run, tmp_path / "k2")
    assert main(["fit", sky, "--out", str(run), "--resume", "--posterior", method]) == 0
    p = mpirun(2, ["fit", sky, "--out", str(tmp_path / "k2"), "--resume", "--posterior", method])
    assert p.returncode == 0, p.stderr
    a, b = (maps(tmp_path / k / "latent_samples.fits") for k in ("k1", "k2"))
    sd = np.tile(maps(run / "latent_std.fits"), (a.shape[0] // 3, 1))  # columns sNN_feature_MM
    d = np.abs(a - b) / sd
    # the draws are the same; NIFTy's stopping rule and line search act on each rank's rows, so a
    # few rows whose KL minimisation is slow end elsewhere (measured: median 2e-6, 99 % 0.012)
    assert np.median(d) < 1e-4 and np.quantile(d, 0.99) < 0.05


def test_bad_input_under_mpi_is_one_line_and_exit_2(sky, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = mpirun(2, ["fit", sky, "--out", str(empty), "--resume"])
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no run" in lines[0] and "Traceback" not in p.stderr


def test_a_failing_rank_aborts_the_job(sky, tmp_path):
    t0 = time.time()
    p = fit_with_wrapped_gradient("""
if rank == 1:
    raise RuntimeError('disk on fire')
return orig(self, *args, **kw)
""", [sky, "--out", str(tmp_path / "r"), "--nside", "8", "--max-epochs", "2"], timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 120
    assert "rank 1 failed: aborting all 2 ranks" in p.stderr


class FakeComm(SerialComm):
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_row_blocks_tile_the_sky_in_whole_coarse_pixels():
    nside = 32
    blocks = [row_block(nside, FakeComm(r, 5)) for r in range(5)]
    assert blocks[0].start == 0 and blocks[-1].stop == 12 * nside ** 2
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    assert all(b.start % 4 == 0 for b in blocks)  # nside 32 / block nside 16: 4 pixels per block
    with pytest.raises(InputError, match="13 MPI ranks but only 12 pixel blocks"):
        row_block(1, FakeComm(0, 13))


def test_sigterm_to_one_rank_stops_all_at_the_same_step(sky, tmp_path):
    """SIGTERM reaching only rank 1: every rank stops after the same step, rank 0 checkpoints."""
    run, whole = tmp_path / "term", tmp_path / "whole"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("latent_dim: 2\ntraining: {batch_size: 64, dtype: float64}\n")  # 10 steps per epoch at nside 8
    args = ["--nside", "8", "--max-epochs", "3", "--config", str(cfg)]
    p = fit_with_wrapped_gradient("""
out = orig(self, *args, **kw)
if rank == 1 and n == 13:  # seen with step 14's gradient
    os.kill(os.getpid(), signal.SIGTERM)
return out
""", [sky, "--out", str(run)] + args)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "stopped by SIGTERM after step 14 (in epoch 2)" in p.stderr and "Traceback" not in p.stderr
    with np.load(run / "checkpoint.npz") as f:
        assert (int(f["epoch"]), int(f["batch"]), int(f["step"])) == (1, 4, 14)
    assert main(["fit", sky, "--out", str(run), "--resume"]) == 0           # resumed on 1 rank
    assert main(["fit", sky, "--out", str(whole)] + args) == 0
    a, b = maps(whole / "latent_mean.fits"), maps(run / "latent_mean.fits")
    assert np.max(np.abs(a - b)) <= 1e-8 * np.max(np.abs(a))


def _validation_elbo(run):
    hist = np.genfromtxt(run / "history.csv", delimiter=",", names=True)
    return float(np.max(hist["validation_elbo"]))


def test_full_length_fits_on_one_and_two_ranks_agree_within_the_seed_spread(sky, tmp_path):
    """A default-length fit on 2 ranks adds the ranks' partial sums in another order than one
    process: rounding differences grow over 150 epochs into another optimum. It must be as good
    a fit as one process's: within the spread of seeds (validation ELBO, reconstruction)."""
    args = ["--nside", "16", "--latent-dim", "4"]
    elbo, recon = {}, {}
    for seed in (0, 1, 2):
        run = tmp_path / f"s{seed}"
        assert main(["fit", sky, "--out", str(run), "--seed", str(seed)] + args) == 0
        elbo[seed] = _validation_elbo(run)
    p = mpirun(2, ["fit", sky, "--out", str(tmp_path / "k2"), "--seed", "0"] + args)
    assert p.returncode == 0, p.stderr
    seeds = np.array(list(elbo.values()))
    spread = seeds.max() - seeds.min()
    two = _validation_elbo(tmp_path / "k2")
    assert abs(two - elbo[0]) <= max(spread, 0.05 * abs(elbo[0])), (two, elbo)
    assert seeds.min() - spread <= two <= seeds.max() + spread, (two, elbo)


DEAL = """
import json, sys
import numpy as np
from galdecomp.parallel import world, block_rows
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.inference.objective import ELBOObjective
comm = world()
n, C = 1000, 6
full = np.random.default_rng(0).standard_normal((n, C))
full[np.random.default_rng(1).random((n, C)) < 0.1] = np.nan
blk = block_rows(n, comm)
model = Autoencoder(C, 3)
params = model.init_params(2)
obj = ELBOObjective(model, full[blk], n, blk.start, comm)
rng = np.random.default_rng(3)
order = rng.permutation(n)
batches = [np.sort(order[i:i + 150]) for i in range(0, 900, 150)] + [np.sort(order[900:])]
obj.deal(batches)
out = []
for b, rows in enumerate(batches):
    xi = rng.standard_normal((rows.size, 3))
    d = obj._dealt
    guests = int(np.diff(d["guest_cut"][b:b + 2])[0])
    mine = int(np.diff(d["own_cut"][b:b + 2])[0]) + guests
    shares = comm.alltoall([mine] * comm.size)
    moved = sum(comm.alltoall([guests] * comm.size))
    v1, g1, _ = obj.value_and_gradient(params, rows, xi, dealt=b)
    v0, g0, _ = obj.value_and_gradient(params, rows, xi)
    out.append([int(rows.size), shares, moved, v1 - v0, float(np.max(np.abs(g1 - g0)) / np.max(np.abs(g0)))])
if comm.rank == 0:
    print(json.dumps(out))
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_dealt_minibatches_give_each_rank_an_even_share_and_the_same_gradient(tmp_path, ranks):
    """``ELBOObjective.deal``: every rank computes n // K or n // K + 1 rows of each minibatch
    (rows beyond a rank's share computed elsewhere, missing channels included), and the value and
    gradient are those of the undealt minibatch up to the order of the sums."""
    p = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-c", DEAL], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads(p.stdout)
    for size, shares, moved, dv, dg in out:
        assert sum(shares) == size and max(shares) - min(shares) <= 1, (size, shares)
        assert abs(dv) < 1e-12 and dg < 1e-12, (dv, dg)
    assert sum(moved for _, _, moved, _, _ in out) > 0  # rows were computed away from their owner


COLLECTIVES = """
import json
import numpy as np
from galdecomp.parallel import world
comm = world()
n = 1001  # not a multiple of the ranks
rng = np.random.default_rng(comm.rank)
head, body = rng.standard_normal(4), rng.standard_normal(n)
h, part = comm.sum_scattered(head, body)
block = comm.vector_block(n)
full = comm.allreduce_sum(np.concatenate([head, body]))
whole = comm.allgather_blocks(part, n)
blocks = comm.alltoall([(block.start, block.stop)] * comm.size)
if comm.rank == 0:
    print(json.dumps([float(np.max(np.abs(h - full[:4]))), float(np.max(np.abs(whole - full[4:]))),
                      blocks]))
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_reduce_scatter_and_allgather_of_blocks_equal_the_allreduce(ranks):
    """The training step's collectives: ``sum_scattered`` gives every rank the summed head and
    its block of the summed body, ``allgather_blocks`` puts the blocks together again (n not a
    multiple of K), equal to the Allreduce up to the order of the sums."""
    p = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-c", COLLECTIVES], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    d_head, d_body, blocks = json.loads(p.stdout)
    assert d_head < 1e-14 and d_body < 1e-14, (d_head, d_body)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1001 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_a_non_finite_gradient_on_one_rank_stops_every_rank_at_the_same_step(sky, tmp_path):
    """Each rank sees only its block of the gradient: a NaN in rank 1's rows reaches every rank
    through the gathered parameters, and all stop with the same one-line error (no hang)."""
    p = fit_with_wrapped_gradient("""
value, grad, terms = orig(self, *args, **kw)
if rank == 1 and n == 2:  # one step per epoch at nside 8
    grad = grad.copy()
    grad[-1] = np.nan
return value, grad, terms
""", [sky, "--out", str(tmp_path / "r"), "--nside", "8", "--max-epochs", "2"], timeout=120)
    assert p.returncode == 1, p.stderr
    assert "non-finite ELBO at epoch 2, step 2" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.count("galdecomp: error:") == 1  # both ranks stopped on their own, at the same step


def test_keep_freed_memory_sets_glibc_thresholds():
    """Under MPI the package raises glibc's mmap/trim thresholds (a 2-rank fit trained no faster
    than one rank without it); on glibc both mallopt calls succeed."""
    import platform

    from galdecomp.parallel import keep_freed_memory

    ok = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert ok
