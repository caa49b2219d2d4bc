"""The latent density a run samples from: the prior (:class:`PriorDensity`), or the transform
fitted to the aggregate posterior (:mod:`galdecomp.model.latent_transform`; a run keeps it in its
folder, :meth:`galdecomp.run.RunFolder.read_transform`)."""

__all__ = ["PriorDensity"]


class PriorDensity:
    """A LatentPrior with the density interface of :mod:`galdecomp.model.latent_transform`."""

    def __init__(self, prior, latent_dim):
        self.prior, self.latent_dim = prior, latent_dim

    def log_density(self, z):
        return self.prior.log_density(z)

    def sample(self, n, rng):
        return self.prior.sample(n, self.latent_dim, rng)
