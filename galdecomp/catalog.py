"""Map catalogs: the YAML input contract, validated, and read into a SkyDataSet.

A catalog lists HEALPix maps::

    nside: 64                     # optional working resolution (default: lowest among the maps)
    frame: galactic               # optional frame of the data set: galactic (G, default) | equatorial
                                  # (celestial, C) | ecliptic (E); maps whose COORDSYS differs are rotated
    rotate_frames: true           # optional: false refuses a map in another frame instead
    maps:
      - name: haslam408           # unique
        file: maps/haslam408.fits # relative to the catalog's folder, or absolute
        frequency_hz: 4.08e8      # > 0
        unit: K_RJ
        field: 0                  # optional FITS column
        transform: auto           # optional: auto | log | asinh | anscombe | linear
        asinh_scale: mad          # optional: the asinh scale, a number (in `unit`) or mad | std
        fwhm_arcmin: 56           # optional beam FWHM of the map; with a target resolution (data.fwhm_arcmin,
                                  # --fwhm-arcmin) the map is smoothed to it (see smooth_to)
        kind: intensity           # optional: intensity (averaged when degraded) | counts (summed);
                                  # default: the FITS header's KIND card, else counts for
                                  # unit counts/photons, else intensity
        noise: 0.5                # optional known per-pixel noise in `unit` (a floor for the learned noise)
        extra_noise: 0.2          # optional, for `galdecomp reconstruct`: noise of this map beyond the
                                  # model's (in `unit`, per pixel), e.g. a noisier survey of the channel
        gain_sigma: 0.05          # optional, for `galdecomp reconstruct`: relative uncertainty of the
                                  # map's calibration factor (prior N(1, gain_sigma^2), marginalised)
"""
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import yaml

from .datasets.table import SkyDataSet
from .errors import InputError
from .skymaps import (FRAME_NAMES, FRAMES, KINDS, MIN_COVERAGE, frame_letter, read_healpix, regrade, smooth_to,
                      to_frame, unseen_to_nan, valid_nside)

__all__ = ["MapEntry", "Catalog", "read_catalog", "load_catalog", "map_reader", "read_map", "working_nside",
           "valid_nside", "unseen_to_nan", "frame_letter", "to_frame", "smooth_to", "check_beams",
           "check_target", "TRANSFORMS", "KINDS", "FRAMES", "MIN_COVERAGE"]

TRANSFORMS = ("auto", "log", "asinh", "anscombe", "linear")
ASINH_RULES = ("mad", "std")
_KEYS = {"name", "file", "frequency_hz", "unit", "field", "transform", "kind", "noise",
         "asinh_scale", "description", "extra_noise", "gain_sigma", "fwhm_arcmin"}

log = logging.getLogger(__name__)


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
    fwhm_arcmin: float = None


@dataclass
class Catalog:
    """A validated catalog: its file, the requested working nside (or None), its maps, its frame
    (healpy's letter) and whether maps in another frame are rotated (else refused)."""

    path: str
    nside: int
    maps: list
    frame: str = "G"
    rotate_frames: bool = True

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


def _read_entry(raw, where, path, folder, seen):
    """One validated :class:`MapEntry` of the catalog ``path`` from its YAML mapping ``raw``
    (``where`` names it in errors; relative files are in ``folder``; ``seen``: the names so far,
    to which its name is added)."""
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
    fwhm = None
    if raw.get("fwhm_arcmin") is not None:
        fwhm = _number(raw["fwhm_arcmin"], f"{where}: fwhm_arcmin")
        if not (fwhm > 0 and np.isfinite(fwhm)):
            raise InputError(f"{where}: fwhm_arcmin must be a positive number, got {raw['fwhm_arcmin']!r}")
    scale = raw.get("asinh_scale", "mad")
    if scale not in ASINH_RULES:
        scale = _number(scale, f"{where}: asinh_scale")
        if not (scale > 0 and np.isfinite(scale)):
            raise InputError(f"{where}: asinh_scale must be positive or one of "
                             f"{', '.join(ASINH_RULES)}, got {raw['asinh_scale']!r}")
    return MapEntry(name, os.path.abspath(fpath), freq, raw["unit"].strip(), fld,
                    transform, kind, noise, scale, **extra, fwhm_arcmin=fwhm)


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
    frame = frame_letter("G" if doc.get("frame") is None else doc["frame"])
    if frame is None:
        raise InputError(f"{path}: frame: {doc['frame']!r} is not a frame (galactic, equatorial or ecliptic)")
    rotate = True if doc.get("rotate_frames") is None else doc["rotate_frames"]
    if not isinstance(rotate, bool):
        raise InputError(f"{path}: rotate_frames: must be true or false, got {rotate!r}")
    folder = os.path.dirname(os.path.abspath(path))
    entries, seen = [], set()
    for i, raw in enumerate(doc["maps"]):
        entries.append(_read_entry(raw, f"{path}: maps[{i}]", path, folder, seen))
    return Catalog(os.path.abspath(path), nside, entries, frame, rotate)


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


