"""MGVI / geoVI posteriors of the latents: exact for a linear decoder, CLI on a trained run."""
import numpy as np
import pytest

from galdecomp.cli import main
from galdecomp.inference.mgvi import amortisation_gap, latent_posterior_samples
from galdecomp.model.autoencoder import Autoencoder
from galdecomp.model import noise

L, C, P = 2, 5, 400


def linear_model():
    """A linear decoder f(z) = z W + b with known weights and noise."""
    rng = np.random.default_rng(11)
    model = Autoencoder(C, L, decoder_hidden=(), floor=0.0)
    params = model.init_params(0)
    dec = rng.normal(size=model.decoder.n_params)
    params[model.slices["decoder"]] = dec
    params[model.slices["noise"]] = rng.uniform(-0.5, 0.5, C)
    theta = model.split(params)[1]
    W, b = theta[:L * C].reshape(L, C), theta[L * C:]
    return model, params, W, b, model.sigma(params)


@pytest.mark.parametrize("method", ["mgvi", "geovi"])
def test_linear_decoder_gives_the_exact_posterior(method):
    model, params, W, b, sigma = linear_model()
    rng = np.random.default_rng(1)
    data = rng.standard_normal((P, L)) @ W + b + sigma * rng.standard_normal((P, C))
    mask = np.ones_like(data, bool)
    cov = np.linalg.inv((W / sigma ** 2) @ W.T + np.eye(L))
    exact_mean = (data - b) @ (W.T / sigma[:, None] ** 2) @ cov
    samples = latent_posterior_samples(model, params, data, mask, np.zeros((P, L)), method,
                                       n_samples=4, iterations=3, seed=3)
    assert samples.shape == (8, P, L)
    # the mean converges to the exact posterior mean; the spread matches the exact covariance
    mean = samples.mean(0)
    assert np.max(np.abs(mean - exact_mean) / np.sqrt(np.diag(cov))) < 0.05
    var = samples.var(0).mean(0)  # antithetic pairs around the mean: no ddof
    np.testing.assert_allclose(var, np.diag(cov), rtol=0.1)
    gap = amortisation_gap(exact_mean, np.broadcast_to(cov, (P, L, L)), samples)
    assert np.median(gap["mahalanobis"]) < 0.1
    assert abs(np.median(gap["std_ratio"]) - 1) < 0.2


def test_noise_model_used_by_mgvi_is_the_models():
    model, params, *_ = linear_model()
    np.testing.assert_allclose(model.sigma(params), noise.sigma(params[model.slices["noise"]], 0.0,
                                                                 model.sigma0, model.tau))


def test_mgvi_from_the_command_line_on_a_trained_run(tmp_path, capsys):
    sky = tmp_path / "sky"
    assert main(["simulate", "--nside", "4", "--out", str(sky), "--no-plot"]) == 0
    run = tmp_path / "run"
    assert main(["fit", str(sky / "catalog.yaml"), "--out", str(run), "--max-epochs", "3",
                 "--latent-dim", "3"]) == 0
    enc = (run / "latent_mean.fits").read_bytes()
    assert main(["fit", str(sky / "catalog.yaml"), "--out", str(run), "--resume", "--posterior", "mgvi"]) == 0
    for f in ["encoder_latent_mean.fits", "encoder_latent_std.fits", "latent_samples.fits",
              "amortisation_gap.fits", "amortisation_gap.csv", "plots/amortisation_gap.png"]:
        assert (run / f).is_file(), f
    assert (run / "encoder_latent_mean.fits").stat().st_size == len(enc)
    assert "method: mgvi" in (run / "config.yaml").read_text()
    rows = (run / "amortisation_gap.csv").read_text().splitlines()
    assert rows[0].startswith("feature,median_abs_shift_sigma") and len(rows) == 4
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", str(sky / "catalog.yaml"), "--out", str(empty), "--resume", "--posterior", "mgvi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no trained model to run mgvi on" in err
