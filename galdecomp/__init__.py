"""galdecomp: unsupervised Bayesian decomposition of the multi-frequency sky.

Data flow: catalog -> preprocessing -> model (NIFTy operators) -> inference -> products -> CLI.
"""
__version__ = "0.1.0"
