"""The registry of latent posterior families: name (the ``covariance`` setting) -> class."""
from .fisher import FisherGaussian, ScaledFisherGaussian
from .posteriors import DiagonalGaussian

__all__ = ["POSTERIORS"]

#: name -> :class:`~galdecomp.model.posteriors.LatentPosterior` subclass
POSTERIORS = {"diagonal": DiagonalGaussian, "fisher": FisherGaussian, "fisher-scaled": ScaledFisherGaussian}
