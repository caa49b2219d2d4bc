"""A trained model as an object: read, encode, decode, sample, score, condition.

Shapes (rows x features, as everywhere): data and masks (P, C) in physical units unless
``standardised=True``; latents (P, L) in the model's own latent order (the run's FITS columns
feature_01, feature_02, ... are the latents ``feature_order[0], feature_order[1], ...``);
posterior standard deviations (P, L); covariances (P, L, L) only where asked for.
:meth:`TrainedModel.encode_maps` gives HEALPix maps instead: (L, npix), features in the run's
significance order.

:meth:`TrainedModel.save` writes one file (``RUN/model.npz``, where
:class:`galdecomp.run.RunFolder` puts it): the trained parameters, the noise floor, the resolved
configuration, the preprocessing, channel names and units, the data set it was trained on, the
order of the features by significance and the versions of galdecomp and its main dependencies
that wrote it (``versions``, JSON); :meth:`TrainedModel.read` reads it back. A run folder's model
is read with :func:`galdecomp.load` (:meth:`galdecomp.run.RunFolder.trained_model`).
"""
import json

import numpy as np

from ..errors import InputError
from ..fileio import atomic_path
from ..model.autoencoder import Autoencoder
from ..model.prior import STANDARD_NORMAL
from ..preprocessing import Preprocessor
from ..versions import versions as current_versions
from .conditional import latent_map
from .latent_density import PriorDensity
from .latent_maps import encode_maps
from .config import resolve_config, with_former_defaults

__all__ = ["TrainedModel"]


def _bad(path, why):
    return InputError(f"{path}: {why}")


