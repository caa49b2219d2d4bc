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

from .catalog import load_catalog, read_catalog
from .errors import InputError
from .fileio import atomic_path, write_text
from .inference.config import model_signature, resolve_config
from .inference.training import TrainingState, split_rows, train
from .model.autoencoder import Autoencoder, ELBOObjective
from .preprocessing import Preprocessor

__all__ = ["fit_rows", "fit_catalog", "run_main_job", "CHECKPOINT"]

CHECKPOINT = "checkpoint.npz"


def _say(msg):
    from .cli import log

    log(msg)


def _stored_config(run_dir):
    """The configuration of the run in ``run_dir`` (for --resume)."""
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)) or \
            not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise InputError(f"{run_dir}: --resume, but the folder holds no run (no {CHECKPOINT} and config.yaml)")
    with open(os.path.join(run_dir, "config.yaml")) as f:
        stored = yaml.safe_load(f)
    stored.pop("catalog", None)
    return stored


def prepare_run_dir(run_dir, overwrite):
    """Create an empty run folder, replacing an existing one only with ``overwrite``.

    Raises
    ------
    InputError
        ``run_dir`` exists and ``overwrite`` is false, or it cannot be created.
    """
    if os.path.exists(run_dir):
        if not overwrite:
            raise InputError(f"{run_dir}: run folder exists (use --resume to continue it or "
                             f"--overwrite to replace it)")
        if not os.path.isdir(run_dir):
            raise InputError(f"{run_dir}: exists and is not a folder")
        shutil.rmtree(run_dir)
    parent = os.path.dirname(run_dir)
    if not os.path.isdir(parent):
        raise InputError(f"{parent}: parent folder of the run does not exist")
    try:
        os.makedirs(run_dir)
    except OSError as e:
        raise InputError(f"{run_dir}: cannot create the run folder ({e.strerror})") from None


def _save_checkpoint(path, state, extra):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **state.to_arrays(), **extra)


def fit_rows(model, data, state, cfg, checkpoint=None, log=None):
    """Train an autoencoder on a table of rows (pixels, images): the data-set-independent core.

    Parameters
    ----------
    model : Autoencoder
    data : ndarray, shape (P, C)
        Standardised data, NaN where missing.
    state : TrainingState
        Fresh or resumed; updated in place.
    cfg : dict
        Resolved configuration (uses ``seed`` and ``training``).
    checkpoint : callable, optional
        ``checkpoint(state)`` after every epoch.
    log : callable, optional
        Progress messages.

    Returns
    -------
    TrainingState
        The final state (``best_params`` are the trained parameters).
    """
    tcfg = cfg["training"]
    train_rows, valid_rows = split_rows(len(data), tcfg["validation_fraction"], cfg["seed"])
    objective = ELBOObjective(model, data, n_total=train_rows.size)

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


def fit_catalog(catalog_path, out, overrides=None, config_file=None, resume=False, overwrite=False):
    """Fit the probabilistic autoencoder to the maps of a catalog and write the run folder.

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
        Continue the run in ``out`` from its checkpoint (its configuration must match).
    overwrite : bool
        Replace an existing run folder.

    Returns
    -------
    dict
        ``run_dir``; ``config`` (resolved); ``state`` (final TrainingState); ``products``
        (from :func:`galdecomp.products.run_outputs.write_run_products`: order, significance,
        sigma, paths).
    """
    catalog = read_catalog(catalog_path)
    run_dir = os.path.abspath(out)
    # everything that can fail is checked before the run folder is touched
    if resume:
        stored = _stored_config(run_dir)
        cfg = resolve_config(config_file if config_file is not None else stored, overrides)
        old = model_signature(resolve_config(stored, where=f"{run_dir}/config.yaml"))
        diff = sorted(k for k, v in model_signature(cfg).items() if old[k] != v)
        if diff:
            raise InputError(f"{run_dir}: --resume with another configuration (differs in: {', '.join(diff)})")
    else:
        cfg = resolve_config(config_file, overrides)
    data_set = load_catalog(catalog, nside=cfg["nside"])
    C, L = data_set.n_features, cfg["latent_dim"]
    if C < L:
        raise InputError(f"{catalog_path}: {C} channels cannot support {L} latent features "
                         f"(use --latent-dim {C} or fewer)")
    if not resume:
        prepare_run_dir(run_dir, overwrite)
    pre = Preprocessor.fit(data_set)
    data = pre.forward(data_set.values).T.copy()            # (P, C) rows = pixels
    mask = data_set.observed.T.copy()
    floor = np.sqrt(pre.noise_to_standardised(data_set) ** 2 + cfg["noise"]["floor"] ** 2)
    model = Autoencoder.from_config(cfg, C, floor)
    fingerprint = f"{catalog.path}|{data_set.nside}|{float(np.nansum(data)):.12e}"
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
        state = TrainingState(model.init_params(cfg["seed"]), cfg["training"]["learning_rate"], cfg["seed"])
        write_text(os.path.join(run_dir, "config.yaml"),
                   "# galdecomp fit configuration (resolved); re-run with --config this file\n"
                   + yaml.safe_dump({"catalog": catalog.path, **cfg}, sort_keys=False))
    extra = dict(preprocessing=json.dumps(pre.to_dict()), fingerprint=fingerprint,
                 config=json.dumps(cfg), catalog=catalog.path)
    _say(f"fitting {len(data)} pixels x {C} channels, {L} latent features, "
         f"{cfg['covariance']} covariance")
    try:
        fit_rows(model, data, state, cfg, checkpoint=lambda st: _save_checkpoint(ckpt, st, extra),
                 log=_say)
    except KeyboardInterrupt:
        _say(f"interrupted after epoch {state.epoch}: continue with "
             f"`galdecomp fit {catalog_path} --out {out} --resume`")
        raise
    from .products.run_outputs import write_run_products

    products = write_run_products(run_dir, data_set, pre, model, state.best_params, np.where(mask, data, 0.0),
                                  mask, state.history, cfg, catalog.path, progress=_say)
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
        ``sky`` (catalog path of the simulated sky), ``fit`` (the result of :func:`fit_catalog`).
    """
    from .fileio import atomic_output_dir
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
        os.makedirs(out, exist_ok=True)
        with atomic_output_dir(sky_dir, overwrite=True) as tmp:
            _say(f"simulating the default sky at nside {sim['nside']} (seed {sim['seed']})")
            sky = simulate_sky(sim["nside"], seed=sim["seed"])
            write_simulated_sky(sky, tmp)
            plot_overview(sky, os.path.join(tmp, "overview.png"))
    fit_cfg = {"nside": sim["nside"], **(cfg["fit"] or {})}
    result = fit_catalog(os.path.join(sky_dir, "catalog.yaml"), os.path.join(out, "fit"),
                         config_file=fit_cfg, resume=resume, overwrite=True)
    return dict(sky=os.path.join(sky_dir, "catalog.yaml"), fit=result)
