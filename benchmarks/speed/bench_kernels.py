"""Speed check of the decoder-likelihood value+gradient (not a test).

Decoder 10->64->64->35 (tanh) on nside-64 and nside-128 sized row sets; one value+gradient
pass with respect to latents, weights and noise, timed as the best of ``--repeat`` runs:

- ``nifty composed``: ``MaskedGaussianEnergy @ (MLPOperator, noise)`` through NIFTy Linearization
- ``nifty fused f64/f32``: the package's energy, :class:`DecoderLikelihood`, through Linearization
- ``MLP.vjp f64/f32``: the bare blocked kernel with a given output cotangent
- tall-skinny matmul ``(P x 64) @ (64 x 64)`` rate, the memory-bound reference

Usage: ``python -m benchmarks.speed.bench_kernels [--blas-threads N] [--repeat R] [--sweep] [--breakdown]``
"""
import argparse
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads in the passes and the matmul reference (0: library default)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also sweep block_size")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--breakdown", action="store_true",
                    help="time the parts of one fused pass (a timed replica of MLP.vjp + loss)")
    args = ap.parse_args()
    import numpy as np
    import nifty8 as ift
    from galdecomp.model.mlp import MLP as _MLP, blas_threads
    from galdecomp.model.likelihood import GaussianLikelihood
    from galdecomp.model.operators import DecoderLikelihood, MaskedGaussianEnergy

    nthr = args.blas_threads or None

    def MLP(*a, **k):
        return _MLP(*a, blas_threads=nthr, **k)

    sizes = [10, 64, 64, 35]
    L, C = sizes[0], sizes[-1]
    per_row = sum(n * m for n, m in zip(sizes[:-1], sizes[1:]))
    # forward + weight gradient + input gradient (all layers)
    flops_row = 2 * per_row * 3

    def best(f, repeat):
        return best_all({0: f}, repeat)[0]

    def best_all(fs, repeat):
        """Best time of each callable; runs round-robin so load drift hits all alike."""
        ts = {k: [] for k in fs}
        for f in fs.values():
            f()
        for _ in range(repeat):
            for k, f in fs.items():
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
        return {k: min(v) for k, v in ts.items()}

    def matmul_rate(P, dt):
        a = np.random.default_rng(0).standard_normal((P, 64)).astype(dt)
        w = np.random.default_rng(1).standard_normal((64, 64)).astype(dt)
        out = np.empty((P, 64), dt)
        with blas_threads(nthr):
            t = best(lambda: np.dot(a, w, out=out), args.repeat)
        return 2 * P * 64 * 64 / t / 1e9

    print(f"# load average {os.getloadavg()}, cpus {os.cpu_count()}, "
          f"BLAS threads {nthr or 'library default'}", flush=True)
    for nside in (64, 128):
        P = 12 * nside ** 2
        rng = np.random.default_rng(42)
        data = rng.standard_normal((P, C))
        mask = rng.random((P, C)) > 0.1
        z = rng.standard_normal((P, L))
        bs_default = args.block_size or MLP(sizes).block_size
        mlps = {dt: MLP(sizes, block_size=bs_default, dtype=dt) for dt in (np.float64, np.float32)}
        xi_w = rng.standard_normal(mlps[np.float64].n_params)
        s = np.full(C, -0.5)
        rows = ift.UnstructuredDomain(P)

        def nifty_grad(op):
            vals = {"latent": z, "weights": xi_w, "noise": s}
            pos = ift.MultiField.from_dict(
                {k: ift.makeField(op.domain[k], vals[k]) for k in op.domain.keys()})
            return lambda: op(ift.Linearization.make_var(pos)).gradient

        fused = {dt: DecoderLikelihood(mlps[dt], data, mask, GaussianLikelihood(0.01), row_domain=rows)
                 for dt in mlps}
        lik = MaskedGaussianEnergy(data, mask, GaussianLikelihood(0.01), row_domain=rows)
        mop = fused[np.float64].mlp_operator
        composed = lik @ (mop.ducktape_left("prediction") +
                          ift.FieldAdapter(lik.domain["noise"], "noise").ducktape_left("noise"))
        g_y = rng.standard_normal((P, C))
        theta = mlps[np.float64].init_scales() * xi_w
        fs = {"nifty composed f64": nifty_grad(composed)}
        for dt in mlps:
            fs[f"nifty fused {np.dtype(dt).name[-2:]}"] = nifty_grad(fused[dt])
        for dt, m in mlps.items():
            fs[f"MLP.vjp {np.dtype(dt).name[-2:]}"] = (lambda m=m: m.vjp(theta, z, g_y))
        results = best_all(fs, args.repeat)
        rate = {dt: matmul_rate(P, dt) for dt in (np.float64, np.float32)}

        print(f"\nnside {nside}: {P} rows, decoder {sizes}, block_size {bs_default}")
        print(f"  tall-skinny matmul ({P}x64)@(64x64): f64 {rate[np.float64]:.1f} GFLOP/s, "
              f"f32 {rate[np.float32]:.1f} GFLOP/s")
        ref = results["nifty fused 32"]
        print(f"  {'path':<20}{'ms':>9}{'GFLOP/s':>10}{'/matmul':>9}{'x fused32':>11}")
        for name, t in results.items():
            dt = np.float32 if name.endswith("32") else np.float64
            gf = flops_row * P / t / 1e9
            print(f"  {name:<20}{t * 1e3:9.1f}{gf:10.1f}{gf / rate[dt]:9.2f}{t / ref:11.2f}")
        if args.sweep:
            print("  block_size sweep, nifty fused value+gradient (ms):")
            bss = (256, 512, 1024, 2048, 4096, 8192)
            fs = {(bs, dt): nifty_grad(DecoderLikelihood(MLP(sizes, block_size=bs, dtype=dt), data,
                                                         mask, GaussianLikelihood(0.01), row_domain=rows))
                  for bs in bss for dt in (np.float64, np.float32)}
            ts = best_all(fs, args.repeat)
            for bs in bss:
                print(f"    {bs:6d}: float64 {ts[bs, np.float64] * 1e3:7.1f}   "
                      f"float32 {ts[bs, np.float32] * 1e3:7.1f}")
        if args.breakdown:
            for dt in (np.float64, np.float32):
                with blas_threads(nthr):
                    parts = breakdown(np, mlps[dt], theta, z, data, mask, args.repeat)
                tot = sum(parts.values())
                print(f"  where time goes, {np.dtype(dt).name} (total {tot * 1e3:.1f} ms): " +
                      ", ".join(f"{k} {v / tot:.0%}" for k, v in parts.items()))
        sys.stdout.flush()


