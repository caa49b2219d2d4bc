"""Recipes: the jobs the command line runs, as plain functions.

``fit_data`` fits the autoencoder to a data source (a catalog's maps, :class:`SkySource`, or a
plain table, :class:`TableSource`) and writes a run folder (``fit_catalog``, ``fit_table``);
``run_main_job`` simulates the default sky and fits it. Both hold their output folder's lock
(one writer per run folder).
"""
import contextlib
import json
import logging
import os
import signal

import numpy as np

from .catalog import valid_nside
from .errors import InputError, JobStopped, WriteError
from .fileio import folder_lock
from .inference.config import model_signature, resolve_config
from .inference.fitting import StopSignals, fit_rows
from .inference.training import TrainingState, finished
from .model.autoencoder import Autoencoder
from .run import RunFolder
from .sources import SkySource, is_table, noise_floor, table_source
from .versions import differences as version_differences
from .workers import threads_of

__all__ = ["fit_data", "fit_catalog", "fit_table", "fit_overrides", "fit_path", "run_main_job"]



log = logging.getLogger(__name__)


def _sets_target(settings):
    """True if configuration ``settings`` (a file's or overrides) give ``data.fwhm_arcmin``."""
    data = (settings or {}).get("data")
    return isinstance(data, dict) and data.get("fwhm_arcmin") is not None


