"""The run layer: a run folder and every file in it (:class:`~galdecomp.run.folder.RunFolder`).

The only code that names, reads and writes a run's own files; the products compute what goes
into them and ask a :class:`RunFolder` where it goes.
"""
from .folder import RunFolder

__all__ = ["RunFolder"]
