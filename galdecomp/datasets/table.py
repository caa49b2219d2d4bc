"""Data sets: a table of samples x features with missing entries.

The model sees rows (samples) of features; a sky data set is one kind of data set whose
samples are HEALPix pixels and whose features are frequency channels, a plain table
(:func:`read_table`: ``.npy``, ``.npz`` or ``.csv``) another.
"""
import csv
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

__all__ = ["DataSet", "SkyDataSet", "read_table", "TABLE_FORMATS"]

#: File name endings of the tables :func:`read_table` reads.
TABLE_FORMATS = (".npy", ".npz", ".csv")


@dataclass
class DataSet:
    """Features x samples values with a per-feature mask of observed entries.

    Attributes
    ----------
    values : ndarray, shape (n_features, n_samples)
        Values in physical units; NaN where not observed.
    observed : ndarray of bool, shape (n_features, n_samples)
        True where a value was measured.
    names : list of str
        Feature (channel) names.
    units : list of str
        Physical unit of each feature.
    """

    values: np.ndarray
    observed: np.ndarray
    names: list
    units: list

    @property
    def n_features(self):
        return self.values.shape[0]

    @property
    def n_samples(self):
        return self.values.shape[1]

    @property
    def missing(self):
        """Boolean mask, True where a value is missing."""
        return ~self.observed


@dataclass
class SkyDataSet(DataSet):
    """Channels x HEALPix pixels at one resolution.

    Attributes
    ----------
    frequencies_hz : ndarray, shape (n_channels,)
    kinds : list of str
        ``"intensity"`` (averaged when regraded) or ``"counts"`` (summed).
    nside : int
    nest : bool
        Pixel ordering of ``values`` (NESTED if true, else RING).
    coord : str
        Coordinate frame of the maps, healpy's letter (``"G"`` Galactic, ``"C"`` equatorial,
        ``"E"`` ecliptic).
    noise : ndarray, shape (n_channels,)
        Known per-pixel noise level in each channel's unit, NaN where unknown.
    sources : list of str
        The file each channel was read from.
    native_nside : list of int
        The resolution of each map before regrading.
    transforms : list of str
        The preprocessing transform the catalog asks for per channel (``"auto"`` by default).
    asinh_scales : list
        The ``asinh`` scale per channel: a number in the channel's unit, or the rule ``"mad"``
        or ``"std"`` (see :mod:`galdecomp.preprocessing`).
    frames : list
        The frame each map's COORDSYS names (None without one: taken to be ``coord``).
    fwhm_arcmin : list
        The beam FWHM each map declares (arcmin; None where not declared).
    target_fwhm_arcmin : float or None
        The resolution the maps with a declared beam were smoothed to (None: not smoothed).
    """

    frequencies_hz: np.ndarray = None
    kinds: list = field(default_factory=list)
    nside: int = 0
    nest: bool = False
    coord: str = "G"
    noise: np.ndarray = None
    sources: list = field(default_factory=list)
    native_nside: list = field(default_factory=list)
    transforms: list = field(default_factory=list)
    asinh_scales: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    fwhm_arcmin: list = field(default_factory=list)
    target_fwhm_arcmin: float = None


def _column_names(n):
    """Default feature names of a table without names: column_01, column_02, ..."""
    return [f"column_{i + 1:02d}" for i in range(n)]


def _read_csv(path):
    """Header names and the values of a CSV table; empty cells and ``nan`` are missing."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    lines = [row for row in lines if any(c.strip() for c in row)]
    if not lines:
        raise InputError(f"{path}: empty table (expected a header row of feature names)")
    names, body = [c.strip() for c in lines[0]], lines[1:]
    bad = next((i for i, row in enumerate(body) if len(row) != len(names)), None)
    if bad is not None:
        raise InputError(f"{path}: line {bad + 2}: {len(body[bad])} values, the header has {len(names)}")
    cells = np.char.strip(np.array(body, dtype=str).reshape(len(body), len(names)))
    cells[cells == ""] = "nan"
    try:
        values = cells.astype(float)
    except ValueError:
        for i, row in enumerate(cells):  # the error path only: find the first bad cell
            for c in row:
                try:
                    float(c)
                except ValueError:
                    raise InputError(f"{path}: line {i + 2}: non-numeric value {str(c)!r}") from None
        raise
    return names, values


def _read_array(path):
    """Feature names (or None) and the array of a ``.npy`` or ``.npz`` table."""
    names = None
    try:
        with open(path, "rb") as fh:
            obj = np.load(fh, allow_pickle=False)
            if isinstance(obj, np.lib.npyio.NpzFile):
                with obj:
                    if "data" not in obj.files:
                        raise InputError(f"{path}: no array 'data' in the .npz file (it holds: "
                                         f"{', '.join(obj.files) or 'nothing'})")
                    values = obj["data"]
                    names = obj["names"] if "names" in obj.files else None
            else:
                values = obj
    except InputError:
        raise
    except Exception as e:  # whatever a damaged or pickled file raises
        raise InputError(f"{path}: not a readable numpy file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if names is not None:
        names = [str(n) for n in np.atleast_1d(names)]
    return names, values


def read_table(path):
    """Read a plain table of rows x features (NaN, inf or an empty CSV cell = missing).

    Parameters
    ----------
    path : str
        ``.npy`` (a 2-D array), ``.npz`` (key ``data``, optional ``names``) or ``.csv`` (a
        header row of feature names, then one row per sample).

    Returns
    -------
    DataSet
        Values features x samples; units ``"1"``; names from the file, else ``column_01``...

    Raises
    ------
    InputError
        ``<path>: <problem>``: a missing or unreadable file, another format, an array that is
        not 2-D or not numeric, a non-numeric CSV value, fewer than 2 rows, duplicate names,
        a feature without any value.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise InputError(f"{path}: unknown table format (expected {', '.join(TABLE_FORMATS)})")
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        names, values = _read_csv(path) if ext == ".csv" else _read_array(path)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    values = np.asarray(values)
    if values.ndim != 2:
        raise InputError(f"{path}: expected a 2-D array (rows x features), got shape {values.shape}")
    if values.dtype.kind not in "biuf":
        raise InputError(f"{path}: expected numbers, got an array of {values.dtype}")
    values = values.astype(np.float64)
    names = _column_names(values.shape[1]) if names is None else names
    if len(names) != values.shape[1]:
        raise InputError(f"{path}: {len(names)} feature names for {values.shape[1]} columns")
    if len(set(names)) != len(names) or not all(names):
        raise InputError(f"{path}: feature names must be unique and not empty")
    if values.shape[0] < 2 or values.shape[1] < 1:
        raise InputError(f"{path}: expected at least 2 rows and 1 feature, got shape {values.shape}")
    observed = np.isfinite(values)
    values[~observed] = np.nan
    empty = np.flatnonzero(~observed.any(axis=0))
    if empty.size:
        raise InputError(f"{path}: feature '{names[empty[0]]}' has no value")
    return DataSet(values.T.copy(), observed.T.copy(), names, ["1"] * len(names))
