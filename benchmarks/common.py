"""The helpers every benchmark shares: paths, data sets, the one way to simulate a sky, fit
galdecomp and run the PyTorch peer, and timing and provenance.

- paths: :data:`ROOT` (the project), :func:`out_dir` (``benchmarks/out/NAME``), :func:`shared_dir`
  (``$GALDECOMP_SHARED``, else ``../shared`` beside the project);
- data sets: :func:`prepare` (``real``, ``real32``, ``demo``, ``realmorph``, ``lowsnr``: input and template
  catalogs), :func:`with_entries`, :class:`Data` (a catalog with galdecomp's preprocessing);
- galdecomp: :func:`simulate` (what ``galdecomp simulate --no-plot`` writes), :func:`fit` (what
  ``galdecomp fit CATALOG --out RUN --overwrite`` runs, in this process), :func:`galdecomp_command`
  (the command line for a subprocess, timed end to end), :func:`show_progress`;
- the PyTorch peer: :func:`torch_mlp`, :func:`torch_vae` (the one VAE), :func:`fit_torch_peer`
  (its training of ``benchmarks.science.bench_quality`` and ``benchmarks.speed.bench_speed``);
- timing and provenance: :func:`best_all`, :func:`package_fingerprint`, :func:`load_average`,
  :func:`optional_torch`.
"""
import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import yaml

#: the project root (the folder holding ``benchmarks/``, ``galdecomp/`` and ``runs/``)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the real maps that are not inputs of the real-sky protocol (dust and HI: its templates)
REAL_INPUTS_EXCLUDE = ("NHI", "EBV")
#: the held-out templates of the real-sky protocol
REAL_TEMPLATES = ("hi4pi_NHI", "sfd98_EBV", "planck13_EBV")
#: posterior draws per pixel of the validation -ELBO of bench_quality (galdecomp and the peer)
EVAL_DRAWS = 32


# ------------------------------------------------------------------------------------ paths
def out_dir(name):
    """``benchmarks/out/NAME``, the default output folder of a benchmark (not committed)."""
    return os.path.join(ROOT, "benchmarks", "out", name)


def shared_dir():
    """The shared data folder: ``$GALDECOMP_SHARED``, else ``shared`` beside the project."""
    env = os.environ.get("GALDECOMP_SHARED")
    return env if env else os.path.join(ROOT, "..", "shared")


# ------------------------------------------------------------------------------------ data sets
def _write_catalog(path, entries, nside=None):
    doc = {"maps": entries}
    if nside:
        doc["nside"] = nside
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def prepare_real(work, nside=64):
    """Input and template catalogs of the real-sky protocol (absolute paths, no copies): the maps
    of ``realsky<nside>`` that are neither dust nor HI, and the held-out :data:`REAL_TEMPLATES`."""
    src = os.path.abspath(os.path.join(shared_dir(), "data", f"realsky{nside}"))
    with open(os.path.join(src, "catalog.yaml")) as f:
        maps = yaml.safe_load(f)["maps"]
    for m in maps:
        m["file"] = os.path.join(src, m["file"])
    inputs = [m for m in maps if not any(x in m["name"] for x in REAL_INPUTS_EXCLUDE)]
    templ = [m for m in maps if m["name"] in REAL_TEMPLATES]
    return (_write_catalog(os.path.join(work, f"real{nside}_inputs.yaml"), inputs),
            _write_catalog(os.path.join(work, f"real{nside}_templates.yaml"), templ))


def prepare_simulated(work, name, preset):
    """The sky of a ``runs/`` preset simulated once into ``work/name`` (cached); (inputs, truth) catalogs."""
    out = os.path.join(work, name)
    if not os.path.isfile(os.path.join(out, "truth", "catalog.yaml")):
        runs = os.path.join(ROOT, "runs")
        with open(os.path.join(runs, preset)) as f:
            sim = yaml.safe_load(f)["simulate"]
        simulate(out, sim["nside"], sim["seed"], sim.get("morphology"), base=runs, where=preset)
    return os.path.join(out, "catalog.yaml"), os.path.join(out, "truth", "catalog.yaml")


