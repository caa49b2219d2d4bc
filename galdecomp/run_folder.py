"""A run folder's own files: its configuration, its checkpoint, and the folder itself.

``RUN/config.yaml`` holds the resolved configuration (usable as ``--config``) and the versions
that wrote it; ``RUN/checkpoint.npz`` the whole training state with the run's metadata
(preprocessing, data fingerprint, configuration). Every write is atomic (:mod:`galdecomp.fileio`);
a file that cannot be read to resume is an InputError that says to start again with
``--overwrite``.
"""
import os
import shutil

import numpy as np
import yaml

from .errors import InputError
from .fileio import LOCK_FILE, atomic_path, check_output_dir, write_text
from .inference.config import with_former_defaults
from .inference.training import TrainingState
from .versions import versions

__all__ = ["CHECKPOINT", "CONFIG", "write_config", "require_run", "stored_config",
           "read_checkpoint", "check_run_dir", "make_run_dir", "save_checkpoint"]

#: the training state and metadata of a run
CHECKPOINT = "checkpoint.npz"
#: the resolved configuration of a run
CONFIG = "config.yaml"


def write_config(run_dir, cfg):
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


def require_run(run_dir, posterior=None):
    """Raise InputError unless ``run_dir`` holds a run (for --resume; ``posterior``: an MGVI request)."""
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)) or \
            not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        what = f"no trained model to run {posterior['method']} on" if posterior else "the folder holds no run"
        raise InputError(f"{run_dir}: --resume, but {what} (no {CHECKPOINT} and config.yaml)")


def stored_config(run_dir):
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


def read_checkpoint(path):
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


def save_checkpoint(path, state, extra):
    """Write the training state and run metadata to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **state.to_arrays(), **extra)
