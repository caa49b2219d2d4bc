"""Normalising transforms of the latent space fitted to the aggregate posterior.

The aggregate posterior ``Q(z) = mean_p q(z | d_p)`` of a trained autoencoder is in general not
the prior N(0, 1). A transform ``u = T(z)`` fitted to draws of Q, with ``T(z) ~ N(0, 1)``, turns
the model into a generator of realistic rows (``z = T^-1(u)``, ``u ~ N(0, 1)``) and gives the
density ``log Q(z) ~ log N(T(z); 0, 1) + log |det dT/dz|``.

Shapes (fixed throughout this module):

- ``z``, ``u``: ndarray, shape (N, L): N rows (draws), L latent features, float64;
- ``log_det_jacobian``, ``log_density``: ndarray, shape (N,);
- posterior moments: ``mean`` (P, L); ``std`` (P, L) (diagonal) or ``cov`` (P, L, L).

Methods (all with ``fit``, ``log_density``, ``sample``, ``to_arrays`` / ``from_arrays``):

- :class:`GaussianisingTransform`: iterative Gaussianisation (Laparra et al. 2011, "RBIG"):
  K layers of rotation (default: principal axes) + per-feature monotone rational-quadratic
  spline through the empirical quantiles (linear tails), exact inverse and log-determinant;
  layers are added while the held-out log-density improves;
- :class:`GaussianDensity`: one full-covariance Gaussian (affine T, exact inverse);
- :class:`GaussianMixtureDensity`: scikit-learn Gaussian mixture (no T; density and sampling);
- ``GaussianDensity.standard(L)``: the prior N(0, 1) itself (T = identity).

:func:`load_density` rebuilds any of them from :meth:`to_arrays` output (key ``kind``).
"""
import numpy as np
from scipy import special

__all__ = ["GaussianisingTransform", "GaussianDensity", "GaussianMixtureDensity", "DENSITIES",
           "gaussian_draws_per_row", "load_density", "standard_normal_logpdf"]

_LOG_2PI = np.log(2.0 * np.pi)


def standard_normal_logpdf(u):
    """``log N(u; 0, 1)`` summed over features: (N, L) -> (N,)."""
    u = np.asarray(u, float)
    return -0.5 * (u * u).sum(1) - 0.5 * u.shape[1] * _LOG_2PI


def gaussian_draws_per_row(mean, cov_or_std, n_per_row, rng):
    """Draws from every row's Gaussian posterior (the aggregate posterior's fitting set).

    Parameters
    ----------
    mean : ndarray, shape (P, L)
    cov_or_std : ndarray, shape (P, L) or (P, L, L)
        Standard deviations of a diagonal posterior, or full covariances.
    n_per_row : int
        Draws per row.
    rng : numpy.random.Generator

    Returns
    -------
    z : ndarray, shape (P * n_per_row, L)
        Row ``p``'s draws are ``z[p * n_per_row:(p + 1) * n_per_row]``.
    """
    mean = np.asarray(mean, float)
    s = np.asarray(cov_or_std, float)
    P, L = mean.shape
    eps = rng.standard_normal((P, int(n_per_row), L))
    if s.ndim == 2:
        if s.shape != (P, L):
            raise ValueError(f"std has shape {s.shape}, expected {(P, L)}")
        z = mean[:, None, :] + s[:, None, :] * eps
    elif s.ndim == 3:
        if s.shape != (P, L, L):
            raise ValueError(f"cov has shape {s.shape}, expected {(P, L, L)}")
        chol = np.linalg.cholesky(s)
        z = mean[:, None, :] + np.einsum("pij,pnj->pni", chol, eps)
    else:
        raise ValueError("cov_or_std must have 2 (std) or 3 (covariance) dimensions")
    return z.reshape(P * int(n_per_row), L)


# -- monotone rational-quadratic spline with linear tails (Gregory & Delbourgo 1982) -------------
def _knot_slopes(x, y):
    """Positive derivatives at the knots (Fritsch-Carlson weighted harmonic mean; ends: the end
    segments' slopes). x, y: (..., M) strictly increasing."""
    h = np.diff(x, axis=-1)
    delta = np.diff(y, axis=-1) / h
    d = np.empty_like(x)
    w1 = 2 * h[..., 1:] + h[..., :-1]
    w2 = h[..., 1:] + 2 * h[..., :-1]
    d[..., 1:-1] = (w1 + w2) / (w1 / delta[..., :-1] + w2 / delta[..., 1:])
    d[..., 0], d[..., -1] = delta[..., 0], delta[..., -1]
    return d


