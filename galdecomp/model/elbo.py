"""Amortised negative ELBO of the probabilistic autoencoder, one fused NIFTy energy operator."""
import copy

import numpy as np
import nifty8 as ift

from . import noise as _noise
from .likelihood import GaussianLikelihood
from .operators import _PartialConstant, channel_domain
from .families import POSTERIORS
from .posteriors import LatentPosterior
from .settings import ELBOSettings

__all__ = ["AmortisedELBO", "ELBOSettings", "KEYS", "MASK_INPUTS", "encoder_input"]

#: domain keys: encoder excitations, decoder excitations, noise excitations
KEYS = ("encoder", "decoder", "noise")

#: How the encoder is told which entries are missing: ``missing`` feeds ``1 - m`` (0 where
#: observed), ``observed`` feeds ``m`` (the setting of older runs, kept so they resume).
MASK_INPUTS = ("missing", "observed")


def encoder_input(data, mask, mask_input="missing", dtype=np.float64):
    """The encoder's input rows: the data (0 where missing) beside a mask indicator.

    With ``missing`` the indicator is 1 only where an entry is missing, so on complete rows
    those inputs are 0 and their weights get no gradient. With ``observed`` (the mask itself) a
    complete row feeds C constant ones: C redundant biases per hidden unit, each moved by its own
    Adam step, which shook the first layer and lost weak signals (benchmarks/history/2026-12.md,
    "Fourth pass").

    Parameters
    ----------
    data : ndarray, shape (B, C)
        Standardised data; missing entries must be 0.
    mask : ndarray of bool, shape (B, C)
        True where observed.
    mask_input : str
        One of :data:`MASK_INPUTS`.
    dtype : numpy dtype
        Of the result (the encoder's compute dtype: its passes cast their input to it anyway).

    Returns
    -------
    ndarray, shape (B, 2C)
    """
    m = np.asarray(mask, bool)
    indicator = ~m if mask_input == "missing" else m
    return np.concatenate([data, indicator], axis=1, dtype=dtype)


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
        Instance, or a key of :data:`~galdecomp.model.families.POSTERIORS`.
    likelihood : GaussianLikelihood, optional
        The noise model (floor, sigma0, tau; :mod:`.noise`); default ``GaussianLikelihood()``.
    settings : ELBOSettings, optional
        KL weight ``beta``, ``n_total``, ``n_batch``, ``with_prior``, ``mask_input``,
        ``block_rows`` (the row blocks whose partial sums :class:`~galdecomp.inference.objective.ELBOObjective`
        may have computed by worker processes) and the networks' scales; default ``ELBOSettings()``.

    Notes
    -----
    Domain ``{"encoder": UD(n_enc), "decoder": UD(n_dec), "noise": UD(C)}``, target scalar. Per
    block of encoder rows: encoder forward, posterior forward, decoder vjp with the likelihood fused
    into it, posterior backward, encoder backward. The Jacobian is the gradient as a linear
    functional (``ift.VdotOperator``); no metric is provided (use a first-order optimiser).
    """

    def __init__(self, data, mask, xi, encoder, decoder, posterior, likelihood=None, settings=None):
        lik = GaussianLikelihood() if likelihood is None else likelihood
        st = ELBOSettings() if settings is None else settings
        if st.mask_input not in MASK_INPUTS:
            raise ValueError(f"mask_input must be one of {MASK_INPUTS}, got {st.mask_input!r}")
        self._mask_input = st.mask_input
        self._block_rows = max(int(st.block_rows), 1)
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
        self._esc = encoder.init_scales() if st.encoder_scales is None else np.asarray(st.encoder_scales, float)
        self._dsc = decoder.init_scales() if st.decoder_scales is None else np.asarray(st.decoder_scales, float)
        self._floor = np.broadcast_to(np.asarray(lik.floor, np.float64), (C,)).copy()
        self._sigma0, self._tau = float(lik.sigma0), float(lik.tau)
        self._beta = float(st.beta)
        self._batch = self._make_batch(data, mask, xi)
        self._n_batch, self._with_prior = st.n_batch, bool(st.with_prior)
        self._n_total = float(len(self._batch["xi"]) if st.n_total is None else st.n_total)
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
        return {"x": encoder_input(d, mask, self._mask_input, self._enc.dtype), "m": m, "count": m.sum(axis=0),
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

    def for_rows(self, n_batch, beta=None):
        """The same ELBO for a minibatch of ``n_batch`` rows whose blocks are computed elsewhere
        (:meth:`sums` with ``parts`` and the batch of :meth:`counts`)."""
        new = copy.copy(self)
        new._batch, new._n_batch = None, n_batch
        if beta is not None:
            new._beta = float(beta)
        return new

    @staticmethod
    def counts(mask, n_rows, per_row=False):
        """What :meth:`sums` needs of a minibatch beside its blocks' partial sums: observed entries
        per feature (``count``), the mask as floats (``m``, for ``per_row``), the number of rows.

        Parameters
        ----------
        mask : ndarray of bool, shape (B, C)
        n_rows : int
        per_row : bool
        """
        m = mask.astype(np.float64)
        return {"count": m.sum(axis=0), "m": m if per_row else None, "xi": np.empty((n_rows, 0))}

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
    def sums(self, v, batch=None, grad_keys=(), per_row=False, parts=None):
        """Sums over the batch's rows and gradients for ``grad_keys`` (excitation space).

        Parameters
        ----------
        v : dict
            Excitations ``encoder``, ``decoder``, ``noise`` (arrays).
        batch : dict, optional
            Default: the operator's own minibatch.
        grad_keys : sequence of str
        per_row : bool
            Also the per-row terms ``nll_rows`` and ``kl_rows``.
        parts : list of dict, optional
            The blocks' partial sums (:meth:`block_sums` of every one of :meth:`blocks`, in
            order), if computed elsewhere; by default computed here, one block after the other.

        Returns
        -------
        dict
            ``nll``, ``kl`` (sums over the rows), ``prior``, ``B`` (the rows the data terms are
            averaged over), ``grad`` (dict, if ``grad_keys``), ``nll_rows``, ``kl_rows`` (if
            ``per_row``).
        """
        batch = self._batch if batch is None else batch
        want = self.wanted(grad_keys, per_row)
        if parts is None:
            weights = self.prepare(v)
            parts = [self.block_sums(weights, rows, want, batch) for rows in self.blocks(len(batch["xi"]))]
        return self._finish(v, batch, parts, want)

    # -- the pieces of sums, for computing the row blocks elsewhere (other processes) ------------
    def blocks(self, n_rows):
        """Row slices of the blocks whose partial sums are formed separately (``block_rows`` rows;
        one empty block for no rows)."""
        if n_rows <= 0:
            return [slice(0, 0)]
        return [slice(a, min(a + self._block_rows, n_rows)) for a in range(0, n_rows, self._block_rows)]

    @staticmethod
    def wanted(grad_keys=(), per_row=False):
        """What the block sums hold: gradients of ``grad_keys``, per-row terms."""
        return dict(grad=len(grad_keys) > 0, encoder="encoder" in grad_keys, decoder="decoder" in grad_keys,
                    noise="noise" in grad_keys, per_row=bool(per_row))

    def prepare(self, v):
        """The parameters as the block sums use them, from excitations ``v`` (dict of arrays)."""
        # the encoder's weights rounded to its dtype in the product's pass (as astype would)
        theta_e = np.multiply(self._esc, v["encoder"], out=np.empty(self._esc.shape, self._enc.dtype),
                              casting="unsafe")
        theta_d = self._dsc * v["decoder"]
        w, _ = _noise.d_inv_var_ds(v["noise"], self._floor, self._sigma0, self._tau)
        return dict(enc=self._enc.prepare(theta_e), dec=self._dec.prepare(theta_d), theta_d=theta_d, w=w,
                    wt=w.astype(self._dec.dtype))

    def batch_norm(self, n_rows):
        """The number the data terms of a minibatch of ``n_rows`` rows here are divided by (all
        the ranks' rows of the minibatch)."""
        return float(self._n_batch or n_rows)

    def _finish(self, v, batch, parts, want):
        """Terms and gradients from the blocks' partial sums, added in block order (the weights'
        gradients only if ``want`` has ``encoder`` or ``decoder``)."""
        xi_d, s = v["decoder"], v["noise"]
        w, dw = _noise.d_inv_var_ds(s, self._floor, self._sigma0, self._tau)
        acc = {k: _block_order_sum(parts, k) for k in ("rr", "kl", "gw")}
        norm = self.batch_norm(len(batch["xi"]))
        pw = 1.0 if self._with_prior else 0.0
        rr, cnt = acc["rr"], batch["count"]
        out = {"nll": GaussianLikelihood.value_from_sums(rr, cnt, w), "kl": acc["kl"],
               "prior": pw * 0.5 * (xi_d @ xi_d + s @ s), "B": norm}
        if want["per_row"]:
            out["nll_rows"] = (np.concatenate([p["nll_rows"] for p in parts])
                               + GaussianLikelihood.log_norm_rows(batch["m"], w))
            out["kl_rows"] = np.concatenate([p["kl_rows"] for p in parts])
        if want["grad"]:
            out["grad"], out["grad_flat"] = self._gradient(v, parts, want, norm, acc, cnt, w, dw)
        return out

    def _gradient(self, v, parts, want, norm, acc, cnt, w, dw):
        """The wanted gradients (dict) as views of one flat array ``[encoder | decoder | noise]``
        of the wanted parts, and that array (``acc``: the blocks' sums of ``rr`` and ``gw``)."""
        s = v["noise"]
        ne, nd = len(self._esc), len(self._dsc)
        sizes = {"encoder": ne, "decoder": nd, "noise": len(s)}
        flat = np.empty(sum(n for k, n in sizes.items() if want[k]))
        g, i = {}, 0
        for k, n in sizes.items():
            if want[k]:
                g[k], i = flat[i:i + n], i + n
        for k, lo in (("encoder", 0), ("decoder", ne)):
            if want[k]:
                self.weight_gradient(v, parts, slice(lo, lo + sizes[k]), g[k], norm)
        if want["noise"]:
            pw = 1.0 if self._with_prior else 0.0
            gw = GaussianLikelihood.grad_inv_var_from_sums(acc["rr"], cnt, w) + acc["gw"]
            g["noise"][:] = gw * dw / norm + pw * s / self._n_total
        return g, flat

    def weight_gradient(self, v, parts, span, out, norm):
        """The networks' gradient (excitation space) on ``span`` of ``[encoder | decoder]``.

        Parameters
        ----------
        v : dict
            Excitations (``decoder`` is read, for its prior term).
        parts : list of dict
            The blocks' partial sums (:meth:`block_sums`, with ``gte`` and ``gtd``), added here in
            block order.
        span : slice
            Positions in the concatenation ``[encoder | decoder]`` of the parameters (step 1).
        out : ndarray, shape (span's length,)
            Written. The arithmetic is elementwise, so any split of the positions gives the bits
            of the whole (worker processes each take a span).
        norm : float
            The rows the data terms are averaged over (:meth:`batch_norm`).
        """
        ne = len(self._esc)
        pw = 1.0 if self._with_prior else 0.0
        a, b = span.start, span.stop
        if a < ne:  # the encoder's positions in the span
            e = slice(a, min(b, ne))
            g = out[:e.stop - a]
            np.multiply(self._esc[e], _block_order_sum(parts, "gte", e), out=g)
            g /= norm
        if b > ne:  # the decoder's
            d = slice(max(a, ne) - ne, b - ne)
            g = out[d.start + ne - a:]
            np.multiply(self._dsc[d], _block_order_sum(parts, "gtd", d), out=g)
            g /= norm
            g += np.multiply(pw, v["decoder"][d]) / self._n_total

    def block_sums(self, weights, rows, want, batch=None):
        """Partial sums of one row block ``rows`` (a slice of the batch; default the operator's).

        Per block of encoder rows: encoder forward, posterior forward, decoder vjp with the
        likelihood fused into it, posterior backward, encoder backward.

        Returns
        -------
        dict
            ``rr`` (C,) sums of squared masked residuals; ``kl`` the block's KL sum; ``gw`` (C,)
            the posterior's gradient with respect to the inverse variances; ``gtd`` (decoder) and
            ``gte`` (encoder) parameter gradients or None; ``nll_rows``, ``kl_rows`` (``per_row``).
        """
        batch = self._batch if batch is None else batch
        dec, post = self._dec, self._post
        w, wt, theta_d = weights["w"], weights["wt"], weights["theta_d"]
        n_rows = rows.stop - rows.start
        C = len(w)
        acc = {"rr": np.zeros(C), "kl": 0.0, "gw": np.zeros(C),
               "gtd": np.zeros(dec.n_params) if want["decoder"] else None}
        if want["per_row"]:
            acc["nll_rows"], acc["kl_rows"] = np.empty(n_rows), np.empty(n_rows)
        m_all, dc, mc, xi = (batch[k][rows] for k in ("m", "dc", "mc", "xi"))

        def enc_cb(e_blk, sl):
            n = sl.stop - sl.start
            iv = m_all[sl] * w
            z, kl, ctx = post.forward(np.asarray(e_blk, np.float64), xi[sl], dec, theta_d, iv)
            acc["kl"] += kl.sum()
            if want["per_row"]:
                acc["kl_rows"][sl] = kl

            def dec_cb(y, sl2):
                r = slice(sl.start + sl2.start, sl.start + sl2.stop)
                np.subtract(y, dc[r], out=y)
                y *= mc[r]
                acc["rr"] += np.einsum("ij,ij->j", y, y, dtype=np.float64)
                if want["per_row"]:
                    acc["nll_rows"][r] = 0.5 * ((y.astype(np.float64) ** 2) @ w)
                if want["grad"]:
                    y *= wt
                return y

            if not want["grad"]:
                dec.vjp(weights["dec"], z, dec_cb, want_theta=False, want_x=False, return_y=False)
                return None
            _, g_dec, g_z = dec.vjp(weights["dec"], z, dec_cb, want_theta=want["decoder"], want_x=True,
                                    return_y=False)
            g_enc_out, g_dec_post, g_inv_var = post.backward(ctx, g_z, np.full(n, self._beta))
            if want["decoder"]:
                acc["gtd"] += g_dec if g_dec_post is None else g_dec + g_dec_post
            if g_inv_var is not None:
                acc["gw"] += np.einsum("ij,ij->j", m_all[sl], g_inv_var)
            return g_enc_out

        _, acc["gte"], _ = self._enc.vjp(weights["enc"], batch["x"][rows], enc_cb, want_theta=want["encoder"],
                                         want_x=False, return_y=False)
        return acc

    def value_of(self, t):
        """The energy from :meth:`sums`' result."""
        return (t["nll"] + self._beta * t["kl"]) / t["B"] + t["prior"] / self._n_total

    def apply(self, x):
        self._check_input(x)
        v = self._values(x)
        if x.jac is None:
            return ift.Field.scalar(self.value_of(self.sums(v)))
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
        t = self.sums(self._values(position), grad_keys=self._domain.keys())
        g = ift.MultiField.from_dict(
            {k: ift.makeField(self._domain[k], a) for k, a in t["grad"].items()}, self._domain)
        terms = {"nll": t["nll"] / t["B"], "kl": t["kl"] / t["B"], "prior": t["prior"] / self._n_total}
        return self.value_of(t), g, terms

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
        t = self.sums(self._values(position), self._batch_for(data, mask, xi), per_row=per_row)
        out = {"nll": t["nll"] / t["B"], "kl": t["kl"] / t["B"], "prior": t["prior"] / self._n_total,
               "value": self.value_of(t)}
        if per_row:
            out["nll_rows"], out["kl_rows"] = t["nll_rows"], t["kl_rows"]
        return out

    def evaluate(self, position, data=None, mask=None, xi=None):
        """Energy value (no gradient), optionally on another batch (e.g. a validation set)."""
        return self.value_of(self.sums(self._values(position), self._batch_for(data, mask, xi)))

    def __repr__(self):
        return (f"AmortisedELBO(B={len(self._batch['xi'])}, posterior={self._post.name!r}, "
                f"beta={self._beta}, variable={list(self._domain.keys())})")


def _block_order_sum(parts, key, span=None):
    """``parts[0][key] + parts[1][key] + ...`` (restricted to ``span``) in block order: a fresh sum
    of the first two blocks, the later ones added into it, so the bits do not depend on which
    process computed a block or summed a span."""
    get = (lambda p: p[key]) if span is None else (lambda p: p[key][span])
    total = get(parts[0])
    if len(parts) > 1:
        total = total + get(parts[1])
    for p in parts[2:]:
        if np.ndim(total) > 0:
            total += get(p)
        else:
            total = total + get(p)
    return total
