"""Errors that the command line reports as one line: bad input (exit 2), failed writes (exit 1)."""


class InputError(Exception):
    """Bad user input: a file, a catalog entry, an option or an output folder.

    The message names the file or field and the problem, on one line. The CLI prints
    ``galdecomp: error: <message>`` and exits with status 2, without a traceback.
    """


class WriteError(Exception):
    """A file could not be written (no space left, read-only file system, quota, I/O error).

    The message names the file and the system's reason, on one line. The CLI prints
    ``galdecomp: error: <message>`` and exits with status 1, without a traceback.
    """


class JobStopped(KeyboardInterrupt):
    """A signal (Ctrl-C, SIGTERM) stopped the job after a checkpoint was written.

    Parameters
    ----------
    signum : int
        The signal; the exit status is ``128 + signum``.
    """

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