def fit_catalog(catalog_path, out, overrides=None, config_file=None, resume=False, overwrite=False,
                comm=None):
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
    comm : SerialComm or MPIComm, optional
        The processes of the job (default :func:`galdecomp.parallel.world`).

    Returns
    -------
    dict
        ``run_dir``; ``config`` (resolved); ``state`` (final TrainingState); ``products``
        (on rank 0: ``order``, ``significance``, ``sigma``, ``paths``; None elsewhere).
    """
    return fit_data(SkySource(catalog_path), out, overrides, config_file, resume, overwrite, comm)


def fit_table(path, out, overrides=None, config_file=None, resume=False, overwrite=False, comm=None):
    """Fit the probabilistic autoencoder to a plain table and write the run folder (CSV products).

    Parameters as :func:`fit_catalog`, with ``path`` a ``.npy``, ``.npz`` or ``.csv`` table of
    rows x features (see :func:`galdecomp.datasets.table.read_table`), or ``"fashion-mnist"``: the
    60,000 training images with the image preset (:data:`galdecomp.datasets.fashion_mnist.PRESET`,
    under the configuration file's settings); rows are sharded over MPI ranks.

    Returns
    -------
    dict
        As :func:`fit_catalog`.
    """
    source = table_source(path)
    if source.preset is not None:  # the data set's settings, under the configuration file's
        from .inference.config import DEFAULTS, merge_settings

        config_file = merge_settings(merge_settings(DEFAULTS, source.preset), config_file or {}, "config")
    return fit_data(source, out, overrides, config_file, resume, overwrite, comm)


#: Settings of ``galdecomp fit``'s options that live in the ``training`` section.
_TRAINING_OPTIONS = ("max_epochs", "threads")


def fit_overrides(settings):
    """The configuration overrides of ``galdecomp fit``'s options (and of :func:`galdecomp.fit`'s keywords).

    Parameters
    ----------
    settings : dict
        Top-level settings of the configuration (``latent_dim``, ``covariance``, ``beta``,
        ``seed``, ``nside``, ``decoder``, ...), and the options' shortcuts ``max_epochs`` and
        ``threads`` (``training``), ``posterior`` and ``rotation`` (method names) and ``fwhm_arcmin``
        (``data``); None values are ignored.

    Returns
    -------
    dict
        Overrides for :func:`~galdecomp.inference.config.resolve_config`.
    """
    out = {k: v for k, v in settings.items() if v is not None and k not in _TRAINING_OPTIONS}
    training = {k: settings[k] for k in _TRAINING_OPTIONS if settings.get(k) is not None}
    if training:
        out["training"] = {**out["training"], **training} if isinstance(out.get("training"), dict) else training
    for part in ("posterior", "rotation"):  # a method name
        if isinstance(out.get(part), str):
            out[part] = {"method": out[part]}
    if "fwhm_arcmin" in out:
        fwhm = out.pop("fwhm_arcmin")
        out["data"] = {**out["data"], "fwhm_arcmin": fwhm} if isinstance(out.get("data"), dict) else {"fwhm_arcmin": fwhm}
    return out


def fit_path(path, out, overrides=None, config_file=None, resume=False, overwrite=False, comm=None):
    """:func:`fit_table` for a table (``.npy``, ``.npz``, ``.csv``, ``"fashion-mnist"``), else
    :func:`fit_catalog`; parameters and result as theirs."""
    path = os.fspath(path)
    return (fit_table if is_table(path) else fit_catalog)(path, out, overrides, config_file, resume, overwrite, comm)


def fit_data(source, out, overrides=None, config_file=None, resume=False, overwrite=False, comm=None):
    """Fit the autoencoder to a data source, with the run folder, its lock, checkpoints and signals.

    Parameters
    ----------
    source : SkySource or TableSource
        The data set (read and checked already).
    out, overrides, config_file, resume, overwrite, comm
        As for :func:`fit_catalog`.

    Returns
    -------
    dict
        As :func:`fit_catalog`.
    """
    if comm is None:
        from .parallel import world

        comm = world()
    with contextlib.ExitStack() as held:  # the run folder's lock, once taken
        return _fit_data(source, out, overrides, config_file, resume, overwrite, held, comm)


def _fit_data(source, out, overrides, config_file, resume, overwrite, held, comm):
    """:func:`fit_data`, holding the run folder's lock in the ExitStack ``held``."""
    run_dir = os.path.abspath(out)
    run = RunFolder(run_dir)
    # everything that can fail is checked, on every rank, before the run folder is touched
    if resume:
        run.require((overrides or {}).get("posterior") or (config_file or {}).get("posterior"))
        held.enter_context(run.lock(comm))
        stored = run.stored_config()
        old = model_signature(resolve_config(stored, where=run.path("config")))
        cfg = resolve_config(config_file if config_file is not None else stored, overrides)
        if not _sets_target(config_file) and not _sets_target(overrides):  # the run's target resolution
            cfg["data"]["fwhm_arcmin"] = (stored.get("data") or {}).get("fwhm_arcmin")
        diff = sorted(k for k, v in model_signature(cfg).items() if old[k] != v)
        if diff:
            raise InputError(f"{run_dir}: --resume with another configuration (differs in: {', '.join(diff)})")
        arrays, state = run.read_checkpoint()
    else:
        cfg = resolve_config(config_file, overrides)
        run.check(overwrite)
        if os.path.isdir(run_dir):
            held.enter_context(run.lock(comm))
    ready = source.prepare(cfg, comm)
    cfg["data"] = ready.record
    data, rows, n_rows = ready.data, ready.rows, ready.n_rows
    C, L = ready.data_set.n_features, cfg["latent_dim"]
    if C < L:
        raise InputError(f"{source.argument}: {C} {source.feature_word} cannot support {L} latent features "
                         f"(use --latent-dim {C} or fewer)")
    model = Autoencoder.from_config(cfg, C, noise_floor(ready.preprocessor, ready.data_set, cfg))
    tcfg = cfg["training"]
    if resume:
        if str(arrays["fingerprint"]) != ready.fingerprint:
            raise InputError(f"{run_dir}: --resume with other data than the run was started on "
                             f"({str(arrays['fingerprint']).split('|')[0]})")
        was_done = state.done  # max_epochs and patience may have changed: train longer, or stop
        state.done = finished(state, tcfg)
        at = f"epoch {state.epoch}" + (f", step {state.step}" if state.batch else "")
        more = " (finished; training longer)" if was_done and not state.done else ""
        log.info(f"resuming {run_dir} after {at}{more}")
        changed = version_differences(stored.get("versions"))  # None in runs written before the record
        if changed:
            log.info(f"resuming under other versions than the run was written with: {', '.join(changed)}")
        comm.barrier()  # every rank has validated its input before rank 0 writes
        if comm.rank == 0:  # the posterior and duration settings may have changed
            run.write_config(cfg)
    else:
        comm.barrier()  # every rank has validated its input before rank 0 replaces anything
        if comm.rank == 0:
            run.create()
        comm.barrier()
        held.enter_context(run.lock(comm, created=True))  # already held if the folder existed
        if comm.rank == 0:
            run.write_config(cfg)
        state = TrainingState(model.init_params(cfg["seed"]), tcfg["learning_rate"], cfg["seed"])
    comm.barrier()
    extra = dict(preprocessing=json.dumps(ready.preprocessor.to_dict()), fingerprint=ready.fingerprint,
                 config=json.dumps(cfg), catalog=source.path)
    ranks = f" on {comm.size} MPI ranks" if comm.size > 1 else ""
    log.info(f"fitting {n_rows} {source.row_word} x {C} {source.feature_word}, {L} latent features, "
             f"{cfg['covariance']} covariance{ranks}")
    save = (lambda st: run.save_checkpoint(st, extra)) if comm.rank == 0 else None
    hint = f"continue with `{source.resume_command(out)}`"
    try:
        with StopSignals() as stop:
            fit_rows(model, data, state, cfg, checkpoint=save, log=log.info, offset=rows.start, n_rows=n_rows,
                     comm=comm, stop=stop)
    except JobStopped as e:
        comm.barrier()  # rank 0 has written the checkpoint
        at = f"step {state.step} (in epoch {state.epoch + 1})" if state.batch else f"epoch {state.epoch}"
        log.info(f"stopped by {signal.Signals(e.signum).name} after {at}, checkpoint written: {hint}")
        raise
    except KeyboardInterrupt:
        log.info(f"interrupted: {hint} (from the last checkpoint)")
        raise
    return _write_run(run, source, ready, model, state, cfg, rows, n_rows, comm)


