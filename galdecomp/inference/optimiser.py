"""The optimiser of training: Adam on a flat parameter vector, its moments as plain arrays."""
import numpy as np

__all__ = ["Adam"]


class Adam:
    """Adam on a flat parameter vector (Kingma & Ba 2015), state kept as plain arrays."""

    #: elements per chunk of :meth:`step`: its passes over a chunk stay in the core's cache
    CHUNK = 16384

    def __init__(self, n, beta1=0.9, beta2=0.999, eps=1e-8):
        self.m = np.zeros(n)
        self.v = np.zeros(n)
        self.t = 0
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self._buf = np.empty((2, min(n, self.CHUNK)))

    def step(self, x, grad, lr, part=slice(None), frozen=None):
        """Count a step and return the updated parameters of ``part`` (:meth:`update`)."""
        self.t += 1
        return self.update(x, grad, lr, part, frozen)

    def update(self, x, grad, lr, part=slice(None), frozen=None, out=None):
        """Return the updated parameters ``x - lr * m_hat / (sqrt(v_hat) + eps)`` of ``part`` at
        step :attr:`t` (not counted: processes sharing the moments each update their part of one
        step).

        Parameters
        ----------
        x : ndarray, shape (n,)
            Parameters.
        grad : ndarray, shape of ``x[part]``
            Gradient of the parameters ``part``.
        lr : float or ndarray, shape (n,)
            Learning rate (per parameter).
        part : slice
            The parameters to update (under MPI each rank updates its block and the blocks are
            gathered); only their moments change.
        frozen : slice, optional
            Parameters (indices of ``x``) whose gradient is 0 at every step of the optimisation
            (the encoder's indicator weights on complete data): their moments stay 0 and their
            update is exactly 0, so they are copied instead of updated (the same bits, sooner).
        out : ndarray, shape of ``x[part]``, optional
            Where to write the result (default: a new array).

        Returns
        -------
        ndarray, shape of ``x[part]``

        The moments are updated in place, chunk after chunk of :attr:`CHUNK` elements in two
        preallocated buffers (the passes over a chunk stay in cache; fresh arrays of this size
        would cost a page fault each); the arithmetic and its order are those of the textbook
        expressions, elementwise, so results depend neither on the chunking nor on ``part``.
        """
        lo = part.indices(len(self.m))[0]
        m, v, x = self.m[part], self.v[part], x[part]
        rate = lr[part] if np.ndim(lr) else lr
        out = np.empty_like(x) if out is None else out
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        ranges = [(0, len(x))]
        if frozen is not None:  # the frozen parameters' positions in the part, copied
            f0, f1, _ = frozen.indices(len(self.m))
            f0, f1 = min(max(f0 - lo, 0), len(x)), min(max(f1 - lo, 0), len(x))
            out[f0:f1] = x[f0:f1]
            ranges = [(0, f0), (f1, len(x))] if f1 > f0 else ranges
        for i, end in ((i, min(i + self.CHUNK, r1)) for r0, r1 in ranges for i in range(r0, r1, self.CHUNK)):
            s = slice(i, end)
            mc, vc, gc = m[s], v[s], grad[s]
            a, b = self._buf[:, :len(gc)]
            mc *= self.beta1
            np.multiply(1 - self.beta1, gc, out=a)
            mc += a
            vc *= self.beta2
            np.multiply(1 - self.beta2, gc, out=a)
            a *= gc
            vc += a
            np.divide(vc, c2, out=b)
            np.sqrt(b, out=b)
            b += self.eps
            np.divide(mc, c1, out=a)
            a *= rate[s] if np.ndim(rate) else rate
            a /= b
            np.subtract(x[s], a, out=out[s])
        return out
