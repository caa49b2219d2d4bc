"""galdecomp's benchmarks: speed, science (fit quality) and scaling, run from the project root.

Each benchmark is a module with a command line, run as ``python -m benchmarks.<group>.<name>``
(e.g. ``python -m benchmarks.speed.bench_fit --help``); ``benchmarks/README.md`` lists them with
their latest figures. The shared helpers (a simulated sky, a galdecomp fit, the PyTorch peer,
timing and provenance) are in :mod:`benchmarks.common`. Not part of the installed package.
"""
