"""Recipes: the jobs the command line runs, as plain functions.

``fit_catalog`` fits the autoencoder to a catalog's maps and writes a run folder;
``run_main_job`` simulates the default sky and fits it.
"""
import json
import os
import shutil
import time

import numpy as np
import yaml

from .catalog import load_catalog, read_catalog, working_nside
from .errors import InputError
from .fileio import atomic_path, write_text
from .inference.config import model_signature, resolve_config
from .inference.training import TrainingState, split_rows, train
from .model.autoencoder import Autoencoder, ELBOObjective
from .preprocessing import ChannelTransform, Preprocessor

__all__ = ["fit_rows", "fit_catalog", "run_main_job", "CHECKPOINT"]

CHECKPOINT = "checkpoint.npz"


def _say(msg):
    from .cli import log
    from .parallel import world

    if world().rank == 0:
        log(msg)


def _write_config(run_dir, catalog_path, cfg):
    """Write RUN/config.yaml: the resolved configuration, usable as ``--config``."""
    write_text(os.path.join(run_dir, "config.yaml"),
               "# galdecomp fit configuration (resolved); re-run with --config this file\n"
               + yaml.safe_dump({"catalog": catalog_path, **cfg}, sort_keys=False))


def _stored_config(run_dir, posterior=None):
    """The configuration of the run in ``run_dir`` (for --resume; ``posterior``: an MGVI request)."""
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)) or \
            not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        what = f"no trained model to run {posterior['method']} on" if posterior else "the folder holds no run"
        raise InputError(f"{run_dir}: --resume, but {what} (no {CHECKPOINT} and config.yaml)")
    with open(os.path.join(run_dir, "config.yaml")) as f:
        stored = yaml.safe_load(f)
    stored.pop("catalog", None)
    return stored


def check_run_dir(run_dir, overwrite):
    """Raise InputError unless ``run_dir`` can be created (or replaced, with ``overwrite``)."""
    if os.path.exists(run_dir):
        if not overwrite:
            raise InputError(f"{run_dir}: run folder exists (use --resume to continue it or "
                             f"--overwrite to replace it)")
        if not os.path.isdir(run_dir):
            raise InputError(f"{run_dir}: exists and is not a folder")
    parent = os.path.dirname(run_dir)
    if not os.path.isdir(parent):
        raise InputError(f"{parent}: parent folder of the run does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: folder is not writable")


def make_run_dir(run_dir):
    """Create an empty run folder, removing what was there (checked by :func:`check_run_dir`)."""
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    try:
        os.makedirs(run_dir)
    except OSError as e:
        raise InputError(f"{run_dir}: cannot create the run folder ({e.strerror})") from None


