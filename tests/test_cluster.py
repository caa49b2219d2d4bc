"""Cluster details: durable renames (fsync), file systems without locks (--no-lock), log lines
with clock time, --quiet / --verbose / --log-file, the SLURM example."""
import errno
import fcntl
import logging
import os
import re
import time

import numpy as np
import pytest
import yaml

from galdecomp import fileio
from galdecomp.run import RunFolder
from galdecomp.cli import main
from galdecomp.errors import WriteError
from galdecomp.logs import LINE

from conftest import config_file, simulated_sky

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"latent_dim": 2, "decoder": {"hidden": [8]}, "encoder": {"hidden": [8]},
         "training": {"batch_size": 32, "schedule_epochs": 2}}


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    return simulated_sky(tmp_path_factory.mktemp("clustersky"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return config_file(tmp_path_factory.mktemp("cfg"), SMALL)


def one_error_line(err, *needles):
    """``err`` ends with one line ``galdecomp: error: ...`` holding ``needles``, without a traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if line.startswith("galdecomp: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


# -- fsync around every atomic rename ----------------------------------------------------------------

@pytest.fixture
def events(monkeypatch):
    """Every fsync (with the path of its descriptor) and rename, in order."""
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        seen.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def assert_synced_around(events, path):
    """The rename to ``path``: its source fsynced before, the folder of ``path`` after."""
    path = os.path.abspath(path)
    k = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == path)
    assert ("fsync", events[k][1]) in events[:k], events
    assert ("fsync", os.path.dirname(path)) in events[k + 1:], events


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, events):
    target = tmp_path / "a.txt"
    fileio.write_text(str(target), "one")
    assert_synced_around(events, target)
    fileio.write_healpix_fits(str(tmp_path / "m.fits"), np.arange(12.0), "m", "K")
    assert_synced_around(events, tmp_path / "m.fits")
    with fileio.atomic_path(str(tmp_path / "b.bin")) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x")
    assert_synced_around(events, tmp_path / "b.bin")
    state = type("S", (), {"to_arrays": lambda self: {"params": np.zeros(3)}})()
    RunFolder(str(tmp_path)).save_checkpoint(state, {"fingerprint": "x"})
    assert_synced_around(events, tmp_path / "checkpoint.npz")


def test_an_output_folder_is_synced_file_by_file_before_it_is_renamed(tmp_path, events):
    out = tmp_path / "out"
    for round_ in range(2):  # new, then replacing the old one
        with fileio.atomic_output_dir(str(out), overwrite=True) as tmp:
            os.mkdir(os.path.join(tmp, "plots"))
            with open(os.path.join(tmp, "plots", "p.txt"), "w") as f:
                f.write(str(round_))
            with open(os.path.join(tmp, "t.csv"), "w") as f:
                f.write("a\n")
        k = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out))
        synced = {e[1] for e in events[:k] if e[0] == "fsync"}
        tmp = events[k][1]
        assert {tmp, f"{tmp}/t.csv", f"{tmp}/plots", f"{tmp}/plots/p.txt"} <= synced
        assert ("fsync", str(tmp_path)) in events[k + 1:]
        assert (out / "plots" / "p.txt").read_text() == str(round_)
        events.clear()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_fsync_is_a_failed_write(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(WriteError, match=re.escape(f"{target}: cannot write (Input/output error)")):
        fileio.write_text(str(target), "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]  # no debris


def test_a_folder_the_file_system_cannot_sync_is_not_an_error(tmp_path, monkeypatch):
    real = os.fsync

    def no_folders(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(os, "fsync", no_folders)
    fileio.write_text(str(tmp_path / "a.txt"), "one")
    with fileio.atomic_output_dir(str(tmp_path / "out")) as tmp:
        (open(os.path.join(tmp, "x"), "w")).close()
    assert (tmp_path / "a.txt").read_text() == "one" and (tmp_path / "out" / "x").exists()


# -- file systems that refuse locks --------------------------------------------------------------------

@pytest.fixture
def no_locks(monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_a_file_system_without_locks_is_named_and_no_lock_runs_anyway(sky, small, tmp_path, no_locks, capsys):
    run = tmp_path / "run"
    fit = ["fit", sky, "--out", str(run), "--config", small, "--max-epochs", "1"]
    assert main(fit) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"galdecomp: error: {run}: the file system refuses locks (ENOLCK: No locks available): "
                    f"use --no-lock to run without the folder lock, at your own risk")
    assert not run.exists()  # nothing left behind

    assert main(fit + ["--no-lock"]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "not locked (--no-lock)" in ln]
    assert len(warned) == 1 and re.fullmatch(LINE, warned[0]) and f"] warning: {run}: not locked" in warned[0]
    assert (run / "model.npz").exists() and not (run / ".galdecomp.lock").exists()

    # an existing run: refused before anything is written, and the other writing commands
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    for args in (["fit", sky, "--out", str(run), "--resume", "--max-epochs", "2"],
                 ["fit", sky, "--out", str(run), "--overwrite", "--config", small],
                 ["report", str(run), "--templates", sky],
                 ["transform", str(run)]):
        assert main(args) == 2, args
        one_error_line(capsys.readouterr().err, f"{run}: the file system refuses locks (ENOLCK", "--no-lock")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert main(["fit", sky, "--out", str(run), "--resume", "--max-epochs", "2", "--no-lock"]) == 0

    main_job = tmp_path / "main"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"simulate": {"nside": 8}, "fit": {**SMALL, "training": {
        **SMALL["training"], "max_epochs": 1}}}))
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--out", str(main_job)]) == 2
    one_error_line(capsys.readouterr().err, f"{main_job}: the file system refuses locks")
    assert not main_job.exists()


def test_a_held_lock_is_still_in_use(tmp_path, monkeypatch):
    def held(fd, op):
        raise OSError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(Exception, match="in use by another galdecomp process"):
        with fileio.folder_lock(str(tmp_path)):
            pass


# -- log lines -----------------------------------------------------------------------------------------

@pytest.fixture
def chatty(monkeypatch):
    """``galdecomp inspect`` replaced by a command that logs one message at each level."""
    from galdecomp import cli

    def cmd(args, comm):
        log = logging.getLogger("galdecomp.test")
        log.debug("a debug message")
        log.info("an info message")
        log.warning("a warning")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "inspect", cmd)


def messages(err):
    lines = err.strip().splitlines()
    for line in lines:
        assert re.fullmatch(LINE, line), line
    return [re.fullmatch(LINE, line).group(3) for line in lines]


@pytest.mark.parametrize("option, shown", [
    ([], ["an info message", "warning: a warning"]),
    (["--quiet"], ["warning: a warning"]),
    (["--verbose"], ["a debug message", "an info message", "warning: a warning"]),
])
def test_quiet_and_verbose(chatty, capsys, option, shown):
    assert main(["inspect", "x.yaml"] + option) == 0
    assert messages(capsys.readouterr().err) == shown
    assert main(option + ["inspect", "x.yaml"]) == 0  # before the command too
    assert messages(capsys.readouterr().err) == shown


def test_quiet_and_verbose_together_are_refused(chatty, capsys):
    assert main(["inspect", "x.yaml", "--quiet", "--verbose"]) == 2
    assert one_error_line(capsys.readouterr().err) == "galdecomp: error: --quiet and --verbose: give at most one"


def test_log_lines_carry_clock_time_and_elapsed_seconds(tmp_path, capsys):
    t0 = time.time()
    assert main(["simulate", "--nside", "8", "--out", str(tmp_path / "sky"), "--no-plot"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[galdecomp")]
    assert len(lines) >= 2
    for line in lines:  # [galdecomp 2026-12-07 08:01:02   12.3s] message
        m = re.fullmatch(LINE, line)
        assert m, line
        clock = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
        assert t0 - 1 <= clock <= time.time() + 1
        assert float(m.group(2)) >= 0


def test_log_file_appends_the_lines_and_the_error(sky, small, tmp_path, chatty, capsys):
    path = tmp_path / "job.log"
    assert main(["inspect", "x.yaml", "--log-file", str(path)]) == 0
    err = capsys.readouterr().err
    assert path.read_text() == err  # the same lines
    assert main(["--log-file", str(path), "--quiet", "inspect", "x.yaml"]) == 0  # appended
    assert messages(path.read_text()) == ["an info message", "warning: a warning", "warning: a warning"]
    # the final error line too, as a log line; the file is closed after the command
    assert main(["fit", sky, "--out", str(tmp_path / "r"), "--config", small, "--latent-dim", "99",
                 "--log-file", str(path)]) == 2
    err = capsys.readouterr().err
    last = path.read_text().splitlines()[-1]
    assert messages(last)[0] == "error: " + one_error_line(err).removeprefix("galdecomp: error: ")
    assert not [h for h in logging.getLogger("galdecomp").handlers if isinstance(h, logging.FileHandler)]
    assert logging.getLogger("galdecomp").level == logging.INFO


def test_an_unwritable_log_file_is_one_line(chatty, tmp_path, capsys):
    bad = tmp_path / "missing" / "job.log"
    assert main(["inspect", "x.yaml", "--log-file", str(bad)]) == 2
    one_error_line(capsys.readouterr().err, f"{bad}: cannot open the log file (No such file or directory)")


# -- the SLURM example ------------------------------------------------------------------------------------

def test_slurm_script_finds_its_config_through_the_submit_dir():
    with open(os.path.join(ROOT, "runs", "slurm_fit.sh")) as f:
        text = f.read()
    header = text.split("set -euo pipefail")[0]
    assert "SLURM_SUBMIT_DIR" in header  # documented
    assert '${SLURM_SUBMIT_DIR:-' in text and "nside256.yaml" in text