def _write_run(run, source, ready, model, state, cfg, rows, n_rows, comm):
    """After training: the latent posterior of every row (and MGVI/geoVI samples if asked), the
    products, the latent transform and ``model.npz`` written into the RunFolder ``run``; returns
    :func:`fit_data`'s result."""
    data = ready.data
    from .products.run_outputs import WRITERS, compute_products, feature_support, gather_products

    params = state.best_params
    mask = np.isfinite(data)
    data0 = np.where(mask, data, 0.0)
    log.info(f"posterior means and standard deviations of all {source.row_word}")
    # in row blocks: the covariances of all rows (P x L x L) are never held, only those of the
    # rows the latent transform is fitted on (at most MAX_ROWS over all ranks)
    t_rows = transform_fit_rows(cfg, rows.start, n_rows, len(data))
    mean, std, t_cov = model.posterior_moments(params, data0, mask, cov_rows=t_rows)
    samples, method = None, cfg["posterior"]["method"]
    if method != "amortised":
        from .inference.mgvi import latent_posterior_samples_on_cores

        p = cfg["posterior"]
        n = threads_of(cfg["training"], comm)
        log.info(f"{method}: {2 * p['n_samples']} samples, {p['iterations']} iterations, decoder and noise fixed"
                 + (f", the rows in {n} shares on {n} cores" if n > 1 else ""))
        samples = latent_posterior_samples_on_cores(n, model, params, data0, mask, mean, method, p["n_samples"],
                                                    p["iterations"], seed=cfg["seed"], log=log.info, offset=rows.start)
    prod = compute_products(ready.preprocessor, model, params, data, mean, std, cfg, samples, comm, log.info)
    del data0, mask, std, samples  # the products hold what is written: peak memory while writing
    prod = gather_products(prod, comm)
    # the last rank fits the latent transform while rank 0 writes the products; one process on
    # several cores forks a worker for the transform meanwhile (one core: in turn)
    written = {}

    def stage(k):
        if k == last:
            fit_transform(run, mean, t_cov, cfg, rows.start, n_rows, comm, root=comm.size - 1)
        if k == 0 and prod is not None:
            written["paths"] = WRITERS[source.kind](run, prod, ready.data_set, ready.preprocessor, model,
                                                    state.history, cfg, source.path, log.info)

    last = 1 if comm.size == 1 and threads_of(cfg["training"], comm) > 1 else 0
    if last:
        from .workers import ForkedWorkers

        with ForkedWorkers(2, stage) as beside:
            beside.run()
    else:
        stage(0)
    products = None
    if prod is not None:
        log.info(feature_support(prod["significance"][prod["order"]] / n_rows, source.row_word[:-1]))
        products = dict(order=prod["order"], significance=prod["significance"][prod["order"]],
                        sigma=prod["sigma"], paths=written["paths"])
    if comm.rank == 0:
        from .inference.trained import TrainedModel

        run.write_model(TrainedModel(model, params, ready.preprocessor, cfg, ready.data_set.units, cfg["data"],
                                     prod["order"], rotation=prod["rotation"]))
    comm.barrier()  # every file of the run is written when the fit returns on any rank
    return dict(run_dir=run.dir, config=cfg, state=state, products=products)


