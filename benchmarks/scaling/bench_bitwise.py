"""What a rank-count-independent (bitwise) gradient would cost per training step.

The pixel-sharded fit adds the ranks' partial sums of the minibatch gradient with one Allreduce;
the float result depends on how the rows are split over the ranks. A bitwise alternative fixes
the grouping: the global rows are cut into fixed blocks of ``R`` rows (ranks own whole blocks),
every block's partial gradient is computed on its own and converted to fixed point with one
exponent shared by all ranks (from a max-Allreduce), and the integer sums, which are
associative, are added with the same Allreduce (int64 instead of float64). The result is then
the same on any number of ranks whose row boundaries fall on block boundaries.

This script measures the compute side of that scheme on one process, side by side in one run
(best of ``--repeat`` round-robin rounds): the current step (one ``value_and_gradient`` call on
the minibatch) against one call per block touched by the minibatch plus the fixed-point
conversion and integer sum, for blocks of 4096, 1024 and 256 rows. The communication (one int64
Allreduce of the same length plus a scalar max) is not included: it is the same size as today's.

Usage: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.scaling.bench_bitwise [--nside 64] [--channels 18] [--repeat 7]``
"""
import argparse

import numpy as np

from benchmarks.common import best_all, load_average, package_fingerprint


def fixed_point_sum(grads, bits=52):
    """Exact integer sum of float vectors on a shared exponent, back to float (rank-order free)."""
    top = max(float(np.max(np.abs(g))) for g in grads) * len(grads)
    e = np.ldexp(1.0, bits - int(np.ceil(np.log2(top if top > 0 else 1.0))))
    acc = np.zeros(grads[0].size, dtype=np.int64)
    for g in grads:
        acc += np.rint(g * e).astype(np.int64)
    return acc / e


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nside", type=int, default=64)
    ap.add_argument("--channels", type=int, default=18)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--blocks", type=int, nargs="+", default=[4096, 1024, 256])
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args(argv)

    from galdecomp.model.autoencoder import Autoencoder
    from galdecomp.inference.objective import ELBOObjective
    from galdecomp.model.likelihood import GaussianLikelihood
    from galdecomp.parallel import SerialComm

    class NotFirst(SerialComm):  # a block's energy without the prior terms (which rank 0 adds once)
        rank = 1

    rng = np.random.default_rng(0)
    P, C, L = 12 * a.nside ** 2, a.channels, 10
    data = rng.standard_normal((P, C))
    model = Autoencoder(C, L, likelihood=GaussianLikelihood(0.01))
    obj = ELBOObjective(model, data, P)
    obj_block = ELBOObjective(model, data, P, comm=NotFirst())
    params = model.init_params(0)
    one, z1 = np.arange(1), np.zeros((1, L))
    prior_grad = obj.value_and_gradient(params, one, z1)[1] - obj_block.value_and_gradient(params, one, z1)[1]
    rows = np.sort(rng.choice(P, a.batch, replace=False))
    xi = rng.standard_normal((a.batch, L))

    def current():
        return obj.value_and_gradient(params, rows, xi)[1]

    def blocked(R):
        block = rows // R
        cuts = np.flatnonzero(np.diff(block)) + 1
        parts = np.split(np.arange(rows.size), cuts)

        def run():
            grads = []
            for p in parts:  # each block alone; weighted back to the minibatch mean
                _, g, _ = obj_block.value_and_gradient(params, rows[p], xi[p])
                grads.append(g * (p.size / rows.size))
            grads.append(prior_grad)
            return fixed_point_sum(grads)
        return run, len(parts)

    entries = {"current: one call per step": (lambda: None, current)}
    n_parts = {}
    for R in a.blocks:
        fn, n = blocked(R)
        n_parts[R] = n
        entries[f"bitwise, blocks of {R} rows"] = (lambda: None, fn)
    g0 = current()
    print(f"# nside {a.nside} ({P} rows) x {C} channels, batch {a.batch}, default networks; "
          f"{package_fingerprint()}; load {load_average()}")
    for R in a.blocks:  # the blocked gradient is the same gradient (up to the float grouping)
        err = np.max(np.abs(blocked(R)[0]() - g0)) / np.max(np.abs(g0))
        print(f"# blocks of {R}: {n_parts[R]} blocks in the minibatch, max relative difference to "
              f"the current gradient {err:.1e}")
    t = best_all(entries, a.repeat)
    base = t["current: one call per step"]
    print("| step variant | ms per step | cost vs current |")
    print("|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {1e3 * v:.2f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
