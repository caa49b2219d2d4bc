"""Fit configuration: defaults, YAML files and command-line overrides, validated in one place.

The resolved configuration is written to RUN/config.yaml; ``galdecomp fit CATALOG --config
RUN/config.yaml`` reproduces the run.
"""
import copy

import yaml

from ..errors import InputError
from .minibatches import MINIBATCH_KINDS

__all__ = ["merge_settings", "DEFAULTS", "DATA_KINDS", "POSTERIOR_METHODS", "ROTATION_METHODS", "resolve_config",
           "load_config_file", "model_signature",
           "with_former_defaults"]

#: Every setting of a fit, with its default.
DEFAULTS = {
    "latent_dim": 10,
    "covariance": "diagonal",      # diagonal | fisher
    "beta": 1.0,                   # weight of the KL term of the ELBO
    "seed": 0,
    "data": {                      # the data set the run is trained on (a record, set by the fit)
        "kind": None,              # sky | table
        "path": None,              # the catalog or table file
        "nside": None,             # sky: working resolution (None: the catalog's); also `nside:`
        "fwhm_arcmin": None,       # sky: target resolution, Gaussian FWHM in arcmin (None: maps as they are)
    },
    "decoder": {"hidden": [128, 128], "activation": "tanh"},
    "encoder": {"hidden": [128, 128], "activation": "tanh",
                "output_scale": 1.0,    # initial excitations of the encoder's output layer x this
                "mask_input": "missing"},  # missing: inputs 1 where a channel is missing | observed: the mask
    "noise": {
        "sigma0": 0.5,             # prior median of the adaptive noise (standardised units)
        "tau": 1.0,                # prior width of log sigma (e-folds)
        "floor": 0.001,            # floor added in quadrature to the catalog's noise (standardised units)
        "poisson_floor": True,     # photon counts without a catalog noise: their Poisson noise as known noise
    },
    "posterior": {
        "method": "amortised",     # amortised | mgvi | geovi (NIFTy, after training; decoder fixed)
        "n_samples": 2,            # antithetic sample pairs per MGVI/geoVI iteration
        "iterations": 3,           # optimize_kl iterations
    },
    "transform": {
        "method": "gaussianising",  # gaussianising | gmm | gaussian | none: latent density fitted after training
    },
    "rotation": {
        "method": "varimax",        # none | varimax: orthogonal rotation of the latent maps chosen after training
    },
    "training": {
        "batch_size": 1024,
        "minibatches": "shuffled",  # shuffled | stratified: one row of each of batch_size runs of rows (even MPI load)
        "max_epochs": 200,
        "learning_rate": 2e-3,     # Adam step (on the weights and log sigma, or on the excitations: step_on)
        "step_on": "weights",      # weights: steps of learning_rate on the weights and log sigma | excitations (theta = scale * xi)
        "min_learning_rate": 1e-5,
        "schedule": "cosine",      # plateau (halve on a validation plateau) | cosine (to min_learning_rate)
        "schedule_epochs": None,   # cosine: epochs of the decay (None: max_epochs of the first run)
        "kl_warmup_epochs": 10,    # KL weight rises linearly from 0 to beta over these epochs
        "lr_factor": 0.5,           # plateau: learning-rate reduction on a validation plateau
        "lr_patience": 8,          # plateau: epochs without improvement before reducing the learning rate
        "patience": 20,            # plateau: epochs without improvement before stopping early
        "validation_fraction": 0.1,
        "select": "median",        # median | mean: per-row validation ELBO statistic that picks the kept parameters
        "dtype": "float32",        # MLP kernels: float32 | float64 (sums, Adam and products stay float64)
        "fisher_dtype": None,      # covariance fisher(-scaled): its Jacobian passes in training (None: as dtype)
        "block_rows": 512,         # rows per block of a minibatch: partial sums per block, added in block order
        "threads": None,           # threads of execution of a one-process fit (None: every core it may use; MPI: 1)
        "checkpoint_seconds": 600,  # also checkpoint inside an epoch after this long (0: every step)
    },
}

_CHOICES = {"covariance": ("diagonal", "fisher", "fisher-scaled")}
POSTERIOR_METHODS = ("amortised", "mgvi", "geovi")
TRANSFORM_METHODS = ("gaussianising", "gmm", "gaussian", "none")
ROTATION_METHODS = ("none", "varimax")
#: Settings that define the model and its optimisation path: a run can only be resumed with them
#: unchanged (the posterior method is applied after training and may change on --resume).
#: The data set (``data``, with the sky's nside) is not among them: the checkpoint's fingerprint of
#: the data guards it.
_MODEL_KEYS = ("latent_dim", "covariance", "beta", "seed", "decoder", "encoder", "noise", "training")
#: Kinds of data set a run can be trained on.
DATA_KINDS = ("sky", "table")
#: Training settings that only govern how long training runs, how often it is checkpointed or how
#: many cores compute it (not the result): ``--resume`` may change them (e.g. a larger max_epochs
#: trains a finished run longer).
_DURATION_KEYS = ("max_epochs", "patience", "checkpoint_seconds", "threads")


