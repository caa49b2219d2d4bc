"""What a batch job meets besides bad input: a second job on the run, damaged run files, a full
disk, a longer run, signals inside an epoch, unexpected errors."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import healpy as hp
import numpy as np
import pytest
import yaml

from galdecomp.run import RunFolder
from galdecomp.cli import main
from galdecomp.inference.config import model_signature, resolve_config
from galdecomp.inference.objective import ELBOObjective

from conftest import config_file, simulated_sky

#: A small model: 21 steps per epoch on the 691 training pixels of an nside-8 sky.
SMALL = {"latent_dim": 2, "decoder": {"hidden": [8]}, "encoder": {"hidden": [8]},
         "training": {"batch_size": 32, "schedule_epochs": 8}}


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return simulated_sky(tmp_path_factory.mktemp("faultsky"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return config_file(tmp_path_factory.mktemp("cfg"), SMALL)


def config(tmp_path, **training):
    """SMALL with other training settings, as a --config file."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "training": {**SMALL["training"], **training}}))
    return str(path)


def latent(run):
    return np.array(hp.read_map(str(run / "latent_mean.fits"), field=None))


def checkpoint(run, *keys):
    with np.load(run / "checkpoint.npz") as f:
        return [f[k] for k in keys]


def error_line(capsys, *needles):
    """stderr ends with one line ``galdecomp: error: ...`` holding ``needles``, and no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("galdecomp: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def galdecomp(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "galdecomp"] + list(args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for_checkpoint(proc, run, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoint.npz").exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint from the job: {proc.poll()}")


# -- one writer per run folder ----------------------------------------------------------------------

def test_second_writer_is_refused_and_a_killed_job_leaves_no_stale_lock(sky, tmp_path, capsys):
    run = tmp_path / "run"
    first = galdecomp("fit", sky, "--out", str(run), "--config", config(tmp_path, patience=100000),
                      "--max-epochs", "100000")  # runs until killed
    try:
        wait_for_checkpoint(first, run)
        held = f"{run}: in use by another galdecomp process (pid {first.pid} on host {socket.gethostname()})"
        for args in (["fit", sky, "--out", str(run), "--resume"],
                     ["fit", sky, "--out", str(run), "--overwrite"],
                     ["report", str(run), "--templates", sky]):
            t0 = time.time()
            assert main(args) == 2
            assert time.time() - t0 < 10  # at once, before reading the maps (a loaded machine)
            assert error_line(capsys) == f"galdecomp: error: {held}"
    finally:
        first.kill()  # SIGKILL: no chance to clean up
        first.communicate()
    assert (run / ".galdecomp.lock").exists()
    epoch, = checkpoint(run, "epoch")
    assert main(["fit", sky, "--out", str(run), "--resume", "--max-epochs", str(epoch + 1)]) == 0
    assert (run / "latent_mean.fits").exists()


# -- damaged run files -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_once(sky, small, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["fit", sky, "--out", str(run), "--config", small, "--max-epochs", "2"]) == 0
    return run


@pytest.fixture
def finished(finished_once, tmp_path):
    """A copy of a finished 2-epoch run."""
    return shutil.copytree(finished_once, tmp_path / "run")


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_damaged_checkpoint(sky, finished, capsys, damage):
    ck = finished / "checkpoint.npz"
    data = ck.read_bytes()
    ck.write_bytes({"truncated": data[:len(data) // 2], "text": b"not a checkpoint\n", "empty": b""}[damage])
    capsys.readouterr()
    assert main(["fit", sky, "--out", str(finished), "--resume"]) == 2
    error_line(capsys, f"{ck}: not a galdecomp checkpoint or unreadable", "start again with --overwrite")
    if damage == "truncated":
        assert main(["fit", sky, "--out", str(finished), "--overwrite", "--config",
                     str(finished / "config.yaml")]) == 0


@pytest.mark.parametrize("text", ["training: {max_epochs: [4\n", "- a\n- list\n", b"\x89PNG\xff\xfe\x00"])
def test_damaged_config(sky, finished, capsys, text):
    cfg = finished / "config.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    capsys.readouterr()
    assert main(["fit", sky, "--out", str(finished), "--resume"]) == 2
    error_line(capsys, f"{cfg}: not a galdecomp run configuration or unreadable", "--overwrite")


# -- a full disk, a read-only file system --------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 600 kB tmpfs (needs root and a mount command; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs: {e}")
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {p.stderr.strip() or p.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_and_read_only_file_system(sky, small, tmp_path, tmpfs, capsys):
    src = tmp_path / "src"
    assert main(["fit", sky, "--out", str(src), "--config", small, "--max-epochs", "2"]) == 0
    run = tmpfs / "run"
    run.mkdir()
    for f in ("config.yaml", "checkpoint.npz"):
        shutil.copy(src / f, run / f)
    good = (run / "checkpoint.npz").read_bytes()
    st = os.statvfs(tmpfs)
    (tmpfs / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - len(good) // 2))
    resume = ["fit", sky, "--out", str(run), "--resume", "--max-epochs", "4"]
    capsys.readouterr()
    assert main(resume) == 1
    error_line(capsys, f"{run / 'checkpoint.npz'}: cannot write (No space left on device)")
    assert sorted(os.listdir(run)) == [".galdecomp.lock", "checkpoint.npz", "config.yaml"]  # no debris
    assert (run / "checkpoint.npz").read_bytes() == good  # the last good checkpoint

    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert main(resume) == 1
    error_line(capsys, f"{run / 'config.yaml'}: cannot write (Read-only file system)")

    subprocess.run(["mount", "-o", "remount,rw,size=8m", str(tmpfs)], check=True)
    os.unlink(tmpfs / "filler")
    assert main(resume) == 0  # space again: the run continues from its last good checkpoint
    assert main(["fit", sky, "--out", str(src), "--resume", "--max-epochs", "4"]) == 0
    np.testing.assert_array_equal(latent(run), latent(src))


# -- training longer -------------------------------------------------------------------------------------

def test_four_plus_four_epochs_equal_eight(sky, small, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["fit", sky, "--out", str(whole), "--config", small, "--max-epochs", "8"]) == 0
    assert main(["fit", sky, "--out", str(parts), "--config", small, "--max-epochs", "4"]) == 0
    assert main(["fit", sky, "--out", str(parts), "--resume", "--max-epochs", "8"]) == 0
    assert "finished; training longer" in capsys.readouterr().err
    np.testing.assert_array_equal(latent(parts), latent(whole))
    for a, b in zip(checkpoint(parts, "params", "best_params", "adam_m", "step"),
                    checkpoint(whole, "params", "best_params", "adam_m", "step")):
        np.testing.assert_array_equal(a, b)
    assert yaml.safe_load((parts / "config.yaml").read_text())["training"]["max_epochs"] == 8
    assert (parts / "history.csv").read_text() .count("\n") == 9
    # the duration settings are not part of the model; the model's are
    # (the cosine schedule's length is fixed when a run starts: max_epochs of the first run)
    longer = dict(max_epochs=9, patience=50, checkpoint_seconds=5,
                  schedule_epochs=resolve_config()["training"]["max_epochs"])
    assert model_signature(resolve_config({"training": longer})) == model_signature(resolve_config())
    assert main(["fit", sky, "--out", str(parts), "--resume", "--config", config(tmp_path, lr_patience=3)]) == 2
    error_line(capsys, "another configuration", "training.lr_patience")


# -- checkpoints inside an epoch, signals ------------------------------------------------------------------

def test_resume_from_a_time_checkpoint_inside_an_epoch(sky, tmp_path, monkeypatch):
    cfg = config(tmp_path, checkpoint_seconds=0)  # a checkpoint after every step
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["fit", sky, "--out", str(whole), "--config", cfg, "--max-epochs", "3"]) == 0
    save = RunFolder.save_checkpoint

    def save_then_die(run, state, extra):
        save(run, state, extra)
        if state.epoch == 1 and state.batch == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_then_die)
    assert main(["fit", sky, "--out", str(cut), "--config", cfg, "--max-epochs", "3"]) == 130
    assert [int(v) for v in checkpoint(cut, "epoch", "batch", "step")] == [1, 5, 26]
    monkeypatch.setattr(RunFolder, "save_checkpoint", save)
    assert main(["fit", sky, "--out", str(cut), "--resume"]) == 0
    np.testing.assert_array_equal(latent(cut), latent(whole))


def test_sigterm_inside_an_epoch_checkpoints_and_resumes_bitwise(sky, small, tmp_path, monkeypatch, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["--config", small, "--max-epochs", "3"]
    assert main(["fit", sky, "--out", str(whole)] + args) == 0
    orig, calls = ELBOObjective.value_and_gradient, []

    def term_at_step_30(self, *a, **kw):
        calls.append(1)
        out = orig(self, *a, **kw)
        if len(calls) == 29:  # what SLURM sends; seen with step 30's gradient
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ELBOObjective, "value_and_gradient", term_at_step_30)
    capsys.readouterr()
    assert main(["fit", sky, "--out", str(cut)] + args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 30 (in epoch 2), checkpoint written" in err
    assert f"galdecomp fit {sky} --out {cut} --resume" in err and "Traceback" not in err
    assert [int(v) for v in checkpoint(cut, "epoch", "batch", "step")] == [1, 9, 30]
    assert not (cut / "latent_mean.fits").exists()
    monkeypatch.setattr(ELBOObjective, "value_and_gradient", orig)
    assert main(["fit", sky, "--out", str(cut), "--resume"]) == 0
    np.testing.assert_array_equal(latent(cut), latent(whole))


def test_sigterm_to_a_running_job(sky, tmp_path):
    run = tmp_path / "run"
    proc = galdecomp("fit", sky, "--out", str(run), "--config", config(tmp_path, patience=100000),
                     "--max-epochs", "100000")  # runs until stopped
    wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    epoch, = checkpoint(run, "epoch")
    assert main(["fit", sky, "--out", str(run), "--resume", "--max-epochs", str(epoch + 1)]) == 0


# -- anything else --------------------------------------------------------------------------------------------

def test_unexpected_error_is_one_line_with_a_log_file(sky, monkeypatch, capsys):
    import galdecomp.catalog

    def broken(*a, **k):
        raise RuntimeError("a bug\nsecond line")

    monkeypatch.setattr(galdecomp.catalog, "load_catalog", broken)
    assert main(["inspect", sky]) == 1
    line = error_line(capsys, "unexpected RuntimeError: a bug (traceback in ", "--debug shows it")
    log = line.split("traceback in ")[1].split(";")[0]
    try:
        text = open(log).read()
        assert "Traceback" in text and "second line" in text
    finally:
        os.unlink(log)
    assert main(["inspect", sky, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("galdecomp: error: unexpected")
    os.unlink(err.split("traceback in ")[1].split(";")[0])


# -- what already worked and must keep working ------------------------------------------------------

def test_a_map_changed_under_a_run_is_refused(small_catalog, small, tmp_path, capsys):
    from conftest import write_map

    catalog, maps, _ = small_catalog
    run = tmp_path / "run"
    assert main(["fit", catalog, "--out", str(run), "--config", small, "--max-epochs", "1"]) == 0
    write_map(tmp_path / "m1.fits", maps[1] * 3 + 1)
    capsys.readouterr()
    assert main(["fit", catalog, "--out", str(run), "--resume", "--max-epochs", "2"]) == 2
    error_line(capsys, str(run), "other data than the run was started on")


@pytest.mark.parametrize("where", ["value", "gradient"])
def test_a_diverging_fit_stops_with_one_line(sky, small, tmp_path, monkeypatch, capsys, where):
    orig, calls = ELBOObjective.value_and_gradient, []

    def nan_at_step_4(self, *a, **kw):
        calls.append(1)
        value, grad, terms = orig(self, *a, **kw)
        if len(calls) == 4 and where == "value":
            value = np.nan
        elif len(calls) == 4:
            grad = grad.copy()
            grad[7] = np.inf
        return value, grad, terms

    monkeypatch.setattr(ELBOObjective, "value_and_gradient", nan_at_step_4)
    capsys.readouterr()
    assert main(["fit", sky, "--out", str(tmp_path / "run"), "--config", small]) == 1
    error_line(capsys, "non-finite ELBO at epoch 1, step 4")
