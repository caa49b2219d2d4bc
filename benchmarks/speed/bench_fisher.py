"""Timing of the Fisher-metric posterior on a full nside-128 sky (196,608 rows), decoder 10->64->64->35, float64.

Run: ``python -m benchmarks.speed.bench_fisher [--rows N] [--repeat R] [--blocks 512 1024 4096]``.
Prints the best of R runs in seconds for all rows, and each time as a multiple of one decoder
value+gradient pass (``MLP.vjp``, float64, 1 BLAS thread, the package default) over the same rows,
measured in the same run (before and after the stages, best of both): absolute seconds are noisy
on a shared machine, the ratios much less. The load average is printed.
"""
import argparse
import os
import time
from types import SimpleNamespace

import numpy as np

from galdecomp.model import fisher as F
from galdecomp.model.mlp import n_params


def best_of(f, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=12 * 128 ** 2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 4096])
    ap.add_argument("--batch", type=int, default=4096, help="rows per forward/backward call (training pattern)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n, L, C = args.rows, 10, 35
    dec = SimpleNamespace(sizes=[L, 64, 64, C], activation="tanh")
    theta = rng.standard_normal(n_params(dec.sizes)) * 0.3
    mu, xi = rng.standard_normal((n, L)), rng.standard_normal((n, L))
    inv_var = rng.uniform(0.5, 2.0, (n, C)) * (rng.random((n, C)) > 0.1)
    g_z, g_kl = rng.standard_normal((n, L)), np.ones(n)

    print(f"rows {n}, decoder {dec.sizes} ({dec.activation}), float64, best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    from galdecomp.model.mlp import MLP
    mlp = MLP(dec.sizes, dec.activation, block_size=1024)
    g_y = rng.standard_normal((n, C))
    t_ref = best_of(lambda: mlp.vjp(theta, mu, g_y), args.repeat)
    rows = []
    row = lambda bs, name, t: rows.append((bs, name, t))  # noqa: E731  (printed at the end)
    for bs in args.blocks:
        blocks = [slice(i, min(i + bs, n)) for i in range(0, n, bs)]
        y, J, cache = F.jacobian_forward(theta, dec.sizes, dec.activation, mu[:bs])
        M = F.metric(J, inv_var[:bs])
        Lc = F.cholesky(M)
        stages = {  # each applied to every block (the first block's arrays stand in for the others)
            "jacobian_forward": lambda s: F.jacobian_forward(theta, dec.sizes, dec.activation, mu[s]),
            "metric": lambda s: F.metric(J, inv_var[:bs]),
            "cholesky (np.linalg)": lambda s: F.cholesky(M),
            "inv_lower (vectorised)": lambda s: F.inv_lower(Lc),
            "solve_lower L^-T xi (vectorised)": lambda s: F.solve_lower(Lc, xi[:bs], trans=True),
            "jacobian_backward": lambda s: F.jacobian_backward(cache, None, J),
        }
        for name, f in stages.items():
            row(bs, name, best_of(lambda: [f(s) for s in blocks], args.repeat))

        post = F.FisherGaussian(block_size=bs, cache_rows=0)  # one call for all rows: J recomputed in backward
        ctx = post.forward(mu, xi, dec, theta, inv_var)[2]
        t_f = best_of(lambda: post.forward(mu, xi, dec, theta, inv_var), args.repeat)
        t_b = best_of(lambda: post.backward(ctx, g_z, g_kl), args.repeat)
        row(bs, "FisherGaussian.forward: metric+chol+sample+logdet+KL", t_f)
        row(bs, "FisherGaussian.backward (recomputes J)", t_b)
        row(bs, "forward + backward, one call", t_f + t_b)

        post = F.FisherGaussian(block_size=bs)  # training pattern: batches of args.batch rows, caches kept

        def train():
            for i in range(0, n, args.batch):
                s = slice(i, i + args.batch)
                ctx = post.forward(mu[s], xi[s], dec, theta, inv_var[s])[2]
                post.backward(ctx, g_z[s], g_kl[s])
        row(bs, f"forward + backward, {args.batch}-row calls (cached J)", best_of(train, args.repeat))

    # machine-state reference: the shared MLP's value+gradient pass (SCIENCE.md: ~0.25 s f64 blocked, unloaded)
    t_end = best_of(lambda: mlp.vjp(theta, mu, g_y), args.repeat)
    ref = min(t_ref, t_end)
    # reference: scipy's batched solve_triangular loops over rows; timed on 1/16 of them
    from scipy.linalg import solve_triangular
    m = n // 16
    Lc = F.cholesky(F.metric(F.jacobian_forward(theta, dec.sizes, dec.activation, mu[:m])[1], inv_var[:m]))
    t_s = best_of(lambda: solve_triangular(Lc, xi[:m, :, None], lower=True, trans="T"), 1) * 16
    t_v = best_of(lambda: F.solve_lower(Lc, xi[:m], trans=True), args.repeat) * 16
    row("all", "L^-T xi: scipy.linalg.solve_triangular (x16 est.)", t_s)
    row("all", "L^-T xi: solve_lower, one block (x16 est.)", t_v)
    print(f"{'block':>6}  {'stage (all rows)':<52} {'s':>7} {'x vjp':>7}")
    for bs, name, t in rows:
        print(f"{bs:>6}  {name:<52} {t:7.3f} {t / ref:7.2f}")
    print(f"   ref  MLP.vjp value+gradient, f64 1 BLAS thread: {t_ref:.3f} s before the stages, {t_end:.3f} s "
          f"after (SCIENCE.md: ~0.25 s unloaded); 'x vjp' = stage time / the smaller")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
