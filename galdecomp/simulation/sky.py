"""Assemble the simulated multi-frequency sky, write it as a catalog and plot it."""
import os
from collections.abc import Mapping
from dataclasses import dataclass

import healpy as hp
import numpy as np
import yaml

from ..errors import InputError
from ..fileio import write_healpix_fits
from .components import Galaxy, halpha_rayleigh, make_galaxy, rj_to_unit
from .fields import rng_for, sky_coords
from .morphology import Morphology, resolve_morphology

__all__ = ["channel_table_path", "load_channel_table", "SimulatedSky", "ComponentMaps",
           "channel_components", "simulate_sky", "write_simulated_sky", "plot_overview",
           "describe_morphology"]

NSIDE_REF = 64  # nside at which the table's noise levels are given
INTENSITY_UNITS = ("K_RJ", "K_CMB", "MJy/sr", "Rayleigh")


def channel_table_path():
    """Path of ``channels.yaml``: ``$GALDECOMP_DATA`` (folder or file) first, then the package's ``data/``.

    Raises
    ------
    InputError
        If neither place holds the table.
    """
    tried = []
    env = os.environ.get("GALDECOMP_DATA")
    if env:
        tried.append(env if env.endswith((".yaml", ".yml")) else os.path.join(env, "channels.yaml"))
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tried.append(os.path.join(package, "data", "channels.yaml"))
    for path in tried:
        if os.path.isfile(path):
            return path
    raise InputError(f"channel table not found (tried {', '.join(tried)}); set GALDECOMP_DATA")


def load_channel_table(path=None):
    """Read and check the channel table.

    Parameters
    ----------
    path : str, optional
        YAML file; default `channel_table_path()`.

    Returns
    -------
    list of dict
        One entry per channel (name, frequency_hz, unit, kind, noise or exposure, ...).
    """
    path = path or channel_table_path()
    with open(path) as f:
        table = yaml.safe_load(f)
    if not isinstance(table, list) or not table:
        raise InputError(f"{path}: expected a non-empty YAML list of channels")
    seen = set()
    for i, ch in enumerate(table):
        where = f"{path}: channel {i} ({ch.get('name', '?') if isinstance(ch, dict) else '?'})"
        if not isinstance(ch, dict) or not {"name", "frequency_hz", "unit", "kind"} <= ch.keys():
            raise InputError(f"{where}: needs name, frequency_hz, unit, kind")
        if ch["name"] in seen:
            raise InputError(f"{where}: duplicate name")
        seen.add(ch["name"])
        if not float(ch["frequency_hz"]) > 0:
            raise InputError(f"{where}: frequency_hz must be > 0")
        if ch["kind"] == "intensity":
            if ch["unit"] not in INTENSITY_UNITS or not float(ch.get("noise", -1)) >= 0:
                raise InputError(f"{where}: intensity channel needs unit in {INTENSITY_UNITS} and noise >= 0")
        elif ch["kind"] == "counts":
            band = ch.get("energy_band_ev")
            if not float(ch.get("exposure", -1)) > 0 or not (isinstance(band, list) and len(band) == 2
                                                              and 0 < band[0] < band[1]):
                raise InputError(f"{where}: counts channel needs exposure > 0 and energy_band_ev [lo, hi]")
        else:
            raise InputError(f"{where}: kind must be 'intensity' or 'counts'")
    return table


class ComponentMaps(Mapping):
    """Noiseless per-channel contributions of each component, stored sparsely.

    ``components[name]`` is an array (n_channels, npix) in the channel units (expected counts
    for counts channels), zero in channels the component does not reach.
    """

    def __init__(self, n_channels, npix):
        self.n_channels, self.npix, self._rows = n_channels, npix, {}

    def add(self, name, channel_index, values):
        """Store the contribution of component ``name`` to channel ``channel_index``."""
        self._rows.setdefault(name, {})[channel_index] = np.asarray(values, dtype=np.float64)

    def __getitem__(self, name):
        rows = self._rows[name]
        out = np.zeros((self.n_channels, self.npix))
        for i, row in rows.items():
            out[i] = row
        return out

    def __iter__(self):
        return iter(self._rows)

    def __len__(self):
        return len(self._rows)


