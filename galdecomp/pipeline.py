"""Recipes: the jobs the command line runs, as plain functions.

``fit_data`` fits the autoencoder to a data source (a catalog's maps, :class:`SkySource`, or a
plain table, :class:`TableSource`) and writes a run folder (``fit_catalog``, ``fit_table``);
``run_main_job`` simulates the default sky and fits it. Both hold their output folder's lock
(one writer per run folder).
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass

import numpy as np
import yaml

from .catalog import load_catalog, map_reader, read_catalog, valid_nside, working_nside
from .dataset import TABLE_FORMATS, DataSet, read_table
from .errors import InputError, JobStopped, WriteError
from .fileio import LOCK_FILE, atomic_path, check_output_dir, folder_lock, write_text
from .inference.config import model_signature, resolve_config, with_former_defaults
from .inference.training import TrainingState, finished, split_rows, train
from .model.autoencoder import Autoencoder, ELBOObjective
from .preprocessing import ChannelTransform, Preprocessor
from .versions import differences as version_differences
from .versions import versions
from .workers import blas_threads, describe_threads, threads_of

__all__ = ["fit_rows", "fit_data", "fit_catalog", "fit_table", "fit_overrides", "fit_path", "SkySource",
           "TableSource", "Prepared", "run_main_job", "CHECKPOINT"]

CHECKPOINT = "checkpoint.npz"


log = logging.getLogger(__name__)


def _write_config(run_dir, cfg):
    """Write RUN/config.yaml: the resolved configuration, usable as ``--config``; a sky run's
    also names its catalog as ``catalog`` (read by ``galdecomp report``); last, the ``versions``
    of the package and its main dependencies that wrote it (a record, ignored when read)."""
    head = {"catalog": cfg["data"]["path"]} if cfg["data"]["kind"] == "sky" else {}
    write_text(os.path.join(run_dir, "config.yaml"),
               "# galdecomp fit configuration (resolved); re-run with --config this file\n"
               + yaml.safe_dump({**head, **cfg}, sort_keys=False)
               + "# the versions that wrote this file (a record: --config and --resume ignore it)\n"
               + yaml.safe_dump({"versions": versions()}, sort_keys=False))


def _unusable(path, what, why):
    """The InputError for a run file that cannot be used to resume."""
    return InputError(f"{path}: not a galdecomp {what} or unreadable ({why}); start again with --overwrite")


def _require_run(run_dir, posterior=None):
    """Raise InputError unless ``run_dir`` holds a run (for --resume; ``posterior``: an MGVI request)."""
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)) or \
            not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        what = f"no trained model to run {posterior['method']} on" if posterior else "the folder holds no run"
        raise InputError(f"{run_dir}: --resume, but {what} (no {CHECKPOINT} and config.yaml)")


def _stored_config(run_dir):
    """The configuration of the run in ``run_dir``, as written to its config.yaml."""
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path) as f:
            stored = yaml.safe_load(f)
    except yaml.YAMLError:
        raise _unusable(path, "run configuration", "not valid YAML") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _unusable(path, "run configuration", getattr(e, "strerror", None) or str(e)) from None
    if not isinstance(stored, dict):
        raise _unusable(path, "run configuration", "not a mapping of settings")
    stored.pop("catalog", None)
    return with_former_defaults(stored)


def _sets_target(settings):
    """True if configuration ``settings`` (a file's or overrides) give ``data.fwhm_arcmin``."""
    data = (settings or {}).get("data")
    return isinstance(data, dict) and data.get("fwhm_arcmin") is not None


def _stored_versions(run_dir):
    """The ``versions`` block of the run's config.yaml (None in runs written before it)."""
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return (yaml.safe_load(f) or {}).get("versions")


def _read_checkpoint(path):
    """The arrays of the checkpoint ``path`` and its TrainingState; InputError if it is not one."""
    try:
        with open(path, "rb") as fh, np.load(fh) as f:  # np.load leaks its own handle on a bad zip
            arrays = dict(f)
        state = TrainingState.from_arrays(arrays)
        str(arrays["fingerprint"])
    except Exception as e:  # whatever a damaged file raises: zipfile, pickle, json, a missing key
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise _unusable(path, "checkpoint", why) from None
    return arrays, state


def check_run_dir(run_dir, overwrite):
    """Raise InputError unless ``run_dir`` can be created (or replaced, with ``overwrite``)."""
    check_output_dir(run_dir, overwrite, "run", "use --resume to continue it or --overwrite to replace it")


def make_run_dir(run_dir):
    """Create an empty run folder, or empty an existing one but for its lock file (checked by
    :func:`check_run_dir`)."""
    try:
        if not os.path.isdir(run_dir):
            os.makedirs(run_dir)
        for name in set(os.listdir(run_dir)) - {LOCK_FILE}:
            path = os.path.join(run_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    except OSError as e:
        raise InputError(f"{run_dir}: cannot create the run folder ({e.strerror})") from None


def _save_checkpoint(path, state, extra):
    """Write the training state and run metadata to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **state.to_arrays(), **extra)


class _StopSignals:
    """While training, SIGINT and SIGTERM ask the job to stop at the next step (after a checkpoint).

    The ranks agree on the step: the flags travel with the step's gradient (see
    :func:`~galdecomp.inference.training.train`'s ``stop``). A second SIGINT (Ctrl-C) interrupts
    at once. Outside the main thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.got, self.old = dict.fromkeys(self.SIGNALS, 0), {}

    def __enter__(self):
        with contextlib.suppress(ValueError):
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.got[signum]:
            raise KeyboardInterrupt
        self.got[signum] = 1

    def flags(self):
        """This rank's count of each signal (``SIGNALS`` order), to be summed over the ranks."""
        return np.array([self.got[s] for s in self.SIGNALS], dtype=np.float64)

    def signal(self, sums):
        """The signal to stop on for the ``flags`` summed over the ranks (SIGTERM before SIGINT),
        or None."""
        return next((s for s, k in zip(self.SIGNALS[::-1], sums[::-1]) if k), None)


def fit_rows(model, data, state, cfg, checkpoint=None, log=None, offset=0, n_rows=None, comm=None,
             stop=None):
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
        ``checkpoint(state)`` after every epoch, and inside an epoch every
        ``training.checkpoint_seconds``.
    log : callable, optional
        Progress messages.
    offset, n_rows : int
        Global index of the first local row and number of rows of all processes (pixel
        sharding; default: this process holds all rows).
    comm : SerialComm or MPIComm, optional
    stop : object, optional
        Stop requests, checked at every step (see :func:`train`).

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
            f"validation {h['validation_elbo']:10.4f} (median {h.get('validation_median', np.nan):.4f})  "
            f"lr {h['lr']:.2g}  "
            f"{h['seconds']:.1f}s/epoch  ETA {eta / 60:.1f} min (at most)")

    t0 = time.perf_counter()
    asked = threads_of(tcfg, objective.comm)
    threads = objective.start_workers(asked, tcfg["batch_size"], valid_rows.size)
    if log:
        log(f"{train_rows.size} training / {valid_rows.size} validation rows, batch {tcfg['batch_size']}; "
            f"{describe_threads(threads, objective.comm)}, {tcfg['dtype']} kernels")
        if objective.comm.size > 1 and (tcfg["threads"] or 1) > 1:
            log(f"training.threads {tcfg['threads']} ignored: under MPI each rank computes its rows alone")
        elif asked > threads:
            log(f"{asked} cores, {threads} used: a minibatch has {threads} blocks of at most "
                f"{tcfg['block_rows']} rows (a smaller training.block_rows gives more)")
    seconds = {}
    try:
        with blas_threads(1):  # idle BLAS threads spin and would take the workers' cores
            train(objective, state, train_rows, valid_rows, tcfg, seed=cfg["seed"], checkpoint=checkpoint,
                  progress=progress if log else None, stop=stop,
                  step_scale=model.step_scales() if tcfg["step_on"] == "weights" else None, seconds=seconds)
    finally:
        objective.close_workers()
    where = training_time_summary(dict(seconds, reduction=objective.reduce_seconds), objective.comm)
    if log:
        log(f"training done after {state.epoch} epochs in {time.perf_counter() - t0:.1f} s; "
            f"best validation ELBO ({tcfg['select']} over the rows) {-state.best_val:.4f}")
        if where:
            log(where)
    return state


def training_time_summary(seconds, comm):
    """One line on where the training time went, per step and per epoch, over the ranks.

    Parameters
    ----------
    seconds : dict
        :func:`~galdecomp.inference.training.train`'s ``seconds`` of this rank, with
        ``reduction`` (the objective's sum of the gradient over the ranks, waits included);
        without ``epochs`` if no epoch ran.
    comm : SerialComm or MPIComm
        Collective: every rank calls it.

    Returns
    -------
    str or None
        On rank 0 (None elsewhere, and when no epoch ran): milliseconds per step of the
        gradient on the rank's own rows, the reduce-scatter with the wait for the slowest rank,
        Adam on the rank's block of the parameters, the Allgather of the blocks, the finiteness
        and signal checks and the rest of the loop; per epoch of the validation and the
        checkpoints; minimum-maximum over the ranks.
    """
    keys = ("gradient", "reduction", "optimiser", "params_gather", "checks", "validation", "checkpoint",
            "total", "steps", "epochs")
    mine = np.array([[seconds.get(k, 0.0) for k in keys]])
    every = comm.gather_rows(mine)
    if every is None or every[:, -1].min() < 1:
        return None
    s = dict(zip(keys, every.T))
    per_step = {"gradient on the rank's rows": s["gradient"] - s["reduction"],
                "reduce-scatter with the wait for the slowest rank": s["reduction"],
                "Adam on the rank's block": s["optimiser"], "parameter Allgather": s["params_gather"],
                "checks": s["checks"],
                "rest of the loop": s["total"] - s["gradient"] - s["optimiser"] - s["params_gather"]
                - s["checks"] - s["validation"] - s["checkpoint"]}
    per_epoch = {"validation": s["validation"], "checkpoints": s["checkpoint"]}

    def fmt(v, n):
        lo, hi = 1e3 * np.min(v / n), 1e3 * np.max(v / n)
        return f"{lo:.2f}" if comm.size == 1 else f"{lo:.2f}-{hi:.2f}"

    ranks = f" (min-max over {comm.size} ranks)" if comm.size > 1 else ""
    return (f"training time{ranks}: per step [ms] "
            + ", ".join(f"{k} {fmt(v, s['steps'])}" for k, v in per_step.items())
            + "; per epoch [ms] " + ", ".join(f"{k} {fmt(v, s['epochs'])}" for k, v in per_epoch.items()))


def load_preprocessed(catalog, nside, pixels=None, comm=None, fwhm_arcmin=None):
    """Read a catalog's maps (NESTED pixel order) and standardise them.

    Each channel's transform is fitted on all pixels of its full map, while only ``pixels`` are
    kept, so every process of a pixel-sharded job gets the same preprocessing.

    Parameters
    ----------
    catalog : Catalog
    nside : int
    pixels : slice, optional
        The NESTED rows to keep (default all).
    comm : SerialComm or MPIComm, optional
        The ranks read the maps side by side (map i by rank ``i % size``) and fit their
        transforms; every rank gets its block and all transforms (default: this process reads
        everything).

    fwhm_arcmin : float, optional
        Target resolution the maps are smoothed to (see :func:`~galdecomp.catalog.load_catalog`).

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
                                             counts=kind == "counts", asinh_scale=e.asinh_scale)

    data_set = load_catalog(catalog, nside=nside, nest=True, pixels=pixels, on_channel=fit_transform, comm=comm,
                            fwhm_arcmin=fwhm_arcmin)
    if comm is not None:  # each transform was fitted by the rank that read its map
        transforms = [comm.bcast(t, map_reader(i, comm)) for i, t in enumerate(transforms)]
    pre = Preprocessor(transforms, data_set.names)
    return data_set, pre, pre.forward(data_set.values).T.copy()


def noise_floor(preprocessor, data_set, cfg):
    """Per-channel noise floor (standardised): the data set's known noise and ``noise.floor``
    in quadrature.

    The known noise is the catalog's ``noise`` where given, else, with ``noise.poisson_floor``,
    the Poisson noise of photon-count channels (``anscombe``: 1 in its units), else 0.
    """
    noise = getattr(data_set, "noise", None)
    known = preprocessor.noise_to_standardised(np.full(data_set.n_features, np.nan) if noise is None else noise)
    if cfg["noise"].get("poisson_floor", False):
        known = np.where(known > 0, known, preprocessor.poisson_noise())
    return np.sqrt(known ** 2 + cfg["noise"]["floor"] ** 2)


@dataclass
class Prepared:
    """A data set read and preprocessed for one process of a fit.

    Attributes
    ----------
    data_set : DataSet
        This process's rows in physical units.
    preprocessor : Preprocessor
    data : ndarray, shape (P_local, C)
        Standardised values, NaN where missing.
    rows : slice
        This process's rows among all ``n_rows``.
    n_rows : int
    fingerprint : str
        Identifies the data (``--resume`` refuses other data): ``path|...|preprocessing``.
    record : dict
        The ``data`` section of the run's configuration: ``kind``, ``path`` (and ``nside``,
        ``fwhm_arcmin``).
    """

    data_set: object
    preprocessor: object
    data: np.ndarray
    rows: slice
    n_rows: int
    fingerprint: str
    record: dict


class SkySource:
    """The maps of a catalog as the data set of a fit: rows are NESTED pixels, features channels."""

    kind, row_word, feature_word = "sky", "pixels", "channels"

    def __init__(self, catalog_path):
        self.argument = catalog_path
        self.catalog = read_catalog(catalog_path)
        self.path = self.catalog.path

    def resume_command(self, out):
        return f"galdecomp fit {self.argument} --out {out} --resume"

    def prepare(self, cfg, comm):
        """Read this process's pixels at the configured nside and standardise them."""
        from .parallel import row_block

        nside = working_nside(self.catalog, cfg["data"]["nside"])
        target = cfg["data"].get("fwhm_arcmin")
        rows = row_block(nside, comm)
        data_set, pre, data = load_preprocessed(self.catalog, nside, rows, comm if comm.size > 1 else None,
                                                fwhm_arcmin=target)
        beams = "" if target is None else f"fwhm {float(target)!r}|"  # runs without a target: as before
        fingerprint = f"{self.path}|{nside}|{beams}" + json.dumps(pre.to_dict(), sort_keys=True)
        return Prepared(data_set, pre, data, rows, 12 * nside * nside, fingerprint,
                        dict(kind="sky", path=self.path, nside=nside, fwhm_arcmin=target))