#: the low-SNR sky: Gaussian noise added to every microwave channel (20-400 GHz) of the
#: real-morphology sky, ``LOWSNR_NOISE`` times the CMB's rms in that channel, so that the CMB
#: sits near the noise (its R^2 from all input channels ~0.75, as on a sky where it is weak)
LOWSNR_NOISE = 1.6
LOWSNR_BAND_HZ = (20e9, 400e9)


def prepare_lowsnr(work, factor=LOWSNR_NOISE, seed=7):
    """The real-morphology sky (:func:`prepare_simulated`, cached) with its microwave channels made
    noisier, written to ``work/lowsnr_sky`` (cached); (inputs, truth) catalogs.

    Each channel with ``LOWSNR_BAND_HZ[0] <= frequency_hz <= LOWSNR_BAND_HZ[1]`` gets independent
    Gaussian noise of standard deviation ``factor`` x the rms of the CMB truth map in the channel's
    unit, and its catalog ``noise`` grows to the quadrature sum. Every other channel, the truth
    maps and the simulation are the realmorph sky's.
    """
    import healpy as hp

    from galdecomp.simulation.components import cmb_to_rj, rj_to_unit

    inputs, truth = prepare_simulated(work, "realmorph_sky", "realmorph.yaml")
    out = os.path.join(work, "lowsnr_sky")
    catalog = os.path.join(out, "catalog.yaml")
    if os.path.isfile(catalog):
        return catalog, truth
    with open(inputs) as f:
        doc = yaml.safe_load(f)
    with open(truth) as f:
        cmb_entry = next(m for m in yaml.safe_load(f)["maps"] if m["name"] == "cmb")
    cmb = hp.read_map(os.path.join(os.path.dirname(truth), cmb_entry["file"]))  # K_CMB, RING
    src, rng = os.path.dirname(inputs), np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "maps"), exist_ok=True)
    for m in doc["maps"]:
        path = os.path.join(src, m["file"])
        f_hz = float(m["frequency_hz"])
        if LOWSNR_BAND_HZ[0] <= f_hz <= LOWSNR_BAND_HZ[1]:
            sigma = factor * np.std(cmb * cmb_to_rj(f_hz) * rj_to_unit(f_hz, m["unit"]))
            values, header = hp.read_map(path, h=True, nest=None)
            nest = dict(header).get("ORDERING", "RING").strip() == "NESTED"
            values = values + sigma * rng.standard_normal(values.size)
            path = os.path.join(out, m["file"])
            hp.write_map(path, values, nest=nest, coord="G", column_units=m["unit"], overwrite=True, dtype=np.float64)
            m["noise"] = float(np.hypot(float(m.get("noise", 0.0)), sigma))
        m["file"] = os.path.abspath(path)
    return _write_catalog(catalog, doc["maps"], doc.get("nside")), truth


def with_entries(catalog, settings, work):
    """A copy of ``catalog`` (absolute file paths) with ``settings`` set on every map entry."""
    if not settings:
        return catalog
    with open(catalog) as f:
        doc = yaml.safe_load(f)
    folder = os.path.dirname(os.path.abspath(catalog))
    for m in doc["maps"]:
        m["file"] = os.path.join(folder, m["file"])
        m.update(settings)
    tag = "_".join(f"{k}-{v}" for k, v in sorted(settings.items()))
    return _write_catalog(os.path.join(work, f"{os.path.basename(folder)}_{tag}.yaml"), doc["maps"],
                          doc.get("nside"))


def prepare(name, work):
    """(inputs, templates) catalogs of a data set: ``real`` (the real maps at nside 64; ``real32``:
    at nside 32), ``demo`` (``runs/demo.yaml``'s sky), ``realmorph`` (``runs/realmorph.yaml``'s)
    or ``lowsnr`` (realmorph with noisier microwave channels, :func:`prepare_lowsnr`)."""
    if name == "real":
        return prepare_real(work)
    if name == "real32":  # the same protocol at nside 32 (4x cheaper)
        return prepare_real(work, 32)
    if name == "demo":
        return prepare_simulated(work, "demo_sky", "demo.yaml")
    if name == "realmorph":
        return prepare_simulated(work, "realmorph_sky", "realmorph.yaml")
    if name == "lowsnr":
        return prepare_lowsnr(work)
    raise SystemExit(f"unknown data set {name}")


