"""galdecomp: unsupervised Bayesian decomposition of the multi-frequency sky.

Data flow: catalog -> preprocessing -> model (NIFTy operators) -> inference -> products -> CLI.
"""
__version__ = "0.1.0"


def load(run_dir):
    """The trained model of a run folder, a :class:`galdecomp.inference.trained.TrainedModel`.

    ``encode``, ``decode``, ``sample``, ``score_rows`` and ``condition`` work on rows x channels
    in physical units (or standardised ones with ``standardised=True``).
    """
    from .inference.trained import TrainedModel

    return TrainedModel.load(run_dir)
