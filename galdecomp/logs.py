"""Progress messages through the standard :mod:`logging` module.

Every module logs to its own child of the ``galdecomp`` logger
(``logging.getLogger(__name__)``); nothing is shown until :func:`configure` (called once by the
command line) adds a handler on stderr that writes ``[galdecomp   12.3s] message`` lines, with
the wall-clock time since the configuration, and silences ranks other than 0 under MPI.
:func:`captured` sends a third-party logger with its own handlers (NIFTy's) into these loggers.
"""
import contextlib
import logging
import sys
import time

__all__ = ["configure", "captured", "ROOT"]

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


class _Forward(logging.Handler):
    """Re-emits records into ``target`` at ``level`` (``ERROR`` and above: ``WARNING``) and keeps them."""

    def __init__(self, target, level, keep):
        super().__init__()
        self.target, self.to_level, self.keep = target, level, keep

    def emit(self, record):
        self.keep.append(record)
        level = logging.WARNING if record.levelno >= logging.ERROR else self.to_level
        if self.target.isEnabledFor(level):
            self.target.log(level, "%s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def captured(name, target, level=logging.DEBUG):
    """Send the records of the logger ``name`` to the logger ``target`` while the block runs.

    The logger's own handlers (NIFTy8 has a stream handler of its own) are removed for the
    duration, so nothing of it is printed directly; its records are logged to ``target`` at
    ``level`` (errors at ``WARNING``), prefixed by the logger's name, and collected.

    Parameters
    ----------
    name : str
        The logger to capture, e.g. ``"NIFTy8"``.
    target : logging.Logger
        A logger of the package (a child of :data:`ROOT`).
    level : int
        Level of the forwarded records below ``ERROR``.

    Yields
    ------
    list of logging.LogRecord
        The records captured so far (the caller may clear it).
    """
    src = logging.getLogger(name)
    saved = src.handlers[:], src.propagate
    keep = []
    src.handlers = [_Forward(target, level, keep)]
    src.propagate = False
    try:
        yield keep
    finally:
        src.handlers, src.propagate = saved
