"""A run folder: the one place that names, reads and writes the files of a run.

``RunFolder(path)`` names every file of the run in ``path`` (``run.path(key)``, and
``run.array(stem, ext)``, ``run.plot(key)`` for the per-row products and figures) and reads
and writes the run's own state: its configuration, checkpoint, trained model and latent
transform. The products compute what goes into their files and ask the run folder where it
goes. Every write is atomic (:mod:`galdecomp.fileio`); a file that cannot be read to resume
is an InputError that says to start again with ``--overwrite``.

======================  ===================================  ==========================================
key                     file                                 written by, read by
======================  ===================================  ==========================================
``config``              ``config.yaml``                      :meth:`write_config`; :meth:`stored_config`,
                                                             :meth:`read_config_file` (report)
``checkpoint``          ``checkpoint.npz``                   :meth:`save_checkpoint`; :meth:`read_checkpoint`
``lock``                ``.galdecomp.lock``                  :func:`galdecomp.fileio.folder_lock` (:meth:`lock`)
``model``               ``model.npz``                        :meth:`write_model`; :meth:`trained_model`
``transform``           ``latent_transform.npz``             :meth:`write_transform`; :meth:`read_transform`
``noise``               ``noise.csv``                        the fit's products; :meth:`trained_model` (runs before model.npz)
``significance``        ``significance.csv``                 the fit's products; the report, :meth:`trained_model`
``rotation``            ``rotation.csv``                     the fit's products (a latent rotation only); the report
``history``             ``history.csv``                      the fit's products
``plots``               ``plots/``                           the fit's figures, :meth:`plot`: :data:`PLOTS`
``report``              ``report/``                          ``galdecomp report`` (default folder): :data:`REPORT_FILES`
(per-row products)      ``STEM.fits`` (a sky), ``STEM.csv``  the fit's products, :meth:`array`: :data:`ARRAYS`;
                        or ``STEM.npy`` (a table)            ``latent_mean.fits`` read by the report
(amortisation gap)      ``amortisation_gap.csv`` (sky),      the fit's products with MGVI/geoVI,
                        ``amortisation_gap_summary.csv``     :meth:`gap_summary`
======================  ===================================  ==========================================

``config.yaml`` holds the resolved configuration (usable as ``--config``) and the versions that
wrote it; ``checkpoint.npz`` the whole training state with the run's metadata (preprocessing,
data fingerprint, configuration); ``model.npz`` the trained model in the format of
:meth:`galdecomp.inference.trained.TrainedModel.save`. The folders the other commands write
(``--out`` of ``anomaly``, ``reconstruct``, ``posterior-check``, ``sample``) are the user's, not
the run's.
"""
import os
import shutil

import numpy as np
import yaml

from ..errors import InputError
from ..fileio import LOCK_FILE, atomic_path, check_output_dir, folder_lock, write_text
from ..inference.config import with_former_defaults
from ..inference.training import TrainingState
from ..versions import versions

__all__ = ["RunFolder", "unusable"]


def unusable(path, what, why):
    """The InputError for a run file that cannot be used to resume."""
    return InputError(f"{path}: not a galdecomp {what} or unreadable ({why}); start again with --overwrite")


