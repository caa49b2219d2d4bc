"""One HEALPix map at a time: reading a FITS map, its frame, rotation, smoothing and regrading.

Every map here is a full-sky RING array, float64, NaN where missing (``healpy.UNSEEN``, NaN and
inf on reading). Rotation and smoothing handle gaps by normalised convolution: the map with zeros
in its gaps and its 0/1 coverage are transformed alike and divided, and a pixel whose transformed
coverage is below :data:`MIN_COVERAGE` is missing. The catalog (:mod:`galdecomp.catalog`) decides
which of these a map of a data set needs.
"""
import warnings

import numpy as np

from .errors import InputError

__all__ = ["FRAMES", "FRAME_NAMES", "KINDS", "MIN_COVERAGE", "frame_letter", "valid_nside", "unseen_to_nan",
           "read_healpix", "to_frame", "smooth_to", "regrade"]

KINDS = ("intensity", "counts")
#: Coordinate frames: healpy's letter -> the names a catalog's ``frame`` or a FITS COORDSYS may use.
FRAMES = {"G": ("G", "GAL", "GALACTIC"),
          "C": ("C", "Q", "CEL", "CELESTIAL", "EQ", "EQU", "EQUATORIAL", "ICRS", "FK5"),
          "E": ("E", "ECL", "ECLIPTIC")}
#: healpy's frame letter -> the frame's name in messages
FRAME_NAMES = {"G": "Galactic", "C": "equatorial", "E": "ecliptic"}
#: A smoothed or rotated pixel keeps a value where at least this fraction of its kernel's weight
#: fell on observed pixels (normalised convolution); below it, it is missing.
MIN_COVERAGE = 0.5


def frame_letter(value):
    """healpy's letter (``"G"``, ``"C"``, ``"E"``) of a frame name such as ``galactic`` or
    ``EQUATORIAL`` (case-insensitive); None for an unknown name."""
    name = str(value).strip().upper()
    return next((k for k, names in FRAMES.items() if name in names), None)


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
    frame : str or None
        The header's COORDSYS as healpy's letter (``"G"``, ``"C"``, ``"E"``; see
        :data:`FRAMES`), None without the card.

    Raises
    ------
    InputError
        Not a readable HEALPix FITS file, a missing field, a COORDSYS that names no known frame.
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
            coordsys = hdr.get("COORDSYS")
            frame = None if coordsys is None or not str(coordsys).strip() else frame_letter(coordsys)
            if coordsys is not None and str(coordsys).strip() and frame is None:
                raise InputError(f"{where}: COORDSYS {str(coordsys).strip()!r} is not a known frame "
                                 f"(G, C or E: Galactic, equatorial, ecliptic)")
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
    return values, hp.npix2nside(values.size), kind, frame


def _normalised(apply, values):
    """``apply`` (a linear map of RING maps) of ``values`` with NaN for missing, by normalised
    convolution: ``apply(values, 0 in the gaps) / apply(coverage)``, NaN where the coverage is
    below :data:`MIN_COVERAGE`; a map without gaps gets ``apply(values)``."""
    observed = np.isfinite(values)
    if observed.all():
        return np.asarray(apply(values), dtype=np.float64)
    num = np.asarray(apply(np.where(observed, values, 0.0)), dtype=np.float64)
    cover = np.asarray(apply(observed.astype(np.float64)), dtype=np.float64)
    keep = cover >= MIN_COVERAGE
    out = np.full(values.shape, np.nan)
    out[keep] = num[keep] / cover[keep]
    return out


def to_frame(values, frame_in, frame_out):
    """Rotate a RING map (NaN for missing) from one coordinate frame to another.

    Pixel-space rotation (``healpy.Rotator.rotate_map_pixel``: each new pixel centre is taken
    to the old frame and the map is interpolated bilinearly there), not a rotation of the
    spherical harmonics, which is not defined for a map with gaps. Missing pixels are handled
    by normalised interpolation: a pixel whose interpolation weight on observed pixels is
    below :data:`MIN_COVERAGE` is missing.

    Parameters
    ----------
    values : ndarray
        RING map, NaN where missing.
    frame_in, frame_out : str
        healpy's frame letters (``"G"``, ``"C"``, ``"E"``).

    Returns
    -------
    ndarray
        The map in ``frame_out`` (a copy also if the frames are equal).
    """
    import healpy as hp

    if frame_in == frame_out:
        return np.array(values, dtype=np.float64)
    rot = hp.Rotator(coord=[frame_in, frame_out])
    return _normalised(rot.rotate_map_pixel, values)


def smooth_to(values, fwhm_arcmin, target_arcmin):
    """Smooth a RING map (NaN for missing) from its beam to a coarser target beam.

    Both beams are Gaussian: the map is convolved (``healpy.smoothing``, ``lmax = 3 nside - 1``)
    with the Gaussian of FWHM ``sqrt(target^2 - fwhm^2)``. Missing pixels are handled by
    normalised convolution: the map with zeros in its gaps and its 0/1 coverage are smoothed
    alike and divided; a pixel whose smoothed coverage is below :data:`MIN_COVERAGE` is missing.

    Parameters
    ----------
    values : ndarray
        RING map, NaN where missing.
    fwhm_arcmin, target_arcmin : float
        The map's beam and the target, FWHM in arcminutes (``fwhm_arcmin <= target_arcmin``).

    Returns
    -------
    ndarray
        The smoothed map (``values`` itself when the beams are equal).
    """
    import healpy as hp

    kernel = np.sqrt(target_arcmin ** 2 - fwhm_arcmin ** 2)
    if not kernel > 0:
        return values

    def smooth(m):
        return hp.smoothing(m, fwhm=np.radians(kernel / 60.0), pol=False)

    return _normalised(smooth, values)


def regrade(values, nside_in, nside_out, kind):
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