def check_target(fwhm_arcmin, where="fwhm_arcmin"):
    """``fwhm_arcmin`` as a float, or None; InputError unless it is None or a positive number."""
    if fwhm_arcmin is None:
        return None
    value = _number(fwhm_arcmin, where)
    if not (value > 0 and np.isfinite(value)):
        raise InputError(f"{where}: must be a positive number (arcmin), got {fwhm_arcmin!r}")
    return value


def check_beams(entries, target_arcmin):
    """Raise InputError for the first of the MapEntry ``entries`` whose declared beam is coarser
    than the target (no map can be sharpened); nothing without a target."""
    if target_arcmin is None:
        return
    for e in entries:
        if e.fwhm_arcmin is not None and e.fwhm_arcmin > target_arcmin:
            raise InputError(f"map '{e.name}' ({e.path}): its beam (fwhm_arcmin {e.fwhm_arcmin:g}) is coarser "
                             f"than the target resolution {target_arcmin:g} arcmin (a map cannot be sharpened: "
                             f"choose a target of at least {e.fwhm_arcmin:g})")


def read_map(entry, nside, frame=None, rotate=True, target_fwhm=None):
    """Read one catalog map at resolution ``nside`` (RING), NaN where missing.

    The map is rotated to ``frame`` if its COORDSYS names another (:func:`to_frame`, at its
    own nside), regraded as `load_catalog` does (intensities averaged, counts summed), and
    smoothed to ``target_fwhm`` if it declares ``fwhm_arcmin`` (:func:`smooth_to`, at ``nside``).

    Parameters
    ----------
    entry : MapEntry
    nside : int
    frame : str, optional
        The frame to return the map in (healpy's letter); None: the map's own, unrotated.
    rotate : bool
        Rotate a map in another frame (else InputError).
    target_fwhm : float, optional
        Target resolution, FWHM in arcmin (no smoothing without one).

    Returns
    -------
    values : ndarray, shape (12 * nside**2,)
    kind : str
    native_nside : int
        The map's resolution before regrading.
    file_frame : str or None
        The frame its COORDSYS names (None without the card: taken to be ``frame``).

    Raises
    ------
    InputError
        An unreadable map or one without a valid pixel (at its own or at the working nside), a
        map in another frame with ``rotate`` false, a beam coarser than the target.
    """
    v, n, kind, own = read_healpix(entry)
    where = f"map '{entry.name}' ({entry.path})"
    if not np.isfinite(v).any():
        raise InputError(f"{where}: no valid pixel")
    if frame is not None and own is not None and own != frame:
        if not rotate:
            raise InputError(f"{where}: in frame {own} ({FRAME_NAMES[own]}, its COORDSYS), not the catalog's "
                             f"frame {frame} ({FRAME_NAMES[frame]}), and rotate_frames is false")
        v = to_frame(v, own, frame)
    full = regrade(v, n, nside, kind)
    if target_fwhm is not None and entry.fwhm_arcmin is not None:
        check_beams([entry], target_fwhm)
        full = smooth_to(full, entry.fwhm_arcmin, target_fwhm)
    if not np.isfinite(full).any():
        raise InputError(f"{where}: no valid pixel at nside {nside}")
    return full, kind, n, own


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


def _read_for_set(cat, i, nside, target, order, on_channel):
    """Map ``i`` of ``cat`` read for :func:`load_catalog`: ``(full map, (kind, native nside,
    file frame))`` at ``nside`` (NESTED if ``order``, the RING index of each NESTED pixel, is
    given), or ``(None, the InputError)`` so that the reader's error can stop every rank alike."""
    e = cat.maps[i]
    try:
        full, kind, n, own = read_map(e, nside, cat.frame, cat.rotate_frames, target)
        if e.transform == "log" and np.nanmin(full) <= 0:
            raise InputError(f"map '{e.name}' ({e.path}): transform 'log' needs positive values, "
                             f"the map has values <= 0 (use asinh or auto)")
        if order is not None:
            full = full[order]
        if on_channel is not None:
            on_channel(i, full, kind)
        return full, (kind, n, own)
    except InputError as err:
        return None, err


