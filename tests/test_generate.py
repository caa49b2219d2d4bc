"""`galdecomp transform` and `galdecomp sample` on a small simulated sky."""
import csv
import os

import numpy as np
import pytest

import galdecomp
from conftest import fit_small_sky
from galdecomp.cli import main
from galdecomp.products.generate import transform_rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = fit_small_sky(tmp_path_factory.mktemp("gen"), "--max-epochs", "15", "--latent-dim", "4")
    return root / "run"


def test_fit_writes_a_latent_transform_that_gaussianises_the_aggregate_posterior(run):
    assert (run / "latent_transform.npz").is_file()
    model = galdecomp.load(str(run))
    assert model.transform is not None and model.transform.kind == "gaussianising"
    y = model.standardise(model.load_rows())
    mean, cov = model.encode(y, standardised=True, full_cov=True)
    rows = transform_rows(len(y), 0.1, 0)
    rng = np.random.default_rng(0)
    z = mean[rows] + np.einsum("pij,pj->pi", np.linalg.cholesky(cov[rows]), rng.standard_normal(mean[rows].shape))
    u = model.transform.forward(z)
    # the fitting draws come out close to N(0, 1); the raw latents do not
    assert np.all(np.abs(u.mean(0)) < 0.15) and np.all(np.abs(u.std(0) - 1) < 0.15)
    np.testing.assert_allclose(model.transform.inverse(u), z, atol=1e-7)
    assert np.mean(model.latent_log_density(z, "transformed")) > np.mean(model.latent_log_density(z, "prior"))


def test_sample_writes_rows_quality_and_plots(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(run), "--n", "300", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "transformed: Frechet distance" in text and "prior: Frechet distance" in text
    model = galdecomp.load(str(run))
    with open(out / "samples.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == model.names and len(rows) == 301
    assert np.isfinite(np.array(rows[1:], float)).all()
    with open(out / "sample_quality.csv") as f:
        q = {r["source"]: r for r in csv.DictReader(f)}
    assert set(q) == {"prior", "transformed"}
    assert all(float(r["frechet"]) >= 0 and 0 <= float(r["median_ks"]) <= 1 for r in q.values())
    # the transform follows the data better than the prior
    assert float(q["transformed"]["frechet"]) < float(q["prior"]["frechet"])
    assert (out / "plots" / "histograms.png").is_file() and (out / "plots" / "corner.png").is_file()


def test_transform_refits_and_sample_needs_one(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["transform", str(copy), "--method", "gmm"]) == 0
    assert "held-out log-density" in capsys.readouterr().out
    assert galdecomp.load(str(copy)).transform.kind == "gaussian_mixture"
    assert main(["sample", str(copy), "--n", "50", "--out", str(tmp_path / "g")]) == 0
    os.unlink(copy / "latent_transform.npz")
    assert main(["sample", str(copy), "--n", "50", "--out", str(tmp_path / "h")]) == 2
    assert "galdecomp transform" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    assert main(["sample", str(copy), "--n", "50", "--from", "prior", "--out", str(tmp_path / "h")]) == 0
