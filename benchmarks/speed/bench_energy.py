"""Speed of the package's likelihood energy (value + gradient) against plain numpy and PyTorch.

One value+gradient pass of ``E = 0.5 sum_ic m_ic [w_c (d_ic - f(z_i)_c)^2 + log(2 pi / w_c)]``,
decoder f = MLP 10->64->64->35 (tanh), with respect to the latents z (rows x 10), the decoder
weights and the per-channel noise excitations s (``1/w_c = floor^2 + (sigma0 exp(tau s_c))^2``),
at nside 64 and 128 (49,152 and 196,608 rows), side by side in ONE run:

- ``package nifty f64/f32``: ``galdecomp.model.operators.DecoderLikelihood`` (MLP dtype f64 / f32)
  through ``ift.Linearization.make_var`` on {latent, weights, noise}, value and ``.gradient``;
- ``package kernel f64/f32``: the same operator's fused numpy pass without NIFTy (``_pass``),
  to separate the NIFTy overhead (skipped if that private method is gone);
- ``numpy blocked f64/f32``: a plain blocked numpy forward + backward written here (1024-row
  blocks, preallocated buffers, bias as a separate add/sum);
- ``torch f32/f64``: the same MLP and loss in PyTorch over all rows at once, autograd backward,
  with torch's default thread count and with ``torch.set_num_threads(1)`` (the package runs its
  BLAS with 1 thread);
- the machine's tall-skinny matmul rate ``(P x 64) @ (64 x 64)``, numpy (OpenBLAS) and torch
  (MKL), 1 thread and the default thread count, f64 and f32.

Every time is the best of ``--repeat`` runs, taken round-robin over all implementations so that
load from other jobs hits them alike; compare the RATIOS, absolute times are noisy on a shared
2-core machine. GFLOP/s counts ``6 * P * sum(n_in * n_out)`` per pass (forward, weight gradient,
input gradient; biases and elementwise work not counted). ``/matmul`` is a pass's rate over the
matmul rate of the same library, dtype and thread count (the package and plain numpy: OpenBLAS,
``--blas-threads``; torch: torch's own matmul). All implementations are checked against the
package's f64 value and gradient before timing.

Usage: ``python -m benchmarks.speed.bench_energy [--nside 64 128] [--repeat 5] [--block-size 1024]
[--blas-threads 1] [--no-torch] [--torch-threads N]``
"""
import argparse
import os
import sys

import numpy as np

from benchmarks.common import best_all, load_average, optional_torch, package_fingerprint

SIZES = (10, 64, 64, 35)
FLOOR, SIGMA0, TAU = 0.01, 0.5, 1.0
LOG2PI = np.log(2.0 * np.pi)


# ----------------------------------------------------------------------------- helpers
def unpack(theta, sizes=SIZES):
    """Per-layer (W (n_in, n_out), b) views of the package's flat parameter layout."""
    from galdecomp.model.mlp import unpack_params

    return unpack_params(theta, sizes)


def noise_w(s):
    """Inverse variance ``w`` and ``dw/ds`` of the package's noise model (no clipping needed here)."""
    adapt = SIGMA0 ** 2 * np.exp(2.0 * TAU * s)
    w = 1.0 / (FLOOR ** 2 + adapt)
    return w, -2.0 * TAU * adapt * w * w


