"""Atomic output: files and folders appear complete or not at all.

Every product galdecomp writes goes to a temporary name beside its final place and is
renamed when complete, so an interrupted job never leaves a half-written file, and a failed
write (no space left, read-only file system, quota) leaves the previous file as it was and is
reported as a :class:`~galdecomp.errors.WriteError` naming the file.

A folder that a job writes into is held with :func:`folder_lock` (one writer per run folder).
"""
import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
import warnings

import numpy as np

from .errors import InputError, WriteError

__all__ = ["atomic_path", "atomic_output_dir", "check_output_dir", "write_text",
           "write_healpix_fits", "folder_lock", "LOCK_FILE", "PROVENANCE"]

PROVENANCE = "galdecomp"
#: The lock file of a folder held by a galdecomp process (see :func:`folder_lock`).
LOCK_FILE = ".galdecomp.lock"


def _write_failed(path, err):
    """The WriteError for an OSError ``err`` while writing ``path``."""
    return WriteError(f"{path}: cannot write ({err.strerror or err})")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name beside ``path``; rename it to ``path`` on success.

    Parameters
    ----------
    path : str
        Final file name. Its folder must exist.

    Yields
    ------
    str
        Temporary name in the same folder (same file system, so the rename is atomic).
        It keeps the final extension, so writers that look at it (``.fits``) behave.

    Raises
    ------
    WriteError
        An OSError while writing (in the block) or renaming; the temporary file is removed.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=folder)
        os.close(fd)
        os.unlink(tmp)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def check_output_dir(path, overwrite, what="output", hint="use --overwrite to replace it"):
    """Raise InputError unless ``path`` can be (re)created as an output folder.

    Parameters
    ----------
    path : str
        Output folder.
    overwrite : bool
        Whether an existing folder may be replaced.
    what : str
        What the folder is, for the messages (``"output"``, ``"run"``).
    hint : str
        What to do when the folder exists and ``overwrite`` is false.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path}: {what} folder exists ({hint})")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: {what} path exists and is not a folder")
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise InputError(f"{parent}: not a folder, cannot hold the {what} {path}")
    if not os.path.isdir(parent):
        raise InputError(f"{parent}: parent folder of the {what} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: folder is not writable")


@contextlib.contextmanager
def atomic_output_dir(path, overwrite=False):
    """Build an output folder under a temporary name and move it into place on success.

    Parameters
    ----------
    path : str
        Final folder.
    overwrite : bool
        Replace an existing folder (only once the new one is complete).

    Yields
    ------
    str
        The temporary folder to fill. On an exception it is removed and ``path`` is
        left as it was.

    Raises
    ------
    WriteError
        An OSError while filling or moving the folder, naming the file under its final path.
    """
    check_output_dir(path, overwrite)
    path = os.path.abspath(path)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    except OSError as e:
        raise InputError(f"{os.path.dirname(path)}: folder is not writable ({e.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.exists(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except WriteError as e:
        raise WriteError(str(e).replace(tmp, path)) from None
    except OSError as e:
        raise _write_failed(str(e.filename or path).replace(tmp, path), e) from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


_HELD = {}  # real path of a locked folder -> [open lock file descriptor, nesting depth]


def _acquire(folder):
    """Take ``folder``'s lock for this process; return an error message instead if it is held."""
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        return None
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        try:  # an existing lock file on a read-only file system: the writes will tell
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return f"{folder}: cannot create the lock file {LOCK_FILE} ({e.strerror})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "pid ? on host ?"
        os.close(fd)
        return f"{folder}: in use by another galdecomp process ({holder})"
    with contextlib.suppress(OSError):  # who holds it is information only (the disk may be full)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    _HELD[key] = [fd, 1]
    return None


def _release(folder):
    key = os.path.realpath(folder)
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
        os.close(_HELD.pop(key)[0])  # closing the descriptor releases the lock


@contextlib.contextmanager
def folder_lock(folder, comm=None):
    """Hold the advisory lock of ``folder`` while the block runs: one writer per folder.

    ``fcntl.flock`` on ``folder/.galdecomp.lock``, which records the holder's pid and host. The
    operating system releases it when the process ends, however it ends, so a killed job leaves
    no stale lock. Re-entrant within a process; under MPI rank 0 holds it.

    Parameters
    ----------
    folder : str
        An existing folder.
    comm : SerialComm or MPIComm, optional
        Collective: every rank calls it and gets the same outcome.

    Raises
    ------
    InputError
        Another process holds the lock (``FOLDER: in use by another galdecomp process (pid N on
        host H)``), or the lock file cannot be created.
    """
    rank = 0 if comm is None else comm.rank
    problem = _acquire(folder) if rank == 0 else None
    if comm is not None:
        problem = comm.bcast(problem)
    if problem:
        raise InputError(problem)
    try:
        yield
    finally:
        if rank == 0:
            _release(folder)


def write_healpix_fits(path, maps, names, units, nest=False, coord="G", header=None):
    """Write HEALPix maps as a FITS binary table with healpy, atomically.

    Parameters
    ----------
    path : str
        Output file.
    maps : array_like, shape (n_maps, n_pix) or (n_pix,)
        Maps to write; missing pixels as ``healpy.UNSEEN``.
    names, units : sequence of str or str
        Column names and units (TUNITn), one per map.
    nest : bool
        Ordering of ``maps`` (NESTED if true, RING otherwise).
    coord : str
        Coordinate system: ``"G"`` (Galactic), ``"C"`` or ``"E"``.
    header : list of (str, object) or (str, object, str), optional
        Extra header cards (e.g. provenance, frequency).
    """
    import healpy as hp

    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 1:
        maps = maps[None]
    names = [names] if isinstance(names, str) else list(names)
    units = [units] * len(maps) if isinstance(units, str) else list(units)
    cards = [("CREATOR", PROVENANCE, "written by galdecomp")] + list(header or [])
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp.write_map(tmp, list(maps) if len(maps) > 1 else maps[0], nest=nest, coord=coord,
                     column_names=names, column_units=units if len(maps) > 1 else units[0],
                     extra_header=cards, dtype=np.float64, overwrite=True)
