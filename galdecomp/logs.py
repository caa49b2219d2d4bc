"""Progress messages through the standard :mod:`logging` module.

Every module logs to its own child of the ``galdecomp`` logger
(``logging.getLogger(__name__)``); nothing is shown until :func:`configure` (called once by the
command line) adds a handler on stderr that writes ``[galdecomp   12.3s] message`` lines, with
the wall-clock time since the configuration, and silences ranks other than 0 under MPI.
"""
import logging
import sys
import time

__all__ = ["configure", "ROOT"]

#: Name of the package's root logger.
ROOT = "galdecomp"


class _Stderr(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr`` (looked up at every message)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property always wins
        pass


class _Elapsed(logging.Formatter):
    """``[galdecomp   12.3s] message``: seconds since ``t0``."""

    def __init__(self, t0):
        super().__init__()
        self.t0 = t0

    def format(self, record):
        return f"[galdecomp {time.perf_counter() - self.t0:7.1f}s] {record.getMessage()}"


class _RankZero(logging.Filter):
    """Lets messages through on rank 0 of ``comm`` only."""

    def __init__(self, comm):
        super().__init__()
        self.comm = comm

    def filter(self, record):
        return self.comm.rank == 0


def configure(comm):
    """Show the ``galdecomp`` loggers' INFO messages on stderr, from rank 0 of ``comm`` only.

    Idempotent: a second call replaces the communicator and keeps the handler and its clock.

    Parameters
    ----------
    comm : SerialComm or MPIComm
    """
    root = logging.getLogger(ROOT)
    root.setLevel(logging.INFO)
    root.propagate = False
    for h in root.handlers:
        if isinstance(h, _Stderr):
            h.filters = [_RankZero(comm)]
            return
    handler = _Stderr()
    handler.setFormatter(_Elapsed(time.perf_counter()))
    handler.addFilter(_RankZero(comm))
    root.addHandler(handler)
