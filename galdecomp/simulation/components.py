"""Physical components of the simulated Galaxy: latent maps and their emission spectra.

`make_galaxy` draws the latent physical maps (gas column, cosmic-ray density, synchrotron
amplitude and index, emission measure, dust optical depth and temperature, hot-gas emission
measures, CMB, ...). `Galaxy` evaluates each component's emission at a frequency or in an
energy band. The maps are non-linear functions of the latent physics: spectral indices,
temperatures and peak frequencies vary over the sky, free-free absorbs low-frequency
synchrotron, dust attenuates H-alpha, gas absorbs soft X-rays.

References: Draine (2011), Physics of the ISM; Planck 2015 X (foreground parametrisations);
Haffner et al. 2003 (H-alpha and emission measure); Planck 2013 XI (dust opacity).
"""
from dataclasses import dataclass, field

import healpy as hp
import numpy as np

from .fields import (SkyGeometry, angular_distance_deg, blob, gaussian_field, lobe_mask, lognormal_field,
                     ring_profile, rng_for, shell_profile)
from .morphology import TARGETS, fit_template

__all__ = ["H_PLANCK", "K_BOLTZMANN", "C_LIGHT", "T_CMB_K", "EV_HZ", "planck_bnu",
           "rj_intensity_per_k", "cmb_to_rj", "rj_to_unit", "cmb_cl", "free_free_tau",
           "halpha_rayleigh", "band_integral", "Galaxy", "make_galaxy"]

H_PLANCK = 6.62607015e-34  # J s
K_BOLTZMANN = 1.380649e-23  # J / K
C_LIGHT = 2.99792458e8  # m / s
T_CMB_K = 2.7255
EV_HZ = 2.417989242e14  # frequency of a 1 eV photon, Hz
KEV_PER_K = 8.617333e-8  # k_B in keV / K
T_E_K = 7000.0  # electron temperature of the warm ionised gas
TAU353_PER_NH = 8.0e-27  # dust optical depth at 353 GHz per H atom (cm^2), Planck 2013 XI
EBV_PER_TAU353 = 1.49e4  # E(B-V) / tau_353 in mag, Planck 2013 XI
SYNC_NU0_HZ = 408e6
AME_NU_REF_HZ = 22.8e9
XRAY_K = 3.0e4  # thermal X-ray photon emissivity scale per emission measure (calibrated)


def planck_bnu(freq_hz, t_k):
    """Planck specific intensity B_nu(T) in W m^-2 Hz^-1 sr^-1."""
    x = H_PLANCK * freq_hz / (K_BOLTZMANN * np.asarray(t_k, dtype=float))
    return 2 * H_PLANCK * freq_hz ** 3 / C_LIGHT ** 2 / np.expm1(x)


def rj_intensity_per_k(freq_hz):
    """Specific intensity of 1 K Rayleigh-Jeans brightness, 2 k nu^2 / c^2, W m^-2 Hz^-1 sr^-1."""
    return 2 * K_BOLTZMANN * freq_hz ** 2 / C_LIGHT ** 2


def cmb_to_rj(freq_hz):
    """K_RJ per K_CMB at ``freq_hz``: x^2 e^x / (e^x - 1)^2 with x = h nu / (k T_CMB)."""
    x = H_PLANCK * freq_hz / (K_BOLTZMANN * T_CMB_K)
    return x ** 2 * np.exp(x) / np.expm1(x) ** 2


def rj_to_unit(freq_hz, unit):
    """Factor converting K_RJ to ``unit`` ("K_RJ", "K_CMB" or "MJy/sr") at ``freq_hz``."""
    if unit == "K_RJ":
        return 1.0
    if unit == "K_CMB":
        return 1.0 / cmb_to_rj(freq_hz)
    if unit == "MJy/sr":
        return rj_intensity_per_k(freq_hz) * 1e20
    raise ValueError(f"unsupported intensity unit {unit!r}")