def _rq_forward(v, x, y, d):
    """Spline value and log-derivative at v (1-D) for knots x, y, derivatives d (1-D, length M)."""
    M = len(x)
    k = np.clip(np.searchsorted(x, v, side="right") - 1, 0, M - 2)
    lo, hi = v < x[0], v > x[-1]
    xk, w = x[k], x[k + 1] - x[k]
    yk, dy = y[k], y[k + 1] - y[k]
    s = dy / w
    dk, dk1 = d[k], d[k + 1]
    xi = np.clip((v - xk) / w, 0.0, 1.0)
    t = xi * (1 - xi)
    den = s + (dk1 + dk - 2 * s) * t
    out = yk + dy * (s * xi * xi + dk * t) / den
    logder = 2 * np.log(s) + np.log(dk1 * xi * xi + 2 * s * t + dk * (1 - xi) ** 2) - 2 * np.log(den)
    out = np.where(lo, y[0] + d[0] * (v - x[0]), out)
    out = np.where(hi, y[-1] + d[-1] * (v - x[-1]), out)
    logder = np.where(lo, np.log(d[0]), np.where(hi, np.log(d[-1]), logder))
    return out, logder


def _rq_inverse(u, x, y, d):
    """Inverse of :func:`_rq_forward` (closed form, a quadratic per segment)."""
    M = len(x)
    k = np.clip(np.searchsorted(y, u, side="right") - 1, 0, M - 2)
    lo, hi = u < y[0], u > y[-1]
    xk, w = x[k], x[k + 1] - x[k]
    yk, dy = y[k], y[k + 1] - y[k]
    s = dy / w
    dk, dk1 = d[k], d[k + 1]
    r = np.clip(u - yk, 0.0, dy)
    a = dy * (s - dk) + r * (dk1 + dk - 2 * s)
    b = dy * dk - r * (dk1 + dk - 2 * s)
    c = -s * r
    disc = np.maximum(b * b - 4 * a * c, 0.0)
    xi = 2 * c / (-b - np.sqrt(disc))
    out = xk + w * xi
    out = np.where(lo, x[0] + (u - y[0]) / d[0], out)
    return np.where(hi, x[-1] + (u - y[-1]) / d[-1], out)


def _random_rotation(L, rng):
    q, r = np.linalg.qr(rng.standard_normal((L, L)))
    return q * np.sign(np.diag(r))


def _pca_rotation(y):
    _, vec = np.linalg.eigh(np.atleast_2d(np.cov(y, rowvar=False)))
    return vec[:, ::-1].T.copy()


def _split(n, validation_fraction, groups, rng):
    """Boolean validation mask over n rows; whole groups go to one side."""
    if not 0 < validation_fraction < 1:
        raise ValueError("validation_fraction must be in (0, 1)")
    if groups is None:
        return rng.random(n) < validation_fraction
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}, expected {(n,)}")
    uniq, inv = np.unique(groups, return_inverse=True)
    return (rng.random(len(uniq)) < validation_fraction)[inv]


