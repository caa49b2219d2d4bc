"""A plain table (.npy, .npz, .csv) as the data set of a fit: products, resume, bad input."""
import numpy as np
import pytest
import yaml

from galdecomp.cli import main

SMALL = {"latent_dim": 2, "decoder": {"hidden": [8]}, "encoder": {"hidden": [8]},
         "training": {"batch_size": 64, "max_epochs": 3, "schedule_epochs": 4}}


@pytest.fixture(scope="module")
def table():
    """400 rows x 5 features from 2 latent features, with some missing entries."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((400, 2))
    x = 100 + 10 * np.tanh(z @ rng.standard_normal((2, 5))) + 0.5 * rng.standard_normal((400, 5))
    x[::17, 2] = np.nan
    return x


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return str(path)


def read_csv(path):
    with open(path) as f:
        header = f.readline().strip().split(",")
    return header, np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def check_run(run, x, names):
    for f in ["config.yaml", "checkpoint.npz", "latent_mean.csv", "latent_std.csv", "reconstruction.csv",
              "residual.csv", "noise.csv", "significance.csv", "history.csv", "plots/training.png"]:
        assert (run / f).is_file(), f
    assert not list(run.glob("*.fits"))
    cols, mean = read_csv(run / "latent_mean.csv")
    assert cols == ["feature_01", "feature_02"] and mean.shape == (len(x), 2)
    cols, std = read_csv(run / "latent_std.csv")
    assert std.shape == (len(x), 2) and np.all(std > 0)
    cols, recon = read_csv(run / "reconstruction.csv")
    assert cols == names and recon.shape == x.shape
    # physical units (the data are ~100 +- 10): the reconstruction is on the data's scale
    assert np.all(np.abs(recon.mean(0) - np.nanmean(x, 0)) < 0.5 * np.nanstd(x, 0))
    assert len(np.genfromtxt(run / "history.csv", delimiter=",", names=True)) == 3
    noise = np.genfromtxt(run / "noise.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert list(noise["channel"]) == names
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["kind"] == "table" and "catalog" not in cfg and "nside" not in cfg["data"]


def test_fit_npy_table(table, tmp_path, config, capsys):
    path = tmp_path / "t.npy"
    np.save(path, table)
    run = tmp_path / "run"
    assert main(["fit", "--data", str(path), "--out", str(run), "--config", config]) == 0
    check_run(run, table, [f"column_{i:02d}" for i in range(1, 6)])
    assert "latent_mean.csv" in capsys.readouterr().out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["path"] == str(path)


def test_fit_csv_and_npz_tables_agree(table, tmp_path, config):
    names = ["a", "b", "c", "d", "e"]
    csv = tmp_path / "t.csv"
    csv.write_text(",".join(names) + "\n" + "".join(
        ",".join("" if np.isnan(v) else repr(float(v)) for v in row) + "\n" for row in table))
    npz = tmp_path / "t.npz"
    np.savez(npz, data=table, names=np.array(names))
    for path in (csv, npz):
        assert main(["fit", "--data", str(path), "--out", str(tmp_path / path.suffix[1:]), "--config", config]) == 0
        check_run(tmp_path / path.suffix[1:], table, names)
    np.testing.assert_array_equal(read_csv(tmp_path / "csv" / "latent_mean.csv")[1],
                                  read_csv(tmp_path / "npz" / "latent_mean.csv")[1])


def test_table_run_resumes_to_the_same_end(table, tmp_path, config):
    path = tmp_path / "t.npy"
    np.save(path, table)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["fit", "--data", str(path), "--out", str(whole), "--config", config, "--max-epochs", "4"]) == 0
    assert main(["fit", "--data", str(path), "--out", str(parts), "--config", config, "--max-epochs", "2"]) == 0
    assert main(["fit", "--data", str(path), "--out", str(parts), "--resume", "--max-epochs", "4"]) == 0
    with np.load(whole / "checkpoint.npz") as a, np.load(parts / "checkpoint.npz") as b:
        np.testing.assert_array_equal(a["params"], b["params"])
    assert main(["fit", "--data", str(path), "--out", str(parts)]) == 2  # exists, no --resume
    other = tmp_path / "other.npy"
    np.save(other, table[::-1])
    assert main(["fit", "--data", str(other), "--out", str(parts), "--resume"]) == 2


def error_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert err.startswith("galdecomp: error: ") and "\n" not in err and "Traceback" not in err, err
    for p in parts:
        assert p in err, err


@pytest.mark.parametrize("name, content, problem", [
    ("gone.npy", None, "file not found"),
    ("vector.npy", np.arange(5.0), "expected a 2-D array (rows x features), got shape (5,)"),
    ("cube.npy", np.zeros((3, 2, 2)), "expected a 2-D array"),
    ("words.npy", np.array([["a", "b"], ["c", "d"]]), "expected numbers"),
    ("nodata.npz", {"x": np.zeros((3, 2))}, "no array 'data'"),
    ("names.npz", {"data": np.zeros((3, 2)), "names": np.array(["a"])}, "1 feature names for 2 columns"),
    ("empty.npy", np.full((4, 2), np.nan), "feature 'column_01' has no value"),
    ("text.csv", "a,b\n1,2\n3,x\n", "line 3: non-numeric value 'x'"),
    ("ragged.csv", "a,b\n1,2\n3\n", "line 3: 1 values, the header has 2"),
    ("table.txt", "1 2\n", "unknown table format"),
])
def test_bad_table_is_one_line_exit_2_nothing_written(tmp_path, capsys, name, content, problem):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif content is not None:
        np.save(path, content)
    run = tmp_path / "run"
    assert main(["fit", "--data", str(path), "--out", str(run)]) == 2
    error_line(capsys, f"{path}: {problem}")
    assert not run.exists()


def test_fit_needs_exactly_one_data_set(tmp_path, table, capsys):
    path = tmp_path / "t.npy"
    np.save(path, table)
    assert main(["fit", "--out", str(tmp_path / "run")]) == 2
    error_line(capsys, "exactly one of CATALOG or --data")
    assert main(["fit", "cat.yaml", "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    error_line(capsys, "exactly one of CATALOG or --data")
    assert main(["fit", "--data", str(path), "--out", str(tmp_path / "run"), "--nside", "8"]) == 2
    error_line(capsys, "--nside")
    assert main(["fit", "--data", str(path), "--out", str(tmp_path / "run"), "--latent-dim", "6"]) == 2
    error_line(capsys, f"{path}: 5 features cannot support 6 latent features")
    assert not (tmp_path / "run").exists()


def test_two_ranks_shard_the_rows_and_equal_one(table, tmp_path, config):
    import os
    import subprocess
    import sys

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec beside the interpreter")
    path = tmp_path / "t.npy"
    np.save(path, table)
    config = tmp_path / "small64.yaml"  # float64 kernels: 1 and 2 ranks then agree to 1e-8
    config.write_text(yaml.safe_dump({**SMALL, "training": {**SMALL["training"], "dtype": "float64"}}))
    config = str(config)
    assert main(["fit", "--data", str(path), "--out", str(tmp_path / "k1"), "--config", config]) == 0
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "galdecomp", "fit", "--data", str(path),
                        "--out", str(tmp_path / "k2"), "--config", config], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "400 rows x 5 features" in p.stderr and "on 2 MPI ranks" in p.stderr
    a, b = (read_csv(tmp_path / k / "latent_mean.csv")[1] for k in ("k1", "k2"))
    assert a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-8 * np.max(np.abs(a))


def test_nside_is_a_data_setting_not_a_model_setting(small_catalog, tmp_path, config):
    """nside (a top-level setting of older config.yaml files, --nside) lives in data.nside;
    model_signature ignores it; an old config.yaml resumes."""
    from galdecomp.inference.config import model_signature, resolve_config

    assert resolve_config({"nside": 4})["data"]["nside"] == 4
    assert resolve_config(None, {"nside": 2})["data"]["nside"] == 2
    assert "nside" not in resolve_config() and "data" not in model_signature(resolve_config())
    assert model_signature(resolve_config({"nside": 4})) == model_signature(resolve_config())
    cat, _, _ = small_catalog
    run = tmp_path / "sky"
    assert main(["fit", cat, "--out", str(run), "--nside", "4", "--config", config, "--max-epochs", "2"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"] == {"kind": "sky", "path": cat, "nside": 4, "fwhm_arcmin": None} and cfg["catalog"] == cat
    old = {"catalog": cat, "nside": 4, **{k: v for k, v in cfg.items() if k not in ("catalog", "data")}}
    (run / "config.yaml").write_text(yaml.safe_dump(old))  # the layout before the data section
    assert main(["fit", cat, "--out", str(run), "--resume", "--max-epochs", "3"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["nside"] == 4
