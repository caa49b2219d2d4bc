"""Spatial templates from real maps for the simulated sky (``galdecomp simulate --morphology DIR``).

A morphology source is a folder with a ``catalog.yaml`` in the package's catalog format (e.g.
``../shared/data/realsky64``). Some of its maps replace the *amplitude* maps of physical components
(gas column, dust optical depth, emission measure, synchrotron at 408 MHz, hot-gas emission
measure, ...); spectra, channels, noise and all spectral parameters stay those of the built-in
model, and components without a template keep their random fields.

Which map drives which component:

- an explicit mapping ``{component: map name}`` (the keys of `TARGETS` or their aliases), when
  given, is used as it is: exactly the listed components get templates;
- otherwise the name rule: for every component in `TARGETS` order, the first of its name
  patterns (case-insensitive substrings, in priority order) that a catalog map's name contains
  picks that map (the first such map in catalog order); a map drives at most one component.

Each template is read through the catalog reader, regraded to the simulation nside and fitted to
the component's model map by `fit_template`: NaN, UNSEEN, values <= 0 and values below
`MIN_RELATIVE` times the median of the positive values, and one-pixel dips below `DIP_FRACTION`
times the median of the 8 neighbours (survey gaps and partly covered pixels along them, e.g. the
ROSAT stripes) are missing; the
template is scaled by one factor so that its median over its valid pixels equals the model's
median over the same pixels; missing pixels are filled with the model map times the template /
model ratio smoothed over the surrounding valid pixels (Gaussian beams of increasing width), so
the truth maps are complete and continuous across gaps.
"""
import os
import warnings
from dataclasses import dataclass, field

import healpy as hp
import numpy as np

from ..catalog import read_catalog, read_map
from ..errors import InputError

__all__ = ["TARGETS", "Morphology", "resolve_morphology", "morphology_from_config", "load_templates",
           "fit_template", "shared_dir", "expand_path"]

#: component (truth-map name) -> (Galaxy attribute, aliases, name patterns of the name rule)
TARGETS = {
    "gas_column": ("n_h", ("gas",), ("hi4pi", "nhi", "n_hi")),
    "dust_tau353": ("tau353", ("dust", "ebv"), ("sfd", "ebv", "tau353")),
    "emission_measure": ("em", ("em", "ionised_gas", "ionized_gas"), ("wham", "halpha", "h_alpha")),
    "synchrotron_408MHz": ("sync_408", ("synchrotron",), ("haslam", "408mhz")),
    "xray_em_halo": ("xem_halo", ("hot_gas",), ("rosat", "kev")),
    "xray_em_local_bubble": ("xem_local", ("local_bubble",), ()),
    "ame_23GHz": ("ame_23", ("ame",), ()),
    "inverse_compton_1GeV": ("ic_amp", ("inverse_compton",), ()),
}
_ALIASES = {alias: name for name, (_, aliases, _) in TARGETS.items() for alias in (name, *aliases)}
FILL_FWHM_DEG = (5.0, 15.0, 45.0, 120.0)  # beams of the gap filling, after one of ~2 pixels
FILL_MIN_WEIGHT = 0.2  # a beam fills a pixel once this share of its weight is on valid pixels
MIN_RELATIVE = 1e-3  # template values below this fraction of their positive median are missing
DIP_FRACTION = 0.5  # ... and values below this fraction of the median of their 8 neighbours


def shared_dir():
    """The shared data folder: ``$GALDECOMP_SHARED``, else ``../shared`` beside the project."""
    env = os.environ.get("GALDECOMP_SHARED")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(os.path.dirname(repo), "shared")


def expand_path(path, base=None):
    """Expand ``$GALDECOMP_SHARED`` (default `shared_dir()`), ``~`` and other variables in
    ``path``; a relative result is taken relative to ``base`` (default: the working folder)."""
    text = str(path)
    for var in ("${GALDECOMP_SHARED}", "$GALDECOMP_SHARED"):
        text = text.replace(var, shared_dir())
    text = os.path.expanduser(os.path.expandvars(text))
    if not os.path.isabs(text) and base is not None:
        text = os.path.join(base, text)
    return os.path.abspath(text)


