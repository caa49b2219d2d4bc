"""Full default fit of the package against a plain PyTorch f32 VAE on the same data, side by side.

The simulated sky (``galdecomp.simulation``, seed 0) at ``--nside`` (default 64: 49,152 pixels x
35 channels) is written into a private scratch folder (``tempfile.mkdtemp``), then, in ONE run:

- ``pkg``: the package's default fit, ``galdecomp.pipeline.fit_catalog`` (what ``galdecomp fit
  CATALOG --out RUN --max-epochs E`` runs): diagonal posterior, float64 MLP kernels, batch 1024,
  Adam lr 3e-3, validation on 10 % of the pixels after every epoch, lr halved after 8 epochs
  without improvement, early stop after 20, checkpoint every epoch, then the run products;
- ``pkg-f32``: the same with ``training: {dtype: float32}`` (as ``--config`` would give it);
- ``pkg-fisher``: the same with ``--covariance fisher``;
- ``torch``: a plain PyTorch f32 VAE of the same size: encoder 70->128->128->20 (tanh) over
  ``[d * mask, mask]`` giving (mu, log sigma), decoder 10->64->64->35 (tanh), Gaussian likelihood
  over the observed channels with a learned per-channel log-sigma (added in quadrature to the
  package's per-channel noise floor, so both fit the same likelihood family), analytic KL, Adam
  lr 3e-3, batch 1024, at most E epochs, on the SAME preprocessed data (captured from the
  package's own ``fit_rows`` call) and the SAME train/validation split
  (``galdecomp.inference.minibatches.split_rows``), with the package's schedule (validation each
  epoch with fixed draws, lr halved after 8 epochs without improvement, early stop after 20,
  best-validation parameters kept); no weight prior, PyTorch's default initialisation.
  Threads: torch's default (``torch.get_num_threads()``);
- ``torch-1t``: the same with ``torch.set_num_threads(1)`` (the package's BLAS runs 1 thread).
- optional (``--variants``): ``pkg-b4096``, ``pkg-f32-b4096`` (batch 4096), ``torch-b4096``.

Each variant runs in its own subprocess; repetitions are round-robin over the variants so that
load from other jobs hits all alike; times are the best of ``--repeat`` (>= 3). The fits are
deterministic, so the repetitions only re-measure time.

Quality: the negative ELBO per pixel of each final model (package: its best-validation
parameters) on the SAME validation pixels, estimated with ``--eval-draws`` reparameterised draws
per pixel (the same draws for every model) by one numpy float64 evaluator written here
(diagonal posteriors), and, for the package models, also by the package's own ELBO operator
(``Autoencoder.elbo(...).terms``; the only evaluator for the Fisher posterior). Weight priors are
not included in either.

Profile (``--profile-epochs``, default 10, 0 = off): one more package default fit under cProfile
for that many epochs, broken down into encoder, decoder, posterior, per-step NIFTy/Python
overhead, Adam, validation, checkpoints and products.

Usage::

    python -m benchmarks.speed.bench_fit                              # full comparison (long: ~1-2 h)
    python -m benchmarks.speed.bench_fit --nside 16 --epochs 3 --repeat 3 --profile-epochs 2   # quick check
    python -m benchmarks.speed.bench_fit --variants pkg,pkg-b4096,torch --epochs 20
"""
import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import ROOT, fit, package_dir, package_fingerprint, simulate, torch_vae

LOG2PI = np.log(2.0 * np.pi)

VARIANTS = {
    "pkg": dict(kind="package", label="package f64 (default)"),
    "pkg-f32": dict(kind="package", label="package f32", config={"training": {"dtype": "float32"}}),
    "pkg-fisher": dict(kind="package", label="package f64 fisher", overrides={"covariance": "fisher"}),
    "pkg-b4096": dict(kind="package", label="package f64 batch 4096",
                      config={"training": {"batch_size": 4096}}),
    "pkg-f32-b4096": dict(kind="package", label="package f32 batch 4096",
                          config={"training": {"dtype": "float32", "batch_size": 4096}}),
    "torch": dict(kind="torch", label="torch f32", threads=None),
    "torch-1t": dict(kind="torch", label="torch f32", threads=1),
    "torch-b4096": dict(kind="torch", label="torch f32 batch 4096", threads=None, batch_size=4096),
}
DEFAULT_VARIANTS = "pkg,torch,torch-1t,pkg-f32,pkg-fisher"


