"""MPI, in one place: the communicator, the pixel blocks of each rank, reductions.

MPI is opt-in: mpi4py is imported only when the process was started by an MPI launcher
(``mpiexec -n K galdecomp ...``) with more than one rank. Everything else in galdecomp sees a
communicator with ``rank``, ``size``, ``allreduce_sum``, ``gather_rows``, ``bcast`` and ``abort``;
the serial one does nothing.

Sharding: the data's rows are pixels in NESTED order; rank r owns one contiguous block (a
compact patch of sky). Blocks are cut at coarse-pixel boundaries (``BLOCK_NSIDE``) so that a
rank's patch is a union of whole coarse pixels.
"""
import os
import sys

import numpy as np

__all__ = ["SerialComm", "MPIComm", "world", "row_block", "BLOCK_NSIDE"]

#: Coarse resolution whose pixels are the units of the pixel blocks of the ranks.
BLOCK_NSIDE = 16

_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK",
                  "HYDRA_CONTROL_FD")


class SerialComm:
    """A one-process communicator: every collective is the identity."""

    rank, size = 0, 1

    def allreduce_sum(self, x):
        """Sum over ranks (here: ``x`` itself, as float64 array)."""
        return np.asarray(x, dtype=np.float64)

    def gather_rows(self, x):
        """Concatenate the ranks' row blocks on rank 0 (here: ``x``)."""
        return x

    def bcast(self, obj):
        return obj

    def barrier(self):
        pass

    def abort(self, code=1):
        sys.exit(code)


class MPIComm(SerialComm):
    """mpi4py's COMM_WORLD behind the same small interface."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def allreduce_sum(self, x):
        from mpi4py import MPI

        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=MPI.SUM)
        return out

    def gather_rows(self, x):
        parts = self.comm.gather(np.ascontiguousarray(x), root=0)
        return np.concatenate(parts, axis=0) if self.rank == 0 else None

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


_WORLD = None


def world():
    """The communicator of this process: MPI when launched by mpiexec with K > 1, else serial."""
    global _WORLD
    if _WORLD is None:
        _WORLD = SerialComm()
        if any(v in os.environ for v in _LAUNCHER_VARS):
            try:
                from mpi4py import MPI
            except ImportError:  # launched by mpiexec, but no mpi4py: run serially
                MPI = None
            if MPI is not None and MPI.COMM_WORLD.Get_size() > 1:
                _WORLD = MPIComm(MPI.COMM_WORLD)
    return _WORLD


def row_block(nside, comm):
    """The contiguous NESTED pixel block of this rank.

    Parameters
    ----------
    nside : int
        Working resolution.
    comm : SerialComm or MPIComm

    Returns
    -------
    slice
        Rows ``[start, stop)`` of the NESTED pixel list owned by ``comm.rank``.

    Raises
    ------
    InputError
        More ranks than coarse pixel blocks.
    """
    from .errors import InputError

    nb = min(nside, BLOCK_NSIDE)
    n_blocks, per_block = 12 * nb * nb, (nside // nb) ** 2
    if comm.size > n_blocks:
        raise InputError(f"{comm.size} MPI ranks but only {n_blocks} pixel blocks at nside {nside} "
                         f"(use at most {n_blocks} ranks)")
    edges = np.linspace(0, n_blocks, comm.size + 1).round().astype(int) * per_block
    return slice(int(edges[comm.rank]), int(edges[comm.rank + 1]))
