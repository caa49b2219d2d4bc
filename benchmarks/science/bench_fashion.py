"""Fashion-MNIST: the sky's autoencoder on images — diagonal against Fisher-metric VAE (issue 12).

Models: galdecomp's own training (``fit_rows`` with ``galdecomp.datasets.fashion_mnist.PRESET``)
on standardised logit pixels (``image_preprocessor``), latent dimensions ``--latent-dims``,
covariance diagonal and Fisher (``--fisher-dims``: Fisher is trained only at these).

On the test images (``--n-test``):

- ``elbo``, ``iwae``: ELBO and importance-weighted log-likelihood (``--k`` draws from q per
  image, q as proposal), nats per image **in the standardised-logit space** (not pixel space);
- ``mse``: reconstruction MSE in pixel space [0, 1] (posterior mean decoded, inverse transform,
  clipped to [0, 1]); ``mse_mean_image``: the mean training image's;
- posterior check on ``--n-check`` images with ``--k-check`` draws: ``KL(q || p(z|d)) =
  E_q[log q - log p(d, z)] + log p(d)`` with ``log p(d)`` the IWAE estimate of the same draws
  (a lower bound of the true KL, tight when the effective sample size is large), with the median
  ESS per image;
- samples from N(0, 1) (and through ``galdecomp.model.latent_transform.GaussianisingTransform``
  fitted on the training posterior means): Fréchet distance in the
  64-d penultimate-layer feature space of a classifier (784-256-64-10 ReLU MLP, torch) trained
  here on the training images — no Inception weights can be downloaded here; the floor is the
  distance between training and test images;
- out-of-distribution AUROC (test images against pixel-inverted ``1 - x`` and vertically flipped
  test images) of the negative ELBO, the reconstruction chi^2, ``-log N(mu; 0, 1)`` and the
  transform's ``-log density(mu)``;
- throughput: one epoch on 60,000 images (59,400 trained, 600 validated) at L = 10 with galdecomp
  against the PyTorch VAE peer of the same widths, batch and float32 (``benchmarks.common.torch_vae``),
  side by side in this process (``OMP_NUM_THREADS`` and torch threads equal: ``--threads``).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.science.bench_fashion --quick      # a few minutes
    OMP_NUM_THREADS=1 python -m benchmarks.science.bench_fashion              # the full run (<= 30 min, 2 cores)

Writes ``--out`` (default ``benchmarks/out/fashion``): ``summary.md``, ``rows.csv`` and PNG grids.
"""
import argparse
import copy
import csv
import os
import sys
import time

import numpy as np

from benchmarks import common

LOG2PI = np.log(2 * np.pi)


# ------------------------------------------------------------------------------ model helpers
def train_model(D, L, cov, epochs, seed=0, log=None, validation_fraction=None):
    """galdecomp's fit of standardised rows ``D``; returns (model, params, cfg, state, seconds)."""
    from galdecomp.datasets.fashion_mnist import PRESET
    from galdecomp.inference.config import resolve_config
    from galdecomp.inference.training import TrainingState
    from galdecomp.model.autoencoder import Autoencoder
    from galdecomp.inference.fitting import fit_rows

    p = copy.deepcopy(PRESET)
    p["training"]["max_epochs"] = epochs
    if validation_fraction:
        p["training"]["validation_fraction"] = validation_fraction
    cfg = resolve_config(p, {"latent_dim": L, "covariance": cov, "seed": seed})
    model = Autoencoder.from_config(cfg, D.shape[1], cfg["noise"]["floor"])
    state = TrainingState(model.init_params(seed), cfg["training"]["learning_rate"], seed)
    t0 = time.perf_counter()
    fit_rows(model, D, state, cfg, log=log)
    return model, state.best_params, cfg, state, time.perf_counter() - t0