def cmb_cl(lmax):
    """Analytic approximation of the CMB temperature power spectrum C_ell in K_CMB^2.

    Sachs-Wolfe plateau (D_ell ~ 1000 muK^2), acoustic peaks at ell ~ 220, 540, 810, 1120,
    1440 and a damping tail; D_ell = ell (ell + 1) C_ell / (2 pi). ell = 0, 1 are zero.
    """
    ell = np.arange(lmax + 1, dtype=float)
    damping = np.exp(-(ell / 1300.0) ** 2)
    base = 1000.0 + 900.0 * ell ** 2 / (ell ** 2 + 250.0 ** 2)
    peaks = sum(h * np.exp(-0.5 * ((ell - c) / w) ** 2)
                for c, h, w in [(220, 4700, 80), (540, 1600, 90), (810, 1500, 95),
                                (1120, 700, 100), (1440, 400, 100)])
    d_ell_uk2 = (base + peaks) * damping
    cl = np.zeros_like(ell)
    cl[2:] = 2 * np.pi * d_ell_uk2[2:] / (ell[2:] * (ell[2:] + 1)) * 1e-12
    return cl


def free_free_tau(freq_hz, em_pc_cm6, t_e_k=T_E_K):
    """Free-free optical depth (Draine 2011; Planck 2015 X Gaunt factor).

    tau = 0.05468 T_e^-1.5 nu_GHz^-2 EM g_ff,
    g_ff = ln(exp(5.960 - sqrt(3)/pi ln(nu_GHz (T_e / 1e4 K)^-1.5)) + e).
    """
    nu9 = freq_hz / 1e9
    g_ff = np.log(np.exp(5.960 - np.sqrt(3) / np.pi * np.log(nu9 * (t_e_k / 1e4) ** -1.5)) + np.e)
    return 0.05468 * t_e_k ** -1.5 * nu9 ** -2 * em_pc_cm6 * g_ff


def halpha_rayleigh(em_pc_cm6, ebv_mag, t_e_k=T_E_K):
    """Observed H-alpha intensity in Rayleigh from emission measure and reddening.

    Unattenuated I = EM / (2.75 T_4^0.9) (Haffner et al. 2003); emitting gas mixed uniformly
    with the dust along the line of sight: attenuation (1 - e^-tau) / tau, tau = A_Halpha / 1.086,
    A_Halpha = 2.5 E(B-V).
    """
    intrinsic = em_pc_cm6 / (2.75 * (t_e_k / 1e4) ** 0.9)
    tau = 2.5 * np.asarray(ebv_mag) / 1.086
    atten = np.where(tau > 1e-8, -np.expm1(-tau) / np.maximum(tau, 1e-8), 1.0)
    return intrinsic * atten


def _log_nodes(e_lo, e_hi, n_nodes=8):
    """Gauss-Legendre nodes in ln E over [e_lo, e_hi]: energies (n, 1) and weights (n, 1) for dE."""
    x, w = np.polynomial.legendre.leggauss(n_nodes)
    half = 0.5 * np.log(e_hi / e_lo)
    e = np.exp(np.log(e_lo) + half * (x + 1.0))[:, None]
    return e, half * w[:, None] * e


def band_integral(dnde, e_lo, e_hi, n_nodes=8):
    """Integral of a photon spectrum over an energy band, Gauss-Legendre in ln E.

    Parameters
    ----------
    dnde : callable
        ``dnde(e)`` with ``e`` of shape (n_nodes, 1) returns dN/dE, shape (n_nodes, n_pix)
        or broadcastable.
    e_lo, e_hi : float
        Band edges (same energy unit as ``dnde`` expects).
    n_nodes : int
        Quadrature nodes.

    Returns
    -------
    ndarray
        Photon intensity integrated over the band.
    """
    e, w = _log_nodes(e_lo, e_hi, n_nodes)
    return np.sum(w * dnde(e), axis=0)


