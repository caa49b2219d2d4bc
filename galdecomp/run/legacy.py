"""Runs written before ``model.npz`` existed: their trained model from checkpoint.npz, noise.csv
and significance.csv."""
import csv
import json
import os

import numpy as np

from ..errors import InputError
from ..inference.config import resolve_config, with_former_defaults
from ..inference.trained import TrainedModel
from ..model.autoencoder import Autoencoder
from ..preprocessing import Preprocessor

__all__ = ["trained_from_checkpoint", "significance_order"]


def trained_from_checkpoint(run):
    """The TrainedModel of the RunFolder ``run`` of the release before model.npz.

    Raises
    ------
    InputError
        No checkpoint, an unfinished run (no noise.csv), or unreadable files.
    """
    ckpt, noise = run.path("checkpoint"), run.path("noise")
    if not os.path.isfile(ckpt):
        raise InputError(f"{run.dir}: not a galdecomp run folder (no {run.FILES['model']} or "
                         f"{run.FILES['checkpoint']})")
    if not os.path.isfile(noise):
        raise InputError(f"{run.dir}: the run has not finished (no {run.FILES['model']} or {run.FILES['noise']}): "
                         "finish it with `galdecomp fit ... --resume`")
    try:
        with open(ckpt, "rb") as fh, np.load(fh) as f:
            a = {k: f[k] for k in ("best_params", "config", "preprocessing", "fingerprint")}
        cfg = resolve_config(with_former_defaults(json.loads(str(a["config"]))), where=ckpt)
        pre = Preprocessor.from_dict(json.loads(str(a["preprocessing"])))
        with open(noise, newline="") as f:
            rows = list(csv.DictReader(f))
        floor = np.array([float(r["floor_standardised"]) for r in rows])
        units = [r["unit"] for r in rows]
        order = significance_order(run)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{run.dir}: cannot read the run written by an earlier release "
                         f"({type(e).__name__}: {e})".splitlines()[0]) from None
    if len(floor) != len(pre.names):
        raise InputError(f"{noise}: {len(floor)} channels, the model has {len(pre.names)}")
    parts = str(a["fingerprint"]).split("|")
    data = (dict(kind="sky", path=parts[0], nside=int(parts[1]),
                 fwhm_arcmin=(cfg.get("data") or {}).get("fwhm_arcmin")) if len(parts) > 2 else dict(kind="unknown"))
    model = Autoencoder.from_config(cfg, len(pre.names), floor)
    return TrainedModel(model, a["best_params"], pre, cfg, units, data, order)


def significance_order(run):
    """Latent index of feature_01, feature_02, ... from the run's significance.csv (None without it)."""
    path = run.path("significance")
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as f:
        return np.array([int(r["latent_index"]) for r in csv.DictReader(f)])
