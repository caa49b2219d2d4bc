"""Per-channel preprocessing: a dynamic-range transform, then standardisation.

Channel values ``x`` (physical units) become ``y = (T(x) - mean) / std`` with ``T`` one of

- ``log``: ``log(x)``, for strictly positive maps;
- ``asinh``: ``asinh(x / scale)``, linear within ``scale`` of zero and logarithmic beyond, for
  maps with zeros or negative values (CMB-dominated maps); ``scale`` is a number given in the
  catalog, or the rule ``mad``: the robust spread of the map (1.4826 x median absolute
  deviation), else its mean absolute value (at least 1 for photon counts), or ``std``: its
  standard deviation;
- ``anscombe``: ``2 sqrt(x + 3/8)``, the variance-stabilising transform of Poisson counts (the
  noise becomes ~N(0, 1) for counts >~ 1 whatever the rate), for photon-count maps;
- ``logit``: ``logit(eps + (1 - 2 eps) x)``, for intensities in [0, 1] (image pixels): the
  Gaussian likelihood on logit pixels keeps decoded intensities inside (0, 1) after the
  inverse, and stretches the ends where pixel noise is small; ``eps`` (stored as ``scale``,
  default 1e-2) keeps 0 and 1 finite (``logit(eps) = -4.6`` for 1e-2, -6.9 for 1e-3);
  the inverse ``(sigmoid(t) - eps) / (1 - 2 eps)`` is exact;
- ``linear``: ``x``.

``auto`` picks ``anscombe`` for photon counts (``kind: counts``, no negative value), ``log``
when every observed value is positive and ``asinh`` otherwise.
The transform is invertible, and is stored with a run as a plain dictionary.
"""
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError

__all__ = ["ChannelTransform", "Preprocessor"]