def transform_fit_rows(cfg, offset, n_rows, n_local):
    """Local indices of this process's rows the latent transform is fitted on (sorted; empty for
    ``transform: method: none``): :func:`galdecomp.products.generate.transform_rows`."""
    from .products.generate import transform_rows

    if cfg["transform"]["method"] == "none":
        return np.zeros(0, dtype=np.int64)
    return transform_rows(n_rows, cfg["training"]["validation_fraction"], cfg["seed"], offset, n_local)


def fit_transform(run, mean, cov, cfg, offset, n_rows, comm, root=0):
    """Fit the latent density of ``cfg["transform"]`` to the aggregate posterior on rank ``root``,
    which writes it (collective: the draws of all ranks are gathered there).

    Parameters
    ----------
    run : RunFolder
    mean : ndarray, shape (P_local, L)
        Posterior means of this process's rows.
    cov : ndarray, shape (K, L, L)
        Posterior covariances of the rows :func:`transform_fit_rows` picks (K of them, at most
        :data:`~galdecomp.products.generate.MAX_ROWS` over all ranks), in that order; or of
        all local rows (P_local, L, L).
    cfg : dict
    offset, n_rows : int
        Global index of the first local row; rows of all processes.
    comm : SerialComm or MPIComm
    root : int
        The rank that fits and writes the transform.

    Returns
    -------
    str or None
        The path written, on ``root``; None elsewhere (and for ``method: none``).
    """
    from .products.generate import draws_from_moments, fit_latent_density

    method = cfg["transform"]["method"]
    if method == "none":
        return None
    rows = transform_fit_rows(cfg, offset, n_rows, len(mean))
    if len(cov) != len(rows):  # covariances of all local rows
        cov = cov[rows]
    z, _ = draws_from_moments(mean[rows], cov, np.arange(len(rows)), cfg["seed"] + offset)
    groups = np.repeat(rows + offset, len(z) // max(len(rows), 1))
    z, groups = comm.gather_rows(z, root), comm.gather_rows(groups.astype(float), root)
    if comm.rank != root:
        if comm.rank == 0:
            log.info(f"latent transform ({method}) fitted on rank {root} meanwhile")
        return None
    log.info(f"latent transform ({method}) on {len(z)} draws of the aggregate posterior")
    density = fit_latent_density(z, groups, method, seed=cfg["seed"])
    return run.write_transform(density)


#: Defaults of the main job (`galdecomp run`).
RUN_DEFAULTS = {"out": "runs/main", "simulate": {"nside": 32, "seed": 0, "morphology": None}, "fit": {}}


def run_main_job(config_file=None, out=None, overwrite=False, resume=False, config_dir=None, comm=None):
    """The main job: simulate the default sky, fit it, and write the products.

    Parameters
    ----------
    config_file : dict, optional
        ``{out: DIR, simulate: {nside, seed, morphology}, fit: {...fit settings...}}``;
        ``morphology`` (optional): real maps as spatial templates, a folder or
        ``{dir: FOLDER, component: map name, ...}`` (see
        `galdecomp.simulation.morphology.morphology_from_config`).
    out : str, optional
        Output folder (overrides the config's ``out``).
    overwrite, resume : bool
        As for ``galdecomp fit``.
    config_dir : str, optional
        Folder of the configuration file: relative ``morphology`` folders are taken from there
        (default: the working folder).
    comm : SerialComm or MPIComm, optional
        The processes of the job (default :func:`galdecomp.parallel.world`).

    Returns
    -------
    dict
        ``sky`` (catalog path of the simulated sky), ``fit`` (the result of :func:`fit_catalog`),
        ``report`` (path of report.md; None on ranks other than 0).
    """
    from .simulation.morphology import morphology_from_config

    if comm is None:
        from .parallel import world

        comm = world()
    cfg = {**RUN_DEFAULTS, **(config_file or {})}
    unknown = sorted(set(cfg) - set(RUN_DEFAULTS))
    if unknown:
        raise InputError(f"run config: unknown setting(s) {', '.join(unknown)}")
    if cfg["simulate"] is not None and not isinstance(cfg["simulate"], dict):
        raise InputError("run config: simulate: expected a mapping (nside, seed, morphology)")
    sim = {**RUN_DEFAULTS["simulate"], **(cfg["simulate"] or {})}
    unknown = sorted(set(sim) - set(RUN_DEFAULTS["simulate"]))
    if unknown:
        raise InputError(f"run config: simulate: unknown setting(s) {', '.join(unknown)}")
    out = os.path.abspath(out or cfg["out"])
    resolve_config(cfg["fit"], where="run config: fit")      # fail early on bad settings
    if not valid_nside(sim["nside"]):
        raise InputError(f"run config: simulate: nside {sim['nside']!r} is not a power of two")
    morphology = None
    if not resume:  # a resumed job keeps its simulated sky
        morphology = morphology_from_config(sim["morphology"], config_dir, "run config: simulate: morphology")
        if morphology is not None:
            morphology.load(sim["nside"])
    sky_dir = os.path.join(out, "sky")
    if resume:
        if not os.path.isfile(os.path.join(sky_dir, "catalog.yaml")):
            raise InputError(f"{out}: --resume, but it holds no main-job run (no sky/catalog.yaml)")
    elif os.path.exists(out) and not overwrite:  # created with its parents below
        raise InputError(f"{out}: output folder exists (use --overwrite to replace it or --resume)")
    created = not os.path.exists(out)
    comm.barrier()  # every rank has checked the folder before rank 0 writes into it
    if comm.rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise WriteError(f"{out}: cannot create the output folder ({e.strerror})") from None
    comm.barrier()
    with folder_lock(out, comm, created=created):
        return _run_main_job(cfg, sim, morphology, out, sky_dir, resume, comm)


def _run_main_job(cfg, sim, morphology, out, sky_dir, resume, comm):
    """:func:`run_main_job` once the output folder exists and is held."""
    from .fileio import atomic_output_dir
    from .simulation import plot_overview, simulate_sky, write_simulated_sky

    if not resume:
        if comm.rank == 0:
            with atomic_output_dir(sky_dir, overwrite=True) as tmp:
                real = f", spatial templates from {morphology.catalog}" if morphology else ""
                log.info(f"simulating the sky at nside {sim['nside']} (seed {sim['seed']}{real})")
                sky = simulate_sky(sim["nside"], seed=sim["seed"], morphology=morphology)
                write_simulated_sky(sky, tmp)
                plot_overview(sky, os.path.join(tmp, "overview.png"))
        comm.barrier()
    fit_cfg = {"nside": sim["nside"], **(cfg["fit"] or {})}
    result = fit_catalog(os.path.join(sky_dir, "catalog.yaml"), os.path.join(out, "fit"),
                         config_file=fit_cfg, resume=resume, overwrite=True, comm=comm)
    report = None
    with RunFolder(result["run_dir"]).lock(comm):  # the report goes into the fit's run folder
        if comm.rank == 0:
            from .products.report import make_report

            log.info("report: the latent features against the truth maps")
            rep = make_report(result["run_dir"], os.path.join(sky_dir, "truth", "catalog.yaml"),
                              progress=log.info)
            report = RunFolder.report_file(rep["out"], "report")
    return dict(sky=os.path.join(sky_dir, "catalog.yaml"), fit=result, report=report)
