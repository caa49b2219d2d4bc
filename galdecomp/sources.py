"""Data sources of a fit: what is read, how it is standardised and how a run recognises it.

A source (:class:`SkySource` for a catalog of HEALPix maps, :class:`TableSource` for a table of
rows, :class:`FashionMNISTSource` for the Fashion-MNIST images) reads this process's rows and
fits the preprocessing into a :class:`Prepared`, and fingerprints its data so that ``--resume``
refuses other data than a run was started on.
"""
import hashlib
import json
import os
from dataclasses import dataclass, replace

import numpy as np

from .catalog import load_catalog, map_reader, read_catalog, select_maps, working_nside
from .datasets.table import TABLE_FORMATS, DataSet, read_table
from .errors import InputError
from .preprocessing import ChannelTransform, Preprocessor

__all__ = ["load_preprocessed", "noise_floor", "channel_rows", "Prepared", "SkySource", "TableSource",
           "FashionMNISTSource", "is_table", "table_source"]


def channel_rows(catalog, names, nside, fwhm_arcmin=None, allow_missing=False):
    """A catalog's maps as rows of the channels ``names`` (a trained run's), matched by map name.

    Parameters
    ----------
    catalog : str or Catalog
    names : list of str
        The channels, in the order of the returned columns.
    nside : int
        Resolution to read the maps at (NESTED rows).
    fwhm_arcmin : float, optional
        Target resolution (:func:`~galdecomp.catalog.load_catalog`).
    allow_missing : bool
        A channel the catalog lacks is a column of NaN (else InputError).

    Returns
    -------
    rows : ndarray, shape (P, C)
        Physical units, NaN where missing.
    data_set : SkyDataSet
        The maps read (the catalog's entries for ``names`` that it has).
    entries : list of MapEntry or None
        Per channel of ``names``, its entry (None where the catalog lacks it).

    Raises
    ------
    InputError
        None of ``names`` in the catalog; a channel missing without ``allow_missing``; a bad map.
    """
    given = isinstance(catalog, (str, os.PathLike))
    cat = read_catalog(os.fspath(catalog)) if given else catalog
    entries = select_maps(cat, names, allow_missing=allow_missing)
    present = [e for e in entries if e is not None]
    if not present:
        raise InputError(f"{os.fspath(catalog) if given else cat.path}: none of the run's channels ({', '.join(names[:4])}, ...)")
    data_set = load_catalog(replace(cat, nside=nside, maps=present), nside=nside, nest=True,
                            fwhm_arcmin=fwhm_arcmin)
    rows = np.full((data_set.n_samples, len(names)), np.nan)
    rows[:, [names.index(e.name) for e in present]] = data_set.values.T
    return rows, data_set, entries


def load_preprocessed(catalog, nside, pixels=None, comm=None, fwhm_arcmin=None):
    """Read a catalog's maps (NESTED pixel order) and standardise them.

    Each channel's transform is fitted on all pixels of its full map, while only ``pixels`` are
    kept, so every process of a pixel-sharded job gets the same preprocessing.

    Parameters
    ----------
    catalog : Catalog
    nside : int
    pixels : slice, optional
        The NESTED rows to keep (default all).
    comm : SerialComm or MPIComm, optional
        The ranks read the maps side by side (map i by rank ``i % size``) and fit their
        transforms; every rank gets its block and all transforms (default: this process reads
        everything).

    fwhm_arcmin : float, optional
        Target resolution the maps are smoothed to (see :func:`~galdecomp.catalog.load_catalog`).

    Returns
    -------
    data_set : SkyDataSet
        The kept pixels in physical units (NESTED).
    preprocessor : Preprocessor
    data : ndarray, shape (P_local, C)
        Standardised values, NaN where missing.
    """
    transforms = [None] * len(catalog.maps)

    def fit_transform(i, full, kind):
        e = catalog.maps[i]
        transforms[i] = ChannelTransform.fit(full[np.isfinite(full)], e.transform, e.name,
                                             counts=kind == "counts", asinh_scale=e.asinh_scale)

    data_set = load_catalog(catalog, nside=nside, nest=True, pixels=pixels, on_channel=fit_transform, comm=comm,
                            fwhm_arcmin=fwhm_arcmin)
    if comm is not None:  # each transform was fitted by the rank that read its map
        transforms = [comm.bcast(t, map_reader(i, comm)) for i, t in enumerate(transforms)]
    pre = Preprocessor(transforms, data_set.names)
    return data_set, pre, pre.forward(data_set.values).T.copy()


def noise_floor(preprocessor, data_set, cfg):
    """Per-channel noise floor (standardised): the data set's known noise and ``noise.floor``
    in quadrature.

    The known noise is the catalog's ``noise`` where given, else, with ``noise.poisson_floor``,
    the Poisson noise of photon-count channels (``anscombe``: 1 in its units), else 0.
    """
    noise = getattr(data_set, "noise", None)
    known = preprocessor.noise_to_standardised(np.full(data_set.n_features, np.nan) if noise is None else noise)
    if cfg["noise"].get("poisson_floor", False):
        known = np.where(known > 0, known, preprocessor.poisson_noise())
    return np.sqrt(known ** 2 + cfg["noise"]["floor"] ** 2)


