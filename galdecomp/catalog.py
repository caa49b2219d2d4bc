"""Map catalogs: the YAML input contract, validated, and read into a SkyDataSet.

A catalog lists HEALPix maps::

    nside: 64                     # optional working resolution (default: lowest among the maps)
    maps:
      - name: haslam408           # unique
        file: maps/haslam408.fits # relative to the catalog's folder, or absolute
        frequency_hz: 4.08e8      # > 0
        unit: K_RJ
        field: 0                  # optional FITS column
        transform: auto           # optional: auto | log | asinh | anscombe | linear
        asinh_scale: mad          # optional: the asinh scale, a number (in `unit`) or mad | std
        kind: intensity           # optional: intensity (averaged when degraded) | counts (summed);
                                  # default: the FITS header's KIND card, else counts for
                                  # unit counts/photons, else intensity
        noise: 0.5                # optional known per-pixel noise in `unit` (a floor for the learned noise)
        extra_noise: 0.2          # optional, for `galdecomp reconstruct`: noise of this map beyond the
                                  # model's (in `unit`, per pixel), e.g. a noisier survey of the channel
        gain_sigma: 0.05          # optional, for `galdecomp reconstruct`: relative uncertainty of the
                                  # map's calibration factor (prior N(1, gain_sigma^2), marginalised)
"""
import os
import warnings
from dataclasses import dataclass

import numpy as np
import yaml

from .dataset import SkyDataSet
from .errors import InputError

__all__ = ["MapEntry", "Catalog", "read_catalog", "load_catalog", "map_reader", "read_map", "working_nside",
           "valid_nside", "unseen_to_nan", "TRANSFORMS", "KINDS"]

TRANSFORMS = ("auto", "log", "asinh", "anscombe", "linear")
ASINH_RULES = ("mad", "std")
KINDS = ("intensity", "counts")
_KEYS = {"name", "file", "frequency_hz", "unit", "field", "transform", "kind", "noise",
         "asinh_scale", "description", "extra_noise", "gain_sigma"}


def valid_nside(n):
    """True for an integer that ``healpy.isnsideok`` accepts for NESTED maps (a power of two)."""
    import healpy as hp

    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and bool(hp.isnsideok(int(n), nest=True))


def unseen_to_nan(values):
    """Set missing pixels of float maps to NaN in place: ``healpy.UNSEEN`` (also as rounded
    through float32), NaN and inf; returns ``values``."""
    import healpy as hp

    values[~np.isfinite(values) | (np.abs(values / hp.UNSEEN - 1) < 1e-5)] = np.nan
    return values


@dataclass
class MapEntry:
    """One map of a catalog, validated (``path`` is absolute)."""

    name: str
    path: str
    frequency_hz: float
    unit: str
    field: int = 0
    transform: str = "auto"
    kind: str = None
    noise: float = float("nan")
    asinh_scale: object = "mad"
    extra_noise: float = 0.0
    gain_sigma: float = 0.0


@dataclass
class Catalog:
    """A validated catalog: its file, the requested working nside (or None) and its maps."""

    path: str
    nside: int
    maps: list

    @property
    def names(self):
        return [m.name for m in self.maps]


def _number(value, where):
    if isinstance(value, bool):
        raise InputError(f"{where}: must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: must be a number, got {value!r}") from None