def _xray_thermal_dnde(e_kev, t_k):
    """Photon spectrum of a hot plasma per unit emission measure (ph cm^-2 s^-1 sr^-1 keV^-1).

    Bremsstrahlung-shaped continuum exp(-E/kT)/E plus an O VII/O VIII line complex near
    0.6 keV whose strength peaks at T ~ 2e6 K; normalisation ``XRAY_K``.
    """
    kt = KEV_PER_K * t_k
    lines = 0.027 * np.exp(-0.5 * ((np.log10(t_k) - 6.35) / 0.15) ** 2) \
        * np.exp(-0.5 * ((e_kev - 0.6) / 0.06) ** 2) / 0.06
    return XRAY_K * (t_k / 1e6) ** -0.5 * (np.exp(-e_kev / kt) / e_kev + lines)


def _xray_sigma_cm2(e_kev):
    """Photo-absorption cross-section per H atom, about 2e-22 (E / keV)^(-8/3) cm^2."""
    return 2e-22 * e_kev ** (-8.0 / 3.0)


@dataclass
class Galaxy:
    """Latent physical maps of one simulated sky (RING, Galactic) and their emission.

    Maps have shape (npix,): gas column ``n_h`` (cm^-2), cosmic-ray density ``cr_density``
    (local = 1), pion-decay photon index ``hadronic_index``, synchrotron ``sync_408`` (K_RJ at
    408 MHz), index ``sync_beta`` and curvature ``sync_curv``, emission measure ``em``
    (pc cm^-6), dust ``tau353``, ``t_dust`` (K), ``beta_dust``, AME ``ame_23`` (K_RJ at
    22.8 GHz) and peak ``ame_peak_hz``, CMB ``cmb_k`` (K_CMB), inverse-Compton amplitude
    ``ic_amp`` (E^2 dN/dE at 1 GeV) and index ``ic_index``, Fermi-bubble template ``bubbles``,
    hot-gas emission measures ``xem_*`` (pc cm^-6). Radio sources: ``src_pix``,
    ``src_flux_jy`` (at 1.4 GHz), ``src_alpha`` (S ~ nu^alpha). See `Galaxy.truth`.
    ``morphology``: component -> {map, scale, filled} for the amplitude maps taken from real
    spatial templates (empty for the built-in random fields).
    """

    nside: int
    seed: int
    n_h: np.ndarray
    cr_density: np.ndarray
    hadronic_index: np.ndarray
    sync_408: np.ndarray
    sync_beta: np.ndarray
    sync_curv: np.ndarray
    em: np.ndarray
    tau353: np.ndarray
    t_dust: np.ndarray
    beta_dust: np.ndarray
    ame_23: np.ndarray
    ame_peak_hz: np.ndarray
    cmb_k: np.ndarray
    ic_amp: np.ndarray
    ic_index: np.ndarray
    bubbles: np.ndarray
    xem_local: np.ndarray
    xem_halo: np.ndarray
    xem_bubbles: np.ndarray
    src_pix: np.ndarray
    src_flux_jy: np.ndarray
    src_alpha: np.ndarray
    morphology: dict = field(default_factory=dict)

    T_XRAY_K = {"local": 1.1e6, "halo": 2.2e6, "bubbles": 3.5e6}
    SYNC_FG_FRACTION = 0.3  # share of synchrotron in front of the ionised gas

    @property
    def ebv(self):
        """Reddening E(B-V) in mag."""
        return EBV_PER_TAU353 * self.tau353

    @property
    def pixel_sr(self):
        """Pixel solid angle in sr."""
        return 4 * np.pi / (12 * self.nside ** 2)

    def radio_k_rj(self, freq_hz):
        """Components at ``freq_hz`` in K_RJ: dict of synchrotron, free_free, ame, thermal_dust,
        cmb, radio_sources."""
        lnx = np.log(freq_hz / SYNC_NU0_HZ)
        tau_ff = free_free_tau(freq_hz, self.em)
        sync = self.sync_408 * np.exp((self.sync_beta + self.sync_curv * lnx) * lnx)
        f_fg = self.SYNC_FG_FRACTION
        ame_shape = lambda nu: np.exp(-0.5 * (np.log(nu / self.ame_peak_hz) / 0.55) ** 2) / nu ** 2
        dust = self.tau353 * (freq_hz / 353e9) ** self.beta_dust * planck_bnu(freq_hz, self.t_dust)
        src_t = self.src_flux_jy * (freq_hz / 1.4e9) ** self.src_alpha * 1e-26 \
            / (rj_intensity_per_k(freq_hz) * self.pixel_sr)
        return {
            "synchrotron": sync * (f_fg + (1 - f_fg) * np.exp(-tau_ff)),
            "free_free": T_E_K * -np.expm1(-tau_ff),
            "ame": self.ame_23 * ame_shape(freq_hz) / ame_shape(AME_NU_REF_HZ),
            "thermal_dust": dust / rj_intensity_per_k(freq_hz),
            "cmb": self.cmb_k * cmb_to_rj(freq_hz),
            "radio_sources": np.bincount(self.src_pix, src_t, minlength=self.n_h.size),
        }

    def xray_photons(self, e_lo_kev, e_hi_kev):
        """Band photon intensities (ph cm^-2 s^-1 sr^-1): dict of hot_gas, xray_background."""
        absorb = lambda e: np.exp(-_xray_sigma_cm2(e) * self.n_h)
        t = self.T_XRAY_K
        hot = band_integral(lambda e: self.xem_local * _xray_thermal_dnde(e, t["local"])
                            + absorb(e) * (self.xem_halo * _xray_thermal_dnde(e, t["halo"])
                                           + self.xem_bubbles * _xray_thermal_dnde(e, t["bubbles"])),
                            e_lo_kev, e_hi_kev)
        cxb = band_integral(lambda e: absorb(e) * 10.0 * e ** -1.45, e_lo_kev, e_hi_kev)
        return {"hot_gas": hot, "xray_background": cxb}

    def gamma_e2dnde(self, e_gev):
        """E^2 dN/dE (GeV cm^-2 s^-1 sr^-1) per gamma-ray component at ``e_gev`` (shape (n, 1)).

        hadronic: 1.6e-27 N_H rho_CR E^(2 - Gamma_h) with a pion-bump turnover below 0.7 GeV;
        inverse_compton: power law of index Gamma_IC = -beta_sync - 0.45; fermi_bubbles:
        E^-1.9 with a 110 GeV cutoff; isotropic_gamma: 5e-7 E^-0.32, 280 GeV cutoff.
        """
        pion = (1 + 0.7 ** 2) / (1 + (0.7 / e_gev) ** 2)
        return {
            "hadronic": 1.6e-27 * self.n_h * self.cr_density * e_gev ** (2 - self.hadronic_index) * pion,
            "inverse_compton": self.ic_amp * e_gev ** (2 - self.ic_index),
            "fermi_bubbles": 4e-7 * self.bubbles * e_gev ** 0.1 * np.exp(-e_gev / 110.0),
            "isotropic_gamma": np.broadcast_to(5e-7 * e_gev ** -0.32 * np.exp(-e_gev / 280.0),
                                               (e_gev.shape[0], self.n_h.size)),
        }

    def gamma_photons(self, e_lo_gev, e_hi_gev):
        """Band photon intensities (ph cm^-2 s^-1 sr^-1) per gamma-ray component."""
        e, w = _log_nodes(e_lo_gev, e_hi_gev)
        return {k: np.sum(w * v / e ** 2, axis=0) for k, v in self.gamma_e2dnde(e).items()}

    def truth(self):
        """Truth maps: dict name -> (map, unit, description, reference frequency in Hz)."""
        gev_hz = 1e9 * EV_HZ
        one_gev = np.ones((1, 1))
        gam = {k: v[0] for k, v in self.gamma_e2dnde(one_gev).items()}
        src = np.bincount(self.src_pix, self.src_flux_jy, minlength=self.n_h.size)
        dust353 = self.tau353 * planck_bnu(353e9, self.t_dust) * 1e20
        gam_unit = "GeV cm-2 s-1 sr-1"
        kev = 1e3 * EV_HZ
        rows = [
            ("synchrotron_408MHz", self.sync_408, "K_RJ", SYNC_NU0_HZ, "synchrotron brightness at 408 MHz"),
            ("sync_beta", self.sync_beta, "1", SYNC_NU0_HZ,
             "synchrotron index beta, T ~ nu^(beta + C ln(nu/408MHz))"),
            ("sync_curvature", self.sync_curv, "1", SYNC_NU0_HZ, "synchrotron curvature C"),
            ("emission_measure", self.em, "pc cm-6", 30e9,
             f"emission measure of the warm ionised gas, T_e = {T_E_K:g} K"),
            ("free_free_30GHz", self.radio_k_rj(30e9)["free_free"], "K_RJ", 30e9,
             "free-free brightness at 30 GHz"),
            ("ebv", self.ebv, "mag", 4.568e14, "reddening E(B-V) = 1.49e4 tau_353"),
            ("thermal_dust_353GHz", dust353, "MJy/sr", 353e9, "thermal dust intensity at 353 GHz"),
            ("dust_tau353", self.tau353, "1", 353e9, "dust optical depth at 353 GHz"),
            ("dust_temperature", self.t_dust, "K", 353e9, "dust temperature of the modified blackbody"),
            ("dust_beta", self.beta_dust, "1", 353e9, "dust emissivity index"),
            ("ame_23GHz", self.ame_23, "K_RJ", AME_NU_REF_HZ, "anomalous microwave emission at 22.8 GHz"),
            ("ame_peak_frequency", self.ame_peak_hz / 1e9, "GHz", AME_NU_REF_HZ,
             "AME log-parabola peak frequency (flux density)"),
            ("cmb", self.cmb_k, "K_CMB", 100e9, "CMB temperature anisotropy"),
            ("gas_column", self.n_h, "cm-2", 1.420405751e9, "total hydrogen column density N_H"),
            ("cr_density", self.cr_density, "1", gev_hz, "cosmic-ray proton density relative to local"),
            ("hadronic_index", self.hadronic_index, "1", gev_hz, "photon index of the pion-decay gamma rays"),
            ("hadronic_1GeV", gam["hadronic"], gam_unit, gev_hz, "hadronic gamma rays, E^2 dN/dE at 1 GeV"),
            ("inverse_compton_1GeV", gam["inverse_compton"], gam_unit, gev_hz,
             "inverse-Compton gamma rays, E^2 dN/dE at 1 GeV"),
            ("ic_index", self.ic_index, "1", gev_hz, "photon index of the inverse-Compton gamma rays"),
            ("fermi_bubbles_1GeV", gam["fermi_bubbles"], gam_unit, gev_hz,
             "Fermi-bubble gamma rays, E^2 dN/dE at 1 GeV"),
            ("xray_em_local_bubble", self.xem_local, "pc cm-6", 0.25 * kev,
             "hot gas EM, local bubble (1.1e6 K, unabsorbed)"),
            ("xray_em_halo", self.xem_halo, "pc cm-6", 0.75 * kev,
             "hot gas EM, Galactic halo (2.2e6 K, absorbed)"),
            ("xray_em_bubbles", self.xem_bubbles, "pc cm-6", 0.75 * kev,
             "hot gas EM, X-ray bubbles and Loop I (3.5e6 K, absorbed)"),
            ("radio_sources_1p4GHz", src, "Jy", 1.4e9,
             "radio point sources, flux density per pixel at 1.4 GHz"),
        ]
        return {name: (m, unit, desc, freq) for name, m, unit, freq, desc in rows}


