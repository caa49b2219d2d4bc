"""Progress messages through the standard :mod:`logging` module.

Every module logs to its own child of the ``galdecomp`` logger
(``logging.getLogger(__name__)``); nothing is shown until :func:`configure` (called by the
command line) adds a handler on stderr that writes lines

    [galdecomp 2026-12-07 08:01:02   12.3s] message

with the local clock time and the seconds since the first configuration (warnings read
``warning: message``), and silences ranks other than 0 under MPI. Its level is INFO, WARNING
(``--quiet``) or DEBUG (``--verbose``); ``--log-file FILE`` appends the same lines to FILE.
:func:`captured` sends a third-party logger with its own handlers (NIFTy's) into these loggers.
"""
import contextlib
import logging
import sys
import time

from .errors import InputError

__all__ = ["configure", "captured", "to_log_file", "ROOT", "LINE"]

#: Name of the package's root logger.
ROOT = "galdecomp"
#: A log line: clock time, seconds since the configuration, message (a regular expression).
LINE = r"\[galdecomp (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) +(\d+\.\d)s\] (.*)"


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
    """``[galdecomp 2026-12-07 08:01:02   12.3s] message``: local time, seconds since ``t0``."""

    def __init__(self, t0):
        super().__init__()
        self.t0 = t0

    def format(self, record):
        if not hasattr(record, "galdecomp_elapsed"):  # the same on stderr and in the log file
            record.galdecomp_elapsed = time.perf_counter() - self.t0
        clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        level = "warning: " if record.levelno == logging.WARNING else \
            "error: " if record.levelno >= logging.ERROR else ""
        return f"[galdecomp {clock} {record.galdecomp_elapsed:7.1f}s] {level}{record.getMessage()}"


class _File(logging.FileHandler):
    """The ``--log-file`` handler (appends)."""


class _RankZero(logging.Filter):
    """Lets messages through on rank 0 of ``comm`` only."""

    def __init__(self, comm):
        super().__init__()
        self.comm = comm

    def filter(self, record):
        return self.comm.rank == 0


def configure(comm, level=logging.INFO, log_file=None):
    """Show the ``galdecomp`` loggers' messages on stderr, from rank 0 of ``comm`` only.

    A second call replaces the communicator, the level and the log file, and keeps the stderr
    handler and its clock.

    Parameters
    ----------
    comm : SerialComm or MPIComm
        Collective when ``log_file`` is given (every rank gets rank 0's outcome).
    level : int
        ``logging.INFO`` (default), ``logging.WARNING`` (``--quiet``) or ``logging.DEBUG``
        (``--verbose``).
    log_file : str, optional
        Also append the lines to this file (opened by rank 0 only); a previous call's file is
        closed.

    Raises
    ------
    InputError
        ``log_file`` cannot be opened for appending.
    """
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    root.propagate = False
    stderr = [h for h in root.handlers if isinstance(h, _Stderr)]
    for h in [h for h in root.handlers if isinstance(h, _File)]:
        root.removeHandler(h)
        h.close()
    if stderr:
        handler = stderr[0]
        handler.filters = [_RankZero(comm)]
    else:
        handler = _Stderr()
        handler.setFormatter(_Elapsed(time.perf_counter()))
        handler.addFilter(_RankZero(comm))
        root.addHandler(handler)
    if log_file is None:
        return
    problem, to_file = None, None
    if comm.rank == 0:
        try:
            to_file = _File(log_file, mode="a", encoding="utf-8")
        except OSError as e:
            problem = f"{log_file}: cannot open the log file ({e.strerror or e})"
    if comm.size > 1:
        problem = comm.bcast(problem)
    if problem:
        raise InputError(problem)
    if to_file is not None:
        to_file.setFormatter(handler.formatter)  # the same clock
        root.addHandler(to_file)


def to_log_file(message, level=logging.ERROR):
    """Append ``message`` as a log line to the ``--log-file`` only (e.g. the final error line,
    which the command line prints on stderr itself)."""
    root = logging.getLogger(ROOT)
    for h in root.handlers:
        if isinstance(h, _File):
            h.handle(root.makeRecord(ROOT, level, "", 0, message, None, None))


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
