"""The latent density a run samples from: the prior, or the transform fitted to the aggregate
posterior and kept in ``RUN/latent_transform.npz``."""
import os

import numpy as np

from ..errors import InputError
from ..fileio import atomic_path

__all__ = ["TRANSFORM_FILE", "PriorDensity", "read_transform", "write_transform"]

#: the latent transform inside a run folder
TRANSFORM_FILE = "latent_transform.npz"


class PriorDensity:
    """A LatentPrior with the density interface of :mod:`galdecomp.model.latent_transform`."""

    def __init__(self, prior, latent_dim):
        self.prior, self.latent_dim = prior, latent_dim

    def log_density(self, z):
        return self.prior.log_density(z)

    def sample(self, n, rng):
        return self.prior.sample(n, self.latent_dim, rng)


def read_transform(run_dir):
    """The latent density of ``run_dir/latent_transform.npz``, or None without one."""
    from ..model.latent_transform import load_density

    path = os.path.join(run_dir, TRANSFORM_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fh, np.load(fh) as f:
            return load_density(dict(f))
    except Exception as e:
        raise InputError(f"{path}: not a galdecomp latent transform or unreadable "
                         f"({type(e).__name__}: {e})".splitlines()[0]) from None


def write_transform(run_dir, density):
    """Write ``run_dir/latent_transform.npz`` atomically; returns its path."""
    path = os.path.join(run_dir, TRANSFORM_FILE)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **density.to_arrays())
    return path