def _save_checkpoint(path, state, extra):
    """Write the training state and run metadata to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **state.to_arrays(), **extra)


def fit_rows(model, data, state, cfg, checkpoint=None, log=None, offset=0, n_rows=None, comm=None):
    """Train an autoencoder on a table of rows (pixels, images): the data-set-independent core.

    Parameters
    ----------
    model : Autoencoder
    data : ndarray, shape (P_local, C)
        Standardised data of this process's rows, NaN where missing.
    state : TrainingState
        Fresh or resumed; updated in place.
    cfg : dict
        Resolved configuration (uses ``seed`` and ``training``).
    checkpoint : callable, optional
        ``checkpoint(state)`` after every epoch.
    log : callable, optional
        Progress messages.
    offset, n_rows : int
        Global index of the first local row and number of rows of all processes (pixel
        sharding; default: this process holds all rows).
    comm : SerialComm or MPIComm, optional

    Returns
    -------
    TrainingState
        The final state (``best_params`` are the trained parameters).
    """
    tcfg = cfg["training"]
    n_rows = len(data) if n_rows is None else n_rows
    train_rows, valid_rows = split_rows(n_rows, tcfg["validation_fraction"], cfg["seed"])
    objective = ELBOObjective(model, data, train_rows.size, offset, comm)

    def progress(st, eta):
        h = st.history[-1]
        log(f"epoch {st.epoch:4d}/{tcfg['max_epochs']}  ELBO {h['elbo']:10.4f}  "
            f"validation {h['validation_elbo']:10.4f}  lr {h['lr']:.2g}  "
            f"{h['seconds']:.1f}s/epoch  ETA {eta / 60:.1f} min (at most)")

    t0 = time.perf_counter()
    if log:
        log(f"{train_rows.size} training / {valid_rows.size} validation rows, batch {tcfg['batch_size']}")
    train(objective, state, train_rows, valid_rows, tcfg, seed=cfg["seed"], checkpoint=checkpoint,
          progress=progress if log else None)
    if log:
        log(f"training done after {state.epoch} epochs in {time.perf_counter() - t0:.1f} s; "
            f"best validation ELBO {-state.best_val:.4f}")
    return state


def load_preprocessed(catalog, nside, pixels=None):
    """Read a catalog's maps (NESTED pixel order) and standardise them.

    Each channel's transform is fitted on all pixels of its full map, while only ``pixels`` are
    kept, so every process of a pixel-sharded job gets the same preprocessing.

    Parameters
    ----------
    catalog : Catalog
    nside : int
    pixels : slice, optional
        The NESTED rows to keep (default all).

    Returns
    -------
    data_set : SkyDataSet
        The kept pixels in physical units (NESTED).
    preprocessor : Preprocessor
    data : ndarray, shape (P_local, C)
        Standardised values, NaN where missing.
    """
    transforms = [None] * len(catalog.maps)

    def fit_transform(i, full, kind):
        e = catalog.maps[i]
        transforms[i] = ChannelTransform.fit(full[np.isfinite(full)], e.transform, e.name,
                                             counts=kind == "counts")

    data_set = load_catalog(catalog, nside=nside, nest=True, pixels=pixels, on_channel=fit_transform)
    pre = Preprocessor(transforms, data_set.names)
    return data_set, pre, pre.forward(data_set.values).T.copy()


def fit_catalog(catalog_path, out, overrides=None, config_file=None, resume=False, overwrite=False):
    """Fit the probabilistic autoencoder to the maps of a catalog and write the run folder.

    Runs on one process or pixel-sharded over the ranks of ``mpiexec`` (same results).

    Parameters
    ----------
    catalog_path : str
        Map catalog (YAML).
    out : str
        Run folder.
    overrides : dict, optional
        Settings from the command line (top-level keys of the configuration).
    config_file : dict, optional
        Settings read from a --config file.
    resume : bool
        Continue the run in ``out`` from its checkpoint (its configuration must match; the
        number of MPI ranks may differ).
    overwrite : bool
        Replace an existing run folder.

    Returns
    -------
    dict
        ``run_dir``; ``config`` (resolved); ``state`` (final TrainingState); ``products``
        (from :func:`galdecomp.products.run_outputs.write_run_products`: order, significance,
        sigma, paths; on rank 0 only, None elsewhere).
    """
    from .parallel import row_block, world

    comm = world()
    catalog = read_catalog(catalog_path)
    run_dir = os.path.abspath(out)
    # everything that can fail is checked, on every rank, before the run folder is touched
    if resume:
        stored = _stored_config(run_dir, (overrides or {}).get("posterior") or (config_file or {}).get("posterior"))
        cfg = resolve_config(config_file if config_file is not None else stored, overrides)
        old = model_signature(resolve_config(stored, where=f"{run_dir}/config.yaml"))
        diff = sorted(k for k, v in model_signature(cfg).items() if old[k] != v)
        if diff:
            raise InputError(f"{run_dir}: --resume with another configuration (differs in: {', '.join(diff)})")
    else:
        cfg = resolve_config(config_file, overrides)
        check_run_dir(run_dir, overwrite)
    nside = working_nside(catalog, cfg["nside"])
    rows = row_block(nside, comm)
    data_set, pre, data = load_preprocessed(catalog, nside, rows)
    C, L = data_set.n_features, cfg["latent_dim"]
    if C < L:
        raise InputError(f"{catalog_path}: {C} channels cannot support {L} latent features "
                         f"(use --latent-dim {C} or fewer)")
    n_rows = 12 * nside * nside
    floor = np.sqrt(pre.noise_to_standardised(data_set.noise) ** 2 + cfg["noise"]["floor"] ** 2)
    model = Autoencoder.from_config(cfg, C, floor)
    fingerprint = f"{catalog.path}|{nside}|" + json.dumps(pre.to_dict(), sort_keys=True)
    ckpt = os.path.join(run_dir, CHECKPOINT)
    if resume:
        with np.load(ckpt) as f:
            arrays = dict(f)
        if str(arrays["fingerprint"]) != fingerprint:
            raise InputError(f"{run_dir}: --resume with other data than the run was started on "
                             f"({str(arrays['fingerprint']).split('|')[0]})")
        state = TrainingState.from_arrays(arrays)
        _say(f"resuming {run_dir} after epoch {state.epoch}")
    else:
        comm.barrier()  # every rank has validated its input before rank 0 replaces anything
        if comm.rank == 0:
            make_run_dir(run_dir)
            _write_config(run_dir, catalog.path, cfg)
        state = TrainingState(model.init_params(cfg["seed"]), cfg["training"]["learning_rate"], cfg["seed"])
    comm.barrier()
    extra = dict(preprocessing=json.dumps(pre.to_dict()), fingerprint=fingerprint,
                 config=json.dumps(cfg), catalog=catalog.path)
    ranks = f" on {comm.size} MPI ranks" if comm.size > 1 else ""
    _say(f"fitting {n_rows} pixels x {C} channels, {L} latent features, {cfg['covariance']} covariance{ranks}")
    save = (lambda st: _save_checkpoint(ckpt, st, extra)) if comm.rank == 0 else None
    try:
        fit_rows(model, data, state, cfg, checkpoint=save, log=_say, offset=rows.start, n_rows=n_rows,
                 comm=comm)
    except KeyboardInterrupt:
        _say(f"interrupted after epoch {state.epoch}: continue with "
             f"`galdecomp fit {catalog_path} --out {out} --resume`")
        raise
    from .products.run_outputs import write_run_products

    params = state.best_params
    mask = np.isfinite(data)
    data0 = np.where(mask, data, 0.0)
    _say("posterior means and covariances of all pixels")
    mean, cov = model.posterior_moments(params, data0, mask)
    samples, method = None, cfg["posterior"]["method"]
    if method != "amortised":
        from .inference.mgvi import latent_posterior_samples

        p = cfg["posterior"]
        _say(f"{method}: {2 * p['n_samples']} samples, {p['iterations']} iterations, decoder and noise fixed")
        samples = latent_posterior_samples(model, params, data0, mask, mean, method, p["n_samples"],
                                           p["iterations"], seed=cfg["seed"], log=_say, offset=rows.start)
    if resume and comm.rank == 0:  # the posterior settings may have changed: keep config.yaml exact
        _write_config(run_dir, catalog.path, cfg)
    products = write_run_products(run_dir, data_set, pre, model, params, data, mean, cov, state.history,
                                  cfg, catalog.path, samples=samples, comm=comm, progress=_say)
    return dict(run_dir=run_dir, config=cfg, state=state, products=products)


#: Defaults of the main job (`galdecomp run`).
RUN_DEFAULTS = {"out": "runs/main", "simulate": {"nside": 32, "seed": 0}, "fit": {}}


def run_main_job(config_file=None, out=None, overwrite=False, resume=False):
    """The main job: simulate the default sky, fit it, and write the products.

    Parameters
    ----------
    config_file : dict, optional
        ``{out: DIR, simulate: {nside, seed}, fit: {...fit settings...}}``.
    out : str, optional
        Output folder (overrides the config's ``out``).
    overwrite, resume : bool
        As for ``galdecomp fit``.

    Returns
    -------
    dict
        ``sky`` (catalog path of the simulated sky), ``fit`` (the result of :func:`fit_catalog`),
        ``report`` (path of report.md; None on ranks other than 0).
    """
    from .fileio import atomic_output_dir
    from .parallel import world
    from .simulation import plot_overview, simulate_sky, write_simulated_sky

    cfg = {**RUN_DEFAULTS, **(config_file or {})}
    unknown = sorted(set(cfg) - set(RUN_DEFAULTS))
    if unknown:
        raise InputError(f"run config: unknown setting(s) {', '.join(unknown)}")
    sim = {**RUN_DEFAULTS["simulate"], **(cfg["simulate"] or {})}
    out = os.path.abspath(out or cfg["out"])
    resolve_config(cfg["fit"], where="run config: fit")      # fail early on bad settings
    sky_dir = os.path.join(out, "sky")
    if resume:
        if not os.path.isfile(os.path.join(sky_dir, "catalog.yaml")):
            raise InputError(f"{out}: --resume, but it holds no main-job run (no sky/catalog.yaml)")
    else:
        if os.path.exists(out) and not overwrite:
            raise InputError(f"{out}: output folder exists (use --overwrite to replace it or --resume)")
        world().barrier()  # every rank has checked the folder before rank 0 writes into it
        if world().rank == 0:
            os.makedirs(out, exist_ok=True)
            with atomic_output_dir(sky_dir, overwrite=True) as tmp:
                _say(f"simulating the default sky at nside {sim['nside']} (seed {sim['seed']})")
                sky = simulate_sky(sim["nside"], seed=sim["seed"])
                write_simulated_sky(sky, tmp)
                plot_overview(sky, os.path.join(tmp, "overview.png"))
        world().barrier()
    fit_cfg = {"nside": sim["nside"], **(cfg["fit"] or {})}
    result = fit_catalog(os.path.join(sky_dir, "catalog.yaml"), os.path.join(out, "fit"),
                         config_file=fit_cfg, resume=resume, overwrite=True)
    report = None
    if world().rank == 0:
        from .products.report import make_report

        _say("report: the latent features against the truth maps")
        rep = make_report(result["run_dir"], os.path.join(sky_dir, "truth", "catalog.yaml"), progress=_say)
        report = os.path.join(rep["out"], "report.md")
    return dict(sky=os.path.join(sky_dir, "catalog.yaml"), fit=result, report=report)
