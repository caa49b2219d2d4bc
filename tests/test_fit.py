"""`galdecomp fit` end to end on a small simulated sky: outputs, resume, bad input."""
import healpy as hp
import numpy as np
import pytest
import yaml

from conftest import write_catalog, write_map
from galdecomp.run import RunFolder
from galdecomp.cli import main

FAST = ["--max-epochs", "3", "--latent-dim", "4"]


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    out = tmp_path_factory.mktemp("sky") / "sim"
    assert main(["simulate", "--nside", "8", "--out", str(out), "--no-plot"]) == 0
    return str(out / "catalog.yaml")


def read_columns(path):
    from astropy.io import fits

    with fits.open(path) as h:
        return [c.name for c in h[1].columns], h[1].header


def test_fit_writes_the_output_contract(sky, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", sky, "--out", str(run)] + FAST) == 0
    out, err = capsys.readouterr()
    assert str(run / "latent_mean.fits") in out
    assert "training time: per step [ms] gradient on the rank's rows" in err
    for f in ["config.yaml", "checkpoint.npz", "latent_mean.fits", "latent_std.fits",
              "reconstruction.fits", "residual.fits", "noise.csv", "significance.csv", "history.csv",
              "plots/latent_mean.png", "plots/latent_std.png", "plots/training.png", "plots/residuals.png"]:
        assert (run / f).is_file(), f
    cols, hdr = read_columns(run / "latent_mean.fits")
    assert cols == ["feature_01", "feature_02", "feature_03", "feature_04"]
    assert hdr["COORDSYS"] == "G" and hdr["NSIDE"] == 8 and hdr["ORIGIN"].startswith("galdecomp")
    mean = np.array(hp.read_map(str(run / "latent_mean.fits"), field=None))
    std = np.array(hp.read_map(str(run / "latent_std.fits"), field=None))
    assert mean.shape == (4, hp.nside2npix(8)) and np.all(std > 0) and np.all(np.isfinite(mean))
    sig = np.genfromtxt(run / "significance.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert list(sig["rank"]) == [1, 2, 3, 4]
    assert np.all(np.diff(sig["delta_loglike_nats"]) <= 0)
    recon_cols, rh = read_columns(run / "reconstruction.fits")
    assert len(recon_cols) == 35 and rh["TUNIT1"] == "K_RJ"
    hist = np.genfromtxt(run / "history.csv", delimiter=",", names=True)
    assert len(hist) == 3
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["latent_dim"] == 4 and cfg["training"]["max_epochs"] == 3


def test_rerun_from_config_reproduces(sky, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["fit", sky, "--out", str(a), "--seed", "3"] + FAST) == 0
    assert main(["fit", sky, "--out", str(b), "--config", str(a / "config.yaml")]) == 0
    np.testing.assert_array_equal(hp.read_map(str(a / "latent_mean.fits"), field=None),
                                  hp.read_map(str(b / "latent_mean.fits"), field=None))


def test_interrupted_run_resumes_to_the_same_end(sky, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--max-epochs", "5", "--latent-dim", "4", "--seed", "1"]
    assert main(["fit", sky, "--out", str(full)] + args) == 0
    save = RunFolder.save_checkpoint

    def save_then_interrupt(run, state, extra):
        save(run, state, extra)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_then_interrupt)
    assert main(["fit", sky, "--out", str(cut)] + args) == 130
    assert not (cut / "latent_mean.fits").exists() and (cut / "checkpoint.npz").exists()
    monkeypatch.setattr(RunFolder, "save_checkpoint", save)
    assert main(["fit", sky, "--out", str(cut), "--resume"]) == 0
    np.testing.assert_array_equal(hp.read_map(str(full / "latent_mean.fits"), field=None),
                                  hp.read_map(str(cut / "latent_mean.fits"), field=None))
    assert (full / "history.csv").read_text().count("\n") == (cut / "history.csv").read_text().count("\n")


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("galdecomp: error:"), err
    for n in needles:
        assert n in err, (n, err)


def test_bad_input_of_fit(sky, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", sky, "--out", str(run), "--latent-dim", "0"]) == 2
    one_line_error(capsys, "latent-dim")
    assert not run.exists()
    # fewer channels than latents
    npix = hp.nside2npix(4)
    write_map(tmp_path / "a.fits", np.linspace(1, 2, npix))
    write_map(tmp_path / "b.fits", np.linspace(2, 3, npix))
    small = write_catalog(tmp_path, [dict(name="a", file="a.fits", frequency_hz=1e9, unit="K"),
                                     dict(name="b", file="b.fits", frequency_hz=2e9, unit="K")])
    assert main(["fit", small, "--out", str(run)]) == 2
    one_line_error(capsys, "2 channels", "10 latent")
    assert not run.exists()
    # --resume on a folder that holds no run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", sky, "--out", str(empty), "--resume"]) == 2
    one_line_error(capsys, "holds no run")
    # a run, then --resume with another configuration, then a plain re-fit without --overwrite
    assert main(["fit", sky, "--out", str(run)] + FAST) == 0
    capsys.readouterr()
    before = (run / "checkpoint.npz").read_bytes()
    assert main(["fit", sky, "--out", str(run), "--resume", "--latent-dim", "5"]) == 2
    one_line_error(capsys, "another configuration", "latent_dim")
    assert main(["fit", sky, "--out", str(run)] + FAST) == 2
    one_line_error(capsys, "exists", "--overwrite")
    assert (run / "checkpoint.npz").read_bytes() == before
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("covariance: full\n")
    assert main(["fit", sky, "--out", str(tmp_path / "x"), "--config", str(bad_cfg)]) == 2
    one_line_error(capsys, "covariance")
