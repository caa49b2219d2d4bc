"""Random streams: one ``numpy.random.SeedSequence`` tree per seed, children named by keys.

``stream(seed, *names)`` is the generator of the node ``seed / names[0] / names[1] / ...``:
``SeedSequence(seed, spawn_key=(key(names[0]), key(names[1]), ...))`` with ``key`` the CRC-32
of a string name (an integer name is its own key). A stream depends only on the seed and its
names, never on which other streams were drawn, or in which order.

The tree (who draws from which node):

==============================  ==============================================================
``model / init``                 :meth:`galdecomp.model.autoencoder.Autoencoder.init_params`
``training / split``             :func:`galdecomp.inference.minibatches.split_rows`
``training / minibatches``       minibatch order and reparameterisation draws
                                 (:class:`~galdecomp.inference.training.TrainingState`)
``training / validation``        the fixed draws of the validation ELBO (``train``)
``mgvi / <first row>``           NIFTy's draws for MGVI/geoVI on one rank
                                 (:func:`galdecomp.inference.mgvi.latent_posterior_samples`)
``report / resampling``          block bootstrap and permutations (``BlockResampler``)
``report / rotations``           random rotations of the rotation null (``BlockResampler``)
``report / split``               the held-out block split (``block_split``)
``report / r2``                  subsamples of the held-out R^2 (``heldout_r2``)
``report / baselines``           the pixels ICA/NMF are fit on (``linear_baselines``)
``reconstruct / calibration``    the entries hidden and the draws of the predictive's calibration
                                 (``galdecomp.products.reconstruct``)
``<field name>``                 the simulated sky's fields and noise
                                 (:func:`galdecomp.simulation.fields.rng_for`: ``gas_clouds``,
                                 ``noise/<channel>``, ...)
==============================  ==============================================================

Older products draw from streams seeded by ``[seed, salt, ...]`` instead of a node of the tree;
they keep them, so that their files stay what they were, under the names of :data:`SALTS`
(``salted(seed, name, *more)``):

==============================  ==============================================================
``generate/draws``               the latent draws of ``transform`` (``products.generate``)
``generate/samples``             the generated rows of the sample-quality table (``generate``)
``posterior_check/pixels``       the pixels ``posterior-check`` checks
``posterior_check/importance``   its importance draws, one stream per candidate q (``more``: i)
``posterior_check/metropolis``   its Metropolis cross-check
==============================  ==============================================================
"""
import zlib

import numpy as np

__all__ = ["SALTS", "salted", "seed_sequence", "stream"]

#: name -> the salt after the seed of a stream of :func:`salted` (numbers of the products'
#: first releases; a new stream takes a node of the tree instead)
SALTS = {"generate/draws": 8101, "generate/samples": 8102, "posterior_check/pixels": 11,
         "posterior_check/importance": 17, "posterior_check/metropolis": 23}


def _key(name):
    """The spawn key of one name: CRC-32 of a string, an integer itself."""
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        return int(name)
    return zlib.crc32(str(name).encode("utf-8"))


def seed_sequence(seed, *names):
    """The node ``seed / names...`` of the seed tree.

    Parameters
    ----------
    seed : int
        Non-negative root seed.
    *names : str or int
        Path of the node below the root.

    Returns
    -------
    numpy.random.SeedSequence
    """
    return np.random.SeedSequence(int(seed), spawn_key=tuple(_key(n) for n in names))


def stream(seed, *names):
    """A generator for the node ``seed / names...`` (see :func:`seed_sequence`).

    Returns
    -------
    numpy.random.Generator
    """
    return np.random.default_rng(seed_sequence(seed, *names))


def salted(seed, name, *more):
    """The generator ``default_rng([seed, SALTS[name], *more])`` of an older product's stream.

    Parameters
    ----------
    seed : int
    name : str
        A key of :data:`SALTS`.
    *more : int
        Further entropy (e.g. the index of one of several streams).

    Returns
    -------
    numpy.random.Generator
    """
    return np.random.default_rng([int(seed), SALTS[name], *(int(m) for m in more)])
