"""galdecomp anomaly: scores of a catalog under a trained run, the top list, the CLI's errors."""
import csv
import os

import healpy as hp
import numpy as np
import pytest
import yaml
from astropy.io import fits

import galdecomp
from galdecomp.cli import main
from galdecomp.fileio import write_healpix_fits
from galdecomp.products.anomaly import ONE_SIGMA, SCORES, anomaly_scores, load_rows, residual_scale

ANOMALY_PIXEL = 600  # NESTED, high latitude at nside 8


def write_copy(sky_catalog, names, values, folder, drop=()):
    """Write ``values`` (P, C physical, NESTED) as a catalog like ``sky_catalog``, without ``drop``."""
    with open(sky_catalog) as f:
        doc = yaml.safe_load(f)
    os.makedirs(os.path.join(folder, "maps"), exist_ok=True)
    entries = {e["name"]: e for e in doc["maps"]}
    doc["maps"] = []
    for c, name in enumerate(names):
        if name in drop:
            continue
        e = dict(entries[name], file=f"maps/{name}.fits")
        write_healpix_fits(os.path.join(folder, e["file"]), values[:, c], name, e["unit"], nest=True)
        doc["maps"].append(e)
    path = os.path.join(folder, "catalog.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A run on a small simulated sky, and a copy of the sky with one anomalous pixel."""
    root = tmp_path_factory.mktemp("anomaly")
    sky = str(root / "sky" / "catalog.yaml")
    assert main(["simulate", "--nside", "8", "--out", str(root / "sky"), "--no-plot"]) == 0
    assert main(["fit", sky, "--out", str(root / "run"), "--max-epochs", "10", "--latent-dim", "3"]) == 0
    model = galdecomp.load(str(root / "run"))
    values = load_rows(model, sky)[0]
    y = model.standardise(values)
    zigzag = 15.0 * (-1.0) ** np.arange(model.n_features)  # a spectrum no component has
    y[ANOMALY_PIXEL] += zigzag * model.sigma
    bad = write_copy(sky, model.names, model.physical(y), str(root / "bad"))
    return root, model, sky, bad


def test_injected_anomaly_is_ranked_first_by_chi2(toy, capsys):
    root, model, sky, bad = toy
    out = root / "scores"
    assert main(["anomaly", str(root / "run"), "--catalog", bad, "--out", str(out), "--top", "5"]) == 0
    assert sorted(os.listdir(out)) == ["anomaly.fits", "anomaly.png", "anomaly_top.csv", "calibration.csv"]
    top = list(csv.DictReader(open(out / "anomaly_top.csv")))
    # in calibrated units the short toy fit's worst Galactic-plane pixels compete with it
    assert len(top) == 5 and ANOMALY_PIXEL in [int(r["pixel"]) for r in top]
    top = [r for r in top if int(r["pixel"]) == ANOMALY_PIXEL]
    assert top[0]["channel_1"] in model.names and abs(float(top[0]["residual_1"])) > 5
    lon, lat = hp.pix2ang(8, ANOMALY_PIXEL, nest=True, lonlat=True)
    assert float(top[0]["l_deg"]) == pytest.approx(lon, abs=1e-3) and float(top[0]["b_deg"]) == pytest.approx(lat, abs=1e-3)
    # the FITS file: NESTED, Galactic, one column per score, the same values
    with fits.open(out / "anomaly.fits") as f:
        h = f[1].header
        assert h["ORDERING"] == "NESTED" and h["COORDSYS"].startswith("G")
        cols = [c.name for c in f[1].columns]
    has_transform = os.path.isfile(root / "run" / "latent_transform.npz")  # written by fit since the transform
    assert cols == [k for k in SCORES if has_transform or k != "neg_log_latent_density"]
    maps = np.array(hp.read_map(str(out / "anomaly.fits"), field=None, nest=True))
    values = load_rows(model, bad)[0]
    cal = list(csv.DictReader(open(out / "calibration.csv")))
    assert [r["channel"] for r in cal] == model.names
    scale = residual_scale(model, load_rows(model, sky)[0])[0]
    np.testing.assert_allclose([float(r["noise_factor"]) for r in cal], scale, atol=1e-4)
    scores, _, _ = anomaly_scores(model, values, 8, scale=scale)
    np.testing.assert_allclose(maps[0], scores["chi2_per_channel"], rtol=1e-10)
    if has_transform and hasattr(model, "latent_log_density"):
        mean = model.encode(values)[0]
        np.testing.assert_allclose(maps[-1], -model.latent_log_density(mean, "transformed"), rtol=1e-8)
    assert "anomaly_top.csv" in capsys.readouterr().out


def test_default_catalog_is_the_runs_own_and_scores_rank_by_choice(toy):
    root, model, sky, bad = toy
    out = root / "own"
    assert main(["anomaly", str(root / "run"), "--out", str(out), "--score", "max_abs_residual", "--top", "3"]) == 0
    top = list(csv.DictReader(open(out / "anomaly_top.csv")))
    vals = [float(r["max_abs_residual"]) for r in top]
    assert vals == sorted(vals, reverse=True) and int(top[0]["pixel"]) != ANOMALY_PIXEL


def test_calibrated_residuals_cover_68_percent_per_channel_on_held_out_pixels(toy):
    """The scale measured on half of the run's pixels puts 68 % of the other half's residuals of
    every channel within +-1; the trained noise alone does worse; ``--noise model`` is the
    trained noise (the scores of the model's own chi2)."""
    root, model, sky, bad = toy
    values = load_rows(model, sky)[0]
    half = np.random.default_rng(1).permutation(len(values))
    fit_rows, test_rows = half[:len(values) // 2], half[len(values) // 2:]
    scale, before = residual_scale(model, values[fit_rows])

    def residuals(rows):
        y = model.standardise(values[rows])
        return np.abs(y - model.decode(model.encode(values[rows])[0], physical=False)) / model.sigma

    r = residuals(test_rows)
    calibrated, trained = (r <= scale).mean(0), (r <= 1).mean(0)
    assert np.all(np.abs(calibrated - ONE_SIGMA) < 0.09), calibrated
    assert np.mean(np.abs(calibrated - ONE_SIGMA)) < np.mean(np.abs(trained - ONE_SIGMA)), (calibrated, trained)
    np.testing.assert_allclose(before, (residuals(fit_rows) <= 1).mean(0), atol=1e-12)
    out = root / "model_noise"
    assert main(["anomaly", str(root / "run"), "--catalog", bad, "--out", str(out), "--noise", "model"]) == 0
    assert "calibration.csv" not in os.listdir(out)
    top = list(csv.DictReader(open(out / "anomaly_top.csv")))
    assert int(top[0]["pixel"]) == ANOMALY_PIXEL
    maps = np.array(hp.read_map(str(out / "anomaly.fits"), field=None, nest=True))
    scores = anomaly_scores(model, load_rows(model, bad)[0], 8)[0]
    np.testing.assert_allclose(maps[0], scores["chi2_per_channel"], rtol=1e-10)


def test_pixels_with_gaps_are_scored_per_observed_channel(toy):
    root, model, sky, bad = toy
    values = load_rows(model, sky)[0]
    gappy = values.copy()
    gappy[:100, :10] = np.nan
    s, resid, n = anomaly_scores(model, gappy, 8)
    assert np.all(n[:100] == model.n_features - 10) and np.all(np.isnan(resid[:100, :10]))
    assert np.all(np.isfinite(s["chi2_per_channel"])) and np.all(s["chi2_per_channel"] >= 0)
    full = anomaly_scores(model, values, 8)[0]
    # per channel: the gappy pixels' scores stay on the scale of the complete ones
    ratio = np.median(s["chi2_per_channel"][:100]) / np.median(full["chi2_per_channel"])
    assert 0.2 < ratio < 5


@pytest.mark.parametrize("case, message", [
    ("missing_run", "run folder not found"),
    ("missing_channel", "no map named"),
    ("bad_score", "unknown score"),
    ("exists", "output folder exists"),
    ("no_catalog", "catalog file not found"),
])
def test_cli_errors_are_one_line_and_write_nothing(toy, capsys, case, message):
    root, model, sky, bad = toy
    out = root / f"err_{case}"
    run = str(root / "run")
    if case == "missing_channel":
        values = load_rows(model, sky)[0]
        cat = write_copy(sky, model.names, values, str(root / "short"), drop=[model.names[4]])
        argv = ["anomaly", run, "--catalog", cat, "--out", str(out)]
        message = f"no map named '{model.names[4]}'"
    elif case == "missing_run":
        argv = ["anomaly", str(root / "nope"), "--out", str(out)]
    elif case == "bad_score":
        argv = ["anomaly", run, "--out", str(out), "--score", "loudness"]
    elif case == "exists":
        out = root / "sky"
        argv = ["anomaly", run, "--out", str(out)]
    else:
        argv = ["anomaly", run, "--catalog", str(root / "none.yaml"), "--out", str(out)]
    before = os.path.exists(out)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("galdecomp: error: ") and message in err[0], err
    assert os.path.exists(out) == before


def test_latent_transform_score_is_the_runs_transform_and_left_out_without_one(toy, tmp_path):
    import shutil

    root, model, sky, bad = toy
    run = root / "run"
    assert model.transform is not None  # fit writes one
    assert main(["anomaly", str(run), "--out", str(root / "lt"), "--score", "neg_log_latent_density"]) == 0
    maps = np.array(hp.read_map(str(root / "lt" / "anomaly.fits"), field=None, nest=True))
    mean = model.encode(load_rows(model)[0])[0]
    np.testing.assert_allclose(maps[-1], -model.transform.log_density(mean), rtol=1e-6)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    os.remove(copy / "latent_transform.npz")
    assert main(["anomaly", str(copy), "--out", str(tmp_path / "none")]) == 0
    assert len(hp.read_map(str(tmp_path / "none" / "anomaly.fits"), field=None, nest=True)) == len(SCORES) - 1
    assert main(["anomaly", str(copy), "--out", str(tmp_path / "x"), "--score", "neg_log_latent_density"]) == 2