def _gas_column(g, g_gas):
    """Gas column [cm^-2]: local csc-law layer, disk, molecular ring, nearby cloud complexes,
    clumps (the log-normal field ``g_gas``)."""
    l, b, thin = g.l, g.b, g.thin
    clouds = sum(a * blob(l, b, lc, bc, s) for lc, bc, s, a in [
        (-151, -19, 6, 3e21), (170, -15, 6, 2.5e21), (160, -20, 5, 2e21), (-5, 17, 5, 4e21),
        (115, 18, 7, 1.5e21), (-60, -16, 4, 2e21), (-20, 15, 5, 1.5e21), (28, 5, 8, 3e21)])
    return (2.0e20 / np.sqrt(g.sin_b ** 2 + np.sin(np.radians(3.0)) ** 2)
            + 8e21 * thin(1.5) * (0.4 + 0.6 * np.exp(-(l / 60.0) ** 2))
            + 4e22 * thin(0.7) * np.exp(-(l / 30.0) ** 2) + clouds) \
        * np.exp(0.55 * g_gas - 0.5 * 0.55 ** 2)


def _synchrotron(g, bubbles):
    """Synchrotron at 408 MHz [K]: halo, thick and thin disk, Galactic-centre region, Cygnus,
    haze, radio loops. Returns the smooth part, the North Polar Spur's weight and the total."""
    l, b, thin = g.l, g.b, g.thin
    smooth = 8.0 + 12 * np.exp(-(g.theta_gc / 50.0) ** 2) \
        + 45 * np.exp(-np.abs(b) / 4.0) * (0.35 + 0.65 * np.exp(-(l / 60.0) ** 2)) \
        + 120 * thin(1.0) * np.exp(-(l / 35.0) ** 2) + 300 * blob(l, b, 0, 0, 1.5)
    north = 0.5 * (1 + np.tanh(b / 6.0))
    nps = 0.15 + 0.85 * north * np.exp(-0.5 * ((l - 25.0) / 25.0) ** 2)  # North Polar Spur
    loops = 30 * shell_profile(angular_distance_deg(l, b, -31, 17.5), 58, 3) * nps \
        + 5 * shell_profile(angular_distance_deg(l, b, 100, -32.5), 45.5, 3) \
        + 4 * shell_profile(angular_distance_deg(l, b, 124, 15.5), 32.5, 3) \
        + 3 * shell_profile(angular_distance_deg(l, b, -45, 48.5), 19.8, 2.5)
    sync_408 = (smooth + loops + 40 * blob(l, b, 80, 0, 3) + 2 * bubbles) \
        * lognormal_field(g.seed, "sync_clumps", g.nside, -3.0, 0.15)
    return smooth, nps, sync_408


