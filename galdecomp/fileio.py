"""Atomic output: files and folders appear complete or not at all.

Every product galdecomp writes goes to a temporary name beside its final place and is
renamed when complete, so an interrupted job never leaves a half-written file, and a failed
write (no space left, read-only file system, quota) leaves the previous file as it was and is
reported as a :class:`~galdecomp.errors.WriteError` naming the file.

Every rename is durable: the new file (or every file of a new folder) is flushed to the disk
with ``fsync`` before the rename and its folder after it (:func:`fsync_replace`), so a node that
crashes just after a write keeps the file it was told was written (a checkpoint).

A folder that a job writes into is held with :func:`folder_lock` (one writer per run folder);
:func:`without_folder_locks` (``--no-lock``) skips the lock where the file system refuses locks.
"""
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import warnings

import numpy as np

from .errors import InputError, WriteError

__all__ = ["atomic_path", "atomic_output_dir", "check_output_dir", "write_text", "fsync_replace",
           "write_healpix_fits", "folder_lock", "without_folder_locks", "LOCK_FILE", "PROVENANCE"]

log = logging.getLogger(__name__)

PROVENANCE = "galdecomp"
#: The lock file of a folder held by a galdecomp process (see :func:`folder_lock`).
LOCK_FILE = ".galdecomp.lock"


def _write_failed(path, err):
    """The WriteError for an OSError ``err`` while writing ``path``."""
    return WriteError(f"{path}: cannot write ({err.strerror or err})")


#: errno values of ``fsync`` on a folder that only mean the file system does not sync folders
_NO_DIR_SYNC = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM}


def _fsync(path, folder=False):
    """``fsync`` the file or folder ``path``; a folder the file system cannot sync is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    except OSError as e:
        if folder and e.errno in _NO_DIR_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (folder and e.errno in _NO_DIR_SYNC):
            raise
    finally:
        os.close(fd)


def fsync_replace(tmp, path, old=None):
    """Rename ``tmp`` to ``path`` durably: fsync ``tmp``, rename, fsync the folder of ``path``.

    Parameters
    ----------
    tmp : str
        A complete file, or a folder: then every file and folder below it is synced.
    path : str
        The final name, on the same file system (an existing file is replaced atomically).
    old : str, optional
        For an existing folder ``path`` (a folder cannot replace one): its new name, given to it
        once ``tmp`` is synced and just before the rename (given back if the rename fails).

    Raises
    ------
    OSError
        From ``fsync`` of a file (EIO, ENOSPC: the data did not reach the disk) or the rename;
        a folder that the file system cannot sync (EINVAL on some network file systems) is not
        an error.
    """
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        for root, dirs, files in os.walk(tmp):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync(os.path.join(root, name))
            for name in dirs:
                _fsync(os.path.join(root, name), folder=True)
        _fsync(tmp, folder=True)
    else:
        _fsync(tmp)
    if old is None:
        os.replace(tmp, path)
    else:
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old, path)
            raise
    _fsync(os.path.dirname(os.path.abspath(path)), folder=True)


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
        Renamed with :func:`fsync_replace`.

    Raises
    ------
    WriteError
        An OSError while writing (in the block), syncing or renaming; the temporary file is
        removed.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=folder)
        os.close(fd)
        os.unlink(tmp)
        yield tmp
        fsync_replace(tmp, path)
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
        left as it was. Renamed with :func:`fsync_replace` (every file in it synced).

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
        old = tmp + ".old" if os.path.exists(path) else None
        fsync_replace(tmp, path, old)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except WriteError as e:
        raise WriteError(str(e).replace(tmp, path)) from None
    except OSError as e:
        raise _write_failed(str(e.filename or path).replace(tmp, path), e) from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


_HELD = {}  # real path of a locked folder -> [open lock file descriptor, nesting depth]
_UNLOCKED = {"on": False, "warned": set()}  # without_folder_locks: on, folders warned about
#: errno values of ``flock`` that mean another process holds the lock
_HELD_ERRNOS = {errno.EWOULDBLOCK, errno.EAGAIN}


@contextlib.contextmanager
def without_folder_locks():
    """While the block runs, :func:`folder_lock` takes no lock (``--no-lock``).

    For file systems that refuse locks (``flock`` fails with ENOLCK, EOPNOTSUPP, ENOSYS). Each
    folder that would have been locked is named once in a warning: nothing then stops a second
    galdecomp process from writing into it at the same time, which would corrupt the run.
    """
    saved = _UNLOCKED["on"]
    _UNLOCKED["on"] = True
    try:
        yield
    finally:
        _UNLOCKED["on"] = saved
        if not saved:
            _UNLOCKED["warned"].clear()


def _acquire(folder):
    """Take ``folder``'s lock for this process; return an error message instead if it is held
    or the file system refuses locks."""
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        return None
    path = os.path.join(folder, LOCK_FILE)
    existed = os.path.lexists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        try:  # an existing lock file on a read-only file system: the writes will tell
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return f"{folder}: cannot create the lock file {LOCK_FILE} ({e.strerror})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in _HELD_ERRNOS:  # ENOLCK, EOPNOTSUPP, ENOSYS: no locks on this file system
            os.close(fd)
            if not existed:  # leave the folder as it was
                with contextlib.suppress(OSError):
                    os.unlink(path)
            code = errno.errorcode.get(e.errno, str(e.errno))
            return (f"{folder}: the file system refuses locks ({code}: {e.strerror}): use --no-lock to run "
                    f"without the folder lock, at your own risk")
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
def folder_lock(folder, comm=None, created=False):
    """Hold the advisory lock of ``folder`` while the block runs: one writer per folder.

    ``fcntl.flock`` on ``folder/.galdecomp.lock``, which records the holder's pid and host. The
    operating system releases it when the process ends, however it ends, so a killed job leaves
    no stale lock. Re-entrant within a process; under MPI rank 0 holds it. Inside
    :func:`without_folder_locks` no lock is taken and a warning names the folder (once).

    Parameters
    ----------
    folder : str
        An existing folder.
    comm : SerialComm or MPIComm, optional
        Collective: every rank calls it and gets the same outcome.
    created : bool
        The caller has just created ``folder``: if the lock cannot be taken and the folder is
        still empty, it is removed (nothing is left behind by a refused job).

    Raises
    ------
    InputError
        Another process holds the lock (``FOLDER: in use by another galdecomp process (pid N on
        host H)``), the file system refuses locks (``FOLDER: the file system refuses locks
        (ENOLCK: ...): use --no-lock ...``), or the lock file cannot be created.
    """
    rank = 0 if comm is None else comm.rank
    if _UNLOCKED["on"]:
        key = os.path.realpath(folder)
        if key not in _UNLOCKED["warned"]:
            _UNLOCKED["warned"].add(key)
            log.warning(f"{folder}: not locked (--no-lock): a second galdecomp process writing into it "
                        f"at the same time would corrupt it")
        yield
        return
    problem = _acquire(folder) if rank == 0 else None
    if problem and created and rank == 0:
        with contextlib.suppress(OSError):  # only if empty: another process's lock file stays
            os.rmdir(folder)
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
