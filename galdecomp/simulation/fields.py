"""Random fields and geometric templates on the HEALPix sphere (RING ordering, Galactic).

All random draws come from generators keyed by ``(seed, name)``, so a field depends only on
the seed and its name, never on the order in which fields are drawn. Spherical-harmonic
coefficients are drawn in order of increasing multipole: the large scales of a field are the
same at every nside for a given seed.
"""
import functools

import healpy as hp
import numpy as np

from ..seeds import stream

__all__ = ["rng_for", "sky_coords", "angular_distance_deg", "power_law_cl", "gaussian_field",
           "lognormal_field", "shell_profile", "ring_profile", "lobe_mask", "blob", "SkyGeometry"]

L_REF = 191  # multipole up to which fields are normalised to unit variance (3 * 64 - 1)


def rng_for(seed, name):
    """Return a numpy Generator that depends only on ``seed`` and the string ``name``.

    Parameters
    ----------
    seed : int
        Simulation seed (non-negative).
    name : str
        Stream name, e.g. ``"gas_clouds"`` or ``"noise/radio_22MHz"``.

    Returns
    -------
    numpy.random.Generator
    """
    return stream(seed, name)


@functools.lru_cache(maxsize=8)
def sky_coords(nside):
    """Galactic longitude and latitude of the pixel centres.

    Parameters
    ----------
    nside : int
        HEALPix resolution.

    Returns
    -------
    l_deg, b_deg : ndarray
        Longitude in (-180, 180] and latitude in [-90, 90], degrees, RING order (read-only).
    """
    l_deg, b_deg = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), lonlat=True)
    l_deg = np.where(l_deg > 180.0, l_deg - 360.0, l_deg)
    l_deg.flags.writeable = False
    b_deg.flags.writeable = False
    return l_deg, b_deg


def angular_distance_deg(l_deg, b_deg, l0_deg, b0_deg):
    """Great-circle distance in degrees between (l, b) and the point (l0, b0)."""
    l, b, l0, b0 = (np.radians(x) for x in (l_deg, b_deg, l0_deg, b0_deg))
    cos_d = np.sin(b) * np.sin(b0) + np.cos(b) * np.cos(b0) * np.cos(l - l0)
    return np.degrees(np.arccos(np.clip(cos_d, -1.0, 1.0)))


def power_law_cl(lmax, slope):
    """Angular power spectrum C_ell proportional to ell**slope (ell >= 2), unit field variance.

    The variance is normalised over 2 <= ell <= ``L_REF`` so a field has the same amplitude
    at every resolution; ell = 0, 1 are zero.

    Parameters
    ----------
    lmax : int
        Highest multipole.
    slope : float
        Power-law index (e.g. -2.5; steeper means smoother).

    Returns
    -------
    ndarray, shape (lmax + 1,)
    """
    ell = np.arange(max(lmax, L_REF) + 1, dtype=float)
    cl = np.zeros_like(ell)
    cl[2:] = ell[2:] ** slope
    cl /= np.sum((2 * ell[:L_REF + 1] + 1) * cl[:L_REF + 1]) / (4 * np.pi)
    return cl[:lmax + 1]


@functools.lru_cache(maxsize=8)
def _alm_order(lmax):
    """healpy alm indices and multipoles of the coefficients in (ell, m) order, ell-major."""
    ell = np.repeat(np.arange(lmax + 1), np.arange(1, lmax + 2))
    m = np.arange(ell.size) - ell * (ell + 1) // 2
    return hp.Alm.getidx(lmax, ell, m), ell, m


def gaussian_field(cl, nside, rng):
    """Gaussian random map with angular power spectrum ``cl``.

    Parameters
    ----------
    cl : array_like, shape (lmax + 1,)
        Angular power spectrum.
    nside : int
        HEALPix resolution of the output.
    rng : numpy.random.Generator
        Source of the coefficients, drawn in order of increasing ell.

    Returns
    -------
    ndarray, shape (12 * nside**2,)
    """
    cl = np.asarray(cl, dtype=float)
    lmax = cl.size - 1
    idx, ell, m = _alm_order(lmax)
    z = rng.standard_normal((ell.size, 2))
    coef = np.where(m == 0, z[:, 0], (z[:, 0] + 1j * z[:, 1]) / np.sqrt(2.0))
    alm = np.zeros(idx.size, dtype=complex)
    alm[idx] = coef * np.sqrt(cl[ell])
    return hp.alm2map(alm, nside, lmax=lmax)