class TrainedModel:
    """A trained probabilistic autoencoder with its preprocessing.

    Parameters
    ----------
    model : Autoencoder
    params : ndarray
        Trained parameters (excitations).
    preprocessor : Preprocessor
        Physical <-> standardised, per channel.
    config : dict
        Resolved fit configuration.
    units : list of str
        Physical unit per channel.
    data : dict
        The data set the model was trained on: ``kind`` (``"sky"`` or ``"table"``), ``path``,
        and for a sky ``nside``.
    feature_order : ndarray of int, shape (L,), optional
        Latent index (of ``z @ rotation``) of feature_01, feature_02, ...; default 0..L-1.
    rotation : ndarray, shape (L, L), optional
        Orthogonal ``R`` (default the identity): :meth:`encode_maps`, as the run's maps, gives
        ``z @ R``; every other method works in the model's own latents ``z``.

    Attributes
    ----------
    prior : LatentPrior
        The training prior, N(0, 1).
    transform : object or None
        A density fitted to the aggregate posterior (:mod:`galdecomp.model.latent_transform`:
        ``log_density``, ``sample``; a transform also ``forward``/``inverse``); a run's, read from
        its folder by :func:`galdecomp.load`; None without one.
    versions : dict or None
        The versions of galdecomp, Python, numpy, scipy, nifty8 and healpy that wrote the
        loaded ``model.npz`` (:func:`galdecomp.versions.versions`); None for a model not read
        from a file or written before they were recorded.
    """

    versions = None

    def __init__(self, model, params, preprocessor, config, units, data, feature_order=None, rotation=None):
        self.model, self.params = model, np.asarray(params, dtype=float)
        self.preprocessor, self.config = preprocessor, config
        self.names, self.units = list(preprocessor.names), list(units)
        self.data = dict(data)
        L = model.latent_dim
        self.feature_order = np.arange(L) if feature_order is None else np.asarray(feature_order, int)
        self.prior = STANDARD_NORMAL
        self.transform = None
        self.rotation = np.eye(L) if rotation is None else np.asarray(rotation, dtype=float)

    @property
    def latent_dim(self):
        return self.model.latent_dim

    @property
    def n_features(self):
        return self.model.n_features

    @property
    def sigma(self):
        """Noise standard deviation per channel (standardised units), shape (C,)."""
        return self.model.sigma(self.params)

    # -- reading and saving --------------------------------------------------------------------
    @classmethod
    def read(cls, path):
        """The trained model of a model file written by :meth:`save` (without a latent transform).

        Raises
        ------
        InputError
            The file is unreadable or not a galdecomp model.
        """
        try:
            with open(path, "rb") as fh, np.load(fh) as f:
                a = dict(f)
            cfg = resolve_config(with_former_defaults(json.loads(str(a["config"]))), where=path)
            pre = Preprocessor.from_dict(json.loads(str(a["preprocessing"])))
            model = Autoencoder.from_config(cfg, len(pre.names), a["floor"])
            model_ok = a["params"].shape == (model.n_params,)
            out = cls(model, a["params"], pre, cfg, [str(u) for u in a["units"]], json.loads(str(a["data"])),
                      a["feature_order"], rotation=a.get("rotation"))
            out.versions = json.loads(str(a["versions"])) if "versions" in a else None
        except InputError:
            raise
        except Exception as e:  # a damaged or foreign file: zipfile, json, a missing key
            raise _bad(path, f"not a galdecomp model or unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
        if not model_ok:
            raise _bad(path, "parameters do not match the configuration")
        return out

    def save(self, path):
        """Write the model file ``path`` (a run's ``model.npz``) atomically; returns ``path``."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, params=self.params, floor=self.model.floor, config=json.dumps(self.config),
                         preprocessing=json.dumps(self.preprocessor.to_dict()),
                         units=np.array(self.units, dtype=str), data=json.dumps(self.data),
                         feature_order=self.feature_order, rotation=self.rotation,
                         versions=json.dumps(current_versions()))
        return path

    # -- the data set ----------------------------------------------------------------------------
    def target_fwhm(self, fwhm_arcmin=None, say=None):
        """The target resolution to read maps at for this run: ``fwhm_arcmin``, else the run's
        ``data.fwhm_arcmin`` (None: maps as they are).

        Parameters
        ----------
        fwhm_arcmin : float, optional
            A target asked for explicitly; ``say`` is called with a warning when it differs
            from the run's (the model was trained at the run's).
        say : callable, optional

        Returns
        -------
        float or None
        """
        own = self.data.get("fwhm_arcmin")
        if fwhm_arcmin is None or fwhm_arcmin == own:
            return own
        if say is not None:
            trained = f"fwhm {own:g} arcmin" if own is not None else "the maps' own resolutions"
            say(f"warning: maps smoothed to fwhm {fwhm_arcmin:g} arcmin, the run was trained at {trained}")
        return fwhm_arcmin

    def load_rows(self, path=None, fwhm_arcmin=None):
        """The rows of the run's data set (or of another of the same kind) in physical units.

        Parameters
        ----------
        path : str, optional
            Another data set of the run's kind instead of the one it was trained on: a catalog
            (sky runs; maps matched to the run's channels by name, at the run's nside, in the
            catalog's frame) or a table with the same features (table runs).
        fwhm_arcmin : float, optional
            Sky runs: the target resolution the maps are smoothed to (default: the run's,
            ``data.fwhm_arcmin``; none for a run without one).

        Returns
        -------
        ndarray, shape (P, C)
            NaN where missing; rows in the order the run was trained on (NESTED pixels).
        """
        from ..sources import channel_rows, table_source

        kind = self.data.get("kind")
        if kind == "table":
            ds = table_source(path or self.data["path"]).table
            if ds.names != self.names:
                raise InputError(f"{path or self.data['path']}: features {', '.join(ds.names[:4])}... are not "
                                 f"the run's ({', '.join(self.names[:4])}...)")
            return ds.values.T
        if kind != "sky":
            raise InputError(f"{path or self.data.get('path')}: reading a data set of kind {kind!r} "
                             f"is not supported")
        target = self.data.get("fwhm_arcmin") if fwhm_arcmin is None else fwhm_arcmin
        return channel_rows(path or self.data["path"], self.names, int(self.data["nside"]), target)[0]

    # -- units ---------------------------------------------------------------------------------
    def standardise(self, values):
        """Physical values (P, C) to standardised values (NaN stays NaN)."""
        return self.preprocessor.forward(np.asarray(values, dtype=float).T).T

    def physical(self, values):
        """Standardised values (P, C) to physical units."""
        return self.preprocessor.inverse(np.asarray(values, dtype=float).T).T

    def _rows(self, data, mask, standardised):
        """Standardised data with missing entries zeroed, and the mask (both (P, C))."""
        data = np.atleast_2d(np.asarray(data, dtype=float))
        if data.shape[1] != self.n_features:
            raise ValueError(f"data must have {self.n_features} columns ({', '.join(self.names)}), "
                             f"got {data.shape[1]}")
        y = data if standardised else self.standardise(data)
        mask = np.isfinite(y) if mask is None else np.asarray(mask, bool) & np.isfinite(y)
        return np.where(mask, y, 0.0), mask

    # -- the model -----------------------------------------------------------------------------
    def encode(self, data, mask=None, standardised=False, full_cov=False, cov_rows=None):
        """The encoder's posterior q(z | d) of every row: mean and standard deviation.

        Computed in row blocks; the covariances of all rows (P x L x L, 10 GB at nside 1024
        with L = 10) only on request.

        Parameters
        ----------
        data : ndarray, shape (P, C)
            NaN where missing.
        mask : ndarray of bool, shape (P, C), optional
            True where observed (default: finite entries).
        standardised : bool
            ``data`` is in standardised units (else physical).
        full_cov : bool
            Return the covariances (P, L, L) instead of the standard deviations.
        cov_rows : array of int, optional
            Also return the covariances of these rows only (K, L, L).

        Returns
        -------
        mean : ndarray, shape (P, L)
        std : ndarray, shape (P, L)
            Marginal standard deviations; with ``full_cov`` instead ``cov`` (P, L, L).
        cov_at_rows : ndarray, shape (K, L, L)
            Only with ``cov_rows``.
        """
        y, m = self._rows(data, mask, standardised)
        return self.model.posterior_moments(self.params, y, m, full_cov=full_cov, cov_rows=cov_rows)

    def encode_maps(self, maps, nest=True, input_nest=False, allow_missing=False):
        """HEALPix maps of the latent features of a sky, as ``galdecomp fit`` writes them.

        Features in the run's significance order (feature_01, feature_02, ...: the columns of
        ``RUN/latent_mean.fits`` and ``latent_std.fits``); on the run's own catalog the same
        numbers. These are the encoder's posterior q(z | d) (a run fitted with
        ``--posterior mgvi|geovi`` writes its samples' moments instead).

        Parameters
        ----------
        maps : str, path-like, dict or ndarray
            A catalog file (maps matched to the run's channels by name, read at the run's
            nside as the fit reads them); or ``{channel name: HEALPix map}``; or an array
            (C, npix) in the run's channel order (:attr:`names`). Arrays: physical units (the
            catalog's), one nside, NaN or ``healpy.UNSEEN`` where missing; encoded at their
            own nside.
        nest : bool
            Pixel ordering of the result: NESTED (default, as the run's FITS files) or RING.
        input_nest : bool
            Arrays are NESTED (default RING, as ``healpy.read_map`` returns them).
        allow_missing : bool
            A run channel absent from ``maps`` is missing in every pixel (the encoder uses the
            channels observed in each pixel); default: an error.

        Returns
        -------
        LatentMaps
            ``mean``, ``std`` (L, npix), ``names``, ``nside``, ``nest``, ``latent_index``.

        Raises
        ------
        InputError
            The run was not fitted to a sky; a channel unknown to the run, or missing (without
            ``allow_missing``); maps of different sizes or not HEALPix.
        """
        return encode_maps(self, maps, nest, input_nest, allow_missing)

    def decode(self, z, physical=True):
        """Decoder output ``f(z)`` for latents (P, L): physical units, or standardised."""
        f = self.model.decode(self.params, np.atleast_2d(np.asarray(z, dtype=float)))
        return self.physical(f) if physical else f

    def latent_log_density(self, z, source="prior"):
        """``log p(z)`` under the prior (``"prior"``) or the fitted transform (``"transformed"``), (N,)."""
        return self._latent_source(source).log_density(np.asarray(z, dtype=float))

    def _latent_source(self, source):
        if source == "prior":
            return PriorDensity(self.prior, self.latent_dim)
        if source == "transformed":
            if self.transform is None:
                raise InputError("the run has no latent transform: fit one with `galdecomp transform RUN`")
            return self.transform
        raise ValueError(f"source must be 'prior' or 'transformed', got {source!r}")

    def sample(self, n, rng, noise=True, source=None):
        """Generate data: ``z`` from the fitted transform or the prior, ``d = f(z) (+ noise)``.

        Parameters
        ----------
        n : int
        rng : numpy.random.Generator
        noise : bool
            Add the model's noise.
        source : {"transformed", "prior"}, optional
            ``z = T^-1(u)``, ``u ~ N(0, 1)`` (a density without inverse samples itself), or
            ``z ~ N(0, 1)``. Default: ``"transformed"`` if the run has a latent transform (as
            ``galdecomp sample``), else ``"prior"``.

        Returns
        -------
        dict
            ``z`` (n, L); ``standardised`` (n, C); ``physical`` (n, C).
        """
        if source is None:
            source = "prior" if self.transform is None else "transformed"
        z = self._latent_source(source).sample(int(n), rng)
        f = self.decode(z, physical=False)
        if noise:
            f = self.model.likelihood.sample(f, self.params[self.model.slices["noise"]], rng)
        return dict(z=z, standardised=f, physical=self.physical(f))

    def score_rows(self, data, mask=None, standardised=False, xi=None):
        """Per-row terms of the ELBO under the encoder's posterior.

        Parameters
        ----------
        data, mask, standardised
            As for :meth:`encode`.
        xi : ndarray, shape (P, L), optional
            Standard-normal draws of the reparameterised sample ``z``; default 0 (the
            posterior mean).

        Returns
        -------
        dict of ndarray, shape (P,)
            ``nll``: ``-log p(d | z)`` over the observed entries; ``kl``: ``KL[q || prior]``;
            ``elbo``: ``-(nll + beta kl)``; ``chi2``: ``sum_c m_c (d_c - f(mean)_c)^2 / sigma_c^2``;
            ``n_observed``: observed entries.
        """
        y, m = self._rows(data, mask, standardised)
        P, L = len(y), self.latent_dim
        xi = np.zeros((P, L)) if xi is None else np.asarray(xi, dtype=float)
        op = self.model.elbo(y, m, xi, P)
        t = op.terms(self.model.position(self.params, op.domain), per_row=True)
        mean = self.model.posterior_moments(self.params, y, m)[0]
        s = self.params[self.model.slices["noise"]]
        chi2 = self.model.likelihood.chi2_rows(y, m, self.decode(mean, physical=False), s)
        return dict(nll=t["nll_rows"], kl=t["kl_rows"], elbo=-(t["nll_rows"] + self.model.beta * t["kl_rows"]),
                    chi2=chi2, n_observed=m.sum(axis=1))

    def recalibrated_sigma(self, data, mask=None, standardised=False):
        """Noise per channel re-estimated from the residuals at the conditioned posterior's MAP.

        Training fits ``sigma`` to the residuals under the encoder's q (its spread and amortisation
        gap included); a predictive built from the MAP, the Laplace covariance and that sigma counts
        the latent uncertainty twice. This is the residual variance at the MAP of every row (given
        all its observed entries, with the model's sigma), corrected for the degrees of freedom
        the latents use: ``sigma_c^2 = sum_p m_pc r_pc^2 / sum_p m_pc (1 - h_pc)`` with the leverage
        ``h_pc = (J M^-1 J^T)_cc / sigma_c^2``; at least the noise floor.

        Returns
        -------
        ndarray, shape (C,)
            Standardised units.
        """
        from ..model.fisher import jacobian_forward

        from .predictive import CONDITION_ROWS

        y, m = self._rows(data, mask, standardised)
        theta, dec = self.model.split(self.params)[1], self.model.decoder
        squares, dof = 0.0, 0.0
        for a in range(0, len(y), CONDITION_ROWS):  # the Laplace covariances of one chunk of rows at a time
            c = slice(a, a + CONDITION_ROWS)
            res = self.condition(y[c], m[c], standardised=True)
            f, J, _ = jacobian_forward(theta, dec.sizes, dec.activation, res["mean"])
            lev = m[c] / self.sigma ** 2 * np.einsum("pcl,plk,pck->pc", J, res["cov"], J)
            squares = squares + (m[c] * (y[c] - f) ** 2).sum(0)
            dof = dof + (m[c] * (1.0 - lev)).sum(0)
        var = squares / np.maximum(dof, 1.0)
        return np.maximum(np.sqrt(var), self.model.floor)

    def condition(self, data, mask=None, standardised=False, extra_noise=None, n_samples=0, seed=0,
                  iterations=100, sigma=None):
        """The latent posterior p(z | y) given only the observed entries of each row.

        Not the encoder's q: the MAP of ``-log p(y | z) - log N(z; 0, 1)`` (damped Gauss-Newton from
        the encoder's mean) and the Fisher/Laplace covariance ``M^-1``, ``M = J^T W J + 1``
        (:func:`galdecomp.inference.conditional.latent_map`).

        Parameters
        ----------
        data, mask, standardised
            As for :meth:`encode`.
        extra_noise : ndarray, shape (C,) or (P, C), optional
            Known noise added to the model's, standardised units (in quadrature).
        n_samples : int
            If > 0, also ``2 n_samples`` MGVI samples from NIFTy started at the MAP.
        seed : int
            Seed of the MGVI samples.
        iterations : int
            Gauss-Newton steps at most.
        sigma : ndarray, shape (C,), optional
            Noise per channel instead of the model's (e.g. :meth:`recalibrated_sigma`).

        Returns
        -------
        dict
            ``mean`` (P, L) MAP; ``cov`` (P, L, L); ``std`` (P, L); ``converged`` (P,) bool;
            ``samples`` (2 n_samples, P, L) if requested.
        """
        y, m = self._rows(data, mask, standardised)
        var = (self.sigma if sigma is None else np.asarray(sigma, float)) ** 2 + \
            (0.0 if extra_noise is None else np.asarray(extra_noise, float) ** 2)
        inv_var = m / var
        start = self.model.posterior_moments(self.params, y, m)[0]
        res = latent_map(self.model.decoder, self.model.split(self.params)[1], y, inv_var, start,
                         iterations=iterations)
        res["std"] = np.sqrt(np.einsum("pii->pi", res["cov"]))
        if n_samples > 0:
            from .mgvi import latent_posterior_samples

            res["samples"] = latent_posterior_samples(self.model, self.params, y, m, res["mean"], "mgvi",
                                                      n_samples, 1, seed=seed)
        return res
