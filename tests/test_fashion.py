"""Fashion-MNIST path: idx reader, logit transform, and a short fit on a few hundred images."""
import gzip
import os

import numpy as np
import pytest

from galdecomp.datasets.fashion_mnist import (PRESET, image_preprocessor, load_fashion_mnist, read_idx)
from galdecomp.errors import InputError
from galdecomp.preprocessing import ChannelTransform


def fashion(split):
    """Images and labels of a split, or skip (fail under CI) with the one-line install hint."""
    try:
        return load_fashion_mnist(split)
    except InputError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e), pytrace=False)
        pytest.skip(str(e))


def _write_idx(path, arr, code):
    head = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def test_idx_reader_and_loader(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    lab = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), img, 0x08)
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), lab, 0x08)
    assert np.array_equal(read_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz")), img)
    X, y = load_fashion_mnist("test", root=str(tmp_path))
    assert X.shape == (5, 784) and np.allclose(X * 255, img.reshape(5, -1)) and list(y) == [3, 1, 4, 1, 5]
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=str(tmp_path))
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + b"abc")  # truncated
    with pytest.raises(InputError, match="another length"):
        read_idx(str(tmp_path / "bad.gz"))


def test_logit_transform_exact_inverse():
    x = np.r_[0.0, 1.0, np.linspace(0, 1, 256), np.random.default_rng(1).random(1000)]
    tr = ChannelTransform.fit(x, "logit", logit_eps=1e-3)
    y = tr.forward(x)
    assert np.all(np.isfinite(y)) and abs(y.mean()) < 1e-12 and abs(y.std() - 1) < 1e-12
    assert np.max(np.abs(tr.inverse(y) - x)) < 1e-13
    h = 1e-6  # derivative against a finite difference
    assert np.allclose(tr.derivative(0.3), (tr.forward(0.3 + h) - tr.forward(0.3 - h)) / (2 * h), rtol=1e-6)
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        ChannelTransform.fit(np.r_[x, 1.5], "logit")
    rt = ChannelTransform(**vars(tr))  # stored as a plain dict (eps in ``scale``)
    assert rt.scale == 1e-3 and np.allclose(rt.inverse(y), x, atol=1e-13)


def test_fit_on_a_few_hundred_images():
    import copy

    from galdecomp.inference.config import resolve_config
    from galdecomp.inference.trained import TrainedModel
    from galdecomp.inference.minibatches import split_rows
    from galdecomp.inference.training import TrainingState
    from galdecomp.model.autoencoder import Autoencoder
    from galdecomp.inference.objective import ELBOObjective
    from galdecomp.inference.fitting import fit_rows

    X, _ = fashion("train")
    X = X[:1000]
    pre = image_preprocessor(X)
    D = pre.forward(X.T).T
    p = copy.deepcopy(PRESET)
    p["training"].update(max_epochs=20, batch_size=64)
    p["encoder"]["hidden"], p["decoder"]["hidden"] = [64], [64]
    cfg = resolve_config(p, {"latent_dim": 4})
    model = Autoencoder.from_config(cfg, 784, cfg["noise"]["floor"])
    state = TrainingState(model.init_params(0), cfg["training"]["learning_rate"], 0)
    tr, va = split_rows(len(D), cfg["training"]["validation_fraction"], 0)
    xi = np.random.default_rng([0, 2]).standard_normal((va.size, 4))
    elbo0 = -ELBOObjective(model, D, tr.size).value(state.params, va, xi)[0]
    fit_rows(model, D, state, cfg)
    elbo1 = state.history[-1]["validation_elbo"]
    assert elbo1 > elbo0 + 200, (elbo0, elbo1)  # nats per image of 784 standardised-logit pixels
    tm = TrainedModel(model, state.best_params, pre, cfg, ["intensity"] * 784, dict(kind="table", path="fmnist"))
    mean, std = tm.encode(X[va])
    assert std.shape == mean.shape
    R = np.clip(tm.decode(mean), 0, 1)
    mse, mse_mean = ((R - X[va]) ** 2).mean(), ((X[tr].mean(0) - X[va]) ** 2).mean()
    assert mse < 0.8 * mse_mean, (mse, mse_mean)
    s = tm.score_rows(X[va])
    assert np.all(np.isfinite(s["elbo"])) and s["n_observed"].min() == 784
    inverted = tm.score_rows(1.0 - X[va])
    assert np.median(inverted["chi2"]) > np.median(s["chi2"])


def test_fit_data_fashion_mnist_preset_writes_tables_and_image_grids(tmp_path, monkeypatch, capsys):
    """`galdecomp fit --data fashion-mnist` on a small idx file (via $GALDECOMP_FASHION_MNIST)."""
    import galdecomp
    from galdecomp.cli import main

    X = fashion("train")[0][:400]
    _write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), np.round(X * 255).astype(np.uint8).reshape(-1, 28, 28), 0x08)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(400, np.uint8), 0x08)
    monkeypatch.setenv("GALDECOMP_FASHION_MNIST", str(tmp_path))
    run = tmp_path / "run"
    assert main(["fit", "--data", "fashion-mnist", "--out", str(run), "--max-epochs", "2", "--latent-dim", "4"]) == 0
    for f in ["latent_mean.csv", "reconstruction.npy", "residual.npy", "plots/reconstructions.png", "model.npz"]:
        assert (run / f).is_file(), f
    assert np.load(run / "reconstruction.npy").shape == (400, 784)
    model = galdecomp.load(str(run))
    assert model.config["decoder"]["hidden"] == PRESET["decoder"]["hidden"]  # the image preset
    assert model.load_rows().shape == (400, 784)
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "20", "--out", str(tmp_path / "s")]) == 0