@dataclass
class SimulatedSky:
    """A simulated all-sky data set (HEALPix RING, Galactic coordinates).

    Attributes
    ----------
    nside, seed : int
        Resolution and random seed.
    channels : list of dict
        Channel table entries, one per map.
    maps : ndarray, shape (n_channels, npix)
        Observed maps in physical units, noise included (counts are integers stored as floats).
    expected : ndarray, shape (n_channels, npix)
        Noiseless maps (expected counts for counts channels).
    truth : dict
        name -> (map, unit, description, reference frequency_hz): component amplitudes and
        spectral parameters.
    components : ComponentMaps
        name -> (n_channels, npix) noiseless contribution of each component.
    galaxy : Galaxy
        The latent physical model.
    morphology_source : str or None
        Catalog of the real maps used as spatial templates (``galaxy.morphology`` says which
        component came from which map), None for the built-in random fields.
    """

    nside: int
    seed: int
    channels: list
    maps: np.ndarray
    expected: np.ndarray
    truth: dict
    components: ComponentMaps
    galaxy: Galaxy
    morphology_source: str = None

    @property
    def names(self):
        """Channel names."""
        return [ch["name"] for ch in self.channels]

    def noise_sigma(self, channel):
        """Per-pixel Gaussian noise sigma of an intensity channel at this nside (0 for counts)."""
        return float(channel.get("noise", 0.0)) * self.nside / NSIDE_REF


def channel_components(galaxy, channel):
    """Noiseless contribution of each component to one channel.

    Parameters
    ----------
    galaxy : Galaxy
        Latent physical maps.
    channel : dict
        Channel table entry.

    Returns
    -------
    dict
        component name -> map in the channel's unit (expected counts for counts channels).
    """
    freq_hz, unit = float(channel["frequency_hz"]), channel["unit"]
    if channel["kind"] == "intensity":
        if unit == "Rayleigh":
            return {"halpha": halpha_rayleigh(galaxy.em, galaxy.ebv)}
        factor = rj_to_unit(freq_hz, unit)
        return {k: v * factor for k, v in galaxy.radio_k_rj(freq_hz).items()}
    e_lo_ev, e_hi_ev = (float(e) for e in channel["energy_band_ev"])
    if e_hi_ev <= 1e6:
        photons = galaxy.xray_photons(e_lo_ev / 1e3, e_hi_ev / 1e3)
    else:
        photons = galaxy.gamma_photons(e_lo_ev / 1e9, e_hi_ev / 1e9)
    scale = float(channel["exposure"]) * galaxy.pixel_sr
    return {k: v * scale for k, v in photons.items()}


def simulate_sky(nside, seed=0, channels=None, morphology=None):
    """Simulate the multi-frequency Galactic sky.

    Parameters
    ----------
    nside : int
        HEALPix resolution (power of 2).
    seed : int
        Random seed: the same seed gives bitwise identical maps.
    channels : list of dict, optional
        Channel table; default `load_channel_table()`.
    morphology : str or Morphology, optional
        Real maps as spatial templates of the components' amplitudes: a folder holding a
        catalog.yaml (maps chosen by the name rule) or a resolved `Morphology` (see
        `galdecomp.simulation.morphology`). Default: the built-in random fields.

    Returns
    -------
    SimulatedSky
    """
    if not hp.isnsideok(nside, nest=True):
        raise InputError(f"nside must be a power of 2, got {nside}")
    channels = load_channel_table() if channels is None else channels
    templates, source = None, None
    if morphology is not None:
        if not isinstance(morphology, Morphology):
            morphology = resolve_morphology(morphology)
        templates, source = morphology.load(nside), morphology.catalog
    galaxy = make_galaxy(nside, seed, templates)
    npix = hp.nside2npix(nside)
    comps = ComponentMaps(len(channels), npix)
    expected = np.zeros((len(channels), npix))
    maps = np.empty_like(expected)
    for i, ch in enumerate(channels):
        for name, values in channel_components(galaxy, ch).items():
            comps.add(name, i, values)
            expected[i] += values
        rng = rng_for(seed, "noise/" + ch["name"])
        if ch["kind"] == "counts":
            maps[i] = rng.poisson(expected[i])
        else:
            maps[i] = expected[i] + float(ch["noise"]) * nside / NSIDE_REF * rng.standard_normal(npix)
    return SimulatedSky(nside=nside, seed=seed, channels=channels, maps=maps, expected=expected,
                        truth=galaxy.truth(), components=comps, galaxy=galaxy, morphology_source=source)


def describe_morphology(sky):
    """Lines saying which real maps gave the spatial templates (empty for the built-in sky)."""
    if sky.morphology_source is None:
        return []
    lines = [f"Spatial templates from {sky.morphology_source} (scaled to the model median; "
             f"gaps filled):"]
    lines += [f"  {comp} <- {u['map']} x {u['scale']:.4g}, {u['filled']} pixels filled"
              for comp, u in sky.galaxy.morphology.items()]
    return lines