class TableSource:
    """A plain table (``.npy``, ``.npz``, ``.csv``; see :func:`galdecomp.dataset.read_table`) as
    the data set of a fit: each feature is standardised (``linear`` transform)."""

    kind, row_word, feature_word = "table", "rows", "features"

    def __init__(self, path):
        self.argument = path
        self.path = os.path.abspath(path)
        self.table = read_table(path)

    def resume_command(self, out):
        return f"galdecomp fit --data {self.argument} --out {out} --resume"

    def prepare(self, cfg, comm):
        """This process's block of rows, standardised per feature over all rows."""
        from .parallel import block_rows

        if cfg["data"].get("fwhm_arcmin") is not None:
            raise InputError(f"{self.argument}: data.fwhm_arcmin (--fwhm-arcmin) is for a catalog of maps, "
                             f"not a table")
        t = self.table
        pre = Preprocessor([ChannelTransform.fit(v[o], "linear", n) for v, o, n in zip(t.values, t.observed, t.names)],
                           t.names)
        rows = block_rows(t.n_samples, comm)
        local = DataSet(t.values[:, rows], t.observed[:, rows], t.names, t.units)
        digest = hashlib.sha256(np.ascontiguousarray(t.values).tobytes()).hexdigest()[:16]
        fingerprint = f"{self.path}|{t.n_samples}x{t.n_features}|{digest}|" + json.dumps(pre.to_dict(), sort_keys=True)
        return Prepared(local, pre, pre.forward(local.values).T.copy(), rows, t.n_samples, fingerprint,
                        dict(kind="table", path=self.path))


