"""galdecomp: unsupervised Bayesian decomposition of the multi-frequency sky.

Data flow: catalog -> preprocessing -> model (NIFTy operators) -> inference -> products -> CLI.
The user-level Python API: :func:`fit` and :func:`load`, both giving a
:class:`galdecomp.inference.trained.TrainedModel`.
"""
import os
__version__ = "0.1.0"


def load(run_dir):
    """The trained model of a run folder, a :class:`galdecomp.inference.trained.TrainedModel`.

    ``encode_maps`` gives HEALPix latent maps as ``galdecomp fit`` writes them; ``encode``,
    ``decode``, ``sample``, ``score_rows`` and ``condition`` work on rows x channels in physical
    units (or standardised ones with ``standardised=True``). Read by
    :meth:`galdecomp.run.RunFolder.trained_model`.

    Raises
    ------
    InputError
        The folder holds no finished run, or its files are unreadable.
    """
    from .run import RunFolder

    return RunFolder(run_dir).trained_model()


def __getattr__(name):
    """``galdecomp.TrainedModel`` and ``galdecomp.LatentMaps``, imported on first use."""
    if name == "TrainedModel":
        from .inference.trained import TrainedModel

        return TrainedModel
    if name == "LatentMaps":
        from .inference.latent_maps import LatentMaps

        return LatentMaps
    raise AttributeError(f"module 'galdecomp' has no attribute {name!r}")


def fit(data, out, config=None, resume=False, overwrite=False, comm=None, **settings):
    """Fit the autoencoder and write the run folder ``out``, as ``galdecomp fit`` does.

    The same recipe as the command line (:func:`galdecomp.pipeline.fit_catalog` or
    :func:`~galdecomp.pipeline.fit_table`): same settings, same files, same parameters.

    Parameters
    ----------
    data : str, path-like or dict
        A catalog file (``catalog.yaml``); a table (``.npy``, ``.npz``, ``.csv``, or
        ``"fashion-mnist"``, as ``--data``); or a configuration naming its data set, as a
        run's ``config.yaml`` does (its ``catalog``, else ``data: path``): a YAML file or a
        dict, then also used as the configuration.
    out : str or path-like
        The run folder.
    config : str, path-like or dict, optional
        A configuration (YAML file or dict, as ``--config``); the settings of ``data`` if it
        is one otherwise.
    resume, overwrite : bool
        As ``--resume`` and ``--overwrite``.
    comm : SerialComm or MPIComm, optional
        The processes of the job (default :func:`galdecomp.parallel.world`).
    **settings
        The command line's options by their names: ``nside``, ``latent_dim``, ``covariance``,
        ``beta``, ``seed``, ``max_epochs``, ``threads``, ``posterior`` (a method name),
        ``fwhm_arcmin`` (the target resolution, ``data.fwhm_arcmin``); and
        any other top-level setting of the configuration (e.g. ``decoder={"hidden": [64]}``,
        ``training={"batch_size": 512}``). They override ``config``.

    Returns
    -------
    TrainedModel
        The trained model, read back from ``out`` (:func:`load`).

    Raises
    ------
    InputError
        Bad data, settings or run folder (the command line's one-line errors).
    """
    from .errors import InputError
    from .inference.config import load_config_file
    from .pipeline import fit_overrides, fit_path

    def as_config(c):
        return dict(load_config_file(os.fspath(c)) if isinstance(c, (str, os.PathLike)) else c)

    path = data
    if isinstance(data, dict) or (isinstance(data, (str, os.PathLike))
                                  and os.fspath(data).lower().endswith((".yaml", ".yml"))
                                  and _is_config(os.fspath(data))):
        named = as_config(data)
        where = "fit" if isinstance(data, dict) else os.fspath(data)
        path = named.get("catalog") or (named.get("data") or {}).get("path")
        if not isinstance(path, str):
            raise InputError(f"{where}: the configuration names no data set (no 'catalog' or 'data: path')")
        if config is None:
            config = named
    config = None if config is None else as_config(config)
    if config is not None:
        config.pop("catalog", None)  # written into RUN/config.yaml for the record
    res = fit_path(path, out, fit_overrides(settings), config, resume, overwrite, comm)
    return load(res["run_dir"])


def _is_config(path):
    """True if the YAML file ``path`` is a configuration, not a catalog (which has ``maps``)."""
    from .inference.config import load_config_file

    return os.path.isfile(path) and "maps" not in load_config_file(path)
