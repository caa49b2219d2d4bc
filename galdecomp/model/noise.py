"""Per-channel noise model: a known floor plus a log-normal adaptive part.

``sigma_c**2 = floor_c**2 + (sigma0 * exp(tau * s_c))**2`` with excitation ``s_c ~ N(0, 1)``.
The adaptive part has a log-normal prior (positive, scale-free, spans orders of magnitude for
``tau ~ 1``); ``floor_c >= 0`` is a known noise floor that keeps ``sigma_c`` away from 0 on
channels the decoder can reproduce exactly (near-duplicate channels). Defaults: ``sigma0 = 0.5``
(a broad start for standardised data) and ``tau = 1``. The exponent ``2 tau s`` is clipped to
``[-EXP_CLIP, EXP_CLIP]`` so that a bad start cannot overflow; the gradient is 0 beyond the clip.
"""
import numpy as np

__all__ = ["SIGMA0", "TAU", "EXP_CLIP", "variance", "sigma", "inv_var", "d_inv_var_ds",
           "d_log_var_ds"]

SIGMA0 = 0.5
TAU = 1.0
EXP_CLIP = 300.0


def _parts(s, floor, sigma0, tau):
    arg = 2.0 * tau * np.asarray(s, dtype=np.float64)
    inside = np.abs(arg) < EXP_CLIP
    adapt = sigma0 ** 2 * np.exp(np.clip(arg, -EXP_CLIP, EXP_CLIP))
    return np.asarray(floor, dtype=np.float64) ** 2 + adapt, adapt, inside


def variance(s, floor=0.0, sigma0=SIGMA0, tau=TAU):
    """Noise variance ``sigma_c**2`` for excitations ``s`` (shape (C,)); floor broadcasts."""
    return _parts(s, floor, sigma0, tau)[0]


def sigma(s, floor=0.0, sigma0=SIGMA0, tau=TAU):
    """Noise standard deviation ``sigma_c = sqrt(floor_c**2 + (sigma0 exp(tau s_c))**2)``."""
    return np.sqrt(variance(s, floor, sigma0, tau))


def inv_var(s, floor=0.0, sigma0=SIGMA0, tau=TAU):
    """Inverse noise variance ``w_c = 1 / sigma_c**2``."""
    return 1.0 / variance(s, floor, sigma0, tau)


def d_log_var_ds(s, floor=0.0, sigma0=SIGMA0, tau=TAU):
    """``d log sigma_c**2 / d s_c = 2 tau (sigma0 exp(tau s_c))**2 / sigma_c**2`` (in [0, 2 tau])."""
    v, adapt, inside = _parts(s, floor, sigma0, tau)
    return np.where(inside, 2.0 * tau * adapt / v, 0.0)


def d_inv_var_ds(s, floor=0.0, sigma0=SIGMA0, tau=TAU):
    """Inverse variance and its derivative, for the chain rule ``dE/ds_c = dE/dw_c * dw_c/ds_c``.

    Returns
    -------
    w : ndarray
        ``1 / sigma_c**2``.
    dw_ds : ndarray
        ``d w_c / d s_c = -w_c * d log sigma_c**2 / d s_c``.
    """
    v, adapt, inside = _parts(s, floor, sigma0, tau)
    w = 1.0 / v
    return w, np.where(inside, -2.0 * tau * adapt * w * w, 0.0)
