"""Atomic output: files and folders appear complete or not at all.

Every product galdecomp writes goes to a temporary name beside its final place and is
renamed when complete, so an interrupted job never leaves a half-written file.
"""
import contextlib
import os
import shutil
import tempfile
import warnings

import numpy as np

from .errors import InputError

__all__ = ["atomic_path", "atomic_output_dir", "check_output_dir", "write_text",
           "write_healpix_fits", "PROVENANCE"]

PROVENANCE = "galdecomp"


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
    """
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def check_output_dir(path, overwrite):
    """Raise InputError unless ``path`` can be (re)created as an output folder.

    Parameters
    ----------
    path : str
        Output folder.
    overwrite : bool
        Whether an existing folder may be replaced.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path}: output folder exists (use --overwrite to replace it)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: output path exists and is not a folder")
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise InputError(f"{parent}: not a folder, cannot hold the output {path}")
    if not os.path.isdir(parent):
        raise InputError(f"{parent}: parent folder of the output does not exist")
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
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


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
