"""Amortised negative ELBO of the probabilistic autoencoder, one fused NIFTy energy operator."""
import copy

import numpy as np
import nifty8 as ift

from . import noise as _noise
from .likelihood import GaussianLikelihood
from .operators import _PartialConstant, channel_domain
from .posteriors import POSTERIORS, LatentPosterior

__all__ = ["AmortisedELBO", "KEYS", "MASK_INPUTS", "encoder_input"]

#: domain keys: encoder excitations, decoder excitations, noise excitations
KEYS = ("encoder", "decoder", "noise")

#: How the encoder is told which entries are missing: ``missing`` feeds ``1 - m`` (0 where
#: observed), ``observed`` feeds ``m`` (runs before the fourth fit-quality pass, 2026-12-04).
MASK_INPUTS = ("missing", "observed")


def encoder_input(data, mask, mask_input="missing"):
    """The encoder's input rows: the data (0 where missing) beside a mask indicator.

    With ``missing`` the indicator is 1 only where an entry is missing, so on complete rows
    those inputs are 0 and their weights get no gradient. With ``observed`` (the mask itself) a
    complete row feeds C constant ones: C redundant biases per hidden unit, each moved by its own
    Adam step, which shook the first layer and lost weak signals (benchmarks/README.md,
    "Fourth pass").

    Parameters
    ----------
    data : ndarray, shape (B, C)
        Standardised data; missing entries must be 0.
    mask : ndarray of bool, shape (B, C)
        True where observed.
    mask_input : str
        One of :data:`MASK_INPUTS`.

    Returns
    -------
    ndarray, shape (B, 2C)
    """
    m = np.asarray(mask, bool)
    indicator = ~m if mask_input == "missing" else m
    return np.concatenate([data, indicator.astype(np.float64)], axis=1)


