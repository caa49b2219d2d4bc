"""Reading a catalog on K ranks: peak memory per rank and time, maps read in rounds over the ranks vs every rank reading.

Run under MPI, e.g. ``mpiexec -n 2 python -m benchmarks.scaling.bench_reading CATALOG --nside 128``. Each
rank reports the peak of the memory allocated while reading (``tracemalloc``, which sees numpy's
arrays; imports excluded) and the wall time; ``--every-rank`` makes every rank read every full map (the behaviour before 2026-12-04).
"""
import argparse
import tracemalloc
import time

import numpy as np


def main(argv=None):
    from galdecomp.catalog import read_catalog
    from galdecomp.parallel import row_block, world
    from galdecomp.sources import load_preprocessed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("catalog")
    ap.add_argument("--nside", type=int, default=128)
    ap.add_argument("--every-rank", action="store_true")
    args = ap.parse_args(argv)
    comm = world()
    cat = read_catalog(args.catalog)
    rows = row_block(args.nside, comm)
    import astropy.io.fits  # noqa: F401  (imports are not the reading's memory)
    import healpy  # noqa: F401

    tracemalloc.start()
    t0 = time.perf_counter()
    _, _, data = load_preprocessed(cat, args.nside, rows, None if args.every_rank else comm)
    dt = time.perf_counter() - t0
    grow = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    out = comm.gather_rows(np.array([[comm.rank, grow, dt, data.nbytes / 2 ** 20]]))
    if comm.rank == 0:
        how = "every rank reads" if args.every_rank else "maps read in rounds (map i by rank i % size) and scattered"
        print(f"{how}, {comm.size} ranks, nside {args.nside}, {len(cat.maps)} maps")
        for r, g, t, b in out:
            print(f"  rank {int(r)}: peak {g:.1f} MiB allocated while reading ({b:.1f} MiB of data kept), {t:.1f} s")


if __name__ == "__main__":
    main()
