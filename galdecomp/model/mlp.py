"""Multilayer perceptron kernels in numpy: parameter layout, activations, passes in blocks.

Layout (shared by every kernel and operator of galdecomp.model)
---------------------------------------------------------------
``sizes = [n_0, n_1, ..., n_K]``; layer k maps ``h_k`` (rows) to
``a_k = h_k @ W_k + b_k`` with ``W_k`` of shape ``(n_k, n_{k+1})``; ``h_{k+1} = act(a_k)``
for hidden layers and ``h_K = a_{K-1}`` (linear output). The flat parameter vector is the
concatenation over layers of ``W_k.ravel()`` (C order) then ``b_k``.

:class:`MLP` evaluates the network on row blocks (``block_size`` rows at a time) so that the
elementwise passes over the (rows, width) activations stay in cache; only the loop over blocks
is in Python.
"""
import numpy as np

from ..workers import blas_threads

__all__ = ["ACTIVATIONS", "MLP", "PreparedWeights", "augmented_layers", "blas_threads", "n_params", "unpack_params"]


def _tanh(a):
    t = np.tanh(a)
    d1 = 1.0 - t * t
    return t, d1, -2.0 * t * d1


def _softplus(a):
    s = 1.0 / (1.0 + np.exp(-a))
    return np.logaddexp(0.0, a), s, s * (1.0 - s)


#: name -> function returning (act(a), act'(a), act''(a))
ACTIVATIONS = {"tanh": _tanh, "softplus": _softplus}


def n_params(sizes):
    """Number of parameters of an MLP with layer widths ``sizes``."""
    return int(sum(n * m + m for n, m in zip(sizes[:-1], sizes[1:])))


def augmented_layers(theta, sizes):
    """Split a flat parameter vector into per-layer ``[[W], [b]]`` views.

    Each layer's ``W`` (row-major) is followed by its ``b`` in the flat vector, so the two
    together are one ``(n_k + 1, n_{k+1})`` block.

    Parameters
    ----------
    theta : ndarray, shape (n_params(sizes),)
    sizes : sequence of int

    Returns
    -------
    list of ndarray
        Views into ``theta`` of shape (n_k + 1, n_{k+1}).
    """
    theta = np.asarray(theta)
    if theta.shape != (n_params(sizes),):
        raise ValueError(f"theta has shape {theta.shape}, expected ({n_params(sizes)},)")
    layers, i = [], 0
    for n, m in zip(sizes[:-1], sizes[1:]):
        layers.append(theta[i:i + (n + 1) * m].reshape(n + 1, m))
        i += (n + 1) * m
    return layers


def unpack_params(theta, sizes):
    """Split a flat parameter vector into per-layer views.

    Parameters
    ----------
    theta : ndarray, shape (n_params(sizes),)
    sizes : sequence of int

    Returns
    -------
    list of (W, b)
        Views into ``theta``: ``W`` of shape (n_k, n_{k+1}), ``b`` of shape (n_{k+1},).
    """
    return [(a[:-1], a[-1]) for a in augmented_layers(theta, sizes)]


def _act_fwd(name, a, out):
    """Write ``act(a)`` into ``out`` (may be a strided view); return what ``_act_scale`` needs."""
    if name == "tanh":
        np.tanh(a, out=out)
        return None
    h, d1, _ = ACTIVATIONS[name](a)
    out[...] = h
    return d1


def _act_scale(name, h, state, g, tmp):
    """Multiply ``g`` in place by ``act'(a)``, given ``h = act(a)`` and the forward state."""
    if name == "tanh":
        np.multiply(h, h, out=tmp)
        np.subtract(1.0, tmp, out=tmp)
        g *= tmp
    else:
        g *= state


class PreparedWeights:
    """An MLP's parameters as its passes use them (:meth:`MLP.prepare`).

    Attributes
    ----------
    layers : list of ndarray
        Per layer ``[[W], [b]]``, shape (n_k + 1, n_{k+1}), compute dtype.
    first_dense : ndarray or None
        The first layer's ``[[W], [b]]`` without the rows of the ``sparse_inputs``.
    """

    __slots__ = ("layers", "first_dense", "_transposed")

    def __init__(self, layers, first_dense=None):
        self.layers, self.first_dense = layers, first_dense
        self._transposed = [None] * len(layers)

    def transposed(self, k):
        """Layer ``k``'s ``W.T`` (contiguous, shape (n_{k+1}, n_k)), made at the first call and kept:
        a pass that needs no input gradient never makes the first layer's."""
        if self._transposed[k] is None:
            # a copy: products with a transposed view differ in the last bits
            self._transposed[k] = np.ascontiguousarray(self.layers[k][:-1].T)
        return self._transposed[k]


