"""Dependence between two maps: correlations, mutual information, spatial-block resampling.

All functions take full maps or pixel vectors with NaN for missing values and use the pixels
valid in both (pairwise deletion). Mutual information (MI) is in nats.

Spatial blocks are coarse HEALPix pixels at ``nside_block`` (default ``nside // 8``, between 1
and 16): in NESTED order each coarse pixel holds the same number ``(nside / nside_block)**2``
of consecutive fine pixels, so permuting blocks is a clean relabelling of the sky, and
resampling whole blocks keeps the correlation of neighbouring pixels. Block resampling
assumes that blocks are nearly independent; for maps correlated over a block or more, random
rotations of the sphere (:func:`rotation_pvalue`) give a better-calibrated null.
"""
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.special import digamma

from ..seeds import stream

__all__ = ["pearson", "mi_binned", "mi_ksg", "ksg_terms", "equivalent_correlation",
           "gaussian_mi", "default_block_nside", "block_index", "block_ids", "BlockResampler",
           "block_permutation_pvalue", "rotation_pvalue", "block_split", "heldout_r2", "match_features",
           "INTERVAL"]

#: Percentiles of the block-bootstrap interval of the KSG MI (a 68 % interval, "1 sigma").
INTERVAL = (16.0, 84.0)


def _pairs(x, y):
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def pearson(x, y):
    """Pearson correlation of two finite 1-D arrays (NaN if either is constant)."""
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _plugin_mi(h):
    """Plug-in MI (nats) of joint histograms ``h`` of shape (..., Bx, By)."""
    h = np.asarray(h, dtype=float)
    p = h / np.maximum(h.sum(axis=(-2, -1), keepdims=True), 1)
    px, py = p.sum(axis=-1, keepdims=True), p.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p / (px * py)), 0.0)
    return t.sum(axis=(-2, -1))