# ============================================================================ common evaluator
def _mlp(layers, x):
    for k, (W, b) in enumerate(layers):
        x = x @ W + b
        if k < len(layers) - 1:
            x = np.tanh(x)
    return x


def _unpack(theta, sizes):
    out, i = [], 0
    for n, m in zip(sizes[:-1], sizes[1:]):
        W = np.asarray(theta[i:i + n * m]).reshape(n, m)
        i += n * m
        out.append((W, np.asarray(theta[i:i + m])))
        i += m
    return out


def neg_elbo_diag(enc, dec, sigma, d, m, xi_all):
    """Negative ELBO per pixel, ``E_q[-log p(d|z)] + KL[q || N(0,1)]``, diagonal-Gaussian q.

    ``enc``, ``dec``: lists of (W (n_in, n_out), b), tanh hidden layers, linear output;
    ``d``: (n, C) standardised data (0 where missing), ``m``: (n, C) float mask;
    ``xi_all``: (K, n, L) standard-normal draws. Returns (total, nll, kl) per pixel.
    """
    L = xi_all.shape[2]
    e = _mlp(enc, np.concatenate([d * m, m], axis=1))
    mu, ls = e[:, :L], e[:, L:]
    sd = np.exp(ls)
    kl = 0.5 * np.sum(mu * mu + sd * sd - 1.0 - 2.0 * ls, axis=1).mean()
    w = 1.0 / sigma ** 2
    const = 0.5 * (m @ (LOG2PI - np.log(w)))
    nll = 0.0
    for xi in xi_all:
        r = (d - _mlp(dec, mu + sd * xi)) * m
        nll += (0.5 * ((r * r) @ w) + const).mean()
    nll /= len(xi_all)
    return nll + kl, nll, kl


def eval_draws(n, L, K, seed=12345):
    return np.random.default_rng(seed).standard_normal((K, n, L))


# ============================================================================ workers
def _capture_fit_rows(pl, cap, prof=None):
    """Wrap ``pipeline.fit_rows`` (looked up at call time by fit_catalog) to capture and time it
    (and profile it with ``prof``, a cProfile.Profile)."""
    orig = pl.fit_rows

    def fit_rows(*a, **k):
        b = inspect.signature(orig).bind(*a, **k)
        cap.update(model=b.arguments["model"], data=b.arguments["data"], cfg=b.arguments["cfg"])
        if cap.get("stop"):
            raise _Captured()
        cap["t_train0"] = time.perf_counter()
        if prof is not None:
            prof.enable()
        st = orig(*a, **k)
        if prof is not None:
            prof.disable()
        cap["t_train1"] = time.perf_counter()
        return st
    pl.fit_rows = fit_rows


class _Captured(Exception):
    pass


def _patch_log(marks, echo):
    import galdecomp.cli as cli

    def log(msg):
        marks.append((time.perf_counter(), str(msg)))
        if echo:
            print(f"    [pkg] {msg}", file=sys.stderr, flush=True)
    cli.log = log


def worker_prepare(job):
    """Capture the package's preprocessed data table and the training/validation split."""
    import galdecomp.pipeline as pl
    from galdecomp.inference.minibatches import split_rows

    cap = {"stop": True}
    _capture_fit_rows(pl, cap)
    _patch_log([], False)
    try:
        fit(job["catalog"], os.path.join(job["scratch"], "prepare"))
    except _Captured:
        pass
    model, data, cfg = cap["model"], cap["data"], cap["cfg"]
    tr, va = split_rows(len(data), cfg["training"]["validation_fraction"], cfg["seed"])
    np.savez(job["data"], data=data, floor=model.floor, train_rows=tr, valid_rows=va,
             cfg=json.dumps(cfg))
    shutil.rmtree(os.path.join(job["scratch"], "prepare"), ignore_errors=True)
    return dict(rows=len(data), channels=data.shape[1], train=len(tr), valid=len(va),
                missing=float(np.mean(~np.isfinite(data))))


def _package_eval(model, params, d, m, xi_all, n_total):
    """The package's own per-pixel negative ELBO (nll + beta kl, no prior) averaged over draws."""
    tot = nll = kl = 0.0
    for xi in xi_all:
        op = model.elbo(d, m, xi, n_total)
        t = op.terms(model.position(params, op.domain))
        tot += t["nll"] + model.beta * t["kl"]
        nll += t["nll"]
        kl += t["kl"]
    K = len(xi_all)
    return tot / K, nll / K, kl / K