def breakdown(np, m, theta, z, data, mask, repeat):
    """Seconds per part of one fused decoder-likelihood pass (best of ``repeat``)."""
    from collections import defaultdict
    dt, sizes, bs = m.dtype, m.sizes, m.block_size
    Wb = m._aug(theta)
    WT = [np.ascontiguousarray(w[:-1].T) for w in Wb]
    d, mk, w = data.astype(dt), mask.astype(dt), np.full(sizes[-1], 2.0, dt)
    pc = time.perf_counter
    best = None
    for _ in range(repeat):
        T = defaultdict(float)
        hs, (a, y, g0, g1, tmp) = m._work(len(z), 5)
        gth = [np.zeros(x.shape) for x in Wb]
        for i in range(0, len(z), bs):
            sl = slice(i, min(i + bs, len(z)))
            n = sl.stop - sl.start
            t = pc()
            hs[0][:n, :-1] = z[sl]
            T["copy in"] += pc() - t
            for k in range(len(Wb) - 1):
                ak = m._view(a, n, sizes[k + 1])
                t = pc()
                np.dot(hs[k][:n], Wb[k], out=ak)
                t2 = pc()
                np.tanh(ak, out=hs[k + 1][:n, :-1])
                T["GEMM"] += t2 - t
                T["tanh"] += pc() - t2
            yk = m._view(y, n, sizes[-1])
            t = pc()
            np.dot(hs[-1][:n], Wb[-1], out=yk)
            t2 = pc()
            np.subtract(yk, d[sl], out=yk)
            yk *= mk[sl]
            np.einsum("ij,ij->j", yk, yk, dtype=np.float64)
            yk *= w
            T["GEMM"] += t2 - t
            T["loss"] += pc() - t2
            gk = yk
            for k in range(len(Wb) - 1, -1, -1):
                t = pc()
                gth[k] += hs[k][:n].T @ gk
                if k == 0:
                    gk @ WT[0]
                    T["GEMM"] += pc() - t
                    break
                gn = m._view(g0 if k % 2 else g1, n, sizes[k])
                np.dot(gk, WT[k], out=gn)
                t2 = pc()
                h, tm = hs[k][:n, :-1], m._view(tmp, n, sizes[k])
                np.multiply(h, h, out=tm)
                np.subtract(1.0, tm, out=tm)
                gn *= tm
                T["GEMM"] += t2 - t
                T["tanh'"] += pc() - t2
                gk = gn
        if best is None or sum(T.values()) < sum(best.values()):
            best = dict(T)
    return best


if __name__ == "__main__":
    main()