def log_weights(model, params, D, k, rng, block=100):
    """Importance log-weights ``log p(d, z) - log q(z | d)`` of ``k`` draws from q per row.

    Returns
    -------
    logw : ndarray, shape (N, k)
    mean : ndarray, shape (N, L)
        Posterior means.
    """
    mask = np.ones(D.shape, bool)
    mean, cov = model.posterior_moments(params, D, mask, full_cov=True)
    chol = np.linalg.cholesky(cov)
    N, L = mean.shape
    logdet = np.log(np.einsum("nii->ni", chol)).sum(axis=1)
    out = np.empty((N, k))
    for a in range(0, N, block):
        b = slice(a, min(a + block, N))
        n = b.stop - b.start
        eps = rng.standard_normal((n, k, L))
        z = mean[b, None, :] + np.einsum("nij,nkj->nki", chol[b], eps)
        log_q = -0.5 * (eps ** 2).sum(-1) - logdet[b, None] - 0.5 * L * LOG2PI
        log_pz = -0.5 * (z ** 2).sum(-1) - 0.5 * L * LOG2PI
        d = np.repeat(D[b], k, axis=0)
        nll = model.nll_rows(params, d, np.ones(d.shape, bool), z.reshape(n * k, L)).reshape(n, k)
        out[b] = -nll + log_pz - log_q
    return out, mean


def ood_scores(model, params, D, rng, trans=None, k=16):
    """Anomaly scores per row (high = anomalous): -ELBO (k draws), reconstruction chi^2 at the
    posterior mean, -log N(mu; 0, 1) (constant dropped) and, with a latent transform, -log p_T(mu)."""
    lw, mu = log_weights(model, params, D, k, rng)
    pred = model.decode(params, mu)
    out = {"-elbo": -lw.mean(1), "chi2": (((D - pred) / model.sigma(params)) ** 2).sum(1),
           "-log N(mu)": 0.5 * (mu ** 2).sum(1)}
    if trans is not None:
        out["-log p_T(mu)"] = -np.asarray(trans.log_density(mu))
    return out


def iwae_terms(logw):
    """Per row: ELBO, IWAE log p(d), KL(q || p(z|d)) = IWAE - ELBO, effective sample size."""
    from scipy.special import logsumexp

    k = logw.shape[1]
    lse = logsumexp(logw, axis=1)
    elbo = logw.mean(axis=1)
    iwae = lse - np.log(k)
    w = np.exp(logw - lse[:, None])
    ess = 1.0 / (w ** 2).sum(axis=1)
    return elbo, iwae, iwae - elbo, ess


def to_pixels(pre, Y):
    """Standardised logit rows to intensities in [0, 1]."""
    return np.clip(pre.inverse(Y.T).T, 0.0, 1.0)


def train_classifier(torch, X, y, epochs=4, seed=0):
    """784-256-64-10 ReLU MLP (Adam, batch 256); returns ``features(X) -> (N, 64)`` and the net."""
    nn = torch.nn
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
    net = nn.Sequential(body, nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    g = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in np.array_split(g.permutation(len(X)), len(X) // 256):
            i = torch.as_tensor(idx)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(Xt[i]), yt[i])
            loss.backward()
            opt.step()

    def features(A):
        with torch.no_grad():
            return body(torch.tensor(A, dtype=torch.float32)).numpy().astype(np.float64)

    def accuracy(A, lab):
        with torch.no_grad():
            return float((net(torch.tensor(A, dtype=torch.float32)).argmax(1).numpy() == lab).mean())

    return features, accuracy


def frechet(f1, f2):
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    from galdecomp.products.sample_quality import frechet_distance

    return float(frechet_distance(f1, f2))


def torch_epoch(torch, D, L, cfg, seed=0):
    """Seconds of one epoch of the PyTorch peer (same widths, batch, float32) over rows ``D``."""
    torch.manual_seed(seed)
    C = D.shape[1]
    params, neg_elbo, _ = common.torch_vae(torch, C, L, cfg["encoder"]["hidden"], cfg["decoder"]["hidden"],
                                              cfg["noise"]["floor"] ** 2, cfg["noise"]["sigma0"])
    opt = torch.optim.Adam(params, lr=cfg["training"]["learning_rate"])
    Dt = torch.tensor(D, dtype=torch.float32)
    Mt = torch.ones_like(Dt)
    X = torch.cat([Dt, Mt], 1)
    bs = cfg["training"]["batch_size"]
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(D)))
    t0 = time.perf_counter()
    for a in range(0, len(D) - bs + 1, bs):
        i = order[a:a + bs]
        opt.zero_grad()
        loss = neg_elbo(X[i], Dt[i], Mt[i], torch.randn(len(i), L))
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, loss.item()