# ----------------------------------------------------------------------------- plain numpy
class NumpyBlocked:
    """Plain blocked numpy value + gradient of the masked Gaussian loss through the MLP."""

    def __init__(self, data, mask, dtype, block=1024):
        self.dt = np.dtype(dtype)
        self.block = block
        self.d = np.where(mask, data, 0.0).astype(self.dt)
        self.m = mask.astype(self.dt)
        self.count = mask.sum(axis=0).astype(np.float64)
        bs = block
        self.buf = {k: np.empty((bs, n), self.dt) for k, n in
                    (("a1", 64), ("a2", 64), ("y", 35), ("g2", 64), ("g1", 64), ("t", 64))}

    def __call__(self, theta, z, s):
        dt, bs, P = self.dt, self.block, len(z)
        layers = [(W.astype(dt), b.astype(dt)) for W, b in unpack(theta)]
        (W0, b0), (W1, b1), (W2, b2) = layers
        W0T, W1T, W2T = (np.ascontiguousarray(W.T) for W, _ in layers)
        w, dw = noise_w(s)
        wt = w.astype(dt)
        gW = [np.zeros(W.shape) for W, _ in layers]
        gb = [np.zeros(b.shape) for _, b in layers]
        gz = np.empty((P, SIZES[0]), dt)
        rr = np.zeros(SIZES[-1])
        B = self.buf
        zc = z.astype(dt)
        for i in range(0, P, bs):
            sl = slice(i, min(i + bs, P))
            n = sl.stop - sl.start
            h0 = zc[sl]
            h1, h2, y = B["a1"][:n], B["a2"][:n], B["y"][:n]
            g2, g1, t = B["g2"][:n], B["g1"][:n], B["t"][:n]
            np.dot(h0, W0, out=h1)
            h1 += b0
            np.tanh(h1, out=h1)
            np.dot(h1, W1, out=h2)
            h2 += b1
            np.tanh(h2, out=h2)
            np.dot(h2, W2, out=y)
            y += b2
            np.subtract(y, self.d[sl], out=y)
            y *= self.m[sl]                                  # r
            rr += np.einsum("ij,ij->j", y, y, dtype=np.float64)
            y *= wt                                          # dE/dy
            gW[2] += h2.T @ y
            gb[2] += y.sum(axis=0, dtype=np.float64)
            np.dot(y, W2T, out=g2)
            np.multiply(h2, h2, out=t)
            np.subtract(1.0, t, out=t)
            g2 *= t
            gW[1] += h1.T @ g2
            gb[1] += g2.sum(axis=0, dtype=np.float64)
            np.dot(g2, W1T, out=g1)
            np.multiply(h1, h1, out=t)
            np.subtract(1.0, t, out=t)
            g1 *= t
            gW[0] += h0.T @ g1
            gb[0] += g1.sum(axis=0, dtype=np.float64)
            np.dot(g1, W0T, out=gz[sl])
        value = 0.5 * (w @ rr + self.count @ (LOG2PI - np.log(w)))
        g_theta = np.concatenate([p for W, b in zip(gW, gb) for p in (W.ravel(), b)])
        g_s = 0.5 * (rr - self.count / w) * dw
        return value, g_theta, gz, g_s