@dataclass
class Morphology:
    """A resolved morphology source: the catalog file and the map entry per component."""

    catalog: str
    templates: dict = field(default_factory=dict)  # component -> MapEntry
    rule: str = "names"  # "names" (name patterns) or "explicit"
    _loaded: dict = field(default_factory=dict, repr=False, compare=False)

    def load(self, nside):
        """The templates at ``nside`` (`load_templates`), read once per nside."""
        if nside not in self._loaded:
            self._loaded[nside] = load_templates(self, nside)
        return self._loaded[nside]


def _catalog_path(path):
    if not os.path.exists(path):
        raise InputError(f"{path}: morphology folder not found")
    if os.path.isdir(path):
        cat = os.path.join(path, "catalog.yaml")
        if not os.path.isfile(cat):
            raise InputError(f"{path}: morphology folder holds no catalog.yaml")
        return cat
    return path


def resolve_morphology(path, mapping=None):
    """Read a morphology source's catalog and decide which map drives which component.

    Parameters
    ----------
    path : str
        Folder holding ``catalog.yaml`` (or the catalog file itself).
    mapping : dict, optional
        ``{component: map name}`` with components named as in `TARGETS` or by an alias (``gas``,
        ``dust``, ``emission_measure``, ``synchrotron``, ``hot_gas``, ...). Given: exactly these
        components get templates; a value None keeps that component's random field. Not given:
        the name rule of the module docstring.

    Returns
    -------
    Morphology

    Raises
    ------
    InputError
        Missing folder or catalog, a bad catalog, an unknown component, a map name absent from
        the catalog, or (name rule) no map matching any component.
    """
    cat_path = _catalog_path(os.path.abspath(str(path)))
    cat = read_catalog(cat_path)
    by_name = {e.name: e for e in cat.maps}
    templates = {}
    if mapping is not None:
        if not isinstance(mapping, dict):
            raise InputError(f"{cat_path}: morphology mapping must be a mapping of component: map name, "
                             f"got {mapping!r}")
        for key, map_name in mapping.items():
            comp = _ALIASES.get(str(key))
            if comp is None:
                raise InputError(f"{cat_path}: morphology: unknown component {key!r} "
                                 f"(known: {', '.join(TARGETS)})")
            if comp in templates:
                raise InputError(f"{cat_path}: morphology: component {comp!r} mapped twice")
            if map_name is None:
                continue
            if map_name not in by_name:
                raise InputError(f"{cat_path}: morphology: {key}: no map named {map_name!r} in the catalog")
            templates[comp] = by_name[map_name]
        return Morphology(cat_path, {c: templates[c] for c in TARGETS if c in templates}, "explicit")
    used = set()
    for comp, (_, _, patterns) in TARGETS.items():
        for pattern in patterns:
            hit = next((e for e in cat.maps if pattern in e.name.lower() and e.name not in used), None)
            if hit is not None:
                templates[comp] = hit
                used.add(hit.name)
                break
    if not templates:
        raise InputError(f"{cat_path}: no map name matches a component's name pattern; give an explicit "
                         f"mapping (component: map name)")
    return Morphology(cat_path, templates, "names")


def morphology_from_config(value, base=None, where="simulate: morphology"):
    """Resolve the ``morphology`` setting of a run configuration.

    Parameters
    ----------
    value : str, dict or None
        A folder (``$GALDECOMP_SHARED/...``, absolute, or relative to ``base``): maps chosen by
        the name rule; or ``{dir: FOLDER, <component>: <map name>, ...}``: the explicit mapping
        (``{dir: FOLDER}`` alone: the name rule). None: no templates.
    base : str, optional
        Folder of the configuration file.
    where : str
        Name of the setting in error messages.

    Returns
    -------
    Morphology or None
    """
    if value is None:
        return None
    mapping = None
    if isinstance(value, dict):
        mapping = {k: v for k, v in value.items() if k != "dir"}
        value = value.get("dir")
        for key, name in mapping.items():
            if name is not None and not isinstance(name, str):
                raise InputError(f"{where}: {key}: expected a map name, got {name!r}")
        mapping = mapping or None
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: expected a folder, or a mapping with 'dir' and component: map name")
    return resolve_morphology(expand_path(value, base), mapping)