def worker_package(job, profile=False):
    import galdecomp.pipeline as pl

    spec = job["spec"]
    cap, marks = {}, []
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    _capture_fit_rows(pl, cap, prof)
    _patch_log(marks, job.get("verbose", False))
    out = os.path.join(job["scratch"], f"run-{job['variant']}-{job['rep']}")
    t0 = time.perf_counter()
    res = fit(job["catalog"], out, config=spec.get("config") or None, max_epochs=job["epochs"],
              **spec.get("overrides", {}))
    t_end = time.perf_counter()
    state, model, cfg = res["state"], cap["model"], cap["cfg"]
    hist = state.history
    r = dict(variant=job["variant"], rep=job["rep"], total=t_end - t0,
             before_train=cap["t_train0"] - t0, train=cap["t_train1"] - cap["t_train0"],
             products=t_end - cap["t_train1"], epochs=state.epoch, steps=state.step,
             epoch_seconds=[h["seconds"] for h in hist],
             val_history=[-h["validation_elbo"] for h in hist],
             best_val_pkg=float(state.best_val), dtype=cfg["training"]["dtype"],
             covariance=cfg["covariance"], batch=cfg["training"]["batch_size"])
    # products phases from the progress messages
    phases, cur = {}, None
    for t, msg in marks:
        if cur is not None:
            phases[cur[0]] = phases.get(cur[0], 0.0) + t - cur[1]
            cur = None
        for key in ("posterior means", "feature significance", "plots"):
            if msg.startswith(key):
                cur = (key, t)
    if cur is not None:
        phases[cur[0]] = phases.get(cur[0], 0.0) + t_end - cur[1]
    r["product_phases"] = phases
    if job.get("evaluate", True):
        with np.load(job["data"]) as f:
            valid = f["valid_rows"]
            ref = f["data"]
        data = cap["data"]
        same = ref.shape == data.shape and np.array_equal(np.isfinite(ref), np.isfinite(data)) and \
            np.allclose(np.nan_to_num(ref), np.nan_to_num(data), rtol=0, atol=0)
        r["same_data_as_torch"] = bool(same)
        msk = np.isfinite(data[valid])
        d = np.where(msk, data[valid], 0.0)
        xi_all = eval_draws(len(valid), model.latent_dim, job["draws"])
        params = state.best_params
        try:
            r["eval_pkg"] = _package_eval(model, params, d, msk, xi_all, job["n_train"])
        except Exception as e:                                   # API drift: report, do not fail
            r["eval_pkg_error"] = f"{type(e).__name__}: {e}"
        if cfg["covariance"] == "diagonal":
            th_e, th_d, _ = model.split(params)
            r["eval_common"] = neg_elbo_diag(_unpack(th_e, model.encoder.sizes),
                                             _unpack(th_d, model.decoder.sizes),
                                             model.sigma(params), d, msk.astype(float), xi_all)
    if prof:
        r["profile"] = analyse_profile(prof, r)
    shutil.rmtree(out, ignore_errors=True)
    return r


