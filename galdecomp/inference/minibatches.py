"""How training deals rows: the training/validation split and each epoch's minibatch order."""
import numpy as np

from ..seeds import stream

__all__ = ["MINIBATCH_KINDS", "split_rows", "epoch_order", "minibatches", "largest_minibatch"]

#: How an epoch's rows are dealt into minibatches (``training.minibatches``).
MINIBATCH_KINDS = ("shuffled", "stratified")


def split_rows(n_rows, validation_fraction, seed):
    """Deterministic split of row indices into training and validation sets.

    Returns
    -------
    train : ndarray of int
        Sorted training row indices.
    valid : ndarray of int
        Sorted validation row indices.
    """
    perm = stream(seed, "training", "split").permutation(n_rows)
    n_val = max(1, int(round(validation_fraction * n_rows)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_order(rng, rows, batch_size, kind="shuffled"):
    """One epoch's rows, in the order the minibatches take them (``batch_size`` at a time, the
    last minibatch also takes the remainder).

    ``shuffled``: a random permutation. ``stratified``: ``rows`` (sorted) are cut into
    ``batch_size`` strata of consecutive rows, each stratum is shuffled, and minibatch ``b`` takes
    the ``b``-th row of every stratum; every row is still used once per epoch. A minibatch then
    spans the whole table (on a sky in NESTED order: the whole sky), and a process that holds a
    contiguous range of rows gets its share of each minibatch's rows to within two rows (its
    range cuts at most two strata), whatever the number of processes.

    Parameters
    ----------
    rng : numpy.random.Generator
    rows : ndarray of int, shape (n,)
        Sorted row indices.
    batch_size : int
    kind : {"shuffled", "stratified"}

    Returns
    -------
    ndarray of int, shape (n,)
    """
    n = rows.size
    q = n // batch_size  # rows of the smallest stratum = number of minibatches
    if kind == "shuffled" or q < 2:
        return rng.permutation(rows)
    bounds = (np.arange(batch_size + 1) * n) // batch_size  # strata of q or q + 1 rows
    size = np.diff(bounds)
    slots = np.full((batch_size, q + 1), -1)
    col = np.arange(n) - np.repeat(bounds[:-1], size)
    slots[np.repeat(np.arange(batch_size), size), col] = np.arange(n)
    slots = rng.permuted(slots, axis=1)
    r, c = np.nonzero(slots[:, :q] < 0)  # a stratum of q rows: its empty slot goes last
    slots[r, c], slots[r, q] = slots[r, q], -1
    order = np.concatenate([slots[:, :q - 1].T.ravel(), slots[:, q - 1:].ravel()])
    return rows[order[order >= 0]]


def minibatches(order, batch_size):
    """An epoch's minibatches (sorted row indices): ``batch_size`` rows of ``order`` at a time, the
    last one also taking the remainder (so no minibatch is smaller than ``batch_size``)."""
    n = max(1, order.size // batch_size)
    return [np.sort(order[b * batch_size:(b + 1) * batch_size] if b < n - 1 else order[b * batch_size:])
            for b in range(n)]


def largest_minibatch(n_rows, batch_size):
    """Rows of the largest of :func:`minibatches` of ``n_rows`` rows (the last one)."""
    return n_rows - (max(1, n_rows // batch_size) - 1) * batch_size
