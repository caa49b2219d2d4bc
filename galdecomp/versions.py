"""The versions of galdecomp, Python and the main dependencies, recorded with every run.

``RUN/config.yaml`` holds them as a ``versions:`` block and ``RUN/model.npz`` as the entry
``versions`` (JSON). They are a record only: a run resumes and loads under other versions
(``--resume`` logs the differences).
"""
import importlib
import importlib.metadata
import platform

__all__ = ["versions", "PACKAGES", "differences"]

#: Distributions whose versions are recorded, with the module that carries ``__version__``.
PACKAGES = {"numpy": "numpy", "scipy": "scipy", "nifty8": "nifty8", "healpy": "healpy"}


def _version(dist, module):
    """The version of the distribution ``dist``: its module's ``__version__``, else its metadata."""
    try:
        v = getattr(importlib.import_module(module), "__version__", None)
        if v:
            return str(v)
    except ImportError:
        pass
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions():
    """The versions of galdecomp, Python and the main dependencies.

    Returns
    -------
    dict of str to str or None
        ``galdecomp``, ``python``, ``numpy``, ``scipy``, ``nifty8``, ``healpy`` (None: not
        installed), in this order.
    """
    from . import __version__

    out = {"galdecomp": __version__, "python": platform.python_version()}
    out.update({dist: _version(dist, module) for dist, module in PACKAGES.items()})
    return out


def differences(recorded, current=None):
    """``name recorded -> current`` for every version that differs, e.g. ``numpy 1.26.4 -> 2.4.6``.

    Parameters
    ----------
    recorded : dict or None
        Versions as written by :func:`versions` (None or not a mapping: nothing to compare).
    current : dict, optional
        Default :func:`versions`.

    Returns
    -------
    list of str
    """
    if not isinstance(recorded, dict):
        return []
    current = versions() if current is None else current
    return [f"{k} {recorded[k]} -> {v}" for k, v in current.items()
            if k in recorded and str(recorded[k]) != str(v)]
