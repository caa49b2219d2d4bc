"""Errors that the command line reports as one line and exit code 2."""


class InputError(Exception):
    """Bad user input: a file, a catalog entry, an option or an output folder.

    The message names the file or field and the problem, on one line. The CLI prints
    ``galdecomp: error: <message>`` and exits with status 2, without a traceback.
    """