def _equal_width(v, bins):
    lo, hi = v.min(), v.max()
    if not hi > lo:
        return np.zeros(v.size, dtype=np.int64)
    return np.minimum(((v - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)


def _entropy(counts):
    """Entropy (nats) of the empirical distribution of non-negative ``counts``."""
    c = counts[counts > 0].astype(float)
    n = c.sum()
    return float(np.log(n) - np.dot(c, np.log(c)) / n)


def mi_binned(x, y, bins=512):
    """Histogram plug-in MI with ``bins`` equal-width bins per axis over the range of each map.

    Biased upward by about ``(occupied cells - occupied rows - occupied columns + 1) / (2 n)``
    nats on ``n`` pixels (large for 512 bins and 10^4-10^5 pixels), and downward when the bins
    are wider than the scatter of one map given the other.
    """
    x, y = _pairs(x, y)
    if x.size < 2:
        return float("nan")
    ix, iy = _equal_width(x, bins), _equal_width(y, bins)
    joint = np.bincount(ix * bins + iy, minlength=bins * bins)
    hx, hy = _entropy(np.bincount(ix, minlength=bins)), _entropy(np.bincount(iy, minlength=bins))
    return hx + hy - _entropy(joint)


def mi_ksg(x, y, k=3, seed=0):
    """KSG (Kraskov-Stoegbauer-Grassberger, algorithm 1) MI, clipped at 0.

    ``sklearn.feature_selection.mutual_info_regression`` with ``n_neighbors=k`` and
    ``random_state=seed`` (which adds 1e-10 relative jitter to break ties).
    """
    from sklearn.feature_selection import mutual_info_regression

    x, y = _pairs(x, y)
    if x.size <= k:
        return float("nan")
    return float(mutual_info_regression(x[:, None], y, n_neighbors=k, random_state=seed)[0])


def _scaled(v, rng):
    """sklearn's preparation of a continuous variable: ``v / std(v)`` plus 1e-10 jitter."""
    s = v.std()
    v = v / (s if s > 0 else 1.0)
    return v + 1e-10 * max(1.0, np.mean(np.abs(v))) * rng.standard_normal(v.size)


def _count_within(v, r):
    """Count of ``j`` with ``|v_j - v_i| <= r_i`` (including ``i``), as a KD-tree computes it."""
    s, n = np.sort(v), v.size
    hi = np.searchsorted(s, v + r, "right")
    lo = np.searchsorted(s, v - r, "left")
    for _ in range(64):  # fix-ups of rounding in v +- r (one step, ties need more)
        up = (hi < n) & (s[np.minimum(hi, n - 1)] - v <= r)
        dn = (hi > 0) & (s[np.maximum(hi - 1, 0)] - v > r)
        lup = (lo < n) & (v - s[np.minimum(lo, n - 1)] > r)
        ldn = (lo > 0) & (v - s[np.maximum(lo - 1, 0)] <= r)
        if not (up.any() or dn.any() or lup.any() or ldn.any()):
            break
        hi += up.astype(np.int64) - dn
        lo += lup.astype(np.int64) - ldn
    return hi - lo


def ksg_terms(x, y, k=3, seed=0):
    """Per-pixel terms of the KSG estimate; their mean is :func:`mi_ksg` before clipping.

    Same estimator and jitter as ``mutual_info_regression`` (KD-tree in the joint max-norm
    space, marginal counts by sorting), about three times faster, and keeping the terms
    ``psi(n) + psi(k) - psi(n_x,i + 1) - psi(n_y,i + 1)`` for block resampling.

    Parameters
    ----------
    x, y : ndarray, shape (n,)
        Finite values.
    k : int
        Neighbours.
    seed : int
        Seed of the jitter (as ``random_state`` of :func:`mi_ksg`).

    Returns
    -------
    ndarray, shape (n,)
    """
    rng = np.random.RandomState(seed)
    x, y = _scaled(np.asarray(x, float), rng), _scaled(np.asarray(y, float), rng)
    xy = np.column_stack([x, y])
    d = cKDTree(xy).query(xy, k=k + 1, p=np.inf)[0][:, -1]
    r = np.nextafter(d, 0)
    return digamma(x.size) + digamma(k) - digamma(_count_within(x, r)) - digamma(_count_within(y, r))


def equivalent_correlation(mi):
    """Correlation of a bivariate Gaussian with this MI: ``sqrt(1 - exp(-2 mi))``."""
    return np.sqrt(1.0 - np.exp(-2.0 * np.maximum(mi, 0.0)))


def gaussian_mi(r2):
    """Gaussian-equivalent MI of a coefficient of determination: ``-log(1 - R^2) / 2``.

    0 if ``R^2 <= 0``, NaN if NaN.
    """
    r2 = np.asarray(r2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(r2 > 0, -0.5 * np.log1p(-np.minimum(r2, 1.0)), np.where(np.isnan(r2), np.nan, 0.0))
    return float(out) if out.ndim == 0 else out


# -- spatial blocks -------------------------------------------------------------------------------

def default_block_nside(nside):
    """Block resolution: ``nside // 8`` (blocks of 64 pixels, ~58/nside_block degrees), 1 to 16."""
    return int(min(max(1, nside // 8), 16))


def block_index(nside, nside_block=None):
    """RING indices of the fine pixels arranged by coarse block.

    Returns
    -------
    ndarray of int, shape (12 nside_block^2, (nside / nside_block)^2)
        Row ``b``: the fine pixels inside coarse NESTED pixel ``b``, in NESTED order.
    """
    import healpy as hp

    nb = nside_block or default_block_nside(nside)
    return hp.nest2ring(nside, np.arange(12 * nside * nside)).reshape(12 * nb * nb, -1)


def block_ids(nside, nside_block=None):
    """Coarse block (NESTED pixel at ``nside_block``) of every RING pixel."""
    import healpy as hp

    nb = nside_block or default_block_nside(nside)
    return hp.ring2nest(nside, np.arange(12 * nside * nside)) // (nside // nb) ** 2


def _codes(v, ref, bins):
    """Bin of each value of ``v`` among ``bins`` equal-count bins of the finite ``ref``; -1 where NaN."""
    r = ref[np.isfinite(ref)]
    edges = np.quantile(r, np.arange(1, bins) / bins) if r.size else np.zeros(bins - 1)
    out = np.searchsorted(edges, v, "right").astype(np.int16)
    out[~np.isfinite(v)] = -1
    return out


def _binned_stat(bx, by, bins):
    """Plug-in MI of bin codes ``bx`` (shape S) against each of ``by`` (shape (R,) + S); -1 = missing."""
    R, cells = by.shape[0], bins * bins
    dt = np.int32 if R * (cells + 1) < 2 ** 31 else np.int64
    code = bx.astype(dt) * bins + by.astype(dt)
    if (bx < 0).any() or (by < 0).any():
        code = np.where((bx >= 0) & (by >= 0), code, cells)
    code = code.reshape(R, -1) + (np.arange(R, dtype=dt) * (cells + 1))[:, None]
    h = np.bincount(code.ravel(), minlength=R * (cells + 1)).reshape(R, cells + 1)[:, :cells]
    return _plugin_mi(h.reshape(R, bins, bins))


def _bins(xs, ys, bins):
    """Bins per axis for the null tests: ``sqrt(n / 20)`` between 2 and 16, or ``bins``; 0 if n < 4."""
    n = int((np.isfinite(xs) & np.isfinite(ys)).sum())
    return 0 if n < 4 else (bins or int(np.clip(np.sqrt(n / 20), 2, 16)))


def _null_pvalue(bx, by, by_null, bins):
    """p-value of the binned MI of codes (bx, by) against its values for (bx, each of by_null)."""
    t_obs = _binned_stat(bx, by[None], bins)[0]
    t_null = _binned_stat(bx, by_null, bins)
    return float((1 + np.sum(t_null >= t_obs - 1e-12)) / (1 + len(by_null)))


def block_permutation_pvalue(xb, yb, perms, bins=None):
    """p-value of independence from permutations of the blocks of ``yb`` against those of ``xb``.

    The statistic is the plug-in MI of equal-count bins (edges: quantiles of each map), a
    fast consistent measure of dependence; ``p = (1 + #{T_perm >= T_obs}) / (1 + n_perm)``
    (at least ``1 / (1 + n_perm)``). The null keeps each map's structure within a block but
    assumes that blocks are exchangeable: for maps correlated over scales comparable to a
    block or larger it is anti-conservative (see :func:`rotation_pvalue`).

    Parameters
    ----------
    xb, yb : ndarray, shape (n_blocks, m)
        Values arranged by block (see :func:`block_index`), NaN where missing; pairs with a
        missing value are dropped after each permutation.
    perms : ndarray of int, shape (n_perm, n_blocks)
        Permutations of the blocks.
    bins : int, optional
        Bins per axis; default ``sqrt(n / 20)`` between 2 and 16 (>= 20 pixels per cell).

    Returns
    -------
    float
    """
    bins = _bins(xb, yb, bins)
    if not bins:
        return float("nan")
    by = _codes(yb, yb, bins)
    return _null_pvalue(_codes(xb, xb, bins), by, by[perms], bins)


def rotation_pvalue(x, y, index, rot_index, bins=None):
    """p-value of independence from random rotations of the sphere ("spin test").

    ``y`` is rotated rigidly (nearest pixel), which keeps all its spatial correlations, and
    compared with ``x`` on the pixels ``index``; same statistic as
    :func:`block_permutation_pvalue`. Exact for statistically isotropic maps.

    Parameters
    ----------
    x, y : ndarray, shape (npix,)
        Full RING maps, NaN where missing.
    index : ndarray of int
        RING pixels at which the maps are compared.
    rot_index : ndarray of int, shape (n_rot,) + index.shape
        For each rotation, the pixel of ``y`` that lands on each of ``index``
        (see :meth:`BlockResampler.__init__`).
    bins : int, optional

    Returns
    -------
    float
    """
    xs, ys = x[index], y[index]
    bins = _bins(xs, ys, bins)
    if not bins:
        return float("nan")
    by = _codes(y, ys, bins)                          # whole map, edges from the compared pixels
    return _null_pvalue(_codes(xs, xs, bins), by[index], by[rot_index], bins)


class BlockResampler:
    """KSG MI with a block-bootstrap interval, block-permutation and rotation p-values, on a subsample.

    The subsample keeps the same ``m`` evenly spaced NESTED positions in every coarse block
    (all pixels if ``npix <= max_pixels``), so blocks stay equal and interchangeable. Fewer
    pixels make the KSG estimate noisier and, for strong dependence, lower (KSG is biased low
    at high MI, the more so the fewer the points); neighbouring pixels of smooth maps carry
    little extra information, so the loss is small (see ``benchmarks/speed/bench_report.py``).

    Parameters
    ----------
    nside : int
    max_pixels : int
        Subsample size (at least one pixel per block).
    n_boot : int
        Bootstrap replicates.
    n_perm : int
        Permutations, and rotations (the smallest p-value is ``1 / (1 + n_perm)``).
    seed : int
        Seed of the random draws (bootstrap weights, permutations, rotations) and of the KSG
        jitter.
    nside_block : int, optional
        Block resolution; default :func:`default_block_nside`.
    """

    def __init__(self, nside, max_pixels=4096, n_boot=1000, n_perm=199, seed=0, nside_block=None):
        self.nside_block = nside_block or default_block_nside(nside)
        full = block_index(nside, self.nside_block)
        nb, s = full.shape
        per = int(min(s, max(1, -(-max_pixels // nb))))
        self.index = full[:, np.linspace(0, s, per, endpoint=False).astype(int)]
        rng = stream(seed, "report", "resampling")
        self.perms = np.argsort(rng.random((n_perm, nb)), axis=1)
        self.weights = rng.multinomial(nb, np.full(nb, 1.0 / nb), size=n_boot).astype(float)
        self.seed = seed
        self._nside, self._n_rot, self._rot = nside, n_perm, None

    @property
    def rot_index(self):
        """(n_perm,) + index.shape: pixel of a map that each rotation brings onto each subsample pixel."""
        if self._rot is None:
            import healpy as hp
            from scipy.spatial.transform import Rotation

            v = np.array(hp.pix2vec(self._nside, self.index.ravel()))
            q = stream(self.seed, "report", "rotations").normal(size=(self._n_rot, 4))
            rot = Rotation.from_quat(q / np.linalg.norm(q, axis=1, keepdims=True)).as_matrix()  # uniform
            src = np.einsum("rji,jm->irm", rot, v)          # R^T v: where each pixel comes from
            self._rot = hp.vec2pix(self._nside, *src).reshape((self._n_rot,) + self.index.shape)
        return self._rot

    @property
    def n_pixels(self):
        """Pixels in the subsample."""
        return self.index.size

    def ksg(self, x, y, k=3):
        """KSG MI of two full RING maps on the subsample, and its block-bootstrap interval.

        The bootstrap resamples whole blocks of the per-pixel KSG terms with replacement
        (neighbour counts held fixed: recomputing them on resampled data would put
        duplicated points at distance 0), ``MI* = sum_b w_b S_b / sum_b w_b n_b``.

        Returns
        -------
        mi, low, high : float
            Estimate and the ``INTERVAL`` percentiles, clipped at 0 (NaN if <= k pixels).
        """
        xb, yb = x[self.index], y[self.index]
        ok = np.isfinite(xb) & np.isfinite(yb)
        if ok.sum() <= k:
            return float("nan"), float("nan"), float("nan")
        t = ksg_terms(xb[ok], yb[ok], k, self.seed)
        blk = np.nonzero(ok)[0]
        nb = len(xb)
        S, N = np.bincount(blk, t, minlength=nb), np.bincount(blk, minlength=nb).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (self.weights @ S) / (self.weights @ N)
        lo, hi = np.nanpercentile(boot, INTERVAL)
        return max(0.0, float(t.mean())), max(0.0, float(lo)), max(0.0, float(hi))

    def pvalue(self, x, y):
        """Block-permutation p-value of independence of two full RING maps (on the subsample)."""
        return block_permutation_pvalue(x[self.index], y[self.index], self.perms)

    def pvalue_rotation(self, x, y):
        """Rotation (spin-test) p-value of independence of two full RING maps (on the subsample)."""
        return rotation_pvalue(x, y, self.index, self.rot_index)


# -- prediction from many maps --------------------------------------------------------------------

def block_split(nside, valid, seed=0, nside_block=None):
    """Split the valid pixels into two halves of whole coarse blocks.

    Parameters
    ----------
    nside : int
    valid : ndarray of bool, shape (npix,)
    seed : int
    nside_block : int, optional

    Returns
    -------
    train, test : ndarray of bool, shape (npix,)
    """
    ids = block_ids(nside, nside_block)
    used = np.unique(ids[valid])
    rng = stream(seed, "report", "split")
    first = rng.permutation(used)[: (len(used) + 1) // 2]
    train = np.isin(ids, first) & valid
    return train, valid & ~train


def heldout_r2(X, y, train, test, seed=0, max_train=8192, max_test=8192):
    """Out-of-sample R^2 of predicting ``y`` from the columns of ``X`` by gradient boosting.

    ``sklearn.ensemble.HistGradientBoostingRegressor`` (up to 100 trees of 15 leaves, learning
    rate 0.2, 63 bins per input, early stopping on 10 % of the training rows; NaN in ``X``
    allowed; one OpenMP thread) fit on at most ``max_train`` random training pixels and scored
    on at most ``max_test`` random test pixels: ``1 - SSE / sum (y - mean y)^2``.

    Parameters
    ----------
    X : ndarray, shape (npix, n_features)
    y : ndarray, shape (npix,)
        NaN where missing (those pixels are not used).
    train, test : ndarray of bool, shape (npix,)
        Disjoint pixel sets (see :func:`block_split`).
    seed : int
    max_train, max_test : int

    Returns
    -------
    float
        NaN if either half has fewer than 10 valid pixels or ``y`` is constant on the test half.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    ok = np.isfinite(y)
    tr, te = np.nonzero(train & ok)[0], np.nonzero(test & ok)[0]
    if tr.size < 10 or te.size < 10:
        return float("nan")
    rng = stream(seed, "report", "r2")
    if tr.size > max_train:
        tr = np.sort(rng.choice(tr, max_train, replace=False))
    if te.size > max_test:
        te = np.sort(rng.choice(te, max_test, replace=False))
    model = HistGradientBoostingRegressor(learning_rate=0.2, max_iter=100, max_leaf_nodes=15, max_bins=63,
                                          early_stopping=tr.size >= 100, validation_fraction=0.1,
                                          n_iter_no_change=10, random_state=seed)
    with threadpool_limits(1, user_api="openmp"):  # small fits: threads cost more than they save
        model.fit(X[tr], y[tr])
        resid = y[te] - model.predict(X[te])
    sst = np.sum((y[te] - y[te].mean()) ** 2)
    return float(1.0 - np.sum(resid ** 2) / sst) if sst > 0 else float("nan")


def match_features(mi):
    """One-to-one matching of features (rows) to templates (columns) maximising the total MI.

    Parameters
    ----------
    mi : ndarray, shape (n_features, n_templates)
        NaN counts as 0.

    Returns
    -------
    list of (int, int)
        ``(feature, template)`` index pairs, ``min(n_features, n_templates)`` of them.
    """
    r, c = linear_sum_assignment(-np.nan_to_num(np.asarray(mi, dtype=float), nan=0.0))
    return [(int(i), int(j)) for i, j in zip(r, c)]