@dataclass
class Prepared:
    """A data set read and preprocessed for one process of a fit.

    Attributes
    ----------
    data_set : DataSet
        This process's rows in physical units.
    preprocessor : Preprocessor
    data : ndarray, shape (P_local, C)
        Standardised values, NaN where missing.
    rows : slice
        This process's rows among all ``n_rows``.
    n_rows : int
    fingerprint : str
        Identifies the data (``--resume`` refuses other data): ``path|...|preprocessing``.
    record : dict
        The ``data`` section of the run's configuration: ``kind``, ``path`` (and ``nside``,
        ``fwhm_arcmin``).
    """

    data_set: object
    preprocessor: object
    data: np.ndarray
    rows: slice
    n_rows: int
    fingerprint: str
    record: dict


class SkySource:
    """The maps of a catalog as the data set of a fit: rows are NESTED pixels, features channels."""

    kind, row_word, feature_word = "sky", "pixels", "channels"
    preset = None

    def __init__(self, catalog_path):
        self.argument = catalog_path
        self.catalog = read_catalog(catalog_path)
        self.path = self.catalog.path

    def resume_command(self, out):
        return f"galdecomp fit {self.argument} --out {out} --resume"

    def prepare(self, cfg, comm):
        """Read this process's pixels at the configured nside and standardise them."""
        from .parallel import row_block

        nside = working_nside(self.catalog, cfg["data"]["nside"])
        target = cfg["data"].get("fwhm_arcmin")
        rows = row_block(nside, comm)
        data_set, pre, data = load_preprocessed(self.catalog, nside, rows, comm if comm.size > 1 else None,
                                                fwhm_arcmin=target)
        beams = "" if target is None else f"fwhm {float(target)!r}|"  # runs without a target: as before
        fingerprint = f"{self.path}|{nside}|{beams}" + json.dumps(pre.to_dict(), sort_keys=True)
        return Prepared(data_set, pre, data, rows, 12 * nside * nside, fingerprint,
                        dict(kind="sky", path=self.path, nside=nside, fwhm_arcmin=target))


class TableSource:
    """A plain table (``.npy``, ``.npz``, ``.csv``; see :func:`galdecomp.datasets.table.read_table`) as
    the data set of a fit: each feature is standardised (``linear`` transform)."""

    kind, row_word, feature_word = "table", "rows", "features"
    #: settings of the data set's kind, under the configuration file's (None: the defaults)
    preset = None

    def __init__(self, path):
        self.argument = path
        self.path = os.path.abspath(path)
        self.table = read_table(path)

    def resume_command(self, out):
        return f"galdecomp fit --data {self.argument} --out {out} --resume"

    def prepare(self, cfg, comm):
        """This process's block of rows, standardised per feature over all rows."""
        from .parallel import block_rows

        if cfg["data"].get("fwhm_arcmin") is not None:
            raise InputError(f"{self.argument}: data.fwhm_arcmin (--fwhm-arcmin) is for a catalog of maps, "
                             f"not a table")
        t = self.table
        pre = Preprocessor([ChannelTransform.fit(v[o], "linear", n) for v, o, n in zip(t.values, t.observed, t.names)],
                           t.names)
        rows = block_rows(t.n_samples, comm)
        local = DataSet(t.values[:, rows], t.observed[:, rows], t.names, t.units)
        digest = hashlib.sha256(np.ascontiguousarray(t.values).tobytes()).hexdigest()[:16]
        fingerprint = f"{self.path}|{t.n_samples}x{t.n_features}|{digest}|" + json.dumps(pre.to_dict(), sort_keys=True)
        return Prepared(local, pre, pre.forward(local.values).T.copy(), rows, t.n_samples, fingerprint,
                        dict(kind="table", path=self.path))


class FashionMNISTSource(TableSource):
    """The 60,000 Fashion-MNIST training images as a table (784 pixel features, one shared
    ``logit`` transform: :func:`galdecomp.datasets.fashion_mnist.image_preprocessor`)."""

    NAME = "fashion-mnist"

    def __init__(self, root=None):
        from .datasets.fashion_mnist import PRESET, load_fashion_mnist

        self.preset = PRESET
        images, _ = load_fashion_mnist("train", root)
        self.argument = self.path = self.NAME
        names = [f"px{i:03d}" for i in range(images.shape[1])]
        self.table = DataSet(images.T.copy(), np.ones(images.T.shape, bool), names, ["1"] * len(names))

    def prepare(self, cfg, comm):
        """This process's block of images, logit-transformed and standardised with one transform."""
        from .datasets.fashion_mnist import image_preprocessor
        from .parallel import block_rows

        t = self.table
        pre = image_preprocessor(t.values.T)
        rows = block_rows(t.n_samples, comm)
        local = DataSet(t.values[:, rows], t.observed[:, rows], t.names, t.units)
        fingerprint = f"{self.NAME}|{t.n_samples}x{t.n_features}|" + json.dumps(pre.to_dict()["px000"], sort_keys=True)
        return Prepared(local, pre, pre.forward(local.values).T.copy(), rows, t.n_samples, fingerprint,
                        dict(kind="table", path=self.NAME))


def is_table(path):
    """Whether ``path`` names a table (``"fashion-mnist"`` or a ``.npy``, ``.npz``, ``.csv`` file)
    rather than a catalog of maps."""
    path = os.fspath(path)
    return path == FashionMNISTSource.NAME or path.lower().endswith(TABLE_FORMATS)


def table_source(path):
    """The source of a table argument: the Fashion-MNIST images for ``"fashion-mnist"``
    (:class:`FashionMNISTSource`), else the table file ``path`` (:class:`TableSource`)."""
    return FashionMNISTSource() if os.fspath(path) == FashionMNISTSource.NAME else TableSource(path)
