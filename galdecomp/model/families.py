"""The registry of latent posterior families: name (the ``covariance`` setting) -> class."""
from .fisher import FisherGaussian
from .posteriors import DiagonalGaussian

__all__ = ["POSTERIORS"]

#: name -> :class:`~galdecomp.model.posteriors.LatentPosterior` subclass
POSTERIORS = {"diagonal": DiagonalGaussian, "fisher": FisherGaussian}