class AmortisedELBO(_PartialConstant, ift.EnergyOperator):
    """Negative ELBO per row of a minibatch, value and gradient in one blocked pass.

    ``E = (1/B) sum_i [NLL_i + beta KL_i] + (1/n_total) (0.5 |xi_dec|^2 + 0.5 |s|^2)`` with
    ``NLL_i = 0.5 sum_c m_ic [(d_ic - f(z_i)_c)^2 / sigma_c^2 + log(2 pi sigma_c^2)]``,
    ``z_i`` the posterior's reparameterised sample for the fixed draw ``xi_i`` and
    ``KL_i = KL[q(z_i | d_i) || N(0, 1)]``. The encoder parameters are variational parameters
    (no prior term); all three inputs are excitations (``theta = scales * excitation``; the noise
    excitation ``s`` as in :mod:`.noise`).

    Parameters
    ----------
    data : ndarray (B, C)
        Minibatch; missing entries may hold anything (they are zeroed).
    mask : ndarray (B, C) of bool
        True where observed.
    xi : ndarray (B, L)
        Standard-normal draws for the reparameterisation.
    encoder : MLP
        Input :func:`encoder_input` (2C columns), output ``posterior.n_encoder_outputs(L)``.
    decoder : MLP
        L -> C.
    posterior : LatentPosterior or str
        Instance, or a key of :data:`~galdecomp.model.posteriors.POSTERIORS`.
    floor, sigma0, tau
        Noise model (:mod:`.noise`).
    beta : float
        KL weight.
    n_total : int, optional
        Rows in the full training set (scales the prior terms); default B.
    encoder_scales, decoder_scales : ndarray, optional
        Default ``init_scales()`` of the networks.
    n_batch : int, optional
        Rows the data terms are averaged over; default B. A pixel-sharded minibatch uses the
        global batch size, so that the ranks' energies add up to the global one.
    with_prior : bool
        Include the prior terms (one rank of a sharded energy only).
    mask_input : str
        How the encoder sees which entries are observed (:func:`encoder_input`).

    Notes
    -----
    Domain ``{"encoder": UD(n_enc), "decoder": UD(n_dec), "noise": UD(C)}``, target scalar. Per
    block of encoder rows: encoder forward, posterior forward, decoder vjp with the likelihood fused
    into it, posterior backward, encoder backward. The Jacobian is the gradient as a linear
    functional (``ift.VdotOperator``); no metric is provided (use a first-order optimiser).
    """

    def __init__(self, data, mask, xi, encoder, decoder, posterior, floor=0.0,
                 sigma0=_noise.SIGMA0, tau=_noise.TAU, beta=1.0, n_total=None,
                 encoder_scales=None, decoder_scales=None, n_batch=None, with_prior=True,
                 mask_input="missing"):
        if mask_input not in MASK_INPUTS:
            raise ValueError(f"mask_input must be one of {MASK_INPUTS}, got {mask_input!r}")
        self._mask_input = mask_input
        self._post = POSTERIORS[posterior]() if isinstance(posterior, str) else posterior
        if not isinstance(self._post, LatentPosterior):
            raise TypeError(f"posterior must be a LatentPosterior, got {type(posterior)}")
        self._enc, self._dec = encoder, decoder
        C, L = decoder.n_out, decoder.n_in
        if encoder.n_in != 2 * C:
            raise ValueError(f"encoder needs {2 * C} inputs (data and mask), has {encoder.n_in}")
        if encoder.n_out != self._post.n_encoder_outputs(L):
            raise ValueError(f"encoder needs {self._post.n_encoder_outputs(L)} outputs for "
                             f"posterior {self._post.name!r}, has {encoder.n_out}")
        self._esc = encoder.init_scales() if encoder_scales is None else np.asarray(encoder_scales, float)
        self._dsc = decoder.init_scales() if decoder_scales is None else np.asarray(decoder_scales, float)
        self._floor = np.broadcast_to(np.asarray(floor, np.float64), (C,)).copy()
        self._sigma0, self._tau = float(sigma0), float(tau)
        self._beta = float(beta)
        self._batch = self._make_batch(data, mask, xi)
        self._n_batch, self._with_prior = n_batch, bool(with_prior)
        self._n_total = float(len(self._batch["xi"]) if n_total is None else n_total)
        self._domain = self._full_domain = ift.MultiDomain.make({
            "encoder": channel_domain(encoder.n_params),
            "decoder": channel_domain(decoder.n_params),
            "noise": channel_domain(C)})

    # -- setup --------------------------------------------------------------------------------
    def _make_batch(self, data, mask, xi):
        C, L = self._dec.n_out, self._dec.n_in
        data, mask = np.asarray(data, np.float64), np.asarray(mask, bool)
        xi = np.asarray(xi, np.float64)
        if data.ndim != 2 or data.shape[1] != C or mask.shape != data.shape:
            raise ValueError(f"data and mask must be (B, {C}), got {data.shape}, {mask.shape}")
        if xi.shape != (len(data), L):
            raise ValueError(f"xi must be ({len(data)}, {L}), got {xi.shape}")
        d = np.where(mask, data, 0.0)
        m = mask.astype(np.float64)
        dt = self._dec.dtype
        return {"x": encoder_input(d, mask, self._mask_input), "m": m, "count": m.sum(axis=0),
                "dc": d.astype(dt), "mc": m.astype(dt), "xi": xi}

    def with_batch(self, data, mask, xi, n_batch=None, beta=None):
        """The same ELBO (networks, noise settings, constants) on another minibatch.

        ``beta``, if given, replaces the KL weight (e.g. during a KL warm-up).
        """
        new = copy.copy(self)
        new._batch = self._make_batch(data, mask, xi)
        new._n_batch = n_batch
        if beta is not None:
            new._beta = float(beta)
        return new

    @property
    def encoder(self):
        return self._enc

    @property
    def decoder(self):
        return self._dec

    @property
    def posterior(self):
        return self._post

    @property
    def encoder_scales(self):
        return self._esc

    @property
    def decoder_scales(self):
        return self._dsc

    @property
    def beta(self):
        return self._beta

    @property
    def n_total(self):
        return self._n_total

    # -- kernel -------------------------------------------------------------------------------
    def _run(self, v, batch, grad_keys=(), per_row=False):
        """Sums and gradients over ``batch``; gradients for ``grad_keys`` (excitation space)."""
        enc, dec, post = self._enc, self._dec, self._post
        theta_e, xi_d, s = self._esc * v["encoder"], v["decoder"], v["noise"]
        theta_d = self._dsc * xi_d
        w, dw = _noise.d_inv_var_ds(s, self._floor, self._sigma0, self._tau)
        wt = w.astype(dec.dtype)
        B, C = batch["m"].shape
        norm = float(self._n_batch or B)
        pw = 1.0 if self._with_prior else 0.0
        grad = len(grad_keys) > 0
        want_d = "decoder" in grad_keys
        acc = {"rr": np.zeros(C), "kl": 0.0, "gw": np.zeros(C),
               "gtd": np.zeros(dec.n_params) if want_d else None}
        rows_nll = np.empty(B) if per_row else None
        rows_kl = np.empty(B) if per_row else None

        def enc_cb(e_blk, sl):
            n = sl.stop - sl.start
            iv = batch["m"][sl] * w
            z, kl, ctx = post.forward(np.asarray(e_blk, np.float64), batch["xi"][sl], dec,
                                      theta_d, iv)
            acc["kl"] += kl.sum()
            if per_row:
                rows_kl[sl] = kl

            def dec_cb(y, sl2):
                rows = slice(sl.start + sl2.start, sl.start + sl2.stop)
                np.subtract(y, batch["dc"][rows], out=y)
                y *= batch["mc"][rows]
                acc["rr"] += np.einsum("ij,ij->j", y, y, dtype=np.float64)
                if per_row:
                    rows_nll[rows] = 0.5 * ((y.astype(np.float64) ** 2) @ w)
                if grad:
                    y *= wt
                return y

            if not grad:
                dec.vjp(theta_d, z, dec_cb, want_theta=False, want_x=False, return_y=False)
                return None
            _, gtd, gz = dec.vjp(theta_d, z, dec_cb, want_theta=want_d, want_x=True,
                                 return_y=False)
            g_e, gtd2, giv = post.backward(ctx, gz, np.full(n, self._beta))
            if want_d:
                acc["gtd"] += gtd if gtd2 is None else gtd + gtd2
            if giv is not None:
                acc["gw"] += np.einsum("ij,ij->j", batch["m"][sl], giv)
            return g_e

        _, gte, _ = enc.vjp(theta_e, batch["x"], enc_cb, want_theta="encoder" in grad_keys,
                            want_x=False, return_y=False)
        rr, cnt = acc["rr"], batch["count"]
        out = {"nll": GaussianLikelihood.value_from_sums(rr, cnt, w), "kl": acc["kl"],
               "prior": pw * 0.5 * (xi_d @ xi_d + s @ s), "B": norm}
        if per_row:
            out["nll_rows"] = rows_nll + GaussianLikelihood.log_norm_rows(batch["m"], w)
            out["kl_rows"] = rows_kl
        if grad:
            g = {}
            if "encoder" in grad_keys:
                g["encoder"] = self._esc * gte / norm
            if want_d:
                g["decoder"] = self._dsc * acc["gtd"] / norm + pw * xi_d / self._n_total
            if "noise" in grad_keys:
                gw = GaussianLikelihood.grad_inv_var_from_sums(rr, cnt, w) + acc["gw"]
                g["noise"] = gw * dw / norm + pw * s / self._n_total
            out["grad"] = g
        return out

    def _value(self, t):
        return (t["nll"] + self._beta * t["kl"]) / t["B"] + t["prior"] / self._n_total

    def apply(self, x):
        self._check_input(x)
        v = self._values(x)
        if x.jac is None:
            return ift.Field.scalar(self._value(self._run(v, self._batch)))
        value, g, _ = self.value_gradient_terms(x.val)
        return x.new(ift.Field.scalar(value), ift.VdotOperator(g))

    def value_gradient_terms(self, position):
        """Value, gradient and terms in one pass (what :meth:`apply` with a Linearization computes).

        Parameters
        ----------
        position : MultiField
            On the operator's domain.

        Returns
        -------
        value : float
        gradient : MultiField
            On the variable part of the domain.
        terms : dict
            ``nll``, ``kl`` (batch means) and ``prior`` (prior term / n_total), as :meth:`terms`.
        """
        t = self._run(self._values(position), self._batch, self._domain.keys())
        g = ift.MultiField.from_dict(
            {k: ift.makeField(self._domain[k], a) for k, a in t["grad"].items()}, self._domain)
        terms = {"nll": t["nll"] / t["B"], "kl": t["kl"] / t["B"], "prior": t["prior"] / self._n_total}
        return self._value(t), g, terms

    # -- logging / validation -----------------------------------------------------------------
    def _batch_for(self, data, mask, xi):
        if data is None:
            return self._batch
        if mask is None:
            mask = np.isfinite(data)
        if xi is None:
            xi = np.zeros((len(data), self._dec.n_in))
        return self._make_batch(data, mask, xi)

    def terms(self, position, data=None, mask=None, xi=None, per_row=False):
        """Terms of the energy, per row.

        Parameters
        ----------
        position : MultiField
            On the operator's domain.
        data, mask, xi : ndarray, optional
            Another batch (default: the operator's own). ``mask`` defaults to ``isfinite(data)``,
            ``xi`` to zeros (the posterior mean sample for the diagonal family).
        per_row : bool
            Also return ``nll_rows`` and ``kl_rows`` (arrays of length B).

        Returns
        -------
        dict
            ``nll`` and ``kl``: batch means; ``prior``: prior term / n_total; ``value`` =
            ``nll + beta kl + prior``.
        """
        t = self._run(self._values(position), self._batch_for(data, mask, xi), per_row=per_row)
        out = {"nll": t["nll"] / t["B"], "kl": t["kl"] / t["B"], "prior": t["prior"] / self._n_total,
               "value": self._value(t)}
        if per_row:
            out["nll_rows"], out["kl_rows"] = t["nll_rows"], t["kl_rows"]
        return out

    def evaluate(self, position, data=None, mask=None, xi=None):
        """Energy value (no gradient), optionally on another batch (e.g. a validation set)."""
        return self._value(self._run(self._values(position), self._batch_for(data, mask, xi)))

    def __repr__(self):
        return (f"AmortisedELBO(B={len(self._batch['xi'])}, posterior={self._post.name!r}, "
                f"beta={self._beta}, variable={list(self._domain.keys())})")
