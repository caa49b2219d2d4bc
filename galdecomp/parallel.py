"""MPI, in one place: the communicator, the pixel blocks of each rank, reductions.

MPI is opt-in: mpi4py is imported only when the process was started by an MPI launcher
(``mpiexec -n K galdecomp ...``) with more than one rank. Everything else in galdecomp sees a
communicator with ``rank``, ``size``, ``allreduce_sum``, ``gather_rows``, ``bcast``,
``scatter_block``, ``alltoall``, ``sum_scattered``, ``allgather_blocks`` and ``abort``;
the serial one does nothing.

Sharding: rank r owns one contiguous block of the data's rows (:func:`block_rows`). For a sky
the rows are pixels in NESTED order and the blocks are cut at coarse-pixel boundaries
(``BLOCK_NSIDE``, :func:`row_block`), so that a rank's patch of sky is a union of whole coarse
pixels.
"""
import os
import sys
import time

import numpy as np

__all__ = ["SerialComm", "MPIComm", "world", "row_block", "block_rows", "BLOCK_NSIDE"]

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

    def gather_rows(self, x, root=0):
        """Concatenate the ranks' row blocks on rank ``root`` (here: ``x``)."""
        return x

    def bcast(self, obj, root=0):
        """Rank ``root``'s ``obj`` on every rank (here: ``obj``)."""
        return obj

    def scatter_block(self, full, block, root=0):
        """Each rank's ``block`` (a slice) of rank ``root``'s 1-D array ``full`` (here: ``full[block]``)."""
        return np.array(full[block], dtype=np.float64)

    def alltoall(self, parts):
        """Item ``j`` of ``parts`` goes to rank ``j``; returns the items received, by source rank
        (here: ``parts``)."""
        return list(parts)

    def vector_block(self, n):
        """This rank's block of a length-``n`` vector cut into equal blocks of ``ceil(n / size)``
        (the last shorter), as :meth:`sum_scattered` and :meth:`allgather_blocks` cut it."""
        size = _block_size(n, self.size)
        return slice(min(self.rank * size, n), min((self.rank + 1) * size, n))

    def sum_scattered(self, head, body):
        """Sums over the ranks of ``head`` (every rank gets it whole) and of ``body`` (each rank
        gets its :meth:`vector_block`): a reduce-scatter (here: both, as float64 arrays)."""
        return np.asarray(head, dtype=np.float64), np.asarray(body, dtype=np.float64)

    def allgather_blocks(self, part, n):
        """The length-``n`` vector whose :meth:`vector_block` of every rank is that rank's
        ``part``, on every rank (here: ``part``, as float64 array)."""
        return np.asarray(part, dtype=np.float64)

    def barrier(self):
        pass

    def abort(self, code=1):
        sys.exit(code)


class MPIComm(SerialComm):
    """mpi4py's COMM_WORLD behind the same small interface."""

    #: Seconds :meth:`abort` waits between flushing this rank's output and MPI_Abort, so that
    #: the launcher forwards the rank's last lines (its error) before it kills the job: once,
    #: in a test run beside another, mpiexec ended the job without the failing rank's line.
    DRAIN_SECONDS = 0.5

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._send = None

    def _send_buffer(self, shape):
        """A zeroed send buffer of ``shape``, kept between calls (a fresh one per step costs page
        faults); only its used part is rewritten, so the padding stays zero."""
        if self._send is None or self._send.shape != shape:
            self._send = np.zeros(shape)
        return self._send

    def allreduce_sum(self, x):
        from mpi4py import MPI

        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=MPI.SUM)
        return out

    def gather_rows(self, x, root=0):
        parts = self.comm.gather(np.ascontiguousarray(x), root=root)
        return np.concatenate(parts, axis=0) if self.rank == root else None

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def scatter_block(self, full, block, root=0):
        """Each rank's ``block`` (a slice) of rank ``root``'s 1-D array ``full``, by one Scatterv."""
        from mpi4py import MPI

        blocks = self.comm.allgather((block.start, block.stop))
        out = np.empty(block.stop - block.start)
        send = None
        if self.rank == root:
            send = [np.ascontiguousarray(full, dtype=np.float64), [b - a for a, b in blocks],
                    [a for a, _ in blocks], MPI.DOUBLE]
        self.comm.Scatterv(send, out, root=root)
        return out

    def alltoall(self, parts):
        return self.comm.alltoall(list(parts))

    def sum_scattered(self, head, body):
        """One ``Reduce_scatter_block``: rank k's block holds ``head`` and block k of ``body``."""
        from mpi4py import MPI

        h, n = len(head), len(body)
        size = _block_size(n, self.size)
        send = self._send_buffer((self.size, h + size))
        send[:, :h] = head
        full = n // size  # blocks filled whole; the rest (at most one, shorter) then zeros
        send[:full, h:] = np.reshape(body[:full * size], (full, size))
        if full < self.size:
            send[full, h:h + n - full * size] = body[full * size:]
        recv = np.empty(h + size)
        self.comm.Reduce_scatter_block(send, recv, op=MPI.SUM)
        block = self.vector_block(n)
        return recv[:h], recv[h:h + block.stop - block.start]

    def allgather_blocks(self, part, n):
        """One ``Allgather`` of the equal (padded) blocks."""
        size = _block_size(n, self.size)
        send = np.zeros(size)
        send[:len(part)] = part
        out = np.empty(self.size * size)
        self.comm.Allgather(send, out)
        return out[:n]

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(self.DRAIN_SECONDS)
        self.comm.Abort(code)