class FashionMNISTSource(TableSource):
    """The 60,000 Fashion-MNIST training images as a table (784 pixel features, one shared
    ``logit`` transform: :func:`galdecomp.datasets.fashion_mnist.image_preprocessor`)."""

    NAME = "fashion-mnist"

    def __init__(self, root=None):
        from .datasets.fashion_mnist import load_fashion_mnist

        images, _ = load_fashion_mnist("train", root)
        self.argument = self.path = self.NAME
        names = [f"px{i:03d}" for i in range(images.shape[1])]
        self.table = DataSet(images.T.copy(), np.ones(images.T.shape, bool), names, ["1"] * len(names))

    def prepare(self, cfg, comm):
        """This process's block of images, logit-transformed and standardised with one transform."""
        from .datasets.fashion_mnist import image_preprocessor
        from .parallel import block_rows

        t = self.table
        pre = image_preprocessor(t.values.T)
        rows = block_rows(t.n_samples, comm)
        local = DataSet(t.values[:, rows], t.observed[:, rows], t.names, t.units)
        fingerprint = f"{self.NAME}|{t.n_samples}x{t.n_features}|" + json.dumps(pre.to_dict()["px000"], sort_keys=True)
        return Prepared(local, pre, pre.forward(local.values).T.copy(), rows, t.n_samples, fingerprint,
                        dict(kind="table", path=self.NAME))


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
    rows x features (see :func:`galdecomp.dataset.read_table`), or ``"fashion-mnist"``: the
    60,000 training images with the image preset (:data:`galdecomp.datasets.fashion_mnist.PRESET`,
    under the configuration file's settings); rows are sharded over MPI ranks.

    Returns
    -------
    dict
        As :func:`fit_catalog`.
    """
    if path == FashionMNISTSource.NAME:
        from .datasets.fashion_mnist import PRESET
        from .inference.config import DEFAULTS, _merge

        config_file = _merge(_merge(DEFAULTS, PRESET), config_file or {}, "config")
        return fit_data(FashionMNISTSource(), out, overrides, config_file, resume, overwrite, comm)
    return fit_data(TableSource(path), out, overrides, config_file, resume, overwrite, comm)


#: Settings of ``galdecomp fit``'s options that live in the ``training`` section.
_TRAINING_OPTIONS = ("max_epochs", "threads")


def fit_overrides(settings):
    """The configuration overrides of ``galdecomp fit``'s options (and of :func:`galdecomp.fit`'s keywords).

    Parameters
    ----------
    settings : dict
        Top-level settings of the configuration (``latent_dim``, ``covariance``, ``beta``,
        ``seed``, ``nside``, ``decoder``, ...), and the options' shortcuts ``max_epochs`` and
        ``threads`` (``training``), ``posterior`` (a method name) and ``fwhm_arcmin``
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
    if isinstance(out.get("posterior"), str):
        out["posterior"] = {"method": out["posterior"]}
    if "fwhm_arcmin" in out:
        fwhm = out.pop("fwhm_arcmin")
        out["data"] = {**out["data"], "fwhm_arcmin": fwhm} if isinstance(out.get("data"), dict) else {"fwhm_arcmin": fwhm}
    return out