class _IndentedDumper(yaml.SafeDumper):
    """SafeDumper that indents list items under their key (``maps:\n  - name: ...``)."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def _dump_catalog(path, nside, entries, comment):
    """Write a catalog YAML with a comment header."""
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    text += yaml.dump({"nside": int(nside), "maps": entries}, Dumper=_IndentedDumper,
                      sort_keys=False, default_flow_style=False, width=200)
    with open(path, "w") as f:
        f.write(text)


def write_simulated_sky(sky, out_dir):
    """Write maps, truth maps and catalogs into the existing empty folder ``out_dir``.

    Layout: ``catalog.yaml``, ``maps/<channel>.fits``, ``truth/<name>.fits`` and
    ``truth/catalog.yaml`` (same catalog format, usable as templates).

    Parameters
    ----------
    sky : SimulatedSky
        Simulation to write.
    out_dir : str
        Existing empty folder.
    """
    if not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: output folder does not exist")
    if os.listdir(out_dir):
        raise InputError(f"{out_dir}: output folder is not empty")
    for sub in ("maps", "truth"):
        os.mkdir(os.path.join(out_dir, sub))
    seed_card = ("SIMSEED", int(sky.seed), "galdecomp.simulation random seed")
    entries = []
    for ch, values in zip(sky.channels, sky.maps):
        name, freq, unit, kind = ch["name"], float(ch["frequency_hz"]), ch["unit"], ch["kind"]
        cards = [("FREQ_HZ", freq, "frequency in Hz"), ("BUNIT", unit, "map unit"),
                 ("KIND", kind, "intensity or counts"), seed_card,
                 ("INSTRUME", str(ch.get("instrument", ""))[:60], "simulated survey")]
        entry = {"name": name, "file": f"maps/{name}.fits", "frequency_hz": freq, "unit": unit, "kind": kind}
        if kind == "intensity":
            entry["noise"] = sky.noise_sigma(ch)
            cards.append(("NOISE", entry["noise"], "1-sigma white noise per pixel"))
        else:
            cards.append(("EXPOSURE", float(ch["exposure"]), "cm2 s: counts = photons/cm2/s/sr * exp * sr"))
        write_healpix_fits(os.path.join(out_dir, entry["file"]), values, name, unit, header=cards)
        entries.append(entry)
    head = "\n".join([f"Simulated multi-frequency sky (galdecomp.simulation), seed {sky.seed}, "
                      f"nside {sky.nside}.", *describe_morphology(sky)])
    _dump_catalog(os.path.join(out_dir, "catalog.yaml"), sky.nside, entries,
                  head + "\nObserved maps including noise; true components in truth/catalog.yaml.")
    truth_entries = []
    for name, (values, unit, desc, freq) in sky.truth.items():
        write_healpix_fits(os.path.join(out_dir, "truth", f"{name}.fits"), values, name, unit,
                           header=[("FREQ_HZ", float(freq), "reference frequency in Hz"),
                                   ("BUNIT", unit, "map unit"), ("KIND", "intensity", "truth map"),
                                   seed_card, ("DESCRIPT", desc[:60], "simulated truth")])
        truth_entries.append({"name": name, "file": f"{name}.fits", "frequency_hz": float(freq),
                              "unit": unit, "kind": "intensity"})
    _dump_catalog(os.path.join(out_dir, "truth", "catalog.yaml"), sky.nside, truth_entries,
                  head + "\nNoiseless truth: component amplitudes and spectral parameters.")


def _display(values, kind, b_deg):
    """Map transformed for display and a label of the transform."""
    if kind == "counts":
        return np.log10(1.0 + values), "log10(1+N)"
    if values.min() > 0:
        lo, hi = np.percentile(values, [0.5, 99.5])
        return (np.log10(values), "log10") if hi > 5 * lo else (values, "linear")
    if values.min() >= 0 or values.max() <= 0:
        return values, "linear"
    scale = np.std(values[np.abs(b_deg) > 30]) or 1.0
    return np.arcsinh(values / scale), f"asinh(x/{scale:.2g})"


def _mollview_grid(panels, nside, path, ncols, title, xsize):
    """Plot (map, kind, title) panels (RING order) as Mollweide views, each on its display
    scale (:func:`_display`), on a grid and save a PNG."""
    from ..figures import mollview_grid

    _, b_deg = sky_coords(nside)
    shown = [_display(np.asarray(values, dtype=float), kind, b_deg) for values, kind, _ in panels]
    mollview_grid([m for m, _ in shown], [f"{label}\n{how}" for (_, _, label), (_, how) in zip(panels, shown)],
                  path, nest=False, ncols=ncols, cmap="inferno", suptitle=title, percentiles=(0.5, 99.8),
                  panel_size=(3.0, 2.3), xsize=xsize)


def plot_overview(sky, path, ncols=7, xsize=400):
    """Save a PNG grid of Mollweide views of all channels (log / asinh colour scales).

    Parameters
    ----------
    sky : SimulatedSky
        Simulation to show.
    path : str
        Output PNG.
    ncols : int
        Panels per row.
    xsize : int
        Pixels across each projected map.
    """
    panels = [(m, ch["kind"], f"{ch['name']} [{ch['unit']}]") for ch, m in zip(sky.channels, sky.maps)]
    _mollview_grid(panels, sky.nside, path, ncols,
                   f"Simulated sky, nside {sky.nside}, seed {sky.seed}: observed channels", xsize)