def load_templates(morphology, nside):
    """Read the templates of a `Morphology` at ``nside``.

    Returns
    -------
    dict
        Galaxy attribute (e.g. ``n_h``) -> (component, map name, map at ``nside`` with NaN where
        missing).

    Raises
    ------
    InputError
        A map that cannot be read or has no positive value at ``nside``.
    """
    out = {}
    for comp, entry in morphology.templates.items():
        values = read_map(entry, nside, frame="G")[0]  # the simulated sky is Galactic
        if not np.any(np.isfinite(values) & (values > 0)):
            raise InputError(f"map '{entry.name}' ({entry.path}): no positive value, cannot be the "
                             f"spatial template of {comp}")
        out[TARGETS[comp][0]] = (comp, entry.name, values)
    return out


def _smooth(values, fwhm_rad):
    nside = hp.npix2nside(values.size)
    return hp.smoothing(values, fwhm=fwhm_rad, lmax=3 * nside - 1, iter=0, use_pixel_weights=False)


def _valid_pixels(raw):
    """Pixels of a template that count as measured (see `fit_template`)."""
    valid = np.isfinite(raw) & (raw > 0)
    valid &= raw >= MIN_RELATIVE * np.median(raw[valid])
    nside = hp.npix2nside(raw.size)
    neighbours = hp.get_all_neighbours(nside, np.arange(raw.size))
    ok = neighbours >= 0
    values = np.where(ok, np.where(valid, raw, np.nan)[np.where(ok, neighbours, 0)], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods
        local = np.nanmedian(values, axis=0)
    dip = np.isfinite(local) & (raw < DIP_FRACTION * local)
    return valid & ~dip


def fit_template(model, raw):
    """Scale a spatial template to a model map and fill its gaps.

    Parameters
    ----------
    model : ndarray
        The component's model (random-field) map, positive.
    raw : ndarray
        The template at the same nside; missing are NaN, values <= 0, values below
        `MIN_RELATIVE` times the median of the positive values and values below `DIP_FRACTION`
        times the median of their (valid) neighbours.

    Returns
    -------
    values : ndarray
        ``scale * raw`` on the valid pixels; elsewhere ``model * exp(<ln(scale raw / model)>)``,
        the log-ratio averaged over valid pixels within the smallest beam (about 2 pixels, then
        `FILL_FWHM_DEG`) that puts at least `FILL_MIN_WEIGHT` of its weight on valid pixels, and
        the median log-ratio where none does.
    scale : float
        ``median(model[valid]) / median(raw[valid])``.
    n_filled : int
        Number of filled pixels.
    """
    valid = _valid_pixels(raw)
    scale = float(np.median(model[valid]) / np.median(raw[valid]))
    out = np.where(valid, raw, 0.0) * scale
    todo = ~valid
    n_filled = int(todo.sum())
    if not n_filled:
        return out, scale, 0
    log_ratio = np.where(valid, np.log(np.where(valid, out, 1.0) / model), 0.0)
    weight = valid.astype(float)
    pix_deg = hp.nside2resol(hp.npix2nside(raw.size), arcmin=True) / 60.0
    for fwhm_deg in (2 * pix_deg, *FILL_FWHM_DEG):
        if not todo.any():
            break
        sw = _smooth(weight, np.radians(fwhm_deg))
        sr = _smooth(log_ratio, np.radians(fwhm_deg))
        ok = todo & (sw > FILL_MIN_WEIGHT)
        out[ok] = model[ok] * np.exp(sr[ok] / sw[ok])
        todo &= ~ok
    out[todo] = model[todo] * np.exp(np.median(log_ratio[valid]))
    return out, scale, n_filled