def _emission_measure(g, g_em):
    """Warm ionised gas [pc cm^-6]: csc-law layer, disk HII regions, named nebulae, clumps tied
    to the gas (``g_em``)."""
    l, b, thin = g.l, g.b, g.thin
    return (2.5 / np.sqrt(g.sin_b ** 2 + np.sin(np.radians(4.0)) ** 2)
            + 600 * thin(1.5) * (0.3 + 0.7 * np.exp(-(l / 40.0) ** 2))
            + 2500 * thin(0.5) * np.exp(-(l / 30.0) ** 2)
            + 40 * blob(l, b, -98, -2, 9) + 80 * ring_profile(angular_distance_deg(l, b, -153, -17), 7, 1.5)
            + 500 * blob(l, b, 80, 0, 3) + 800 * blob(l, b, -73, -1, 1.5) + 40 * blob(l, b, 6, 23, 4)) \
        * np.exp(0.8 * g_em - 0.5 * 0.8 ** 2)


def _dust(g, n_h, em, use):
    """Dust: optical depth at 353 GHz from the gas times a dust-to-gas variation (``use``: the
    template rule of :func:`make_galaxy`); temperature warmer in the inner Galaxy and near HII
    regions, colder in dense clouds; spectral index anti-correlated with the temperature."""
    tau353 = TAU353_PER_NH * n_h * (1 + 0.3 * g.inner(60, 10)) \
        * lognormal_field(g.seed, "dust_to_gas", g.nside, -2.5, 0.12)
    tau353 = use("tau353", tau353)
    t_dust = np.clip(19.0 + 2.5 * g.inner(40, 8) + 2.0 * em / (em + 300.0)
                     - 1.5 * np.log10(np.maximum(n_h / 1e21, 1.0)) + 1.0 * g.gauss("dust_temperature", -3.0),
                     14.0, 26.0)
    beta_dust = np.clip(1.55 - 0.025 * (t_dust - 19.0) + 0.07 * g.gauss("dust_beta", -3.0), 1.3, 1.9)
    return tau353, t_dust, beta_dust


