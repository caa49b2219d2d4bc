"""NIFTy8 operators around the numpy MLP kernels: decoder, masked Gaussian likelihood, noise model.

Rows (pixels or images) live on a caller-given 1-D NIFTy domain (``ift.HPSpace(nside)`` for the
sky, ``ift.UnstructuredDomain(n)`` otherwise); channels and network widths are
``ift.UnstructuredDomain``. Network parameters enter as standard-normal excitations
``xi`` with ``theta = scales * xi``.

Holding some inputs constant (``simplify_for_constant_input``) returns a copy of the same
operator class with the constants stored (where NIFTy's chain needs them inserted, the residual
and geoVI's transformation, public operators do it: ``PartialExtractor(...).adjoint``, ``Adder``).
The only private names written are ``_domain`` / ``_target`` (and ``_capability`` of linear
operators), which is how NIFTy's documentation has a custom operator declare its spaces.
"""
import copy

import numpy as np
import nifty8 as ift

from . import noise as _noise
from .likelihood import GaussianLikelihood

__all__ = ["MLPOperator", "MaskedGaussianEnergy", "DecoderLikelihood", "NoiseInvVar",
           "channel_domain", "rows_domain"]


def rows_domain(row_domain, n_features):
    """``DomainTuple(row_domain, UnstructuredDomain(n_features))`` for a 1-D row domain."""
    row = ift.DomainTuple.make(row_domain)
    if len(row) != 1 or len(row.shape) != 1:
        raise ValueError(f"row domain must be one 1-D domain, got {row}")
    return ift.DomainTuple.make((row[0], ift.UnstructuredDomain(int(n_features))))


def channel_domain(n):
    """``DomainTuple(UnstructuredDomain(n))``."""
    return ift.DomainTuple.make(ift.UnstructuredDomain(int(n)))


class _PartialConstant:
    """Mixin: holding keys of a MultiDomain constant gives a shallow copy that stores them.

    Subclasses read inputs through ``self._values(x)`` (constants merged in) and compute
    derivatives only for the keys in ``self._domain``.
    """
    _const = {}

    def _fields(self, x):
        return x.val if x.jac is not None else x

    def _values(self, x):
        fld = self._fields(x)
        out = dict(self._const)
        out.update({k: fld[k].val for k in fld.keys()})
        return out

    def _insertion(self):
        """The operator from the variable keys to the full domain that inserts the constants
        (None if there are none): the variable fields embedded (the adjoint of NIFTy's
        ``PartialExtractor``, zeros at the constant keys) plus the constants (zeros at the
        variable keys). Built from public operators only; exact, as adding zeros is."""
        if not self._const:
            return None
        full = self._full_domain
        cst = ift.MultiField.from_dict({k: ift.makeField(full[k], self._const[k]) if k in self._const
                                        else ift.full(full[k], 0.0) for k in full.keys()}, full)
        return ift.Adder(cst) @ ift.PartialExtractor(full, self._domain).adjoint

    def _simplify_for_constant_input_nontrivial(self, c_inp):
        new = copy.copy(self)
        new._const = {**self._const, **{k: c_inp[k].val for k in c_inp.keys()}}
        new._domain = ift.MultiDomain.make(
            {k: d for k, d in self._domain.items() if k not in c_inp.keys()})
        new._after_partial()
        return None, new

    def _after_partial(self):
        pass


class _LikelihoodPartial(_PartialConstant):
    """Partial-constant support for LikelihoodEnergyOperators (transformation, residual)."""

    def _after_partial(self):
        """The residual and the metric's square root on the variable keys, through NIFTy's own
        constructor (the operator's name kept)."""
        ins, name = self._insertion(), self.name
        res = None if self._res_full is None else self._res_full @ ins
        ift.LikelihoodEnergyOperator.__init__(self, res, lambda x: self._sqrt_metric_full(
            ift.MultiField.from_dict({**self._fields_of(x), **{
                k: ift.makeField(self._full_domain[k], v) for k, v in self._const.items()}})))
        self.name = name

    @property
    def residual_full(self):
        """The data residual operator on the full (constants included) domain, or None."""
        return self._res_full

    @staticmethod
    def _fields_of(x):
        x = x.val if isinstance(x, ift.Linearization) else x
        return {k: x[k] for k in x.keys()}

    def get_transformation(self):
        dt, trafo = self._transformation()
        ins = self._insertion()
        return dt, (trafo if ins is None else trafo @ ins)