def load_catalog(catalog, nside=None, nest=False, pixels=None, on_channel=None, comm=None, fwhm_arcmin=None):
    """Read every map of a catalog into one data set at a common resolution and frame.

    Maps are read one at a time, so at most one full map is held besides the result. A map
    whose COORDSYS names another frame than the catalog's is rotated to it (or refused, with
    ``rotate_frames: false``); a map without COORDSYS is taken to be in the catalog's frame.
    With a target resolution, each map that declares ``fwhm_arcmin`` is smoothed to it at the
    working nside (:func:`smooth_to`); the others are left as they are. Each of these cases is
    logged once (maps without COORDSYS only if some map has one or the catalog's frame is not
    Galactic); without a target, a warning is logged when the declared beams differ by more
    than the working pixel size.

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
    fwhm_arcmin : float, optional
        Target resolution, Gaussian FWHM in arcmin (default: none, maps as they are).

    Returns
    -------
    SkyDataSet
        Channels x pixels in physical units, NaN and ``observed == False`` where missing, in
        the catalog's frame (``coord``).

    Raises
    ------
    InputError
        Any problem with the catalog or a map (named in the message), a target that is not a
        positive number, a map whose declared beam is coarser than the target.
    """
    import healpy as hp

    cat = read_catalog(catalog) if isinstance(catalog, str) else catalog
    target = check_target(fwhm_arcmin, "target fwhm_arcmin")
    check_beams(cat.maps, target)
    nside = working_nside(cat, nside)
    npix = hp.nside2npix(nside)
    pixels = slice(*(slice(0, npix) if pixels is None else pixels).indices(npix)[:2])
    values = np.empty((len(cat.maps), pixels.stop - pixels.start))
    native, kinds, frames = [], [], []
    order = hp.nest2ring(nside, np.arange(npix)) if nest else None

    def read(i):
        return _read_for_set(cat, i, nside, target, order, on_channel)

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
            frames.append(status[2])
            values[i] = full[pixels] if comm is None else comm.scatter_block(full, pixels, root)
    _log_frames_and_beams(cat, frames, nside, target)
    return SkyDataSet(values=values, observed=np.isfinite(values), names=cat.names,
                      units=[e.unit for e in cat.maps],
                      frequencies_hz=np.array([e.frequency_hz for e in cat.maps]),
                      kinds=kinds, nside=nside, nest=nest, coord=cat.frame,
                      noise=np.array([e.noise for e in cat.maps]),
                      sources=[e.path for e in cat.maps], native_nside=native,
                      transforms=[e.transform for e in cat.maps],
                      asinh_scales=[e.asinh_scale for e in cat.maps], frames=frames,
                      fwhm_arcmin=[e.fwhm_arcmin for e in cat.maps], target_fwhm_arcmin=target)


def _names(names, at_most=4):
    """The first ``at_most`` of ``names``, comma-separated, and how many more."""
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def _log_frames_and_beams(cat, frames, nside, target):
    """Log what :func:`load_catalog` did about frames and beams (one line per case)."""
    import healpy as hp

    rotated = [f"{e.name} ({f})" for e, f in zip(cat.maps, frames) if f is not None and f != cat.frame]
    if rotated:
        log.info(f"{cat.path}: rotated to the catalog's frame {cat.frame}: {_names(rotated)}")
    assumed = [e.name for e, f in zip(cat.maps, frames) if f is None]
    if assumed and (len(assumed) < len(frames) or cat.frame != "G"):  # else: all Galactic, as always
        log.info(f"{cat.path}: no COORDSYS, taken to be in the catalog's frame {cat.frame}: {_names(assumed)}")
    declared = [e for e in cat.maps if e.fwhm_arcmin is not None]
    if target is not None:
        log.info(f"{cat.path}: {len(declared)} maps smoothed to fwhm {target:g} arcmin")
        bare = [e.name for e in cat.maps if e.fwhm_arcmin is None]
        if bare:
            log.info(f"{cat.path}: no fwhm_arcmin, left at their own resolution: {_names(bare)}")
    elif declared:
        fine = min(declared, key=lambda e: e.fwhm_arcmin)
        coarse = max(declared, key=lambda e: e.fwhm_arcmin)
        pixel = hp.nside2resol(nside, arcmin=True)
        if coarse.fwhm_arcmin - fine.fwhm_arcmin > pixel:
            log.warning(f"warning: {cat.path}: beams differ by more than a pixel ({pixel:.1f} arcmin at nside "
                        f"{nside}): finest '{fine.name}' ({fine.fwhm_arcmin:g} arcmin), coarsest '{coarse.name}' "
                        f"({coarse.fwhm_arcmin:g} arcmin); set a target resolution (--fwhm-arcmin, "
                        f"data.fwhm_arcmin) to bring them to a common one")