class GaussianisingTransform:
    """Iterative Gaussianisation: ``T = g_K o R_K o ... o g_1 o R_1``.

    Layer k rotates, ``y = v @ R_k.T`` (R_k orthogonal, so no volume change), then maps every
    feature j through a strictly increasing rational-quadratic spline ``g_kj`` whose knots are
    the empirical quantiles of ``y_j`` at the probabilities ``Phi(t)`` of Gaussian points ``t``
    equally spaced in [-t_max, t_max] (knot values: ``t``), and linear tails whose slopes map
    the mean excess of the draws beyond the end knots to that of N(0, 1) beyond ``t_max``.
    Inverse and derivative are closed-form everywhere.

    Attributes
    ----------
    rotations : ndarray, shape (K, L, L)
    knots_x, knots_y, knots_d : ndarray, shape (K, L, M)
        Spline knots (input, output) and derivatives at them.
    validation_curve : ndarray, shape (K_tried + 1,)
        Mean held-out log-density after 0, 1, ... layers (layer 0: a standard normal on the
        raw z), from :meth:`fit`; empty after :meth:`from_arrays`.
    """

    kind = "gaussianising"

    def __init__(self, rotations, knots_x, knots_y, knots_d, validation_curve=None):
        self.rotations = np.asarray(rotations, float)
        self.knots_x, self.knots_y = np.asarray(knots_x, float), np.asarray(knots_y, float)
        self.knots_d = np.asarray(knots_d, float)
        self.validation_curve = np.asarray(validation_curve if validation_curve is not None else [], float)

    @property
    def n_layers(self):
        """Number of layers K."""
        return len(self.rotations)

    @property
    def latent_dim(self):
        return self.rotations.shape[1] if self.n_layers else self.knots_x.shape[1]

    # -- fitting ----------------------------------------------------------------------------------
    @staticmethod
    def _fit_layer(v, rotation, n_knots, t_max):
        y = v @ rotation.T
        t = np.linspace(-t_max, t_max, n_knots)
        x = np.quantile(y, special.ndtr(t), axis=0).T                     # (L, M)
        span = x[:, -1:] - x[:, :1]
        x = np.maximum.accumulate(x + 1e-9 * span * np.arange(n_knots) / n_knots, axis=1)
        yk = np.broadcast_to(t, x.shape).copy()
        d = _knot_slopes(x, yk)
        # tails: slope = Gaussian mean excess beyond t_max / the data's mean excess beyond the knot
        gauss_excess = np.exp(-0.5 * t_max ** 2) / np.sqrt(2 * np.pi) / special.ndtr(-t_max) - t_max
        for j in range(len(x)):
            hi = y[:, j] - x[j, -1]
            lo = x[j, 0] - y[:, j]
            for end, exc in ((-1, hi[hi > 0]), (0, lo[lo > 0])):
                if len(exc) >= 5 and exc.mean() > 0:
                    d[j, end] = gauss_excess / exc.mean()
        return x, yk, d

    @classmethod
    def fit(cls, z, seed=0, max_layers=100, validation_fraction=0.2, groups=None, rotation="pca",
            n_knots=None, tail_fraction=0.005, patience=5, tol=1e-3, log=None):
        """Fit to draws of the aggregate posterior.

        Parameters
        ----------
        z : ndarray, shape (N, L)
            Draws (e.g. from :func:`gaussian_draws_per_row`).
        seed : int
            Seed of the train/validation split and the random rotations.
        max_layers : int
            Layers at most.
        validation_fraction : float
            Fraction of the draws (of the groups, if given) held out for the stopping rule.
        groups : ndarray, shape (N,), optional
            Group label per draw (e.g. the pixel); a group is held out whole.
        rotation : {"pca", "random"}
            The principal axes of the current layer's input, or random orthogonal rotations
            (``pca`` generated closer rows on both benchmark skies, benchmarks/README.md).
        n_knots : int, optional
            Quantile knots per feature and layer (default ``clip(sqrt(N_train) / 4, 8, 64)``).
        tail_fraction : float
            Probability beyond each end knot (at least 50 training draws); the linear tails'
            slopes match the draws' mean excess beyond the end knots to the Gaussian's.
        patience : int
            Stop after this many layers without a held-out improvement larger than ``tol``.
        tol : float
            Improvement of the mean held-out log-density (nats per draw) that counts.
        log : callable, optional
            Called with one progress line per layer.

        Returns
        -------
        GaussianisingTransform
            With the layers up to the best held-out log-density.
        """
        z = np.asarray(z, float)
        if z.ndim != 2 or not np.all(np.isfinite(z)):
            raise ValueError("z must be a finite (N, L) array")
        if rotation not in ("random", "pca"):
            raise ValueError(f"unknown rotation {rotation!r}")
        rng = np.random.default_rng(seed)
        val = _split(len(z), validation_fraction, groups, rng)
        tr, va = z[~val], z[val]
        if len(tr) < 50 or len(va) < 10:
            raise ValueError(f"too few draws: {len(tr)} training, {len(va)} validation")
        L = z.shape[1]
        n_knots = int(n_knots or np.clip(np.sqrt(len(tr)) / 4, 8, 64))
        t_max = float(special.ndtri(1 - min(0.25, max(tail_fraction, 50.0 / len(tr)))))
        layers = []
        va_logdet = np.zeros(len(va))
        curve = [standard_normal_logpdf(va).mean()]
        best, best_k, since = curve[0], 0, 0
        for k in range(int(max_layers)):
            R = _random_rotation(L, rng) if rotation == "random" else _pca_rotation(tr)
            x, yk, d = cls._fit_layer(tr, R, n_knots, t_max)
            layers.append((R, x, yk, d))
            tr, _ = cls._apply_layer(tr, R, x, yk, d)
            va, ld = cls._apply_layer(va, R, x, yk, d)
            va_logdet += ld
            curve.append((standard_normal_logpdf(va) + va_logdet).mean())
            if log is not None:
                log(f"layer {k + 1}: held-out log-density {curve[-1]:.4f}")
            if curve[-1] > best + tol:
                best, best_k, since = curve[-1], k + 1, 0
            else:
                since += 1
                if since >= patience:
                    break
        layers = layers[:best_k]
        M = n_knots
        arr = [np.array([lay[i] for lay in layers]).reshape((best_k,) + s)
               for i, s in enumerate([(L, L), (L, M), (L, M), (L, M)])]
        return cls(*arr, validation_curve=curve)

    # -- evaluation -------------------------------------------------------------------------------
    @staticmethod
    def _apply_layer(v, R, x, yk, d):
        y = v @ R.T
        out, ld = np.empty_like(y), np.zeros(len(y))
        for j in range(y.shape[1]):
            out[:, j], lj = _rq_forward(y[:, j], x[j], yk[j], d[j])
            ld += lj
        return out, ld

    def _check(self, z):
        z = np.asarray(z, float)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected shape (N, {self.latent_dim}), got {z.shape}")
        return z

    def forward_and_log_det(self, z):
        """``(T(z), log |det dT/dz|)``: shapes (N, L) and (N,)."""
        v, ld = self._check(z), np.zeros(len(z))
        for k in range(self.n_layers):
            v, lk = self._apply_layer(v, self.rotations[k], self.knots_x[k], self.knots_y[k],
                                      self.knots_d[k])
            ld += lk
        return v, ld

    def forward(self, z):
        """``u = T(z)``, shape (N, L)."""
        return self.forward_and_log_det(z)[0]

    def inverse(self, u):
        """``z = T^-1(u)``, shape (N, L)."""
        v = self._check(u).copy()
        for k in range(self.n_layers - 1, -1, -1):
            for j in range(v.shape[1]):
                v[:, j] = _rq_inverse(v[:, j], self.knots_x[k, j], self.knots_y[k, j], self.knots_d[k, j])
            v = v @ self.rotations[k]
        return v

    def log_det_jacobian(self, z):
        """``log |det dT/dz|`` per row, shape (N,)."""
        return self.forward_and_log_det(z)[1]

    def log_density(self, z):
        """``log N(T(z); 0, 1) + log |det dT/dz|`` per row, shape (N,)."""
        u, ld = self.forward_and_log_det(z)
        return standard_normal_logpdf(u) + ld

    def sample(self, n, rng):
        """``n`` draws ``T^-1(u)``, ``u ~ N(0, 1)``: shape (n, L)."""
        return self.inverse(rng.standard_normal((int(n), self.latent_dim)))

    # -- storage ----------------------------------------------------------------------------------
    def to_arrays(self):
        """Parameters as a dict of ndarrays (for ``numpy.savez``); inverse: :meth:`from_arrays`."""
        return {"kind": np.array(self.kind), "rotations": self.rotations, "knots_x": self.knots_x,
                "knots_y": self.knots_y, "knots_d": self.knots_d,
                "validation_curve": self.validation_curve}

    @classmethod
    def from_arrays(cls, arrays):
        """Rebuild from :meth:`to_arrays` output (or an opened ``.npz``)."""
        _check_kind(arrays, cls.kind)
        return cls(arrays["rotations"], arrays["knots_x"], arrays["knots_y"], arrays["knots_d"],
                   arrays["validation_curve"] if "validation_curve" in arrays else None)