# ------------------------------------------------------------------------------------------
class MLPOperator(_PartialConstant, ift.Operator):
    """An :class:`~galdecomp.model.mlp.MLP` applied to every row of a field.

    Parameters
    ----------
    mlp : MLP
    row_domain : Domain
        1-D domain of the rows.
    input_key, weights_key : str
        Keys of the input field (rows x n_in) and of the weight excitations (n_params).
    scales : ndarray, shape (n_params,), optional
        Prior scales, ``theta = scales * xi``; default ``mlp.init_scales()``.

    Notes
    -----
    Domain ``{input_key: (row, UD(n_in)), weights_key: UD(n_params)}``, target
    ``(row, UD(n_out))``. The Jacobian recomputes the forward pass in blocks (jvp for ``times``,
    vjp for ``adjoint_times``); no activations are stored.
    """

    def __init__(self, mlp, row_domain, input_key="input", weights_key="weights", scales=None):
        self._mlp = mlp
        self._scales = mlp.init_scales() if scales is None else np.asarray(scales, np.float64)
        if self._scales.shape != (mlp.n_params,):
            raise ValueError(f"scales must have shape ({mlp.n_params},)")
        self._input_key, self._weights_key = str(input_key), str(weights_key)
        self._domain = self._full_domain = ift.MultiDomain.make({
            self._input_key: rows_domain(row_domain, mlp.n_in),
            self._weights_key: channel_domain(mlp.n_params)})
        self._target = rows_domain(row_domain, mlp.n_out)

    @property
    def mlp(self):
        return self._mlp

    @property
    def scales(self):
        return self._scales

    def apply(self, x):
        self._check_input(x)
        v = self._values(x)
        theta, inp = self._scales * v[self._weights_key], v[self._input_key]
        y = ift.makeField(self._target, self._mlp.forward(theta, inp))
        if x.jac is None:
            return y
        return x.new(y, self.jacobian(theta, inp))

    def jacobian(self, theta, inp):
        """Jacobian at parameters ``theta`` (not excitations) and input ``inp``, over the variable keys."""
        return _MLPJacobian(self._domain, self._target, self._mlp, self._scales, theta, inp,
                            self._input_key, self._weights_key)

    def __repr__(self):
        return f"MLPOperator({self._mlp}, variable={list(self._domain.keys())})"


class _MLPJacobian(ift.LinearOperator):
    """Jacobian of :class:`MLPOperator` (``times`` = jvp, ``adjoint_times`` = vjp)."""

    def __init__(self, domain, target, mlp, scales, theta, inp, input_key, weights_key):
        self._domain, self._target = domain, target
        self._capability = self.TIMES | self.ADJOINT_TIMES
        self._mlp, self._sc, self._theta, self._inp = mlp, scales, theta, inp
        self._input_key, self._weights_key = input_key, weights_key

    def apply(self, x, mode):
        self._check_input(x, mode)
        dom = self._domain
        has_weights, has_input = self._weights_key in dom.keys(), self._input_key in dom.keys()
        if mode == self.TIMES:
            dth = self._sc * x[self._weights_key].val if has_weights else None
            dx = x[self._input_key].val if has_input else None
            return ift.makeField(self._target, self._mlp.jvp(self._theta, self._inp, dth, dx)[1])
        _, gth, gx = self._mlp.vjp(self._theta, self._inp, x.val, want_theta=has_weights, want_x=has_input,
                                   return_y=False)
        out = {}
        if has_weights:
            out[self._weights_key] = ift.makeField(dom[self._weights_key], self._sc * gth)
        if has_input:
            out[self._input_key] = ift.makeField(dom[self._input_key], gx)
        return ift.MultiField.from_dict(out, dom)