class RunFolder:
    """The files of the run in ``path`` (a folder; it need not exist yet).

    Parameters
    ----------
    path : str or path-like
        The run folder, kept as given (:attr:`dir`).
    """

    #: key -> name inside the run folder (the table of the module docstring)
    FILES = {"config": "config.yaml", "checkpoint": "checkpoint.npz", "lock": LOCK_FILE, "model": "model.npz",
             "transform": "latent_transform.npz", "noise": "noise.csv", "significance": "significance.csv",
             "rotation": "rotation.csv", "history": "history.csv", "plots": "plots", "report": "report"}
    #: stems of the per-row products (``.fits`` for a sky; ``.csv``, or ``.npy`` when wide, for a table)
    ARRAYS = ("latent_mean", "latent_std", "latent_cov", "reconstruction", "residual", "encoder_latent_mean",
              "encoder_latent_std", "latent_samples", "amortisation_gap")
    #: key -> figure inside ``plots/``
    PLOTS = {"training": "training.png", "residuals": "residuals.png", "latent_mean": "latent_mean.png",
             "latent_std": "latent_std.png", "amortisation_gap": "amortisation_gap.png",
             "reconstructions": "reconstructions.png"}
    #: the amortisation-gap summary per feature (MGVI/geoVI), by kind of data set
    GAP_SUMMARY = {"sky": "amortisation_gap.csv", "table": "amortisation_gap_summary.csv"}
    #: the files of a report folder (``report/`` or ``galdecomp report --out``), besides its ``plots/``
    REPORT_FILES = {"correlations": "correlations.csv", "summary": "summary.csv", "report": "report.md"}

    def __init__(self, path):
        self.dir = os.fspath(path)

    def __repr__(self):
        return f"RunFolder({self.dir!r})"

    def __fspath__(self):
        return self.dir

    # -- names --------------------------------------------------------------------------------
    def path(self, key):
        """The path of the file ``key`` of :data:`FILES`."""
        return os.path.join(self.dir, self.FILES[key])

    def has(self, key):
        """Whether the file ``key`` of :data:`FILES` exists."""
        return os.path.isfile(self.path(key))

    @classmethod
    def array_name(cls, stem, ext):
        """The name of a per-row product: ``stem`` of :data:`ARRAYS` and ``ext`` (``.fits``, ``.csv``, ``.npy``)."""
        if stem not in cls.ARRAYS:
            raise KeyError(stem)
        return stem + ext

    def array(self, stem, ext):
        """The path of the per-row product :meth:`array_name`."""
        return os.path.join(self.dir, self.array_name(stem, ext))

    @classmethod
    def plot_name(cls, key):
        """``plots/NAME.png`` of the figure ``key`` of :data:`PLOTS`."""
        return f"{cls.FILES['plots']}/{cls.PLOTS[key]}"

    def plot(self, key):
        """The path of the figure ``key`` of :data:`PLOTS`."""
        return os.path.join(self.path("plots"), self.PLOTS[key])

    def gap_summary(self, kind):
        """The path of the amortisation-gap summary of a run on data of ``kind`` (``sky``, ``table``)."""
        return os.path.join(self.dir, self.GAP_SUMMARY[kind])

    @classmethod
    def report_file(cls, folder, key):
        """The path of the file ``key`` of :data:`REPORT_FILES` in the report ``folder``."""
        return os.path.join(folder, cls.REPORT_FILES[key])

    # -- the folder ---------------------------------------------------------------------------
    def check(self, overwrite):
        """Raise InputError unless the folder can be created (or replaced, with ``overwrite``)."""
        check_output_dir(self.dir, overwrite, "run", "use --resume to continue it or --overwrite to replace it")

    def create(self):
        """Create an empty run folder, or empty an existing one but for its lock file (checked by
        :meth:`check`)."""
        try:
            if not os.path.isdir(self.dir):
                os.makedirs(self.dir)
            for name in set(os.listdir(self.dir)) - {LOCK_FILE}:
                path = os.path.join(self.dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        except OSError as e:
            raise InputError(f"{self.dir}: cannot create the run folder ({e.strerror})") from None

    def lock(self, comm=None, created=False):
        """The folder's lock (:func:`galdecomp.fileio.folder_lock`), a context manager."""
        return folder_lock(self.dir, comm, created=created)

    def require(self, posterior=None):
        """Raise InputError unless the folder holds a run (for --resume; ``posterior``: an MGVI request)."""
        if not self.has("checkpoint") or not self.has("config"):
            what = f"no trained model to run {posterior['method']} on" if posterior else "the folder holds no run"
            raise InputError(f"{self.dir}: --resume, but {what} "
                             f"(no {self.FILES['checkpoint']} and {self.FILES['config']})")

    # -- configuration ------------------------------------------------------------------------
    def write_config(self, cfg):
        """Write config.yaml: the resolved configuration, usable as ``--config``; a sky run's also
        names its catalog as ``catalog`` (read by ``galdecomp report``); last, the ``versions`` of
        the package and its main dependencies that wrote it (a record, ignored when read)."""
        head = {"catalog": cfg["data"]["path"]} if cfg["data"]["kind"] == "sky" else {}
        write_text(self.path("config"),
                   "# galdecomp fit configuration (resolved); re-run with --config this file\n"
                   + yaml.safe_dump({**head, **cfg}, sort_keys=False)
                   + "# the versions that wrote this file (a record: --config and --resume ignore it)\n"
                   + yaml.safe_dump({"versions": versions()}, sort_keys=False))

    def stored_config(self):
        """The configuration of the run, as written to its config.yaml (for --resume)."""
        path = self.path("config")
        try:
            with open(path) as f:
                stored = yaml.safe_load(f)
        except yaml.YAMLError:
            raise unusable(path, "run configuration", "not valid YAML") from None
        except (OSError, UnicodeDecodeError) as e:
            raise unusable(path, "run configuration", getattr(e, "strerror", None) or str(e)) from None
        if not isinstance(stored, dict):
            raise unusable(path, "run configuration", "not a mapping of settings")
        stored.pop("catalog", None)
        return with_former_defaults(stored)

    def read_config_file(self):
        """config.yaml as written, with its ``catalog`` (for the report: the run's input catalog).

        Raises
        ------
        InputError
            No config.yaml, not YAML, or no ``catalog`` entry.
        """
        path = self.path("config")
        try:
            with open(path) as f:
                cfg = yaml.safe_load(f)
        except FileNotFoundError:
            raise InputError(f"{path}: not found (the run's configuration names its input catalog)") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            raise InputError(f"{path}: not valid YAML") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("catalog"), str):
            raise InputError(f"{path}: no 'catalog' entry (the path of the run's input catalog)")
        return cfg

    # -- checkpoint ---------------------------------------------------------------------------
    def read_checkpoint(self):
        """The arrays of checkpoint.npz and its TrainingState; InputError if it is not one."""
        path = self.path("checkpoint")
        try:
            with open(path, "rb") as fh, np.load(fh) as f:  # np.load leaks its own handle on a bad zip
                arrays = dict(f)
            state = TrainingState.from_arrays(arrays)
            str(arrays["fingerprint"])
        except Exception as e:  # whatever a damaged file raises: zipfile, pickle, json, a missing key
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            raise unusable(path, "checkpoint", why) from None
        return arrays, state

    def save_checkpoint(self, state, extra):
        """Write the training state and run metadata ``extra`` (dict of arrays) to checkpoint.npz atomically."""
        with atomic_path(self.path("checkpoint")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **state.to_arrays(), **extra)

    # -- the trained model and its latent density ---------------------------------------------
    def write_model(self, trained):
        """Write a TrainedModel to model.npz (atomically); returns its path."""
        return trained.save(self.path("model"))

    def trained_model(self):
        """The trained model of the run (:func:`galdecomp.load`) with its latent transform.

        Runs written before model.npz existed are read from checkpoint.npz, noise.csv and
        significance.csv (:func:`galdecomp.run.legacy.trained_from_checkpoint`).

        Raises
        ------
        InputError
            The folder holds no finished run, or its files are unreadable.
        """
        from ..inference.trained import TrainedModel

        if self.has("model"):
            out = TrainedModel.read(self.path("model"))
        else:
            from .legacy import trained_from_checkpoint

            out = trained_from_checkpoint(self)
        out.transform = self.read_transform()
        return out

    def read_transform(self):
        """The latent density of latent_transform.npz, or None without one."""
        from ..model.latent_transform import load_density

        path = self.path("transform")
        if not os.path.isfile(path):
            return None
        try:
            with open(path, "rb") as fh, np.load(fh) as f:
                return load_density(dict(f))
        except Exception as e:
            raise InputError(f"{path}: not a galdecomp latent transform or unreadable "
                             f"({type(e).__name__}: {e})".splitlines()[0]) from None

    def write_transform(self, density):
        """Write a latent density (``to_arrays``) to latent_transform.npz atomically; returns its path."""
        path = self.path("transform")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **density.to_arrays())
        return path