@dataclass
class ChannelTransform:
    """Transform of one channel: ``y = (T(x) - mean) / std``.

    Attributes
    ----------
    kind : str
        ``"log"``, ``"asinh"``, ``"anscombe"``, ``"logit"`` or ``"linear"``.
    scale : float
        ``asinh`` scale in the channel's unit; ``logit``: eps; 1 otherwise.
    mean, std : float
        Standardisation of ``T(x)`` over the observed pixels.
    slope : float
        Median of ``|dy/dx|`` over the observed pixels: converts a noise level between physical
        and standardised units.
    """

    kind: str
    scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    slope: float = 1.0

    def _t(self, x):
        if self.kind == "log":
            return np.log(x)
        if self.kind == "asinh":
            return np.arcsinh(x / self.scale)
        if self.kind == "anscombe":
            return 2.0 * np.sqrt(np.asarray(x, dtype=float) + 0.375)
        if self.kind == "logit":
            u = self.scale + (1.0 - 2.0 * self.scale) * np.asarray(x, dtype=float)
            return np.log(u) - np.log1p(-u)
        return np.asarray(x, dtype=float)

    def forward(self, x):
        """Physical values to standardised values (NaN stays NaN)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self._t(x) - self.mean) / self.std

    def inverse(self, y):
        """Standardised values back to physical units."""
        t = np.asarray(y) * self.std + self.mean
        if self.kind == "log":
            return np.exp(t)
        if self.kind == "asinh":
            return self.scale * np.sinh(t)
        if self.kind == "anscombe":
            return 0.25 * t * t - 0.375
        if self.kind == "logit":
            return (0.5 * (1.0 + np.tanh(0.5 * t)) - self.scale) / (1.0 - 2.0 * self.scale)
        return t

    def derivative(self, x):
        """dy/dx at physical values ``x``: converts a physical noise level to standardised units."""
        if self.kind == "log":
            d = 1.0 / np.asarray(x, dtype=float)
        elif self.kind == "asinh":
            d = 1.0 / np.sqrt(self.scale ** 2 + np.asarray(x, dtype=float) ** 2)
        elif self.kind == "anscombe":
            d = 1.0 / np.sqrt(np.asarray(x, dtype=float) + 0.375)
        elif self.kind == "logit":
            u = self.scale + (1.0 - 2.0 * self.scale) * np.asarray(x, dtype=float)
            d = (1.0 - 2.0 * self.scale) / (u * (1.0 - u))
        else:
            d = np.ones_like(np.asarray(x, dtype=float))
        return d / self.std

    @classmethod
    def fit(cls, x, kind="auto", name="channel", counts=False, asinh_scale="mad", logit_eps=1e-2):
        """Choose and fit the transform to the observed values ``x`` of one channel.

        Parameters
        ----------
        x : ndarray
            Observed (finite) values in physical units.
        kind : str
            ``"auto"``, ``"log"``, ``"asinh"``, ``"anscombe"``, ``"logit"`` or ``"linear"``
            (``auto`` never picks ``logit``).
        name : str
            Channel name for error messages.
        counts : bool
            The channel holds photon counts: ``auto`` chooses ``anscombe``; an ``asinh`` scale
            by the ``mad`` rule is at least 1, so one photon is not made a jump of many
            standard deviations in a mostly-empty map.
        asinh_scale : float or str
            A number (the channel's unit), or the rule ``"mad"`` or ``"std"``.
        logit_eps : float
            ``eps`` of the ``logit`` kind, in (0, 0.5).
        """
        x = np.asarray(x, dtype=float)
        x = x[np.isfinite(x)]
        if x.size == 0:
            raise InputError(f"map '{name}': no valid pixel")
        if kind == "auto":
            kind = "anscombe" if counts and x.min() >= 0 else "log" if x.min() > 0 else "asinh"
        if kind == "log" and x.min() <= 0:
            raise InputError(f"map '{name}': transform 'log' needs positive values, "
                             f"the map has values <= 0 (use asinh or auto)")
        if kind == "anscombe" and x.min() < 0:
            raise InputError(f"map '{name}': transform 'anscombe' needs counts >= 0, "
                             f"the map has negative values (use asinh or auto)")
        if kind == "logit" and (x.min() < 0 or x.max() > 1):
            raise InputError(f"map '{name}': transform 'logit' needs values in [0, 1], "
                             f"the map has values in [{x.min():.3g}, {x.max():.3g}]")
        if kind == "logit" and not 0 < logit_eps < 0.5:
            raise InputError(f"map '{name}': logit eps must be in (0, 0.5), got {logit_eps!r}")
        if kind not in ("log", "asinh", "anscombe", "logit", "linear"):
            raise InputError(f"map '{name}': unknown transform {kind!r}")
        scale = float(logit_eps) if kind == "logit" else 1.0
        if kind == "asinh":
            if asinh_scale == "std":
                scale = np.std(x)
            elif asinh_scale == "mad":
                scale = 1.4826 * np.median(np.abs(x - np.median(x)))
                if not scale > 0:
                    scale = np.mean(np.abs(x))
                scale = max(scale, 1.0) if counts else scale
            else:
                scale = float(asinh_scale)
            if not scale > 0:
                scale = 1.0
        tr = cls(kind, float(scale))
        t = tr._t(x)
        tr.mean = float(np.mean(t))
        std = float(np.std(t))
        tr.std = std if std > 0 else 1.0
        tr.slope = float(np.median(np.abs(tr.derivative(x))))
        return tr


class Preprocessor:
    """The transforms of all channels of a data set.

    Parameters
    ----------
    transforms : list of ChannelTransform
    names : list of str
        Channel names, in order.
    """

    def __init__(self, transforms, names):
        self.transforms = list(transforms)
        self.names = list(names)

    @classmethod
    def fit(cls, dataset, kinds=None):
        """Fit one transform per channel on all of a data set's samples.

        Parameters
        ----------
        dataset : DataSet
        kinds : list of str, optional
            Requested transform per channel; default the data set's ``transforms`` if it has
            them, else ``"auto"`` for all.
        """
        kinds = kinds or getattr(dataset, "transforms", None) or ["auto"] * dataset.n_features
        counts = getattr(dataset, "kinds", None) or ["intensity"] * dataset.n_features
        scales = getattr(dataset, "asinh_scales", None) or ["mad"] * dataset.n_features
        trs = [ChannelTransform.fit(v[o], k, n, counts=c == "counts", asinh_scale=a)
               for v, o, k, n, c, a in zip(dataset.values, dataset.observed, kinds, dataset.names, counts,
                                           scales)]
        return cls(trs, dataset.names)

    def forward(self, values):
        """Channels x samples physical values to standardised values."""
        return np.stack([t.forward(v) for t, v in zip(self.transforms, values)])

    def inverse(self, values):
        """Channels x samples standardised values to physical units."""
        return np.stack([t.inverse(v) for t, v in zip(self.transforms, values)])

    def noise_to_standardised(self, noise):
        """Known per-channel noise levels (physical units, NaN = unknown) in standardised units.

        Parameters
        ----------
        noise : array_like, shape (n_channels,)

        Returns
        -------
        ndarray, shape (n_channels,)
            ``noise * slope`` (median ``|dy/dx|`` over observed pixels); 0 where unknown.
        """
        noise = np.asarray(noise, dtype=float)
        slopes = np.array([t.slope for t in self.transforms])
        return np.where(np.isfinite(noise), noise * slopes, 0.0)

    def poisson_noise(self):
        """Poisson noise of photon-count channels in standardised units.

        Returns
        -------
        ndarray, shape (n_channels,)
            ``1 / std`` for ``anscombe`` channels, 0 for the others: the transform makes
            Poisson noise ~N(0, 1) at rates >~ 1 photon and narrower below, where the counts
            take a few discrete levels and 1 is the noise a fit cannot go under without
            predicting single photons.
        """
        return np.array([1.0 / t.std if t.kind == "anscombe" else 0.0 for t in self.transforms])

    def to_dict(self):
        """A YAML-safe description: ``{name: {kind, scale, mean, std}}``."""
        return {n: asdict(t) for n, t in zip(self.names, self.transforms)}

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`."""
        return cls([ChannelTransform(**v) for v in d.values()], list(d))