def lognormal_field(seed, name, nside, slope, sigma_ln):
    """Log-normal random map with mean about 1: ``exp(sigma_ln * g - sigma_ln**2 / 2)``.

    Parameters
    ----------
    seed : int
        Simulation seed.
    name : str
        Field name (selects the random stream).
    nside : int
        HEALPix resolution.
    slope : float
        Power-law index of the angular power spectrum of ``g`` (unit variance).
    sigma_ln : float
        Standard deviation of the logarithm.

    Returns
    -------
    ndarray, shape (12 * nside**2,)
    """
    g = gaussian_field(power_law_cl(3 * nside - 1, slope), nside, rng_for(seed, name))
    return np.exp(sigma_ln * g - 0.5 * sigma_ln ** 2)


def shell_profile(dist_deg, radius_deg, thickness_deg):
    """Limb-brightened projection of a thin spherical shell, peak normalised to 1.

    Parameters
    ----------
    dist_deg : ndarray
        Angular distance from the shell centre, degrees.
    radius_deg, thickness_deg : float
        Outer angular radius and thickness of the shell.

    Returns
    -------
    ndarray
        Projected path length through the shell divided by its maximum.
    """
    r_out, r_in = radius_deg, radius_deg - thickness_deg
    path = np.sqrt(np.clip(r_out ** 2 - dist_deg ** 2, 0, None)) \
        - np.sqrt(np.clip(r_in ** 2 - dist_deg ** 2, 0, None))
    return path / np.sqrt(r_out ** 2 - r_in ** 2)


def ring_profile(dist_deg, radius_deg, width_deg):
    """Gaussian ring ``exp(-(d - R)**2 / (2 w**2))`` in angular distance ``d``."""
    return np.exp(-0.5 * ((dist_deg - radius_deg) / width_deg) ** 2)


def lobe_mask(l_deg, b_deg, l0_deg, b0_deg, half_width_deg, half_height_deg, edge=0.08):
    """Soft-edged ellipse in (l, b): about 1 inside, 0 outside, logistic edge of relative width ``edge``."""
    rho = np.hypot((l_deg - l0_deg) / half_width_deg, (b_deg - b0_deg) / half_height_deg)
    return 0.5 * (1.0 - np.tanh((rho - 1.0) / (2 * edge)))


def blob(l_deg, b_deg, l0_deg, b0_deg, sigma_deg):
    """Gaussian blob of peak 1 and angular dispersion ``sigma_deg`` centred at (l0, b0)."""
    return np.exp(-0.5 * (angular_distance_deg(l_deg, b_deg, l0_deg, b0_deg) / sigma_deg) ** 2)


class SkyGeometry:
    """Galactic coordinates of every pixel and the field shapes the components of
    :func:`galdecomp.simulation.components.make_galaxy` share."""

    def __init__(self, nside, seed):
        self.nside, self.seed = nside, seed
        self.l, self.b = sky_coords(nside)
        self.lmax = 3 * nside - 1
        self.sin_b = np.abs(np.sin(np.radians(self.b)))
        self.theta_gc = angular_distance_deg(self.l, self.b, 0.0, 0.0)
        self.b_warp = 2.0 * np.sin(np.radians(self.l)) * (self.l / 180.0) ** 2  # outer-disk warp

    def gauss(self, name, slope):
        """A unit Gaussian random field of power-law spectrum ``l^slope`` from the stream ``name``."""
        return gaussian_field(power_law_cl(self.lmax, slope), self.nside, rng_for(self.seed, name))

    def inner(self, l_w, b_w):
        """A Gaussian bump on the Galactic centre, widths ``l_w``, ``b_w`` degrees."""
        return np.exp(-(self.l / l_w) ** 2 - (self.b / b_w) ** 2)

    def thin(self, h_deg):
        """An exponential layer of scale height ``h_deg`` degrees about the warped disk."""
        return np.exp(-np.abs(self.b - self.b_warp) / h_deg)