# ----------------------------------------------------------------------------- torch
class TorchPass:
    """The same loss in PyTorch (all rows at once, autograd backward)."""

    def __init__(self, torch, data, mask, dtype):
        self.t = torch
        tdt = {np.float32: torch.float32, np.float64: torch.float64}[np.dtype(dtype).type]
        self.tdt = tdt
        self.d = torch.from_numpy(np.where(mask, data, 0.0)).to(tdt)
        self.m = torch.from_numpy(mask.astype(np.float64)).to(tdt)
        self.count = self.m.sum(dim=0)

    def prepare(self, theta, z, s):
        t = self.t
        self.leaves = [t.tensor(a, dtype=self.tdt, requires_grad=True) for W, b in unpack(theta)
                       for a in (W, b)]
        self.z = t.tensor(z, dtype=self.tdt, requires_grad=True)
        self.s = t.tensor(s, dtype=self.tdt, requires_grad=True)

    def __call__(self):
        t = self.t
        W0, b0, W1, b1, W2, b2 = self.leaves
        h = t.tanh(t.addmm(b0, self.z, W0))
        h = t.tanh(t.addmm(b1, h, W1))
        r = (t.addmm(b2, h, W2) - self.d) * self.m
        rr = (r * r).sum(dim=0)
        w = 1.0 / (FLOOR ** 2 + SIGMA0 ** 2 * t.exp(2.0 * TAU * self.s))
        E = 0.5 * (w @ rr + self.count @ (LOG2PI - t.log(w)))
        grads = t.autograd.grad(E, [*self.leaves, self.z, self.s])
        return E, grads

    def result(self):
        E, g = self()
        g_theta = np.concatenate([x.detach().double().numpy().ravel() for x in g[:6]])
        return float(E.detach()), g_theta, g[6].double().numpy(), g[7].double().numpy()


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nside", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeat", type=int, default=5, help="best of R (at least 3)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="rows per block for the package MLP and plain numpy (default: package default)")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads of the package and plain-numpy passes (package default 1)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch's multi-thread setting (default: torch.get_num_threads())")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if args.repeat < 3:
        ap.error("--repeat must be at least 3")

    import nifty8 as ift
    from threadpoolctl import threadpool_limits
    from galdecomp.model.mlp import MLP
    from galdecomp.model.likelihood import GaussianLikelihood
    from galdecomp.model.operators import DecoderLikelihood

    torch = optional_torch(args.no_torch, " (pip install -e '.[bench]')")
    nthr = args.blas_threads
    t_default = None
    if torch is not None:
        t_default = args.torch_threads or torch.get_num_threads()

    flops_row = 6 * sum(n * m for n, m in zip(SIZES[:-1], SIZES[1:]))
    print(f"# bench_energy: decoder {list(SIZES)} tanh, value+gradient wrt latent, weights, noise; "
          f"best of {args.repeat}, round-robin")
    print(f"# package galdecomp ({package_fingerprint()})")
    print(f"# cpus {os.cpu_count()}, load average {load_average()}, "
          f"numpy {np.__version__} (package/numpy BLAS threads {nthr}), nifty8 {ift.__version__}"
          + (f", torch {torch.__version__} (default threads torch.get_num_threads() = "
             f"{torch.get_num_threads()}, used {t_default})" if torch else ""))
    print(f"# GFLOP/s counts 6*P*sum(n_in*n_out) = {flops_row} flop per row; '/matmul' = rate / the "
          "same-library, same-dtype, same-threads (196608x64)@(64x64) rate; '/blockGEMM' = rate / the "
          "cache-resident 1024-row-block GEMM rate (OpenBLAS)")
    # --- matmul reference rates, measured once in this run (the brief's reference shape)
    P_ref = 12 * 128 ** 2
    rng0 = np.random.default_rng(0)
    a64, w64 = rng0.standard_normal((P_ref, 64)), rng0.standard_normal((64, 64))
    none = lambda: None  # noqa: E731
    mm_entries = {}
    for dt in (np.float64, np.float32):
        a, w = a64.astype(dt), w64.astype(dt)
        out = np.empty((P_ref, 64), dt)
        for th in dict.fromkeys((nthr, 1, 2)):
            def f(a=a, w=w, out=out, th=th):
                with threadpool_limits(limits=th, user_api="blas"):
                    np.dot(a, w, out=out)
            mm_entries[("numpy", np.dtype(dt).name, th)] = (none, f)

        def blocked(a=a, w=w, out=out, bs=1024):   # the same GEMMs on cache-resident 1024-row blocks
            with threadpool_limits(limits=nthr, user_api="blas"):
                for i in range(0, P_ref, bs):
                    np.dot(a[i:i + bs], w, out=out[i:i + bs])
        mm_entries[("numpy blocked", np.dtype(dt).name, nthr)] = (none, blocked)
        if torch is not None:
            ta, tw = torch.from_numpy(a), torch.from_numpy(w)
            tout = torch.empty((P_ref, 64), dtype=ta.dtype)
            for th in dict.fromkeys((t_default, 1)):
                mm_entries[("torch", np.dtype(dt).name, th)] = (
                    lambda th=th: torch.set_num_threads(th),
                    lambda ta=ta, tw=tw, tout=tout: torch.mm(ta, tw, out=tout))
    mm = {k: 2 * P_ref * 64 * 64 / t / 1e9 for k, t in best_all(mm_entries, args.repeat).items()}
    del a64, mm_entries
    print(f"\n## tall-skinny matmul ({P_ref}x64)@(64x64), GFLOP/s (best of {args.repeat})")
    print(f"  {'library':<15}{'dtype':<9}{'threads':>8}{'GFLOP/s':>9}")
    for (lib, dt, th), r in mm.items():
        print(f"  {lib:<15}{dt:<9}{th:>8}{r:9.1f}")
    print("  ('numpy blocked': the same product as 1024-row GEMMs, cache-resident, for comparison)")
    summary = []
    for nside in args.nside:
        P = 12 * nside ** 2
        L, C = SIZES[0], SIZES[-1]
        rng = np.random.default_rng(42)
        data = rng.standard_normal((P, C))
        mask = rng.random((P, C)) > 0.1
        z = rng.standard_normal((P, L))
        s = np.full(C, -0.5) + 0.1 * rng.standard_normal(C)
        kw = {} if args.block_size is None else {"block_size": args.block_size}
        mlps = {dt: MLP(SIZES, "tanh", dtype=dt, blas_threads=nthr, **kw) for dt in (np.float64, np.float32)}
        bsz = mlps[np.float64].block_size
        xi_w = rng.standard_normal(mlps[np.float64].n_params)
        scales = mlps[np.float64].init_scales()
        theta = scales * xi_w
        rows = ift.UnstructuredDomain(P)
        ops = {dt: DecoderLikelihood(m, data, mask, GaussianLikelihood(FLOOR, SIGMA0, TAU), row_domain=rows)
               for dt, m in mlps.items()}
        vals = {"latent": z, "weights": xi_w, "noise": s}
        pos = ift.MultiField.from_dict({k: ift.makeField(ops[np.float64].domain[k], v) for k, v in vals.items()})

        def nifty(op):
            def f():
                lin = op(ift.Linearization.make_var(pos))
                return lin.val.val, lin.gradient
            return f

        def kernel(op):
            w, dw = noise_w(s)

            def f():
                rr, gth, gz = op._pass(theta, z, w, True, True)
                return rr, gth, gz, 0.5 * (rr - op._count / w) * dw
            return f

        np_impl = {dt: NumpyBlocked(data, mask, dt, bsz) for dt in (np.float64, np.float32)}

        def limited(fn):
            def f():
                with threadpool_limits(limits=nthr, user_api="blas"):
                    return fn()
            return f

        entries = {}
        for dt in (np.float64, np.float32):
            entries[f"package nifty {np.dtype(dt).name}"] = (none, nifty(ops[dt]))
        if hasattr(ops[np.float64], "_pass"):
            for dt in (np.float64, np.float32):
                entries[f"package kernel {np.dtype(dt).name}"] = (none, kernel(ops[dt]))
        for dt in (np.float64, np.float32):
            entries[f"numpy blocked {np.dtype(dt).name}"] = (
                none, limited(lambda dt=dt: np_impl[dt](theta, z, s)))
        tpass = {}
        if torch is not None:
            for dt in (np.float32, np.float64):
                tp = TorchPass(torch, data, mask, dt)
                tp.prepare(theta, z, s)
                tpass[dt] = tp
                for th in dict.fromkeys((t_default, 1)):
                    entries[f"torch {np.dtype(dt).name} {th} thr"] = (
                        lambda th=th: torch.set_num_threads(th), tp)

        # --- correctness: every implementation against the package's f64 NIFTy pass
        ref_v, ref_g = nifty(ops[np.float64])()
        ref = (float(ref_v), ref_g["weights"].val / scales, ref_g["latent"].val, ref_g["noise"].val)

        def relerr(a, b):
            return max(float(np.abs(np.asarray(x, float) - y).max() / (np.abs(y).max() + 1e-300))
                       for x, y in zip(a[1:], b[1:]))

        checks = {}
        for dt in (np.float64, np.float32):
            v, g = nifty(ops[dt])()
            checks[f"package nifty {np.dtype(dt).name}"] = (float(v), g["weights"].val / scales,
                                                            g["latent"].val, g["noise"].val)
            with threadpool_limits(limits=nthr, user_api="blas"):
                checks[f"numpy blocked {np.dtype(dt).name}"] = np_impl[dt](theta, z, s)
            if dt in tpass:
                torch.set_num_threads(t_default)
                checks[f"torch {np.dtype(dt).name}"] = tpass[dt].result()
        bad = []
        msg = []
        for k, c in checks.items():
            ev = abs(c[0] - ref[0]) / abs(ref[0])
            eg = relerr(c, ref)
            tol = 1e-9 if "float64" in k else 3e-3
            msg.append(f"{k} {max(ev, eg):.1e}")
            if not (ev < tol and eg < tol):
                bad.append(k)
        print(f"\n## nside {nside}: {P} rows, block size {bsz}")
        print("  check vs package nifty float64 (max rel. error of value and gradients): " + ", ".join(msg))
        if bad:
            print(f"  WARNING: {', '.join(bad)} disagree with the package: their timings are not comparable")

        # --- timing
        times = best_all(entries, args.repeat)
        t32 = {th: times.get(f"torch float32 {th} thr") for th in dict.fromkeys((t_default, 1))}
        hdr = f"  {'implementation':<27}{'ms':>9}{'GFLOP/s':>9}{'/matmul':>9}{'/blockGEMM':>11}"
        for th in t32:
            if t32[th]:
                hdr += f"{'x torch32 ' + str(th) + 't':>15}"
        print(hdr)
        rate = {}
        for name, t in times.items():
            dt = "float32" if "float32" in name else "float64"
            if name.startswith("torch"):
                ref_rate = mm.get(("torch", dt, int(name.split()[2])))
            else:
                ref_rate = mm.get(("numpy", dt, nthr))
            gf = flops_row * P / t / 1e9
            rate[name] = (gf, gf / ref_rate if ref_rate else float("nan"))
            blk = "" if name.startswith("torch") else f"{gf / mm[('numpy blocked', dt, nthr)]:.2f}"
            line = f"  {name:<27}{t * 1e3:9.1f}{gf:9.1f}{rate[name][1]:9.2f}{blk:>11}"
            for th, tt in t32.items():
                if tt:
                    line += f"{t / tt:15.2f}"
            print(line)
        pk = times["package nifty float32"]
        p64 = times["package nifty float64"]
        print("  goal lines:")
        if any(t32.values()):
            print("    package f32 / torch f32 time ratio (goal ≤ 1): " + ", ".join(
                f"{pk / tt:.2f} (torch {th} thread{'s' if th > 1 else ''})" for th, tt in t32.items() if tt))
        print(f"    fraction of matmul rate (goal ≥ 0.5): package f32 {rate['package nifty float32'][1]:.2f}, "
              f"package f64 {rate['package nifty float64'][1]:.2f} (of the OpenBLAS {nthr}-thread "
              f"({P_ref}x64)@(64x64) rate, same dtype); of the cache-resident blocked GEMM rate: "
              f"f32 {rate['package nifty float32'][0] / mm[('numpy blocked', 'float32', nthr)]:.2f}, "
              f"f64 {rate['package nifty float64'][0] / mm[('numpy blocked', 'float64', nthr)]:.2f}")
        if "package kernel float32" in times:
            print(f"    NIFTy overhead: nifty/kernel time f64 {p64 / times['package kernel float64']:.2f}, "
                  f"f32 {pk / times['package kernel float32']:.2f}; package nifty / numpy blocked: "
                  f"f64 {p64 / times['numpy blocked float64']:.2f}, f32 {pk / times['numpy blocked float32']:.2f}")
        summary.append((nside, pk, t32, rate))
        sys.stdout.flush()
    print(f"\n# load average at the end {load_average()}")


if __name__ == "__main__":
    main()