def _nside_into_data(settings):
    """``settings`` with a top-level ``nside`` (configuration files before the ``data`` section,
    ``--nside``) moved to ``data.nside``."""
    if not settings or "nside" not in settings:
        return settings
    settings = dict(settings)
    nside = settings.pop("nside")
    if nside is not None:
        data = settings.get("data")
        settings["data"] = {**(data if isinstance(data, dict) else {}), "nside": nside}
    return settings


def merge_settings(base, new, where="config"):
    """``base`` (nested dict) updated by ``new``, recursively; a key of ``new`` not in ``base``
    is an :class:`~galdecomp.errors.InputError` naming it (``where``: the message's prefix)."""
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if k not in base:
            raise InputError(f"{where}: unknown setting '{k}'")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise InputError(f"{where}: '{k}' must be a mapping")
            out[k] = merge_settings(base[k], v, f"{where}: {k}")
        else:
            out[k] = v
    return out


def load_config_file(path):
    """Read a YAML configuration file into a dict (no validation)."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except yaml.YAMLError:
        raise InputError(f"{path}: not valid YAML") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a config file must be a mapping of settings")
    return doc


def _positive_int(cfg, key, where):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError(f"{where}: {key} must be a positive integer, got {v!r}")


def _positive(cfg, key, where, allow_zero=False):
    v = cfg[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise InputError(f"{where}: {key} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"number, got {v!r}")


def resolve_config(file_config=None, overrides=None, where="config"):
    """Defaults, updated by a config file's settings, then by command-line overrides.

    Parameters
    ----------
    file_config : dict, optional
        Settings from a YAML file (nested like ``DEFAULTS``); a top-level ``nside`` is
        ``data.nside``; a top-level ``versions`` (the record in a run's config.yaml) is ignored.
    overrides : dict, optional
        Top-level settings from the command line (``None`` values are ignored; ``nside`` is
        ``data.nside``).
    where : str
        Name of the source for error messages.

    Returns
    -------
    dict
        The full, validated configuration.
    """
    if file_config and "versions" in file_config:  # a run's record of the versions that wrote it
        file_config = {k: v for k, v in file_config.items() if k != "versions"}
    cfg = merge_settings(DEFAULTS, _nside_into_data(file_config), where)
    cfg = merge_settings(cfg, _nside_into_data({k: v for k, v in (overrides or {}).items() if v is not None}), where)
    if cfg["data"]["kind"] not in (None,) + DATA_KINDS:
        raise InputError(f"{where}: data.kind must be one of {', '.join(DATA_KINDS)}, got {cfg['data']['kind']!r}")
    if cfg["data"]["fwhm_arcmin"] is not None:
        _positive(cfg["data"], "fwhm_arcmin", f"{where}: data")
    _positive_int(cfg, "latent_dim", where)
    for k, choices in _CHOICES.items():
        if cfg[k] not in choices:
            raise InputError(f"{where}: {k} must be one of {', '.join(choices)}, got {cfg[k]!r}")
    _positive(cfg, "beta", where)
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise InputError(f"{where}: seed must be a non-negative integer, got {cfg['seed']!r}")
    for part in ("decoder", "encoder"):
        hidden = cfg[part]["hidden"]
        if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
            raise InputError(f"{where}: {part}.hidden must be a list of positive integers, got {hidden!r}")
        from ..model.mlp import ACTIVATIONS
        if cfg[part]["activation"] not in ACTIVATIONS:
            raise InputError(f"{where}: {part}.activation must be one of {', '.join(ACTIVATIONS)}")
    if cfg["posterior"]["method"] not in POSTERIOR_METHODS:
        raise InputError(f"{where}: posterior.method must be one of {', '.join(POSTERIOR_METHODS)}, "
                         f"got {cfg['posterior']['method']!r}")
    _positive_int(cfg["posterior"], "n_samples", f"{where}: posterior")
    _positive_int(cfg["posterior"], "iterations", f"{where}: posterior")
    _positive(cfg["noise"], "sigma0", f"{where}: noise")
    _positive(cfg["noise"], "tau", f"{where}: noise")
    _positive(cfg["noise"], "floor", f"{where}: noise", allow_zero=True)
    if not isinstance(cfg["noise"]["poisson_floor"], bool):
        raise InputError(f"{where}: noise.poisson_floor must be true or false, got {cfg['noise']['poisson_floor']!r}")
    _positive(cfg["encoder"], "output_scale", f"{where}: encoder")
    from ..model.elbo import MASK_INPUTS
    if cfg["encoder"]["mask_input"] not in MASK_INPUTS:
        raise InputError(f"{where}: encoder.mask_input must be one of {', '.join(MASK_INPUTS)}, "
                         f"got {cfg['encoder']['mask_input']!r}")
    if cfg["transform"]["method"] not in TRANSFORM_METHODS:
        raise InputError(f"{where}: transform.method must be one of {', '.join(TRANSFORM_METHODS)}, "
                         f"got {cfg['transform']['method']!r}")
    if cfg["rotation"]["method"] not in ROTATION_METHODS:
        raise InputError(f"{where}: rotation.method must be one of {', '.join(ROTATION_METHODS)}, "
                         f"got {cfg['rotation']['method']!r}")
    _check_training(cfg["training"], where)
    return cfg


def _check_training(t, where):
    """Validate the ``training`` section ``t`` of a merged configuration (fills ``schedule_epochs``)."""
    if t["step_on"] not in ("weights", "excitations"):
        raise InputError(f"{where}: training.step_on must be weights or excitations, got {t['step_on']!r}")
    if t["select"] not in ("median", "mean"):
        raise InputError(f"{where}: training.select must be median or mean, got {t['select']!r}")
    if t["minibatches"] not in MINIBATCH_KINDS:
        raise InputError(f"{where}: training.minibatches must be one of {', '.join(MINIBATCH_KINDS)}, "
                         f"got {t['minibatches']!r}")
    if t["schedule"] not in ("plateau", "cosine"):
        raise InputError(f"{where}: training.schedule must be plateau or cosine, got {t['schedule']!r}")
    if isinstance(t["kl_warmup_epochs"], bool) or not isinstance(t["kl_warmup_epochs"], int) \
            or t["kl_warmup_epochs"] < 0:
        raise InputError(f"{where}: training.kl_warmup_epochs must be a non-negative integer")
    for k in ("batch_size", "max_epochs", "lr_patience", "patience", "block_rows"):
        _positive_int(t, k, f"{where}: training")
    if t["threads"] is not None:
        _positive_int(t, "threads", f"{where}: training")
    if t["schedule_epochs"] is None:
        t["schedule_epochs"] = t["max_epochs"]
    _positive_int(t, "schedule_epochs", f"{where}: training")
    for k in ("learning_rate", "min_learning_rate", "lr_factor"):
        _positive(t, k, f"{where}: training")
    _positive(t, "checkpoint_seconds", f"{where}: training", allow_zero=True)
    if not 0 < t["validation_fraction"] < 0.5:
        raise InputError(f"{where}: training.validation_fraction must be in (0, 0.5)")
    if t["dtype"] not in ("float64", "float32"):
        raise InputError(f"{where}: training.dtype must be float64 or float32")
    if t["fisher_dtype"] not in (None, "float64", "float32"):
        raise InputError(f"{where}: training.fisher_dtype must be float64, float32 or null")


def model_signature(cfg):
    """The part of a configuration that must match for ``--resume``.

    Returns
    -------
    dict
        The settings of ``_MODEL_KEYS``, with the training settings as ``training.<key>`` and
        without those of ``_DURATION_KEYS``.
    """
    sig = {k: cfg[k] for k in _MODEL_KEYS if k != "training"}
    sig.update({f"training.{k}": v for k, v in cfg["training"].items() if k not in _DURATION_KEYS})
    return sig


#: Settings added since the first runs, with the values that reproduce the runs written before them.
_FORMER_DEFAULTS = {"encoder": {"output_scale": 0.1, "mask_input": "observed"}, "noise": {"poisson_floor": False},
                    "training": {"schedule": "plateau", "kl_warmup_epochs": 0, "step_on": "excitations",
                                 "select": "mean", "block_rows": 1024, "fisher_dtype": "float64"}}


#: Sections a stored configuration predates, as they were then (a run without ``rotation`` had none).
_FORMER_SECTIONS = {"rotation": {"method": "none"}}


def with_former_defaults(stored):
    """A stored run configuration with the settings it predates filled in as they were then."""
    if isinstance(stored, dict) and "latent_dim" in stored:  # a resolved configuration, not a partial file
        for part, values in _FORMER_SECTIONS.items():
            stored.setdefault(part, dict(values))
    for part, values in _FORMER_DEFAULTS.items():
        if isinstance(stored.get(part), dict):
            for k, v in values.items():
                stored[part].setdefault(k, v)
    return stored