# ------------------------------------------------------------------------------------------
class NoiseInvVar(ift.Operator):
    """Noise excitations ``s`` (channels) -> inverse variances ``1 / sigma_c**2`` (see :mod:`.noise`).

    Parameters
    ----------
    domain : Domain
        Channel domain.
    floor : float or ndarray (C,)
    sigma0, tau : float
    """

    def __init__(self, domain, floor=0.0, sigma0=_noise.SIGMA0, tau=_noise.TAU):
        self._domain = self._target = ift.DomainTuple.make(domain)
        self._floor = np.broadcast_to(np.asarray(floor, np.float64), self._domain.shape).copy()
        self._sigma0, self._tau = float(sigma0), float(tau)

    def apply(self, x):
        self._check_input(x)
        s = (x.val.val if x.jac is not None else x.val)
        w, dw = _noise.d_inv_var_ds(s, self._floor, self._sigma0, self._tau)
        w = ift.makeField(self._target, w)
        if x.jac is None:
            return w
        return x.new(w, ift.makeOp(ift.makeField(self._domain, dw)))


class _NoiseSetup:
    """Shared data/mask/noise handling of the likelihood operators."""

    def _setup_data(self, data, mask, row_domain, likelihood):
        """The data and mask as arrays, the domains, and the noise model of ``likelihood``
        (a GaussianLikelihood; default no floor, :mod:`.noise`'s sigma0 and tau)."""
        lik = GaussianLikelihood() if likelihood is None else likelihood
        if isinstance(data, ift.Field):
            row_domain = data.domain[0] if row_domain is None else row_domain
            data = data.val
        data = np.asarray(data, np.float64)
        if data.ndim != 2:
            raise ValueError(f"data must be (rows, channels), got shape {data.shape}")
        mask = np.isfinite(data) if mask is None else np.asarray(mask, bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} != data shape {data.shape}")
        if row_domain is None:
            row_domain = ift.UnstructuredDomain(data.shape[0])
        self._pdom = rows_domain(row_domain, data.shape[1])
        if self._pdom.shape != data.shape:
            raise ValueError(f"row domain {row_domain} does not match {data.shape[0]} rows")
        self._cdom = channel_domain(data.shape[1])
        self._data = np.where(mask, data, 0.0)
        self._mask = mask.astype(np.float64)
        self._count = self._mask.sum(axis=0)
        self._floor = np.broadcast_to(np.asarray(lik.floor, np.float64), (data.shape[1],)).copy()
        if np.any(self._floor < 0):
            raise ValueError("noise floor must be >= 0")
        self._sigma0, self._tau = float(lik.sigma0), float(lik.tau)
        self._likelihood = GaussianLikelihood(self._floor, self._sigma0, self._tau)

    def _noise(self, s):
        return _noise.d_inv_var_ds(s, self._floor, self._sigma0, self._tau)

    def _noise_fisher(self, s):
        """Fisher information of the noise excitations (:meth:`GaussianLikelihood.noise_fisher`)."""
        return self._likelihood.noise_fisher(self._count, s)

    def _value(self, rr, w):
        """``0.5 sum_c [w_c rr_c + n_c log(2 pi / w_c)]``."""
        return GaussianLikelihood.value_from_sums(rr, self._count, w)

    def _g_w(self, rr, w):
        """Derivative of :meth:`_value` with respect to ``w``."""
        return GaussianLikelihood.grad_inv_var_from_sums(rr, self._count, w)

    def _stock_transformation(self, prediction_key, noise_key):
        """Metric-whitening transformation from stock operators (as in VariableCovarianceGaussianEnergy)."""
        f = ift.FieldAdapter(self._pdom, prediction_key)
        ivar = NoiseInvVar(self._cdom, self._floor, self._sigma0, self._tau) @ \
            ift.FieldAdapter(self._cdom, noise_key)
        bcast = ift.ContractionOperator(self._pdom, spaces=0).adjoint
        res = ift.makeOp(ift.makeField(self._pdom, np.sqrt(self._mask))) @ \
            ift.Adder(ift.makeField(self._pdom, -self._data)) @ f
        part1 = (bcast @ ivar.sqrt()) * res
        part2 = ift.makeOp(ift.makeField(self._cdom, 0.5 * np.sqrt(self._count))) @ ivar.log()
        trafo = part1.ducktape_left(prediction_key) + part2.ducktape_left(noise_key)
        return {prediction_key: np.float64, noise_key: np.float64}, trafo