def worker_torch(job):
    import torch

    spec = job["spec"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    threads = torch.get_num_threads()
    with np.load(job["data"]) as f:
        data, floor = f["data"], f["floor"]
        train_rows, valid_rows = f["train_rows"], f["valid_rows"]
        cfg = json.loads(str(f["cfg"]))
    tc = cfg["training"]
    bs = spec.get("batch_size", tc["batch_size"])
    L, C = cfg["latent_dim"], data.shape[1]
    mask = np.isfinite(data)
    d0 = np.where(mask, data, 0.0)
    m = mask.astype(np.float64)
    seed = job.get("torch_seed", cfg["seed"])
    torch.manual_seed(seed)
    X = torch.tensor(np.concatenate([d0 * m, m], axis=1), dtype=torch.float32)
    D = torch.tensor(d0, dtype=torch.float32)
    M = torch.tensor(m, dtype=torch.float32)
    floor2 = torch.tensor(floor ** 2, dtype=torch.float32)
    nn = torch.nn
    assert cfg["encoder"]["activation"] == cfg["decoder"]["activation"] == "tanh"
    params, vae_neg_elbo, (enc, dec, log_sigma) = torch_vae(
        torch, C, L, cfg["encoder"]["hidden"], cfg["decoder"]["hidden"], floor2, cfg["noise"]["sigma0"],
        beta=cfg["beta"])
    opt = torch.optim.Adam(params, lr=tc["learning_rate"])

    def neg_elbo(idx, xi):
        return vae_neg_elbo(X[idx], D[idx], M[idx], xi)

    gen = torch.Generator().manual_seed(seed)
    tr = torch.as_tensor(train_rows, dtype=torch.long)
    va = torch.as_tensor(valid_rows, dtype=torch.long)
    val_xi = torch.randn((len(va), L), generator=gen)
    lr, best, best_state = tc["learning_rate"], np.inf, None
    since_best = since_lr = 0
    ep_sec, val_sec, val_hist = [], [], []
    t_start = time.perf_counter()
    epoch = 0
    while epoch < job["epochs"]:
        t0 = time.perf_counter()
        order = tr[torch.randperm(len(tr), generator=gen)]
        nb = max(1, len(order) // bs)
        for b in range(nb):
            idx = order[b * bs:(b + 1) * bs] if b < nb - 1 else order[b * bs:]
            xi = torch.randn((len(idx), L), generator=gen)
            loss = neg_elbo(idx, xi)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t1 = time.perf_counter()
        with torch.no_grad():
            val = float(neg_elbo(va, val_xi))
        t2 = time.perf_counter()
        epoch += 1
        ep_sec.append(t2 - t0)
        val_sec.append(t2 - t1)
        val_hist.append(val)
        if not np.isfinite(best) or val < best - 1e-4 * abs(best):
            best, since_best, since_lr = val, 0, 0
            best_state = [p.detach().clone() for p in params]
        else:
            since_best += 1
            since_lr += 1
        if since_lr >= tc["lr_patience"] and lr > tc["min_learning_rate"]:
            lr = max(lr * tc["lr_factor"], tc["min_learning_rate"])
            for g in opt.param_groups:
                g["lr"] = lr
            since_lr = 0
        if since_best >= tc["patience"]:
            break
    t_train = time.perf_counter() - t_start
    # export the best parameters in the package's layout and evaluate them like the package's
    with torch.no_grad():
        for p, q in zip(params, best_state):
            p.copy_(q)

    def layers(seq):
        return [(lin.weight.detach().double().numpy().T.copy(), lin.bias.detach().double().numpy().copy())
                for lin in seq if isinstance(lin, nn.Linear)]
    sigma = np.sqrt(floor ** 2 + np.exp(2.0 * log_sigma.detach().double().numpy()))
    msk = mask[valid_rows]
    d = np.where(msk, data[valid_rows], 0.0)
    xi_all = eval_draws(len(valid_rows), L, job["draws"])
    return dict(variant=job["variant"], rep=job["rep"], threads=threads, seed=seed, train=t_train, total=t_train,
                epochs=epoch, steps=epoch * (max(1, len(train_rows) // bs)), epoch_seconds=ep_sec,
                val_seconds=val_sec, val_history=val_hist, best_val_torch=best, batch=bs,
                eval_common=neg_elbo_diag(layers(enc), layers(dec), sigma, d, msk.astype(float), xi_all))


# ============================================================================ profile analysis
def analyse_profile(prof, r):
    """Times (s, under the profiler) of the parts of a package fit, from cProfile's call graph."""
    import io
    import pstats

    st = pstats.Stats(prof)
    stats = st.stats

    def keys(func, file=None):
        return [k for k in stats if k[2] == func and (file is None or file in k[0])]

    def ct(func, file=None):
        return sum(stats[k][3] for k in keys(func, file))

    def ncalls(func, file=None):
        return sum(stats[k][1] for k in keys(func, file))

    def edge(callee, caller, file=None):
        """Cumulative time of ``callee`` when called from ``caller``."""
        tot = 0.0
        for k in keys(callee, file):
            for ck, v in stats[k][4].items():
                if ck[2] == caller:
                    tot += v[3]
        return tot

    parts = {}
    steps = ct("value_and_gradient", "objective")
    run_in_steps = edge("_run", "value_gradient_terms")
    enc_all = edge("vjp", "_run", "mlp.py")
    enc_cb = ct("enc_cb", "elbo.py")
    dec = edge("vjp", "enc_cb", "mlp.py")
    post = edge("forward", "enc_cb") + edge("backward", "enc_cb")
    parts["training steps (ELBOObjective.value_and_gradient)"] = steps
    parts["  encoder MLP passes (train + validation)"] = enc_all - enc_cb
    parts["  decoder MLP + fused loss (train + validation)"] = dec
    parts["  posterior sample/KL fwd+bwd (train + validation)"] = post
    parts["  per-step overhead outside the numpy pass (batch copy, MultiFields, flatten)"] = \
        steps - run_in_steps
    parts["Adam.step"] = ct("step", "training.py")
    parts["validation (ELBOObjective.value, every epoch)"] = ct("value", "objective")
    parts["checkpoints (save_checkpoint)"] = ct("save_checkpoint", "run/folder.py")
    parts["training total (fit_rows)"] = ct("fit_rows", "fitting.py")
    counts = {"steps": ncalls("value_and_gradient", "objective"),
              "MLP.vjp calls": ncalls("vjp", "mlp.py"),
              "MultiField.from_dict calls": ncalls("from_dict", "multi_field"),
              "makeField calls": ncalls("makeField")}
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    top = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-16:]
    return dict(parts=parts, counts=counts, top=top)


# ============================================================================ driver
def run_worker(job, timeout=None):
    if "variant" in job:
        job = {**job, "spec": VARIANTS[job["variant"]]}
    fd, path = tempfile.mkstemp(suffix=".json", dir=job["scratch"])
    os.close(fd)
    job = {**job, "result": path}
    cmd = [sys.executable, "-m", __spec__.name, "--_job", json.dumps(job)]
    p = subprocess.run(cmd, timeout=timeout, cwd=job.get("src"))  # --snapshot: the copy's packages first
    if p.returncode != 0:
        raise RuntimeError(f"worker {job.get('variant', job['task'])} failed (exit {p.returncode})")
    with open(path) as f:
        return json.load(f)


def _worker_main(job):
    task = job["task"]
    if task == "simulate":
        t0 = time.perf_counter()
        simulate(job["sky"], job["nside"], seed=0)
        r = dict(seconds=time.perf_counter() - t0)
    elif task == "prepare":
        r = worker_prepare(job)
    elif task == "profile":
        r = worker_package(job, profile=True)
    elif job["spec"]["kind"] == "torch":
        r = worker_torch(job)
    else:
        r = worker_package(job)
    with open(job["result"], "w") as f:
        json.dump(r, f, default=float)


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--_job":
        _worker_main(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nside", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=150, help="max epochs of every fit (default 150)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per variant, best time kept (>= 3)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    ap.add_argument("--package-variant", action="append", default=[], metavar="NAME=YAML",
                    help="an extra package fit with these settings (a --config mapping), e.g. "
                         "'lr1e-2={training: {dtype: float32, learning_rate: 0.01}}'; repeatable")
    ap.add_argument("--eval-draws", type=int, default=32, help="draws per validation pixel for the ELBO")
    ap.add_argument("--quality-seeds", type=int, default=3,
                    help="train the 1-thread torch VAE with this many seeds (0..K-1; same data and split) "
                         "to show its run-to-run spread of the validation ELBO (default 3; 1: off)")
    ap.add_argument("--profile-epochs", type=int, default=10, help="cProfile a package fit (0: off)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--save-json", metavar="FILE", help="also write all raw results to FILE")
    ap.add_argument("--report-json", metavar="FILE", help="only print the report of a --save-json FILE")
    ap.add_argument("--snapshot", action="store_true",
                    help="copy the galdecomp sources into the scratch folder first and run every fit on that "
                         "copy (consistent results while the package is being edited)")
    ap.add_argument("--verbose", action="store_true", help="echo the package's progress messages")
    args = ap.parse_args()
    if args.report_json:
        with open(args.report_json) as f:
            saved = json.load(f)
        ns = argparse.Namespace(**saved["args"])
        for k, v in saved["variants"].items():
            VARIANTS.setdefault(k, v)
        report(ns, saved["info"], saved["names"], saved["results"], saved["prof"], saved["load0"])
        return
    if args.repeat < 1:
        ap.error("--repeat must be positive")
    if args.repeat < 3:
        print(f"# WARNING: --repeat {args.repeat} < 3: a quick check, not a measurement", file=sys.stderr)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    import yaml
    for spec in args.package_variant:
        name, _, text = spec.partition("=")
        name = name.strip()
        if not name or not text or name in VARIANTS:
            ap.error(f"--package-variant {spec!r}: need a new NAME=YAML")
        cfg = yaml.safe_load(text)
        if not isinstance(cfg, dict):
            ap.error(f"--package-variant {spec!r}: the YAML must be a mapping")
        VARIANTS[name] = dict(kind="package", label=f"package {name}", config=cfg)
        names.append(name)
    args.extra_variants = {k: VARIANTS[k] for k in names if k not in DEFAULT_VARIANTS.split(",")}
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")

    scratch = tempfile.mkdtemp(prefix="galdecomp-bench-fit-")
    try:
        _drive(args, names, scratch)
    finally:
        if args.keep:
            print(f"# scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _drive(args, names, scratch):
    pkg_dir = package_dir()
    orig_fp = package_fingerprint(pkg_dir)
    src = None
    if args.snapshot:  # the workers run in the copy's folder, so they import its galdecomp and benchmarks
        src = os.path.join(scratch, "src")
        shutil.copytree(pkg_dir, os.path.join(src, "galdecomp"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(os.path.join(ROOT, "benchmarks"), os.path.join(src, "benchmarks"),
                        ignore=shutil.ignore_patterns("__pycache__", "out", "*.md"))
        if os.path.isdir(os.path.join(os.path.dirname(pkg_dir), "data")):   # the repo's data/ (channel table)
            shutil.copytree(os.path.join(os.path.dirname(pkg_dir), "data"), os.path.join(src, "data"))
        pkg_dir = os.path.join(src, "galdecomp")
        os.environ["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    args.package = f"{pkg_dir} ({orig_fp})" + (" [snapshot of the working tree]" if args.snapshot else "")

    def say(msg):
        print(f"[bench_fit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    load0 = os.getloadavg()
    sky_dir = os.path.join(scratch, "sky")
    sim = run_worker(dict(scratch=scratch, src=src, task="simulate", sky=sky_dir, nside=args.nside))
    say(f"simulated sky nside {args.nside} in {sim['seconds']:.1f} s")
    base = dict(scratch=scratch, src=src, catalog=os.path.join(sky_dir, "catalog.yaml"),
                data=os.path.join(scratch, "data.npz"), epochs=args.epochs, draws=args.eval_draws,
                verbose=args.verbose)
    info = run_worker({**base, "task": "prepare"})
    base["n_train"] = info["train"]
    say(f"data: {info['rows']} rows x {info['channels']} channels, {info['train']} training / "
        f"{info['valid']} validation rows, {info['missing']:.1%} entries missing")
    results = {v: [] for v in names}
    for rep in range(args.repeat):
        for v in names:
            t0 = time.perf_counter()
            r = run_worker({**base, "task": "fit", "variant": v, "rep": rep})
            results[v].append(r)
            say(f"rep {rep + 1}/{args.repeat} {v}: {r['epochs']} epochs, training {r['train']:.1f} s "
                f"(worker {time.perf_counter() - t0:.1f} s)")
    seeds = []
    if args.quality_seeds > 1:
        for sd in range(args.quality_seeds):
            if sd == 0 and results.get("torch-1t"):
                seeds.append(results["torch-1t"][0])        # seed 0 is the timed torch-1t fit
                continue
            r = run_worker({**base, "task": "fit", "variant": "torch-1t", "rep": f"seed{sd}", "torch_seed": sd})
            seeds.append(r)
            say(f"quality seed {sd}: torch-1t {r['epochs']} epochs, -ELBO/pixel {r['eval_common'][0]:.3f}")
    args.seed_runs = seeds
    prof = None
    if args.profile_epochs > 0:
        prof = run_worker({**base, "task": "profile", "variant": "pkg", "rep": "profile",
                           "epochs": args.profile_epochs, "evaluate": False})
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump(dict(args=vars(args), info=info, names=names, results=results, prof=prof, load0=load0,
                           variants={k: VARIANTS[k] for k in names}), f, default=float)
    report(args, info, names, results, prof, load0)


def report(args, info, names, results, prof, load0):
    try:
        import torch
        tver = torch.__version__
    except ImportError:
        tver = "not installed"

    print(f"# bench_fit: full fit of the simulated sky, nside {args.nside} ({info['rows']} pixels x "
          f"{info['channels']} channels), {info['train']} training / {info['valid']} validation pixels "
          f"(split_rows), at most {args.epochs} epochs, best of {args.repeat} (round-robin), "
          f"validation -ELBO with {args.eval_draws} draws/pixel")
    print(f"# package {args.package}")
    print(f"# cpus {os.cpu_count()}, load average at start {tuple(round(x, 2) for x in load0)}, "
          f"at end {tuple(round(x, 2) for x in os.getloadavg())}; torch {tver}")
    rows = {}
    for v in names:
        rs = results[v]
        spec = VARIANTS[v]
        label = spec["label"]
        if spec["kind"] == "torch":
            label += f" ({rs[0]['threads']} thread{'s' if rs[0]['threads'] > 1 else ''})"
        ep = [float(np.median(r["epoch_seconds"])) for r in rs]
        rep = min(rs, key=lambda r: r["train"])          # the fastest repetition represents the variant
        key = [round((r.get("eval_common") or r.get("eval_pkg") or [0])[0], 6) for r in rs]
        row = dict(label=label, kind=spec["kind"], epochs=rep["epochs"], steps=rep["steps"],
                   best_epoch=int(np.argmin(rep["val_history"])) + 1,
                   train=rep["train"], total=min(r["total"] for r in rs),
                   epoch=min(ep), common=rep.get("eval_common"), pkg=rep.get("eval_pkg"),
                   r=rs, rep=rep, deterministic=len(set(key)) == 1)
        rows[v] = row
    print("\n## wall time and validation negative ELBO per pixel (nats; lower is better)")
    hdr = (f"  {'variant':<30}{'epochs':>7}{'best':>6}{'steps':>7}{'train s':>9}{'s/epoch':>9}{'fit total s':>12}"
           f"{'-ELBO/pix':>11}{'(nll':>9}{' + kl)':>8}{'pkg eval':>10}")
    print(hdr)
    for v, w in rows.items():
        c = w["common"]
        tot = "" if w["kind"] == "torch" else _fmt(w["total"], ".1f")
        line = (f"  {w['label']:<30}{w['epochs']:>7}{w['best_epoch']:>6}{w['steps']:>7}{w['train']:9.1f}{w['epoch']:9.3f}"
                f"{tot:>12}")
        if c:
            line += f"{c[0]:11.3f}{c[1]:9.3f}{c[2]:8.3f}"
        else:
            line += f"{'':>28}"
        line += f"{_fmt(w['pkg'][0] if w['pkg'] else None):>10}"
        print(line)
    print("  best: epoch of the best validation loss (whose parameters are kept). train s: training wall (package: fit_rows incl. validation, checkpoints, progress; torch: the "
          "training loop incl. validation); s/epoch: median epoch (steps + validation); fit total: "
          "fit_catalog (read + preprocess + train + products). -ELBO: common numpy f64 evaluator; "
          "pkg eval: the package's own ELBO operator, same draws.")
    if getattr(args, "seed_runs", None):
        v = np.array([r["eval_common"][0] for r in args.seed_runs])
        print(f"  run-to-run spread of the torch VAE (1 thread, seeds 0..{len(v) - 1}, same data and split): "
              f"-ELBO/pixel {v.mean():.3f} ± {v.std(ddof=1):.3f} (min {v.min():.3f}, max {v.max():.3f}; "
              f"epochs {', '.join(str(r['epochs']) for r in args.seed_runs)})")
    for v, w in rows.items():
        if not w["deterministic"]:
            print(f"  note: {w['label']} gave different fits in its repetitions (epochs, train s, -ELBO/pixel): " +
                  "; ".join(f"{r['epochs']}, {r['train']:.1f}, "
                            f"{(r.get('eval_common') or r.get('eval_pkg'))[0]:.3f}" for r in w["r"]))
    for v in names:
        r0 = results[v][0]
        if "same_data_as_torch" in r0 and not r0["same_data_as_torch"]:
            print(f"  WARNING: {v} saw other data than the torch runs")
        if "eval_pkg_error" in r0:
            print(f"  note: the package's evaluator failed for {v}: {r0['eval_pkg_error']}")

    # goal lines
    pk = rows.get("pkg")
    tvs = [v for v in names if VARIANTS[v]["kind"] == "torch" and "batch_size" not in VARIANTS[v]]
    pvs = [v for v in names if VARIANTS[v]["kind"] == "package"]
    if pvs and tvs:
        print("\n## goal lines")
        print("  time ratio package / torch (goal ≤ 3): training wall, per epoch [, whole fit_catalog incl. "
              "reading and products, for the default]")
        for v in pvs:
            w = rows[v]
            parts = []
            for tv in tvs:
                t = rows[tv]
                txt = f"vs {t['label']}: {w['train'] / t['train']:.2f}x, {w['epoch'] / t['epoch']:.2f}x"
                if v == "pkg":
                    txt += f", {w['total'] / t['train']:.2f}x"
                parts.append(txt)
            print(f"    {w['label']:<28}" + "; ".join(parts))
        pool = {(r["variant"], str(r["rep"])): r for r in
                [r for tv in tvs for r in rows[tv]["r"]] + list(getattr(args, "seed_runs", None) or [])}
        pool = list(pool.values())
        tv_vals = np.array([r["eval_common"][0] for r in pool])
        print(f"  validation -ELBO/pixel, package - torch (goal ≤ 0: package equal or better); torch over all its "
              f"{len(tv_vals)} fits (both thread settings, repetitions, seeds): mean {tv_vals.mean():.3f} ± "
              f"{tv_vals.std(ddof=1) if len(tv_vals) > 1 else 0:.3f}, best {tv_vals.min():.3f}, worst {tv_vals.max():.3f}")
        for v in pvs:
            w = rows[v]
            val = w["common"] or w["pkg"]
            if val:
                print(f"    {w['label']:<28}{val[0]:8.3f}: {val[0] - tv_vals.mean():+.3f} vs the torch mean, "
                      f"{val[0] - tv_vals.min():+.3f} vs the best torch fit"
                      f"{'' if w['common'] else ' (package evaluator)'}")
        print("  time to quality: seconds of epochs until the validation loss (each fit's own single-draw "
              "check) first reaches the torch fit's best; ratio package / torch:")
        for v in pvs:
            w = rows[v]
            rp = min(w["r"], key=lambda r: r["train"])
            parts = []
            for tv in tvs:
                rt = min(rows[tv]["r"], key=lambda r: r["train"])
                e_t = int(np.argmin(rt["val_history"]))
                target = rt["val_history"][e_t]
                t_t = sum(rt["epoch_seconds"][:e_t + 1])
                hit = [i for i, x in enumerate(rp["val_history"]) if x <= target]
                if hit:
                    t_p = sum(rp["epoch_seconds"][:hit[0] + 1])
                    parts.append(f"vs {rows[tv]['label']} ({target:.2f} nats at epoch {e_t + 1}, {t_t:.1f} s): "
                                 f"epoch {hit[0] + 1}, {t_p:.1f} s, {t_p / t_t:.2f}x")
                else:
                    parts.append(f"vs {rows[tv]['label']} ({target:.2f} nats at epoch {e_t + 1}, {t_t:.1f} s): "
                                 f"not reached in {len(rp['val_history'])} epochs")
            print(f"    {w['label']:<28}" + "; ".join(parts))
        if pk:
            for v in pvs:
                if v != "pkg":
                    w = rows[v]
                    print(f"  {w['label']}: training wall {w['train'] / pk['train']:.2f}x, per epoch "
                          f"{w['epoch'] / pk['epoch']:.2f}x of the default fit")

    # package breakdown
    if pk:
        best = min(pk["r"], key=lambda r: r["train"])
        ck = best["train"] - sum(best["epoch_seconds"])
        print(f"\n## package default fit, where the wall time goes (fastest repetition, "
              f"{best['epochs']} epochs)")
        names = {"posterior means": "posterior means/covariances",
                 "feature significance": "feature significance + FITS/CSV writing", "plots": "plots"}
        print(f"  read + preprocess + setup {best['before_train']:.1f} s, training {best['train']:.1f} s "
              f"(epochs {sum(best['epoch_seconds']):.1f} s, checkpoints + progress {ck:.1f} s), "
              f"products {best['products']:.1f} s (" +
              ", ".join(f"{names.get(k, k)} {s:.1f} s" for k, s in best["product_phases"].items()) + ")")
        tv = rows.get(tvs[0]) if tvs else None
        if tv:
            b = min(tv["r"], key=lambda r: r["train"])
            print(f"  torch ({tv['label']}): validation {np.median(b['val_seconds']) * 1e3:.0f} ms per epoch "
                  f"of {np.median(b['epoch_seconds']) * 1e3:.0f} ms")
    if prof:
        p = prof["profile"]
        parts = p["parts"]
        ref = parts["training total (fit_rows)"] or 1.0
        print(f"\n## cProfile of the training of a package default fit (fit_rows), {prof['epochs']} epochs "
              f"(times under the profiler, which inflates Python-level overheads; fraction of fit_rows)")
        for k, s in parts.items():
            print(f"  {k:<82}{s:8.2f} s {s / ref:6.1%}")
        print("  calls: " + ", ".join(f"{k} {n}" for k, n in p["counts"].items()))
        print("  top functions by own time:")
        for ln in p["top"]:
            print("   " + ln[:150])


if __name__ == "__main__":
    main()