class MLP:
    """Per-row multilayer perceptron with blocked forward, reverse (vjp) and forward-mode (jvp) passes.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths ``[n_in, n_hidden..., n_out]``; parameter layout as in the module docstring.
    activation : str
        Hidden-layer activation, a key of :data:`ACTIVATIONS`; the output layer is linear.
    block_size : int
        Rows per block. Default 1024: fastest on the project's 2-core Xeon (1 MB L2 per core)
        for the 10-64-64-35 decoder, 10-20 % faster than 4096 (benchmarks/speed/bench_kernels.py --sweep).
    dtype : numpy dtype
        Compute dtype, ``np.float64`` or ``np.float32``. Inputs are cast per block, outputs are
        returned as float64 and parameter gradients are accumulated in float64.
    blas_threads : int or None
        BLAS threads during the passes (None: leave the library setting). Default 1: the per-block
        GEMMs are small, and multi-threaded BLAS on them was up to 10x slower whenever the cores
        were shared (other processes, MPI ranks); parallelise over rows with MPI ranks instead.
    sparse_inputs : slice, optional
        Input columns that are often 0 in a whole block (the encoder's missing-entry indicators).
        A block where they all are computes the first layer without them (in :meth:`forward` and
        :meth:`vjp`; their weights' gradient is then 0): the same function, as many fewer
        multiply-adds, the results equal to rounding (the GEMM sums fewer terms).

    Notes
    -----
    Each layer is one GEMM ``[h, 1] @ [[W], [b]]`` on a row block whose last column is 1, so the
    bias and its gradient cost no extra pass over the block. Activations are recomputed in every
    call (nothing is stored between calls).
    """

    def __init__(self, sizes, activation="tanh", block_size=1024, dtype=np.float64,
                 blas_threads=1, sparse_inputs=None):
        self.sizes = tuple(int(s) for s in sizes)
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"bad layer sizes {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.block_size = max(int(block_size), 1)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
        self.n_params = n_params(self.sizes)
        self.n_in, self.n_out = self.sizes[0], self.sizes[-1]
        self.blas_threads = blas_threads
        self.sparse_inputs = sparse_inputs
        if sparse_inputs is not None:
            cols = np.arange(self.n_in)
            self._dense_rows = np.append(np.setdiff1d(cols, cols[sparse_inputs]), self.n_in)  # and the bias
            dense = self._dense_rows[:-1]  # the input columns kept: a slice when they are a run (a view, no gather)
            contiguous = len(dense) > 0 and np.array_equal(dense, np.arange(dense[0], dense[-1] + 1))
            self._dense_cols = slice(int(dense[0]), int(dense[-1]) + 1) if contiguous else dense

    def __repr__(self):
        return (f"MLP({list(self.sizes)}, activation={self.activation!r}, "
                f"block_size={self.block_size}, dtype={self.dtype.name}, "
                f"blas_threads={self.blas_threads})")

    def init_scales(self, weight_gain=1.0, bias_scale=0.1):
        """Prior standard deviations of the parameters.

        The parameters are scaled standard-normal excitations: ``theta = scales * xi`` with prior
        ``xi ~ N(0, 1)``, i.e. ``theta ~ N(0, diag(scales**2))``. A draw of ``xi`` is a LeCun-type
        initialisation (unit-variance pre-activations for unit-variance inputs).

        Parameters
        ----------
        weight_gain : float
            Weights of layer k get ``weight_gain / sqrt(n_k)`` (n_k = fan-in).
        bias_scale : float
            Scale of every bias.

        Returns
        -------
        ndarray, shape (n_params,)
        """
        out = np.empty(self.n_params)
        for (W, b), n in zip(unpack_params(out, self.sizes), self.sizes[:-1]):
            W[...] = weight_gain / np.sqrt(n)
            b[...] = bias_scale
        return out

    def prepare(self, theta):
        """The parameters in the form the passes use, made once for many calls.

        Parameters
        ----------
        theta : ndarray, shape (n_params,)

        Returns
        -------
        PreparedWeights
            Accepted by :meth:`forward`, :meth:`vjp` and :meth:`jvp` in place of ``theta``
            (the same results, bitwise): the per-layer ``[[W], [b]]`` in the compute dtype and
            contiguous copies of the ``W.T``. The passes of a batch's row blocks share it.
        """
        if isinstance(theta, PreparedWeights):
            return theta
        layers = self._aug(theta)
        dense = None
        if self.sparse_inputs is not None:
            dense = np.empty((len(self._dense_rows), layers[0].shape[1]), layers[0].dtype)
            dense[:-1] = layers[0][self._dense_cols]
            dense[-1] = layers[0][-1]
        return PreparedWeights(layers, dense)

    # -- internals ----------------------------------------------------------------------------
    def _aug(self, theta):
        """Per-layer ``[[W], [b]]`` in the compute dtype (None for ``theta=None``): views of
        ``theta`` (of its copy in the compute dtype), as each layer's ``W`` is followed by its
        ``b`` in the flat vector."""
        if theta is None:
            return None
        if isinstance(theta, PreparedWeights):
            return theta.layers
        theta = np.asarray(theta)
        if theta.dtype != self.dtype:
            theta = np.asarray(theta, dtype=np.float64).astype(self.dtype, copy=False)
        return augmented_layers(theta, self.sizes)

    def _check_x(self, x, n_cols=None):
        x = np.asarray(x)
        n_cols = self.n_in if n_cols is None else n_cols
        if x.ndim != 2 or x.shape[1] != n_cols:
            raise ValueError(f"array has shape {x.shape}, expected (n_rows, {n_cols})")
        return x

    def _blocks(self, n_rows):
        """Row slices of the blocks; BLAS threads are limited while the loop runs."""
        with blas_threads(self.blas_threads):
            for i in range(0, n_rows, self.block_size):
                yield slice(i, min(i + self.block_size, n_rows))

    def _work(self, n_rows, n_flat=1):
        """Augmented activation buffers ``[h_k, 1]`` and ``n_flat`` flat scratch buffers."""
        bs = min(self.block_size, max(n_rows, 1))
        hs = []
        for n in self.sizes[:-1]:
            h = np.empty((bs, n + 1), self.dtype)
            h[:, n] = 1.0
            hs.append(h)
        width = max(self.sizes)
        return hs, [np.empty(bs * width, self.dtype) for _ in range(n_flat)]

    @staticmethod
    def _view(flat, n, m):
        return flat[:n * m].reshape(n, m)

    def _dense_input(self, xb, prepared, buffer):
        """The block's first-layer input without the sparse columns, if they are all 0 in it
        (else None); ``buffer`` holds it (its last column 1)."""
        if self.sparse_inputs is None or prepared is None or xb[:, self.sparse_inputs].any():
            return None
        n = xb.shape[0]
        if buffer[0] is None:
            buffer[0] = np.empty((self.block_size, len(self._dense_rows)), self.dtype)
            buffer[0][:, -1] = 1.0
        hd = buffer[0][:n]
        hd[:, :-1] = xb[:, self._dense_cols]
        return hd

    def _fwd_block(self, Wb, hs, scratch, y_flat, xb, prepared=None, buffer=(None,)):
        """Forward pass of one block; returns the output view, the activation states and the
        dense first-layer input if the sparse inputs were skipped (else None)."""
        n = xb.shape[0]
        hd = self._dense_input(xb, prepared, buffer)
        if hd is None:
            hs[0][:n, :-1] = xb
        states = []
        for k in range(len(Wb) - 1):
            a = self._view(scratch, n, self.sizes[k + 1])
            if k == 0 and hd is not None:
                np.dot(hd, prepared.first_dense, out=a)
            else:
                np.dot(hs[k][:n], Wb[k], out=a)
            states.append(_act_fwd(self.activation, a, hs[k + 1][:n, :-1]))
        y = self._view(y_flat, n, self.n_out)
        if len(Wb) == 1 and hd is not None:
            np.dot(hd, prepared.first_dense, out=y)
        else:
            np.dot(hs[-1][:n], Wb[-1], out=y)
        return y, states, hd

    # -- public passes ------------------------------------------------------------------------
    def forward(self, theta, x):
        """Network output.

        Parameters
        ----------
        theta : ndarray, shape (n_params,), or PreparedWeights
        x : ndarray, shape (n_rows, n_in)

        Returns
        -------
        y : ndarray, shape (n_rows, n_out), float64
        """
        x = self._check_x(x)
        prepared = self.prepare(theta) if self.sparse_inputs is not None else None
        Wb = self._aug(theta if prepared is None else prepared)
        hs, (scratch, y_flat) = self._work(len(x), 2)
        out, buffer = np.empty((len(x), self.n_out)), [None]
        for sl in self._blocks(len(x)):
            out[sl] = self._fwd_block(Wb, hs, scratch, y_flat, x[sl], prepared, buffer)[0]
        return out

    def vjp(self, theta, x, g_y, want_theta=True, want_x=True, return_y=True):
        """Fused forward and reverse pass: output and vector-Jacobian products.

        Parameters
        ----------
        theta : ndarray, shape (n_params,), or PreparedWeights
        x : ndarray, shape (n_rows, n_in)
        g_y : ndarray, shape (n_rows, n_out), or callable
            Cotangent of the output. A callable ``g_y(y_block, rows)`` is called once per block
            with the block's output (compute dtype, valid during the call only) and its row
            slice, and returns that block's cotangent; this fuses a loss into the pass.
        want_theta, want_x : bool
            Compute ``g_theta`` / ``g_x`` (otherwise None is returned in their place).
        return_y : bool
            Return the output (otherwise None).

        Returns
        -------
        y : ndarray (n_rows, n_out) or None
        g_theta : ndarray (n_params,) or None
            ``sum_i g_y[i] . d y[i] / d theta``, accumulated in float64.
        g_x : ndarray (n_rows, n_in) or None
        """
        x = self._check_x(x)
        P, K = len(x), len(self.sizes) - 1
        prepared = self.prepare(theta)
        Wb = prepared.layers
        hs, (scratch, y_flat, g0, g1, tmp) = self._work(P, 5)
        g_theta = np.zeros(self.n_params) if want_theta else None
        gth = augmented_layers(g_theta, self.sizes) if want_theta else None
        y_out = np.empty((P, self.n_out)) if return_y else None
        gx_out = np.empty((P, self.n_in)) if want_x else None
        call = callable(g_y)
        if not call:
            g_y = self._check_x(g_y, self.n_out)
            if len(g_y) != P:
                raise ValueError(f"g_y has {len(g_y)} rows, x has {P}")
        buffer = [None]
        for sl in self._blocks(P):
            n = sl.stop - sl.start
            y, states, hd = self._fwd_block(Wb, hs, scratch, y_flat, x[sl], prepared, buffer)
            if return_y:
                y_out[sl] = y
            gk = g_y(y, sl) if call else g_y[sl]
            if not (want_theta or want_x):
                continue
            gk = np.asarray(gk, dtype=self.dtype)
            for k in range(K - 1, -1, -1):
                if want_theta and k == 0 and hd is not None:
                    gd = hd.T @ gk
                    gth[0][self._dense_cols] += gd[:-1]
                    gth[0][-1] += gd[-1]
                elif want_theta:
                    gth[k] += hs[k][:n].T @ gk
                if k == 0:
                    if want_x:
                        gx_out[sl] = gk @ prepared.transposed(0)
                    break
                gn = self._view(g0 if k % 2 else g1, n, self.sizes[k])
                np.dot(gk, prepared.transposed(k), out=gn)
                _act_scale(self.activation, hs[k][:n, :-1], states[k - 1], gn,
                           self._view(tmp, n, self.sizes[k]))
                gk = gn
        return y_out, g_theta, gx_out

    def jvp(self, theta, x, d_theta=None, d_x=None):
        """Forward-mode pass: output and Jacobian-vector product.

        Parameters
        ----------
        theta : ndarray, shape (n_params,), or PreparedWeights
        x : ndarray, shape (n_rows, n_in)
        d_theta : ndarray, shape (n_params,), or None
            Parameter tangent (None: zero).
        d_x : ndarray, shape (n_rows, n_in), or None
            Input tangent (None: zero).

        Returns
        -------
        y, d_y : ndarray, shape (n_rows, n_out), float64
        """
        x = self._check_x(x)
        P, K = len(x), len(self.sizes) - 1
        if d_x is not None:
            d_x = self._check_x(d_x)
        Wb, dWb = self._aug(theta), self._aug(d_theta)
        hs, (scratch, y_flat, dy_flat, tmp, tmp2) = self._work(P, 5)
        dhs = [np.zeros_like(h) for h in hs]          # augmented tangents, last column 0
        y_out, dy_out = np.empty((P, self.n_out)), np.empty((P, self.n_out))
        for sl in self._blocks(P):
            n = sl.stop - sl.start
            hs[0][:n, :-1] = x[sl]
            dhs[0][:n, :-1] = 0.0 if d_x is None else d_x[sl]
            for k in range(K):
                m = self.sizes[k + 1]
                last = k == K - 1
                a = self._view(y_flat if last else scratch, n, m)
                da = self._view(dy_flat if last else tmp, n, m)
                np.dot(hs[k][:n], Wb[k], out=a)
                if d_x is not None or k > 0:
                    np.dot(dhs[k][:n], Wb[k], out=da)
                else:
                    da[...] = 0.0
                if dWb is not None:
                    da += hs[k][:n] @ dWb[k]
                if last:
                    y_out[sl], dy_out[sl] = a, da
                else:
                    st = _act_fwd(self.activation, a, hs[k + 1][:n, :-1])
                    _act_scale(self.activation, hs[k + 1][:n, :-1], st, da, self._view(tmp2, n, m))
                    dhs[k + 1][:n, :-1] = da
        return y_out, dy_out