class MaskedGaussianEnergy(_LikelihoodPartial, _NoiseSetup, ift.LikelihoodEnergyOperator):
    """Masked Gaussian negative log-likelihood with the per-channel noise model.

    ``E = 0.5 sum_{i,c} m_ic [(d_ic - f_ic)^2 / sigma_c^2 + log(2 pi sigma_c^2)]``,
    ``sigma_c`` from :mod:`galdecomp.model.noise` with excitations ``s`` (prior not included).

    Parameters
    ----------
    data : ndarray (rows, C) or Field
        Missing entries may hold anything (NaN included); they are zeroed.
    mask : ndarray (rows, C) of bool, optional
        True where observed; default ``isfinite(data)``.
    likelihood : GaussianLikelihood, optional
        The noise model: floor, sigma0, tau (see :mod:`.noise`); default ``GaussianLikelihood()``.
    row_domain : Domain, optional
        1-D row domain; default the data Field's first domain or ``UnstructuredDomain(rows)``.
    prediction_key, noise_key : str

    Notes
    -----
    A custom fused ``LikelihoodEnergyOperator``: value and gradient in one numpy pass. With
    ``want_metric`` it returns the exact Fisher metric (block diagonal): ``m_ic / sigma_c^2`` for the
    prediction and ``0.5 n_c (d log sigma_c^2 / d s_c)^2`` for the noise (n_c observed rows),
    sampleable as MGVI needs. ``get_transformation`` is built from stock operators in the form
    NIFTy's ``VariableCovarianceGaussianEnergy`` uses (its Jacobian reproduces the Fisher metric
    in expectation, not exactly), for geoVI.
    """

    def __init__(self, data, mask=None, likelihood=None, row_domain=None, prediction_key="prediction",
                 noise_key="noise"):
        self._setup_data(data, mask, row_domain, likelihood)
        self._prediction_key, self._noise_key = str(prediction_key), str(noise_key)
        self._domain = self._full_domain = ift.MultiDomain.make(
            {self._prediction_key: self._pdom, self._noise_key: self._cdom})
        res = ift.makeOp(ift.makeField(self._pdom, self._mask)) @ \
            ift.Adder(ift.makeField(self._pdom, -self._data)) @ ift.FieldAdapter(self._pdom, self._prediction_key)
        res = res @ ift.PartialExtractor(self._domain, res.domain)
        self._res_full = res
        ift.LikelihoodEnergyOperator.__init__(self, res, self._sqrt_metric_full)

    def _sqrt_metric_full(self, x):
        w = self._noise(x[self._noise_key].val)[0]
        return ift.makeOp(ift.makeField(self._pdom, np.sqrt(self._mask * w)))

    def apply(self, x):
        self._check_input(x)
        v = self._values(x)
        w, dw = self._noise(v[self._noise_key])
        r = (v[self._prediction_key] - self._data) * self._mask
        rr = np.einsum("ij,ij->j", r, r)
        val = ift.Field.scalar(self._value(rr, w))
        if x.jac is None:
            return val
        keys = self._domain.keys()
        g = {}
        if self._prediction_key in keys:
            r *= w
            g[self._prediction_key] = ift.makeField(self._pdom, r)
        if self._noise_key in keys:
            g[self._noise_key] = ift.makeField(self._cdom, self._g_w(rr, w) * dw)
        g = ift.MultiField.from_dict(g, self._domain)
        if not x.want_metric:
            return x.new(val, ift.VdotOperator(g))
        met = {}
        if self._prediction_key in keys:
            met[self._prediction_key] = ift.makeField(self._pdom, self._mask * w)
        if self._noise_key in keys:
            met[self._noise_key] = ift.makeField(self._cdom, self._noise_fisher(v[self._noise_key]))
        met = ift.makeOp(ift.MultiField.from_dict(met, self._domain), sampling_dtype=np.float64)
        return x.new(val, ift.VdotOperator(g), met)

    def _transformation(self):
        return self._stock_transformation(self._prediction_key, self._noise_key)

    def __repr__(self):
        return f"MaskedGaussianEnergy({self._pdom.shape}, variable={list(self._domain.keys())})"