def fit_path(path, out, overrides=None, config_file=None, resume=False, overwrite=False, comm=None):
    """:func:`fit_table` for a table (``.npy``, ``.npz``, ``.csv``, ``"fashion-mnist"``), else
    :func:`fit_catalog`; parameters and result as theirs."""
    path = os.fspath(path)
    table = path == FashionMNISTSource.NAME or path.lower().endswith(TABLE_FORMATS)
    return (fit_table if table else fit_catalog)(path, out, overrides, config_file, resume, overwrite, comm)


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
    ckpt = os.path.join(run_dir, CHECKPOINT)
    # everything that can fail is checked, on every rank, before the run folder is touched
    if resume:
        _require_run(run_dir, (overrides or {}).get("posterior") or (config_file or {}).get("posterior"))
        held.enter_context(folder_lock(run_dir, comm))
        stored = _stored_config(run_dir)
        old = model_signature(resolve_config(stored, where=f"{run_dir}/config.yaml"))
        cfg = resolve_config(config_file if config_file is not None else stored, overrides)
        if not _sets_target(config_file) and not _sets_target(overrides):  # the run's target resolution
            cfg["data"]["fwhm_arcmin"] = (stored.get("data") or {}).get("fwhm_arcmin")
        diff = sorted(k for k, v in model_signature(cfg).items() if old[k] != v)
        if diff:
            raise InputError(f"{run_dir}: --resume with another configuration (differs in: {', '.join(diff)})")
        arrays, state = _read_checkpoint(ckpt)
    else:
        cfg = resolve_config(config_file, overrides)
        check_run_dir(run_dir, overwrite)
        if os.path.isdir(run_dir):
            held.enter_context(folder_lock(run_dir, comm))
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
        changed = version_differences(_stored_versions(run_dir))
        if changed:
            log.info(f"resuming under other versions than the run was written with: {', '.join(changed)}")
        comm.barrier()  # every rank has validated its input before rank 0 writes
        if comm.rank == 0:  # the posterior and duration settings may have changed
            _write_config(run_dir, cfg)
    else:
        comm.barrier()  # every rank has validated its input before rank 0 replaces anything
        if comm.rank == 0:
            make_run_dir(run_dir)
        comm.barrier()
        held.enter_context(folder_lock(run_dir, comm, created=True))  # already held if the folder existed
        if comm.rank == 0:
            _write_config(run_dir, cfg)
        state = TrainingState(model.init_params(cfg["seed"]), tcfg["learning_rate"], cfg["seed"])
    comm.barrier()
    extra = dict(preprocessing=json.dumps(ready.preprocessor.to_dict()), fingerprint=ready.fingerprint,
                 config=json.dumps(cfg), catalog=source.path)
    ranks = f" on {comm.size} MPI ranks" if comm.size > 1 else ""
    log.info(f"fitting {n_rows} {source.row_word} x {C} {source.feature_word}, {L} latent features, "
             f"{cfg['covariance']} covariance{ranks}")
    save = (lambda st: _save_checkpoint(ckpt, st, extra)) if comm.rank == 0 else None
    hint = f"continue with `{source.resume_command(out)}`"
    try:
        with _StopSignals() as stop:
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
            fit_transform(run_dir, mean, t_cov, cfg, rows.start, n_rows, comm, root=comm.size - 1)
        if k == 0 and prod is not None:
            written["paths"] = WRITERS[source.kind](run_dir, prod, ready.data_set, ready.preprocessor, model,
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

        TrainedModel(model, params, ready.preprocessor, cfg, ready.data_set.units, cfg["data"],
                     prod["order"]).save(run_dir)
    comm.barrier()  # every file of the run is written when the fit returns on any rank
    return dict(run_dir=run_dir, config=cfg, state=state, products=products)


def transform_fit_rows(cfg, offset, n_rows, n_local):
    """Local indices of this process's rows the latent transform is fitted on (sorted; empty for
    ``transform: method: none``): :func:`galdecomp.products.generate.transform_rows`."""
    from .products.generate import transform_rows

    if cfg["transform"]["method"] == "none":
        return np.zeros(0, dtype=np.int64)
    return transform_rows(n_rows, cfg["training"]["validation_fraction"], cfg["seed"], offset, n_local)


def fit_transform(run_dir, mean, cov, cfg, offset, n_rows, comm, root=0):
    """Fit the latent density of ``cfg["transform"]`` to the aggregate posterior on rank ``root``,
    which writes it (collective: the draws of all ranks are gathered there).

    Parameters
    ----------
    run_dir : str
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
    from .inference.trained import write_transform
    from .products.generate import aggregate_draws, fit_latent_density

    method = cfg["transform"]["method"]
    if method == "none":
        return None
    rows = transform_fit_rows(cfg, offset, n_rows, len(mean))
    if len(cov) != len(rows):  # covariances of all local rows
        cov = cov[rows]
    z, _ = aggregate_draws(mean[rows], cov, np.arange(len(rows)), cfg["seed"] + offset)
    groups = np.repeat(rows + offset, len(z) // max(len(rows), 1))
    z, groups = comm.gather_rows(z, root), comm.gather_rows(groups.astype(float), root)
    if comm.rank != root:
        if comm.rank == 0:
            log.info(f"latent transform ({method}) fitted on rank {root} meanwhile")
        return None
    log.info(f"latent transform ({method}) on {len(z)} draws of the aggregate posterior")
    density = fit_latent_density(z, groups, method, seed=cfg["seed"])
    return write_transform(run_dir, density)


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
    with folder_lock(result["run_dir"], comm):  # the report goes into the fit's run folder
        if comm.rank == 0:
            from .products.report import make_report

            log.info("report: the latent features against the truth maps")
            rep = make_report(result["run_dir"], os.path.join(sky_dir, "truth", "catalog.yaml"),
                              progress=log.info)
            report = os.path.join(rep["out"], "report.md")
    return dict(sky=os.path.join(sky_dir, "catalog.yaml"), fit=result, report=report)