class GaussianDensity:
    """One Gaussian ``N(mean, cov)``; ``T(z) = chol^-1 (z - mean)`` with ``cov = chol chol^T``.

    Parameters
    ----------
    mean : ndarray, shape (L,)
    cov : ndarray, shape (L, L)
    """

    kind = "gaussian"

    def __init__(self, mean, cov):
        self.mean, self.cov = np.asarray(mean, float), np.asarray(cov, float)
        self.chol = np.linalg.cholesky(self.cov)
        self.n_layers = 1

    @property
    def latent_dim(self):
        return len(self.mean)

    @classmethod
    def standard(cls, L):
        """The prior N(0, 1) in L dimensions (T = identity)."""
        return cls(np.zeros(L), np.eye(L))

    @classmethod
    def fit(cls, z, seed=0, **_):
        """Sample mean and covariance of z (N, L); ``seed`` is unused (same signature)."""
        z = np.asarray(z, float)
        return cls(z.mean(0), np.cov(z, rowvar=False).reshape(z.shape[1], z.shape[1]))

    def forward(self, z):
        """``u = chol^-1 (z - mean)``, shape (N, L)."""
        from scipy.linalg import solve_triangular
        return solve_triangular(self.chol, (np.asarray(z, float) - self.mean).T, lower=True).T

    def inverse(self, u):
        """``z = mean + chol u``, shape (N, L)."""
        return self.mean + np.asarray(u, float) @ self.chol.T

    def log_det_jacobian(self, z):
        """``-log |det chol|`` for every row, shape (N,)."""
        return np.full(len(z), -np.log(np.diag(self.chol)).sum())

    def log_density(self, z):
        """``log N(z; mean, cov)`` per row, shape (N,)."""
        return standard_normal_logpdf(self.forward(z)) + self.log_det_jacobian(z)

    def sample(self, n, rng):
        """``n`` draws, shape (n, L)."""
        return self.inverse(rng.standard_normal((int(n), self.latent_dim)))

    def to_arrays(self):
        """``kind``, ``mean``, ``cov``."""
        return {"kind": np.array(self.kind), "mean": self.mean, "cov": self.cov}

    @classmethod
    def from_arrays(cls, arrays):
        _check_kind(arrays, cls.kind)
        return cls(arrays["mean"], arrays["cov"])