def _cmb(g):
    """CMB temperature [K] with a Gaussian beam of the pixel size."""
    fwhm = np.radians(1.0) * 64 / g.nside
    ell = np.arange(g.lmax + 1)
    cl = cmb_cl(g.lmax) * np.exp(-ell * (ell + 1) * (fwhm / np.sqrt(8 * np.log(2))) ** 2)
    return gaussian_field(cl, g.nside, rng_for(g.seed, "cmb"))


def _xray_bubbles(g, nps):
    """Emission measure of the X-ray bubbles and the North Polar Spur (weight ``nps``)."""
    l, b = g.l, g.b
    return (6e-3 * (shell_profile(angular_distance_deg(l, b, 0, 42), 40, 10)
                    + 0.8 * shell_profile(angular_distance_deg(l, b, 0, -40), 37, 10))
            + 8e-3 * shell_profile(angular_distance_deg(l, b, -31, 17.5), 58, 8) * nps) \
        * lognormal_field(g.seed, "xray_bubbles", g.nside, -2.5, 0.3)


def _radio_sources(nside, seed):
    """Radio point sources: Euclidean counts above 0.5 Jy at 1.4 GHz, steep or flat spectra.
    Returns pixels, fluxes [Jy] and spectral indices."""
    rng = rng_for(seed, "radio_sources")
    n_src = 400
    z, phi = rng.uniform(-1, 1, n_src), rng.uniform(0, 2 * np.pi, n_src)
    src_pix = hp.ang2pix(nside, np.arccos(z), phi)
    src_flux = np.minimum(0.5 * rng.uniform(0, 1, n_src) ** (-1 / 1.5), 50.0)
    steep = rng.uniform(0, 1, n_src) < 0.7
    src_alpha = np.where(steep, rng.normal(-0.8, 0.15, n_src), rng.normal(-0.1, 0.25, n_src))
    return src_pix, src_flux, src_alpha


