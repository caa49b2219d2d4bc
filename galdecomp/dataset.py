"""Data sets: a table of samples x features with missing entries.

The model sees rows (samples) of features; a sky data set is one kind of data set whose
samples are HEALPix pixels and whose features are frequency channels.
"""
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DataSet", "SkyDataSet"]


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

    def coverage(self):
        """Fraction of samples observed, per feature."""
        return self.observed.mean(axis=1)


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
        Coordinate system of the maps (``"G"`` Galactic).
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