class GaussianMixtureDensity:
    """Full-covariance Gaussian mixture (:class:`sklearn.mixture.GaussianMixture`).

    No transform T: only :meth:`log_density` and :meth:`sample`.
    """

    kind = "gaussian_mixture"

    def __init__(self, weights, means, covariances):
        from scipy.linalg import cholesky, solve_triangular
        from sklearn.mixture import GaussianMixture

        self.weights, self.means = np.asarray(weights, float), np.asarray(means, float)
        self.covariances = np.asarray(covariances, float)
        gm = GaussianMixture(len(self.weights), covariance_type="full")
        gm.weights_, gm.means_, gm.covariances_ = self.weights, self.means, self.covariances
        eye = np.eye(self.means.shape[1])  # the fitted attribute: inverse Cholesky factors, transposed
        gm.precisions_cholesky_ = np.array([solve_triangular(cholesky(c, lower=True), eye, lower=True).T
                                            for c in self.covariances])
        self._gm = gm

    @property
    def latent_dim(self):
        return self.means.shape[1]

    @classmethod
    def fit(cls, z, seed=0, n_components=16, max_iter=200, **_):
        """Maximum-likelihood mixture of ``n_components`` full Gaussians (EM, k-means start)."""
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(n_components, covariance_type="full", max_iter=max_iter,
                             random_state=seed, reg_covar=1e-6).fit(np.asarray(z, float))
        return cls(gm.weights_, gm.means_, gm.covariances_)

    def log_density(self, z):
        """``log sum_k w_k N(z; m_k, C_k)`` per row, shape (N,)."""
        return self._gm.score_samples(np.asarray(z, float))

    def sample(self, n, rng):
        """``n`` draws in random order, shape (n, L)."""
        counts = rng.multinomial(int(n), self.weights / self.weights.sum())
        chol = np.linalg.cholesky(self.covariances)
        comp = np.repeat(np.arange(len(counts)), counts)
        rng.shuffle(comp)
        eps = rng.standard_normal((int(n), self.latent_dim))
        return self.means[comp] + np.einsum("nij,nj->ni", chol[comp], eps)

    def to_arrays(self):
        """``kind``, ``weights`` (K,), ``means`` (K, L), ``covariances`` (K, L, L)."""
        return {"kind": np.array(self.kind), "weights": self.weights, "means": self.means,
                "covariances": self.covariances}

    @classmethod
    def from_arrays(cls, arrays):
        _check_kind(arrays, cls.kind)
        return cls(arrays["weights"], arrays["means"], arrays["covariances"])


def _check_kind(arrays, kind):
    if "kind" in arrays and str(arrays["kind"]) != kind:
        raise ValueError(f"arrays hold a {str(arrays['kind'])!r}, not a {kind!r}")


#: The latent density families by their setting name (``transform.method``): name -> class
#: (benchmarks/README.md, "Latent transform", for the default).
DENSITIES = {"gaussianising": GaussianisingTransform, "gmm": GaussianMixtureDensity, "gaussian": GaussianDensity}


def load_density(arrays):
    """Rebuild a :class:`GaussianisingTransform`, :class:`GaussianDensity` or
    :class:`GaussianMixtureDensity` from its :meth:`to_arrays` dict (key ``kind``)."""
    kinds = {c.kind: c for c in DENSITIES.values()}
    kind = str(arrays["kind"])
    if kind not in kinds:
        raise ValueError(f"unknown latent density kind {kind!r}")
    return kinds[kind].from_arrays(arrays)