def make_galaxy(nside, seed=0, templates=None):
    """Draw the latent physical maps of a simulated Galaxy.

    Parameters
    ----------
    nside : int
        HEALPix resolution.
    seed : int
        Random seed; the large scales agree between resolutions for the same seed.
    templates : dict, optional
        Galaxy attribute (``n_h``, ``tau353``, ``em``, ``sync_408``, ``xem_halo``, ...) ->
        (component, map name, map at ``nside`` with NaN where missing), from
        `galdecomp.simulation.morphology.load_templates`. Each replaces that amplitude map's
        spatial structure (scaled to the model's median, gaps filled, see
        `galdecomp.simulation.morphology.fit_template`) before the maps that depend on it are
        derived; everything else, including all random draws, is unchanged.

    Returns
    -------
    Galaxy
    """
    templates = templates or {}
    used = {}

    def use(attr, model):
        """``model``, or the template of ``attr`` fitted to it."""
        if attr not in templates:
            return model
        comp, name, raw = templates[attr]
        values, scale, n_filled = fit_template(model, raw)
        used[comp] = {"map": name, "scale": scale, "filled": n_filled}
        return values

    g = SkyGeometry(nside, seed)
    l, b, gauss, inner = g.l, g.b, g.gauss, g.inner

    g_gas = gauss("gas_clouds", -2.7)
    n_h = use("n_h", _gas_column(g, g_gas))

    # Cosmic rays: denser and harder toward the inner Galaxy, depleted in the outer Galaxy.
    cr = 1.0 + 1.6 * inner(40, 10) - 0.3 * np.exp(-((np.abs(l) - 180) / 60.0) ** 2 - (b / 10.0) ** 2) \
        + 0.1 * gauss("cr_density", -4.0)
    cr = np.clip(cr, 0.3, None)
    hadronic_index = 2.75 - 0.25 * inner(40, 10) + 0.03 * gauss("hadronic_index", -4.0)

    # Fermi-bubble lobes (gamma rays, microwave haze).
    bubbles = lobe_mask(l, b, 0, 25, 20, 27) + lobe_mask(l, b, 0, -25, 20, 27)

    smooth, nps, sync_408 = _synchrotron(g, bubbles)
    sync_408 = use("sync_408", sync_408)
    sync_beta = np.clip(-2.78 + 0.10 * np.exp(-np.abs(b) / 8.0) + 0.1 * bubbles
                        + 0.08 * gauss("sync_beta", -3.0), -3.2, -2.45)
    sync_curv = np.clip(-0.035 + 0.01 * gauss("sync_curvature", -3.0), -0.07, 0.0)

    g_em = 0.5 * g_gas + np.sqrt(0.75) * gauss("em_clumps", -2.5)
    em = use("em", _emission_measure(g, g_em))

    tau353, t_dust, beta_dust = _dust(g, n_h, em, use)

    # AME tied to dust and radiation field; peak frequency varies.
    ame_23 = use("ame_23", 10.0 * tau353 * (t_dust / 19.0) ** 2
                 * lognormal_field(seed, "ame_emissivity", nside, -3.0, 0.2))
    ame_peak_hz = 25e9 * np.exp(0.08 * gauss("ame_peak", -3.0))

    cmb_k = _cmb(g)

    # Inverse Compton from the synchrotron electrons in the interstellar radiation field.
    isrf = 1.0 + 3.0 * np.exp(-(g.theta_gc / 25.0) ** 2) + 1.5 * np.exp(-np.abs(b) / 5.0)
    ic_amp = use("ic_amp", 2.5e-7 * (smooth / 10.0) * isrf)
    ic_index = np.clip(-sync_beta - 0.45, 2.1, 2.7)

    # Hot gas: local bubble (unabsorbed), patchy halo, X-ray bubbles and the North Polar Spur.
    xem_local = use("xem_local", 4e-3 * (0.7 + 0.6 * g.sin_b)
                    * lognormal_field(seed, "xray_local", nside, -3.0, 0.1))
    xem_halo = use("xem_halo", 2e-3 * (1 + 1.5 * np.exp(-(g.theta_gc / 40.0) ** 2))
                   * lognormal_field(seed, "xray_halo", nside, -2.5, 0.3))
    xem_bubbles = _xray_bubbles(g, nps)
    src_pix, src_flux, src_alpha = _radio_sources(nside, seed)

    return Galaxy(nside=nside, seed=seed, n_h=n_h, cr_density=cr, hadronic_index=hadronic_index,
                  sync_408=sync_408, sync_beta=sync_beta, sync_curv=sync_curv,
                  em=em, tau353=tau353, t_dust=t_dust, beta_dust=beta_dust, ame_23=ame_23,
                  ame_peak_hz=ame_peak_hz, cmb_k=cmb_k, ic_amp=ic_amp, ic_index=ic_index,
                  bubbles=bubbles, xem_local=xem_local, xem_halo=xem_halo, xem_bubbles=xem_bubbles,
                  src_pix=src_pix, src_flux_jy=src_flux, src_alpha=src_alpha,
                  morphology={c: used[c] for c in TARGETS if c in used})