# ------------------------------------------------------------------------------------------
class DecoderLikelihood(_LikelihoodPartial, _NoiseSetup, ift.LikelihoodEnergyOperator):
    """Fused decoder + masked Gaussian likelihood: one blocked numpy pass for value and gradient.

    Equals ``MaskedGaussianEnergy @ (MLPOperator, noise)``: ``E = 0.5 sum_{i,c} m_ic
    [(d_ic - f_theta(z_i)_c)^2 / sigma_c^2 + log(2 pi sigma_c^2)]``, theta = scales * xi.

    Parameters
    ----------
    decoder : MLP
        Latent -> channels network (its dtype sets the compute precision).
    data, mask, likelihood, row_domain
        As for :class:`MaskedGaussianEnergy`.
    scales : ndarray (n_params,), optional
        Default ``decoder.init_scales()``.
    keys : tuple of str
        The domain's keys of the latents, the decoder's weights and the noise.

    Notes
    -----
    Domain ``{latent: (row, UD(L)), weights: UD(n_params), noise: UD(C)}``. The loss is fused
    into the decoder's vjp block loop (residual, masked square sums and cotangent per block).
    With ``want_metric`` the metric is ``J^T F J`` with F the Fisher metric of
    :class:`MaskedGaussianEnergy` and J the Jacobian of (decoder, noise) (MGVI-ready).
    """

    def __init__(self, decoder, data, mask=None, likelihood=None, row_domain=None, scales=None,
                 keys=("latent", "weights", "noise")):
        latent_key, weights_key, noise_key = keys
        self._setup_data(data, mask, row_domain, likelihood)
        self._mlpop = MLPOperator(decoder, self._pdom[0], latent_key, weights_key, scales)
        if decoder.n_out != self._pdom.shape[1]:
            raise ValueError(f"decoder has {decoder.n_out} outputs, data {self._pdom.shape[1]} channels")
        self._dec = decoder
        self._latent_key, self._weights_key, self._noise_key = str(latent_key), str(weights_key), str(noise_key)
        self._prediction_key = "_prediction"
        self._lik = MaskedGaussianEnergy(self._data, self._mask > 0, likelihood, self._pdom[0], self._prediction_key, self._noise_key)
        self._domain = self._full_domain = ift.MultiDomain.make({
            **{k: self._mlpop.domain[k] for k in self._mlpop.domain.keys()},
            self._noise_key: self._cdom})
        self._lift = self._mlpop.ducktape_left(self._prediction_key) + \
            ift.FieldAdapter(self._cdom, self._noise_key).ducktape_left(self._noise_key)
        self._res_full = self._lik.residual_full @ self._lift
        self._dc = self._data.astype(decoder.dtype)
        self._mc = self._mask.astype(decoder.dtype)
        ift.LikelihoodEnergyOperator.__init__(self, self._res_full, self._sqrt_metric_full)

    @property
    def mlp_operator(self):
        """The unfused :class:`MLPOperator` (same keys and scales)."""
        return self._mlpop

    def _sqrt_metric_full(self, x):
        return self._lik._sqrt_metric_full(self._lift.force(x))

    def _pass(self, theta, z, w, want_theta, want_z):
        """Return (rr, g_theta, g_z) with ``g = d/d(.) 0.5 sum m r^2 w``; w=None: value only."""
        rr = np.zeros(self._pdom.shape[1])
        dc, mc = self._dc, self._mc
        wt = None if w is None else w.astype(self._dec.dtype)

        def g_y(y, sl):
            np.subtract(y, dc[sl], out=y)
            y *= mc[sl]
            rr[...] += np.einsum("ij,ij->j", y, y, dtype=np.float64)
            if wt is not None:
                y *= wt
            return y

        _, gth, gz = self._dec.vjp(theta, z, g_y, want_theta=want_theta, want_x=want_z,
                                   return_y=False)
        return rr, gth, gz

    def apply(self, x):
        self._check_input(x)
        v = self._values(x)
        theta, z, s = self._mlpop.scales * v[self._weights_key], v[self._latent_key], v[self._noise_key]
        w, dw = self._noise(s)
        keys = self._domain.keys()
        lin = x.jac is not None
        rr, gth, gz = self._pass(theta, z, w if lin else None,
                                 lin and self._weights_key in keys, lin and self._latent_key in keys)
        val = ift.Field.scalar(self._value(rr, w))
        if not lin:
            return val
        g = {}
        if self._weights_key in keys:
            g[self._weights_key] = ift.makeField(self._domain[self._weights_key], self._mlpop.scales * gth)
        if self._latent_key in keys:
            g[self._latent_key] = ift.makeField(self._domain[self._latent_key], gz)
        if self._noise_key in keys:
            g[self._noise_key] = ift.makeField(self._cdom, self._g_w(rr, w) * dw)
        jac = ift.VdotOperator(ift.MultiField.from_dict(g, self._domain))
        if not x.want_metric:
            return x.new(val, jac)
        return x.new(val, jac, self._metric(theta, z, s, w))

    def _metric(self, theta, z, s, w):
        """``J^T F J`` over the variable keys (J: Jacobian of (decoder, noise), F: Fisher)."""
        keys = self._domain.keys()
        mlp_keys = [k for k in (self._latent_key, self._weights_key) if k in keys]
        jac, fisher = None, {}
        if mlp_keys:
            jac = _MLPJacobian(ift.MultiDomain.make({k: self._domain[k] for k in mlp_keys}),
                               self._pdom, self._dec, self._mlpop.scales, theta, z,
                               self._latent_key, self._weights_key)
            fisher[self._prediction_key] = ift.makeField(self._pdom, self._mask * w)
        if self._noise_key in keys:
            fisher[self._noise_key] = ift.makeField(self._cdom, self._noise_fisher(s))
        fisher = ift.MultiField.from_dict(fisher)
        lift_jacobian = _LiftJacobian(self._domain, fisher.domain, jac, self._prediction_key, self._noise_key)
        return ift.SandwichOperator.make(lift_jacobian, ift.makeOp(fisher, sampling_dtype=np.float64))

    def _transformation(self):
        dt, trafo = self._lik.get_transformation()
        return dt, trafo @ self._lift

    def __repr__(self):
        return f"DecoderLikelihood({self._dec}, variable={list(self._domain.keys())})"


class _LiftJacobian(ift.LinearOperator):
    """Jacobian of ``(latent, weights, noise) -> (prediction, noise)`` over the variable keys."""

    def __init__(self, domain, target, mlp_jac, prediction_key, noise_key):
        self._domain, self._target = domain, target
        self._capability = self.TIMES | self.ADJOINT_TIMES
        self._jac, self._prediction_key, self._noise_key = mlp_jac, prediction_key, noise_key

    def apply(self, x, mode):
        self._check_input(x, mode)
        noise = self._noise_key in self._domain.keys()
        if mode == self.TIMES:
            out = {self._noise_key: x[self._noise_key]} if noise else {}
            if self._jac is not None:
                out[self._prediction_key] = self._jac(x.extract(self._jac.domain))
            return ift.MultiField.from_dict(out, self._target)
        out = {self._noise_key: x[self._noise_key]} if noise else {}
        if self._jac is not None:
            g = self._jac.adjoint(x[self._prediction_key])
            out.update({k: g[k] for k in g.keys()})
        return ift.MultiField.from_dict(out, self._domain)