class Data:
    """Inputs (NESTED rows) of one catalog with galdecomp's preprocessing, and the templates (RING)."""

    def __init__(self, inputs, templates):
        import healpy as hp

        from galdecomp.catalog import load_catalog, read_catalog, working_nside
        from galdecomp.sources import load_preprocessed
        from galdecomp.preprocessing import Preprocessor

        cat = read_catalog(inputs)
        self.nside = working_nside(cat)
        self.catalog = cat
        self.dataset, self.pre, self.data = load_preprocessed(cat, self.nside)
        npix = 12 * self.nside ** 2
        self.n2r = hp.ring2nest(self.nside, np.arange(npix))  # RING pixel r is NESTED row n2r[r]
        self.physical = self.dataset.values.T  # (P, C) NESTED, NaN missing
        tset = load_catalog(templates, nside=self.nside)
        self.template_names = tset.names
        self.T = Preprocessor.fit(tset).forward(tset.values)  # (n_templates, npix) RING
        self.complete = np.isfinite(self.data).all(axis=1)     # NESTED rows
        # channels that are not photon counts (anscombe): a Gaussian density on sparse counts
        # rewards predicting single photons, so the ELBO is also reported without them
        self.intensity = np.array([t.kind != "anscombe" for t in self.pre.transforms])

    def ring(self, rows):
        """(P, k) NESTED rows -> (P, k) RING rows."""
        return rows[self.n2r]


# ------------------------------------------------------------------------------------ galdecomp
def simulate(out, nside, seed=0, morphology=None, base=None, where="simulate: morphology"):
    """Simulate a sky into the folder ``out`` (replaced): what ``galdecomp simulate --nside N --seed S
    --out OUT --overwrite --no-plot [--morphology DIR]`` writes (``catalog.yaml``, the maps, ``truth/``).

    ``morphology``: None, a folder of maps (the name rule) or a ``runs/`` preset's
    ``{dir: FOLDER, component: map name, ...}`` (a relative folder is relative to ``base``).
    Returns the path of the sky's catalog.
    """
    from galdecomp.fileio import atomic_output_dir
    from galdecomp.simulation import simulate_sky, write_simulated_sky
    from galdecomp.simulation.morphology import morphology_from_config

    morph = morphology_from_config(morphology, base, where) if morphology else None
    sky = simulate_sky(nside, seed=seed, morphology=morph)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_output_dir(os.path.abspath(out), overwrite=True) as tmp:
        write_simulated_sky(sky, tmp)
    return os.path.join(out, "catalog.yaml")


def fit(catalog, out, config=None, resume=False, **options):
    """galdecomp's fit of ``catalog`` into the run folder ``out`` (replaced), in this process: what
    ``galdecomp fit CATALOG --out OUT --overwrite [--config FILE] [--resume]`` runs, with
    ``options`` as its options (``seed``, ``max_epochs``, ``latent_dim``, ``nside``, ``threads``,
    ``covariance``, ...) or any top-level setting (``training={...}``). Returns ``fit_catalog``'s
    result (``state``, ``run_dir``, ``products``)."""
    from galdecomp.pipeline import fit_catalog, fit_overrides

    return fit_catalog(catalog, out, fit_overrides(options), config, resume, overwrite=True)


def show_progress():
    """Show the package's progress messages on stderr, as the command line does."""
    from galdecomp.logs import configure
    from galdecomp.parallel import world

    configure(world())


def galdecomp_command(args, ranks=1, module=False):
    """The command line ``galdecomp ARGS`` for a subprocess: the console script beside this
    interpreter, or with ``module`` ``python -m galdecomp``; on ``ranks`` > 1 under ``mpiexec -n``."""
    bindir = os.path.dirname(sys.executable)
    cmd = ([sys.executable, "-m", "galdecomp"] if module else [os.path.join(bindir, "galdecomp")]) + list(args)
    if ranks > 1:
        cmd = [os.path.join(bindir, "mpiexec"), "-n", str(ranks)] + cmd
    return cmd


# ------------------------------------------------------------------------------------ timing and provenance


def best_all(entries, repeat):
    """Best wall time of each entry ``name -> (setup, fn)``.

    Runs round-robin (every entry once per round, ``repeat`` rounds, after one untimed warm-up
    round) so that load from other jobs on a shared machine hits all entries alike; ``setup()``
    runs before every call and is not timed.
    """
    ts = {k: [] for k in entries}
    for setup, fn in entries.values():
        setup()
        fn()
    for _ in range(repeat):
        for k, (setup, fn) in entries.items():
            setup()
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in ts.items()}