def mask_input_cost(cfg, L, reps=30):
    """Seconds per training step (forward + vjp) of the encoder with 2C inputs against C inputs."""
    from galdecomp.model.mlp import MLP

    bs, out = cfg["training"]["batch_size"], {}
    rng = np.random.default_rng(0)
    for n_in in (1568, 784):
        mlp = MLP([n_in, *cfg["encoder"]["hidden"], 2 * L], cfg["encoder"]["activation"], dtype=np.float32)
        th = rng.standard_normal(mlp.n_params) * 0.01
        x, g = rng.standard_normal((bs, n_in)), rng.standard_normal((bs, 2 * L))
        mlp.vjp(th, x, g)
        t0 = time.perf_counter()
        for _ in range(reps):
            mlp.vjp(th, x, g)
        out[n_in] = (time.perf_counter() - t0) / reps
    return out


# ------------------------------------------------------------------------------ plots
def grid_png(path, images, ncol, title=None, scale=0.45):
    """Save images (N, 784) in [0, 1] as a grid PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    nrow = -(-n // ncol)
    tiles = np.ones((nrow * 29 + 1, ncol * 29 + 1))
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        tiles[1 + 29 * r:29 * (r + 1), 1 + 29 * c:29 * (c + 1)] = 1.0 - im.reshape(28, 28)
    fig = plt.figure(figsize=(ncol * scale, nrow * scale + (0.3 if title else 0)))
    ax = fig.add_axes([0, 0, 1, 1 if not title else nrow * scale / (nrow * scale + 0.3)])
    ax.imshow(tiles, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8, y=0.995)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6,000 images, 2 epochs, L 2 and 10, smaller checks")
    ap.add_argument("--out", default=common.out_dir("fashion"))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--latent-dims", default=None, help="comma-separated (default 2,10,32)")
    ap.add_argument("--fisher-dims", default=None, help="latent dims also trained with Fisher (default 2,10)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--k", type=int, default=100, help="importance draws per test image")
    ap.add_argument("--n-check", type=int, default=None)
    ap.add_argument("--k-check", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS equal)")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--eps", type=float, default=None, help="logit eps (default LOGIT_EPS)")
    ap.add_argument("--heldout", default="1,8", help="classes left out of training for the held-out-class "
                    "OOD test (default Trouser, Bag; '' to skip)")
    ap.add_argument("--heldout-covariances", default="diagonal,fisher")
    ap.add_argument("--only-fisher", action="store_true", help="train no diagonal model (e.g. Fisher L=32 alone)")
    a = ap.parse_args(argv)
    q = a.quick
    epochs = a.epochs or (2 if q else 8)
    dims = [int(x) for x in (a.latent_dims or ("2,10" if q else "2,10,32")).split(",")]
    fdims = [int(x) for x in ("2,10" if a.fisher_dims is None else a.fisher_dims).split(",") if x]
    n_train, n_test = a.n_train or (6000 if q else 60000), a.n_test or (2000 if q else 10000)
    n_check, k_check = a.n_check or (100 if q else 300), a.k_check or (300 if q else 1000)
    os.makedirs(a.out, exist_ok=True)

    import torch
    from sklearn.metrics import roc_auc_score

    from galdecomp.datasets.fashion_mnist import CLASSES, LOGIT_EPS, PRESET, image_preprocessor, load_fashion_mnist
    from galdecomp.products.generate import draws_from_moments, fit_latent_density, transform_rows

    torch.set_num_threads(a.threads)
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"# threads: torch {a.threads}, OMP_NUM_THREADS {omp}; load {common.load_average()}")
    print(f"# {common.package_fingerprint()}")
    Xtr_all, ytr_all = load_fashion_mnist("train")
    Xte_all, yte_all = load_fashion_mnist("test")
    Xtr, ytr = Xtr_all[:n_train], ytr_all[:n_train]
    Xte, yte = Xte_all[:n_test], yte_all[:n_test]
    eps = LOGIT_EPS if a.eps is None else a.eps
    pre = image_preprocessor(Xtr, eps)
    std = lambda X: pre.forward(X.T).T  # noqa: E731
    Dtr, Dte = std(Xtr), std(Xte)
    rng = np.random.default_rng(0)
    lines, rows = [], []
    say = lambda s="": (print(s, flush=True), lines.append(s))  # noqa: E731

    # classifier features for the Fréchet distance
    t0 = time.perf_counter()
    features, accuracy = train_classifier(torch, Xtr_all, ytr_all, epochs=2 if q else 4)
    F_te = features(Xte)
    fd_floor = frechet(features(Xtr_all[-10000:]), F_te)
    clf_s = time.perf_counter() - t0
    mean_img = Xtr.mean(0)
    mse_mean = float(((Xte - mean_img) ** 2).mean())

    ood_sets = {"inverted": 1.0 - Xte, "vflip": Xte.reshape(-1, 28, 28)[:, ::-1, :].reshape(len(Xte), -1)}
    models = [(L, "diagonal") for L in dims if not a.only_fisher] + [(L, "fisher") for L in dims if L in fdims]
    grids = {}
    for L, cov in models:
        print(f"== L={L} {cov}: training {epochs} epochs on {n_train} images", flush=True)
        model, params, cfg, state, secs = train_model(Dtr, L, cov, epochs, log=print)
        rec = dict(L=L, covariance=cov, epochs=state.epoch, train_seconds=round(secs, 1),
                   seconds_per_epoch=round(secs / state.epoch, 1))
        logw, mean = log_weights(model, params, Dte, a.k, rng)
        elbo, iwae, _, _ = iwae_terms(logw)
        rec.update(elbo=elbo.mean(), iwae=iwae.mean())
        mse = float(((to_pixels(pre, model.decode(params, mean)) - Xte) ** 2).mean())
        rec.update(mse=mse, mse_mean_image=mse_mean)
        logw_c, _ = log_weights(model, params, Dte[:n_check], k_check, rng)
        e_c, i_c, kl_c, ess_c = iwae_terms(logw_c)
        rec.update(kl_q_post=kl_c.mean(), kl_q_post_median=np.median(kl_c), ess_median=np.median(ess_c),
                   ess_fraction=np.median(ess_c) / k_check)
        # samples
        n_s = len(Xte)
        zs = rng.standard_normal((n_s, L))
        S = to_pixels(pre, model.decode(params, zs))
        rec["fd_prior"] = frechet(features(S), F_te)
        rec["fd_floor"] = fd_floor
        # the recipe of `galdecomp fit` / `galdecomp transform`: 8 draws from q(z|d) of up to
        # 20,000 training images, iterative Gaussianisation (and the 16-component mixture)
        mtr, ctr = model.posterior_moments(params, Dtr, np.ones(Dtr.shape, bool), full_cov=True)
        z, groups = draws_from_moments(mtr, ctr, transform_rows(len(Dtr), 0.1, 0), 0)
        for method, key in (("gmm", "fd_gmm"), ("gaussianising", "fd_transform")):
            trans = fit_latent_density(z, groups, method, seed=0)
            St = to_pixels(pre, model.decode(params, np.asarray(trans.sample(n_s, rng))))
            rec[key] = frechet(features(St), F_te)
        grids[(L, cov, "transform")] = St[:64]
        grids[(L, cov, "prior")] = S[:64]
        grids[(L, cov, "recon")] = (Xte[:32], to_pixels(pre, model.decode(params, mean[:32])))
        # out of distribution
        s_in = ood_scores(model, params, Dte, rng, trans)
        for name, Xo in ood_sets.items():
            s_out = ood_scores(model, params, std(Xo), rng, trans)
            for sc in s_in:
                y = np.r_[np.zeros(len(Xte)), np.ones(len(Xo))]
                rec[f"auroc_{name}_{sc}"] = roc_auc_score(y, np.r_[s_in[sc], s_out[sc]])
        rows.append(rec)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)

    # held-out classes: train at L=10 without them, score their test images against the others
    held = [int(c) for c in a.heldout.split(",") if c]
    hrows = []
    if held:
        keep_tr, out_te = ~np.isin(ytr, held), np.isin(yte, held)
        for cov in a.heldout_covariances.split(","):
            print(f"== held-out classes {held}: L=10 {cov}, {keep_tr.sum()} training images", flush=True)
            model, params, cfg, state, secs = train_model(Dtr[keep_tr], 10, cov, epochs, log=print)
            sc = ood_scores(model, params, Dte, rng)
            y = out_te.astype(int)
            hrows.append(dict(covariance=cov, n_in=int((~out_te).sum()), n_out=int(out_te.sum()),
                              **{k: roc_auc_score(y, v) for k, v in sc.items()}))
            print(hrows[-1], flush=True)

    # throughput
    thr = None
    if not a.no_throughput:
        print("== throughput: one epoch on 60,000 images at L=10", flush=True)
        Dall = std(Xtr_all) if n_train < 60000 else Dtr
        *_, st_g, secs_g = train_model(Dall, 10, "diagonal", 1, validation_fraction=0.01)
        g_epoch = st_g.history[-1]["seconds"]
        from galdecomp.inference.config import resolve_config
        cfg10 = resolve_config(copy.deepcopy(PRESET), {"latent_dim": 10})
        t_torch, _ = torch_epoch(torch, Dall[:59400], 10, cfg10)
        *_, st_f, _ = train_model(Dall[:6000], 10, "fisher", 1, validation_fraction=0.01)
        *_, st_f32, _ = train_model(Dall[:6000], 32, "fisher", 1, validation_fraction=0.01)
        *_, st_d32, _ = train_model(Dall[:6000], 32, "diagonal", 1, validation_fraction=0.01)
        thr = dict(galdecomp=g_epoch, torch=t_torch, fisher_6000=st_f.history[-1]["seconds"],
                   fisher32_6000=st_f32.history[-1]["seconds"], diag32_6000=st_d32.history[-1]["seconds"])
        thr["mask"] = mask_input_cost(cfg10, 10)

    # ---- write
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(os.path.join(a.out, "rows.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    for (L, cov, kind), im in grids.items():
        if kind == "recon":
            grid_png(os.path.join(a.out, f"recon_L{L}_{cov}.png"), np.concatenate(im), 16,
                     f"test images (rows 1-2) and reconstructions (rows 3-4), L={L} {cov}")
        else:
            grid_png(os.path.join(a.out, f"samples_{kind}_L{L}_{cov}.png"), im, 8,
                     f"samples z~{'N(0,1)' if kind == 'prior' else 'transform'}, L={L} {cov}")
    f3 = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    mode = "--quick" if q else "full run"
    say(f"## Fashion-MNIST ({mode}): {n_train} training images, {n_test} test images, {epochs} epochs")
    say()
    say(f"`{' '.join(['OMP_NUM_THREADS=' + omp, 'python -m benchmarks.science.bench_fashion'] + (argv or sys.argv[1:]))}`; "
        f"{common.package_fingerprint()}; torch threads {a.threads}; logit eps {eps}; "
        f"widths encoder {PRESET['encoder']['hidden']}, decoder {PRESET['decoder']['hidden']}, "
        f"batch {PRESET['training']['batch_size']}, float32.")
    say()
    say("ELBO and IWAE: nats per image in the standardised-logit space (784 dims), not pixel space; "
        f"IWAE with k={a.k} draws from q. MSE in pixel space [0, 1] (mean image: {mse_mean:.4f}). "
        f"KL(q||p(z|d)) = IWAE - ELBO on {n_check} test images with k={k_check} (a lower bound; "
        "median ESS given).")
    say()
    say("| L | q | epochs | s/epoch | ELBO | IWAE | MSE | KL(q‖p) mean | KL median | ESS median |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['L']} | {r['covariance']} | {r['epochs']} | {r['seconds_per_epoch']} | {r['elbo']:.1f} | "
            f"{r['iwae']:.1f} | {r['mse']:.4f} | {r['kl_q_post']:.2f} | {r['kl_q_post_median']:.2f} | "
            f"{r['ess_median']:.0f}/{k_check} |")
    say()
    say(f"Samples: Fréchet distance in the 64-d penultimate features of a 784-256-64-10 MLP trained here "
        f"on the 60,000 training images (test accuracy {accuracy(Xte_all, yte_all):.3f}, {clf_s:.0f} s; "
        f"no Inception weights can be downloaded here); {n_test} samples against {n_test} test images. "
        f"Floor (10,000 training images against the test images): {fd_floor:.3f}.")
    say()
    say("| L | q | FD, z ~ N(0,1) | FD, z = T^-1(u), Gaussianisation | change | FD, z ~ GMM 16 | change |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for key in ("fd_transform", "fd_gmm"):
            ft = r.get(key, "")
            cells += [f3(ft), f"{100 * (ft / r['fd_prior'] - 1):+.0f} %" if isinstance(ft, float) else ""]
        say(f"| {r['L']} | {r['covariance']} | {r['fd_prior']:.3f} | " + " | ".join(cells) + " |")
    say()
    sc = [k for k in rows[0] if k.startswith("auroc_")]
    say("Out-of-distribution AUROC (test images against the same test images transformed; "
        "score high = anomalous):")
    say()
    say("| L | q | " + " | ".join(k[6:] for k in sc) + " |")
    say("|---|---|" + "---|" * len(sc))
    for r in rows:
        say(f"| {r['L']} | {r['covariance']} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in sc) + " |")
    if hrows:
        names = ", ".join(CLASSES[c] for c in held)
        say()
        say(f"Held-out classes ({names}): L=10 models trained on the training images of the other 8 classes "
            f"({epochs} epochs); test images of the held-out classes ({hrows[0]['n_out']}) against the other "
            f"test images ({hrows[0]['n_in']}), AUROC:")
        say()
        hk = [k for k in hrows[0] if k not in ("covariance", "n_in", "n_out")]
        say("| q | " + " | ".join(hk) + " |")
        say("|---|" + "---|" * len(hk))
        for r in hrows:
            say(f"| {r['covariance']} | " + " | ".join(f"{r[k]:.3f}" for k in hk) + " |")
    if thr:
        say()
        say(f"Throughput, one epoch on 60,000 images at L=10 (59,400 trained, batch "
            f"{PRESET['training']['batch_size']}), same process, torch threads {a.threads}, "
            f"OMP_NUM_THREADS {omp}: galdecomp diagonal {thr['galdecomp']:.1f} s, PyTorch peer "
            f"{thr['torch']:.1f} s (ratio {thr['galdecomp'] / thr['torch']:.2f}); galdecomp Fisher "
            f"{thr['fisher_6000']:.1f} s for 5,940 images (x10: {10 * thr['fisher_6000']:.0f} s per 60,000); "
            f"at L=32 Fisher {thr['fisher32_6000']:.1f} s, diagonal {thr['diag32_6000']:.1f} s for 5,940 images. "
            f"Encoder step (forward + vjp, batch {PRESET['training']['batch_size']}) with the mask inputs "
            f"(1568 inputs) {1e3 * thr['mask'][1568]:.2f} ms, without (784) {1e3 * thr['mask'][784]:.2f} ms.")
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written: {a.out}/summary.md, rows.csv, *.png")


if __name__ == "__main__":
    main()