def read_catalog(path):
    """Read and validate a catalog YAML file without reading its maps.

    Parameters
    ----------
    path : str
        The catalog file.

    Returns
    -------
    Catalog

    Raises
    ------
    InputError
        Missing file, YAML that is not a catalog, a bad or duplicate entry, a missing map file.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: catalog file not found")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise InputError(f"{path}: not valid YAML{line}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text YAML file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("maps"), list) or not doc["maps"]:
        raise InputError(f"{path}: not a catalog (expected a mapping with a non-empty 'maps' list)")
    nside = doc.get("nside")
    if nside is not None and not valid_nside(nside):
        raise InputError(f"{path}: nside: {nside!r} is not a power of two")
    folder = os.path.dirname(os.path.abspath(path))
    entries, seen = [], set()
    for i, raw in enumerate(doc["maps"]):
        where = f"{path}: maps[{i}]"
        if not isinstance(raw, dict):
            raise InputError(f"{where}: entry is not a mapping")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: missing 'name'")
        where = f"{path}: map '{name}'"
        if name in seen:
            raise InputError(f"{where}: duplicate name")
        seen.add(name)
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            warnings.warn(f"{where}: ignoring unknown keys {', '.join(unknown)}")
        if "frequency_hz" not in raw or raw["frequency_hz"] is None:
            raise InputError(f"{where}: missing frequency_hz")
        freq = _number(raw["frequency_hz"], f"{where}: frequency_hz")
        if not freq > 0 or not np.isfinite(freq):
            raise InputError(f"{where}: frequency_hz must be positive, got {raw['frequency_hz']!r}")
        if not isinstance(raw.get("unit"), str) or not raw["unit"].strip():
            raise InputError(f"{where}: missing 'unit'")
        file = raw.get("file")
        if not isinstance(file, str) or not file:
            raise InputError(f"{where}: missing 'file'")
        fpath = file if os.path.isabs(file) else os.path.join(folder, file)
        if not os.path.isfile(fpath):
            raise InputError(f"{where}: map file not found: {fpath}")
        fld = raw.get("field", 0)
        if isinstance(fld, bool) or not isinstance(fld, int) or fld < 0:
            raise InputError(f"{where}: field must be a non-negative integer, got {fld!r}")
        transform = raw.get("transform", "auto")
        if transform not in TRANSFORMS:
            raise InputError(f"{where}: transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
        kind = raw.get("kind")  # None: the FITS header's KIND, else intensity (see read_healpix)
        if kind is not None and kind not in KINDS:
            raise InputError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        noise = float("nan")
        if raw.get("noise") is not None:
            noise = _number(raw["noise"], f"{where}: noise")
            if not noise >= 0:
                raise InputError(f"{where}: noise must be >= 0, got {raw['noise']!r}")
        extra = {}
        for key in ("extra_noise", "gain_sigma"):
            extra[key] = 0.0 if raw.get(key) is None else _number(raw[key], f"{where}: {key}")
            if not (extra[key] >= 0 and np.isfinite(extra[key])):
                raise InputError(f"{where}: {key} must be a number >= 0, got {raw[key]!r}")
        scale = raw.get("asinh_scale", "mad")
        if scale not in ASINH_RULES:
            scale = _number(scale, f"{where}: asinh_scale")
            if not (scale > 0 and np.isfinite(scale)):
                raise InputError(f"{where}: asinh_scale must be positive or one of "
                                 f"{', '.join(ASINH_RULES)}, got {raw['asinh_scale']!r}")
        entries.append(MapEntry(name, os.path.abspath(fpath), freq, raw["unit"].strip(), fld,
                                transform, kind, noise, scale, **extra))
    return Catalog(os.path.abspath(path), nside, entries)


def select_maps(catalog, names, allow_missing=False, what="a channel of the run"):
    """A catalog's entries for ``names``, in that order (matched by map name).

    Parameters
    ----------
    catalog : Catalog
    names : list of str
    allow_missing : bool
        Give None for a name the catalog lacks instead of raising.
    what : str
        What a name is, for the error message.

    Returns
    -------
    list of MapEntry (or None)

    Raises
    ------
    InputError
        ``<catalog>: no map named '<name>' (and N more), <what>`` unless ``allow_missing``.
    """
    by_name = {e.name: e for e in catalog.maps}
    missing = [n for n in names if n not in by_name]
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{catalog.path}: no map named '{missing[0]}'{more}, {what}")
    return [by_name.get(n) for n in names]


def read_healpix(entry):
    """Read one catalog map as a full-sky RING array with NaN for missing pixels.

    Parameters
    ----------
    entry : MapEntry

    Returns
    -------
    values : ndarray
        The map in RING order, NaN where UNSEEN, NaN or infinite.
    nside : int
        Its resolution.
    kind : str
        ``entry.kind``, else the header's KIND card if it names a kind, else ``"counts"`` for
        unit counts/photons, else ``"intensity"``.
    """
    import healpy as hp
    from astropy.io import fits

    where = f"map '{entry.name}' ({entry.path})"
    try:
        with fits.open(entry.path) as hdul:
            if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
                raise InputError(f"{where}: not a HEALPix map (no binary table extension)")
            hdr = hdul[1].header
            pixtype = str(hdr.get("PIXTYPE", "HEALPIX")).strip().upper()
            if pixtype != "HEALPIX":
                raise InputError(f"{where}: not a HEALPix map (PIXTYPE = {pixtype})")
            ncol = len(hdul[1].columns)
            partial = (str(hdr.get("INDXSCHM", "")).strip().upper() == "EXPLICIT"
                       or str(hdr.get("OBJECT", "")).strip().upper() == "PARTIAL")
            n_fields = ncol - 1 if partial else ncol
            kind = entry.kind or str(hdr.get("KIND", "")).strip().lower()
            if kind not in KINDS:
                kind = "counts" if entry.unit.lower() in ("counts", "count", "photons") else "intensity"
            if entry.field >= n_fields:
                raise InputError(f"{where}: field {entry.field} does not exist "
                                 f"(the file has {n_fields} map column(s))")
    except InputError:
        raise
    except OSError as e:
        raise InputError(f"{where}: not a readable FITS file ({str(e).splitlines()[0]})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = hp.read_map(entry.path, field=entry.field, nest=False, partial=partial,
                                 dtype=np.float64)
    except Exception as e:  # healpy raises ValueError, TypeError, KeyError ... for non-HEALPix tables
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{where}: not a HEALPix map ({msg})") from None
    values = np.array(values, dtype=np.float64)
    unseen_to_nan(values)
    return values, hp.npix2nside(values.size), kind


def _regrade(values, nside_in, nside_out, kind):
    """Regrade a RING map with NaN for missing: intensities averaged, counts summed."""
    import healpy as hp

    if nside_in == nside_out:
        return values
    m = np.where(np.isnan(values), hp.UNSEEN, values)
    # power=-2 keeps the sum over the sky (counts); power=0 averages (intensities).
    out = hp.ud_grade(m, nside_out, pess=False, order_in="RING", order_out="RING",
                      power=-2 if kind == "counts" else None)
    out = np.asarray(out, dtype=np.float64)
    out[out == hp.UNSEEN] = np.nan
    return out


def read_map(entry, nside):
    """Read one catalog map at resolution ``nside`` (RING), NaN where missing.

    The map is regraded as `load_catalog` does (intensities averaged, counts summed).

    Parameters
    ----------
    entry : MapEntry
    nside : int

    Returns
    -------
    values : ndarray, shape (12 * nside**2,)
    kind : str
    native_nside : int
        The map's resolution before regrading.

    Raises
    ------
    InputError
        An unreadable map or one without a valid pixel (at its own or at the working nside).
    """
    v, n, kind = read_healpix(entry)
    if not np.isfinite(v).any():
        raise InputError(f"map '{entry.name}' ({entry.path}): no valid pixel")
    full = _regrade(v, n, nside, kind)
    if not np.isfinite(full).any():
        raise InputError(f"map '{entry.name}' ({entry.path}): no valid pixel at nside {nside}")
    return full, kind, n


def _native_nside(entry):
    """HEALPix nside of a catalog map from its header (no data read)."""
    from astropy.io import fits

    try:
        with fits.open(entry.path) as hdul:
            n = hdul[1].header.get("NSIDE") if len(hdul) > 1 else None
    except OSError:
        n = None
    return int(n) if n is not None and valid_nside(int(n)) else None


def working_nside(catalog, nside=None):
    """The resolution a catalog is loaded at: ``nside``, else the catalog's, else the lowest map's.

    Parameters
    ----------
    catalog : Catalog
    nside : int, optional

    Returns
    -------
    int
    """
    if nside is not None and not valid_nside(nside):
        raise InputError(f"nside {nside!r} is not a power of two")
    if nside or catalog.nside:
        return nside or catalog.nside
    headers = [_native_nside(e) for e in catalog.maps]
    if None in headers:  # a header without NSIDE: read the maps to find out
        headers = [read_healpix(e)[1] for e in catalog.maps]
    return min(headers)


def map_reader(index, comm):
    """The rank that reads map ``index`` of a catalog under :func:`load_catalog` (maps are read
    in rounds of ``comm.size``, map ``first + r`` by rank r)."""
    return index % comm.size


def load_catalog(catalog, nside=None, nest=False, pixels=None, on_channel=None, comm=None):
    """Read every map of a catalog into one data set at a common resolution.

    Maps are read one at a time, so at most one full map is held besides the result.

    Parameters
    ----------
    catalog : str or Catalog
        Catalog file or an already validated catalog.
    nside : int, optional
        Working resolution; default the catalog's ``nside``, else the lowest among the maps.
    nest : bool
        Pixel ordering of the returned values (NESTED if true).
    pixels : slice, optional
        Keep only these pixels (in the returned ordering), e.g. one MPI rank's block.
    on_channel : callable, optional
        ``on_channel(index, full_map, kind)`` called with each channel's full map (working nside
        and ordering, NaN where missing) and kind, e.g. to fit a transform on all pixels (on
        the reading rank only, with ``comm``).
    comm : SerialComm or MPIComm, optional
        With a communicator, the maps are read in rounds of ``comm.size``: in a round, rank r
        reads map ``first + r`` and sends every rank its ``pixels`` block (one Scatterv per map),
        so every map is read once, by one rank, the ranks read side by side, and no rank holds
        more than one full map. Without one, this process reads every map.

    Returns
    -------
    SkyDataSet
        Channels x pixels in physical units, NaN and ``observed == False`` where missing.

    Raises
    ------
    InputError
        Any problem with the catalog or a map (named in the message).
    """
    import healpy as hp

    cat = read_catalog(catalog) if isinstance(catalog, str) else catalog
    nside = working_nside(cat, nside)
    npix = hp.nside2npix(nside)
    pixels = slice(*(slice(0, npix) if pixels is None else pixels).indices(npix)[:2])
    values = np.empty((len(cat.maps), pixels.stop - pixels.start))
    native, kinds = [], []
    order = hp.nest2ring(nside, np.arange(npix)) if nest else None

    def read(i):
        e = cat.maps[i]
        try:
            full, kind, n = read_map(e, nside)
            if e.transform == "log" and np.nanmin(full) <= 0:
                raise InputError(f"map '{e.name}' ({e.path}): transform 'log' needs positive values, "
                                 f"the map has values <= 0 (use asinh or auto)")
            if nest:
                full = full[order]
            if on_channel is not None:
                on_channel(i, full, kind)
            return full, (kind, n)
        except InputError as err:
            return None, err

    size = 1 if comm is None else comm.size
    for first in range(0, len(cat.maps), size):  # a round: map first + r is read by rank r
        batch = range(first, min(first + size, len(cat.maps)))
        mine = first + (0 if comm is None else comm.rank)
        full, got = read(mine) if mine in batch else (None, None)
        for i in batch:
            root = map_reader(i, comm) if comm is not None else 0
            status = got if comm is None else comm.bcast(got if comm.rank == root else None, root)
            if isinstance(status, InputError):  # the reader's error stops every rank alike
                raise InputError(str(status))
            kinds.append(status[0])
            native.append(status[1])
            values[i] = full[pixels] if comm is None else comm.scatter_block(full, pixels, root)
    return SkyDataSet(values=values, observed=np.isfinite(values), names=cat.names,
                      units=[e.unit for e in cat.maps],
                      frequencies_hz=np.array([e.frequency_hz for e in cat.maps]),
                      kinds=kinds, nside=nside, nest=nest, coord="G",
                      noise=np.array([e.noise for e in cat.maps]),
                      sources=[e.path for e in cat.maps], native_nside=native,
                      transforms=[e.transform for e in cat.maps],
                      asinh_scales=[e.asinh_scale for e in cat.maps])