_WORLD = None


def _block_size(n, n_ranks):
    """Length of the equal blocks (``ceil(n / n_ranks)``, the last block shorter) in which
    :meth:`SerialComm.vector_block` and the collectives on blocks cut a length-``n`` vector."""
    return -(-n // n_ranks)


def keep_freed_memory(mmap_threshold=32 << 20, trim_threshold=256 << 20):
    """Let glibc's malloc keep freed blocks of up to ``mmap_threshold`` bytes for reuse.

    Once MPI is initialised (the mpich wheels), glibc no longer raises its mmap and trim
    thresholds as a process frees large blocks, so every ~1 MB work array of a training step was
    mapped and page-faulted afresh: a 2-rank fit trained no faster than one rank
    (benchmarks/history/2026-12.md, "End to end at 2 ranks"). Without MPI glibc's own adjustment depends
    on the order of allocations (a step of 512 rows took 8.9 ms instead of 4.4 ms in a plain
    process), so :func:`world` sets it for every run. The same as ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set before the process starts; does nothing off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold)) and mallopt(m_trim_threshold, int(trim_threshold)))


def world():
    """The communicator of this process: MPI when launched by mpiexec with K > 1, else serial."""
    global _WORLD
    if _WORLD is None:
        _WORLD = SerialComm()
        keep_freed_memory()
        if any(v in os.environ for v in _LAUNCHER_VARS):
            try:
                from mpi4py import MPI
            except ImportError:  # launched by mpiexec, but no mpi4py: run serially
                MPI = None
            if MPI is not None:
                if MPI.COMM_WORLD.Get_size() > 1:
                    _WORLD = MPIComm(MPI.COMM_WORLD)
                    one_thread_per_rank()
    return _WORLD


def one_thread_per_rank():
    """Limit the BLAS and OpenMP thread pools of this MPI rank to one thread for the whole job.

    Ranks share a node's cores: with every rank's BLAS starting a thread per core, the pools of
    the ranks compete for the cores and their idle threads spin. On 2 cores, 2 ranks of a
    20-epoch fit of the real maps at nside 64 took 16.9 s end to end with OpenBLAS's default
    threads and 10.0 s with one per rank (products and latent transform 3x faster, training 4.2 s
    against 3.2 s). The same as ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` set before the job;
    does nothing without threadpoolctl. Returns whether the limit was set.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=1)
    return True


def block_rows(n_rows, comm, unit=1, what="rows"):
    """The contiguous block of rows of this rank, cut at multiples of ``unit`` rows.

    Parameters
    ----------
    n_rows : int
        Rows of the data set (a multiple of ``unit``).
    comm : SerialComm or MPIComm
    unit : int
        Rows of the smallest block (e.g. the pixels of one coarse HEALPix pixel).
    what : str
        The name of the units for the error message.

    Returns
    -------
    slice
        Rows ``[start, stop)`` owned by ``comm.rank``; the blocks of all ranks tile the rows.

    Raises
    ------
    InputError
        More ranks than units.
    """
    from .errors import InputError

    n_units = n_rows // unit
    if comm.size > n_units:
        raise InputError(f"{comm.size} MPI ranks but only {n_units} {what} (use at most {n_units} ranks)")
    edges = np.linspace(0, n_units, comm.size + 1).round().astype(int) * unit
    return slice(int(edges[comm.rank]), int(edges[comm.rank + 1]))


def row_block(nside, comm):
    """The contiguous NESTED pixel block of this rank, made of whole ``BLOCK_NSIDE`` pixels.

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
    nb = min(nside, BLOCK_NSIDE)
    return block_rows(12 * nside * nside, comm, (nside // nb) ** 2, f"pixel blocks at nside {nside}")