def package_dir():
    import importlib.util

    return list(importlib.util.find_spec("galdecomp").submodule_search_locations)[0]


def package_fingerprint(pkg_dir=None):
    """``sources sha256 <12 hex>, git HEAD <rev>`` of the galdecomp sources (read-only git call).

    The hash covers every ``.py`` file of the package, so runs on an edited working tree can be
    told apart from runs on the commit.
    """
    pkg_dir = pkg_dir or package_dir()
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(pkg_dir)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for fn in sorted(files):
            if fn.endswith(".py"):
                with open(os.path.join(root, fn), "rb") as f:
                    h.update(fn.encode() + f.read())
    try:
        head = subprocess.run(["git", "-C", os.path.dirname(pkg_dir), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        head = "?"
    return f"sources sha256 {h.hexdigest()[:12]}, git HEAD {head}"


def load_average():
    return tuple(round(x, 2) for x in os.getloadavg())


def optional_torch(disabled=False, hint=""):
    """``torch`` if it is installed and not ``disabled``, else None (with a printed note)."""
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        print(f"# torch not installed: torch rows skipped{hint}")
        return None
    return torch


# ------------------------------------------------------------------------------------ the PyTorch peer
def torch_mlp(torch, sizes):
    """``torch.nn.Sequential`` of Linear layers of widths ``sizes`` with tanh between them."""
    nn = torch.nn
    mods = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def torch_vae(torch, n_features, latent_dim, encoder_hidden, decoder_hidden, floor2=0.0, sigma0=1.0, beta=1.0,
              masked=True):
    """The PyTorch f32 VAE of the benchmarks, the peer a user would write (tanh MLPs, learned
    per-channel noise, Gaussian likelihood, analytic KL to N(0, 1), PyTorch's default initialisation).

    Encoder ``-> encoder_hidden -> 2L`` giving (mu, log sigma), decoder ``L -> decoder_hidden -> C``,
    noise variance ``floor2 + exp(2 log_sigma)`` per channel with ``log_sigma`` starting at
    ``log(sigma0)``. Two forms of the data, each the arithmetic its benchmarks were measured with:

    - ``masked`` (bench_fit, bench_step, bench_fashion): rows with missing entries; the encoder sees
      ``[d * m, m]`` (2C inputs), the likelihood counts the observed channels;
      ``neg_elbo(X, D, M, xi) -> scalar``: the mean -ELBO (``nll + beta kl``) of rows with inputs
      ``X = [d * m, m]``, data ``D`` (missing set to 0), mask ``M`` (float) and one draw ``xi``;
    - not ``masked`` (bench_quality's and bench_speed's peer, :func:`fit_torch_peer`): complete
      rows, the encoder sees ``d`` (C inputs); ``neg_elbo(X, xis, keep=None) -> (n,)``: the -ELBO
      per row, the likelihood averaged over the draws ``xis`` (a list of (n, L)), with the boolean
      ``keep`` only the likelihood terms of those channels (the encoder still sees every channel).

    Returns
    -------
    params : list of torch.nn.Parameter
        Encoder, decoder and ``log_sigma`` parameters (for the optimiser).
    neg_elbo : callable
        As above.
    modules : tuple
        ``(encoder, decoder, log_sigma)``.
    """
    nn = torch.nn
    L = latent_dim

    def mlp(sizes):
        return torch_mlp(torch, sizes)

    enc = mlp([(2 if masked else 1) * n_features, *encoder_hidden, 2 * L])
    dec = mlp([L, *decoder_hidden, n_features])
    log_sigma = nn.Parameter(torch.full((n_features,), float(np.log(sigma0))))
    log2pi = float(np.log(2.0 * np.pi))

    def neg_elbo(X, D, M, xi):
        e = enc(X)
        mu, ls = e[:, :L], e[:, L:]
        sd = torch.exp(ls)
        y = dec(mu + sd * xi)
        var = floor2 + torch.exp(2.0 * log_sigma)
        r = (D - y) * M
        nll = 0.5 * ((r * r) / var + M * (log2pi + torch.log(var))).sum(dim=1)
        kl = 0.5 * (mu * mu + sd * sd - 1.0 - 2.0 * ls).sum(dim=1)
        return (nll + beta * kl).mean()

    def neg_elbo_rows(X, xis, keep=None):
        e = enc(X)
        mu, ls = e[:, :L], e[:, L:]
        sd = torch.exp(ls)
        var = floor2 + torch.exp(2 * log_sigma)
        nll = 0.0
        for xi in xis:
            r = X - dec(mu + sd * xi)
            t = 0.5 * ((r * r) / var + log2pi + torch.log(var))
            nll = nll + (t if keep is None else t[:, keep]).sum(1)
        kl = 0.5 * (mu * mu + sd * sd - 1.0 - 2.0 * ls).sum(1)
        return nll / len(xis) + beta * kl

    return [*enc.parameters(), *dec.parameters(), log_sigma], neg_elbo if masked else neg_elbo_rows, \
        (enc, dec, log_sigma)


def fit_torch_peer(X, seed, latent_dim, epochs=200, lr=2e-3, batch=1024, valid=None, log=None, channels=None):
    """The PyTorch peer trained on complete rows ``X`` (n, C): :func:`torch_vae` (not ``masked``),
    encoder and decoder 2x128 tanh, ``log_sigma`` starting at 0, no floor; Adam ``lr`` with cosine
    annealing over ``epochs``, minibatches of ``batch`` rows (order from ``default_rng([seed, 77])``,
    one draw per row from torch's global generator after ``torch.manual_seed(seed)``).

    Returns dict(features: the encoder means on X, seconds: the training loop, weights: the
    networks' (W (n_in, n_out), b) and ``log_sigma`` as float64, validation: mean and median -ELBO of
    the ``valid`` rows (:data:`EVAL_DRAWS` draws each, generator seeded 12345) or None,
    validation_channels: the same with only the likelihood terms of the boolean ``channels``)."""
    import torch

    torch.manual_seed(seed)
    nn = torch.nn
    n, C = X.shape
    L = latent_dim
    params, neg_elbo, (enc, dec, log_sigma) = torch_vae(torch, C, L, [128, 128], [128, 128], masked=False)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    train = np.arange(n) if valid is None else np.setdiff1d(np.arange(n), valid)
    Xt = torch.tensor(X, dtype=torch.float32)
    gen = np.random.default_rng([seed, 77])

    def draws(rows, k, gen_t=None):
        return [torch.randn((len(rows), L), generator=gen_t) for _ in range(k)]

    t0 = time.perf_counter()
    for ep in range(epochs):
        order = gen.permutation(train)
        for b in range(0, len(order), batch):
            idx = torch.as_tensor(order[b:b + batch])
            loss = neg_elbo(Xt[idx], draws(idx, 1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if log and (ep + 1) % 50 == 0:
            log(f"torch epoch {ep + 1}: loss {loss.item():.4f}")
    seconds = time.perf_counter() - t0
    weights = dict(enc=[(m.weight.detach().numpy().T.astype(float), m.bias.detach().numpy().astype(float))
                        for m in enc if isinstance(m, nn.Linear)],
                   dec=[(m.weight.detach().numpy().T.astype(float), m.bias.detach().numpy().astype(float))
                        for m in dec if isinstance(m, nn.Linear)],
                   log_sigma=log_sigma.detach().numpy().astype(float))
    with torch.no_grad():
        mu = enc(Xt)[:, :L].numpy().astype(float)
        val = None
        if valid is not None:
            v = torch.as_tensor(valid)
            per_row = neg_elbo(Xt[v], draws(v, EVAL_DRAWS, torch.Generator().manual_seed(12345)))
            per_row = per_row.numpy().astype(float)
            val = (float(per_row.mean()), float(np.median(per_row)))
            val_ch = None
            if channels is not None:
                keep = torch.as_tensor(np.asarray(channels, bool))
                per_row = neg_elbo(Xt[v], draws(v, EVAL_DRAWS, torch.Generator().manual_seed(12345)), keep)
                per_row = per_row.numpy().astype(float)
                val_ch = (float(per_row.mean()), float(np.median(per_row)))
    return dict(features=mu, seconds=seconds, validation=val, weights=weights,
                validation_channels=val_ch if valid is not None else None)
