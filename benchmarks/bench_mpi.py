"""Strong scaling of the pixel-sharded fit: 1 vs 2 MPI ranks (one thread each), nside 64 and 128.

Measures, in one run: time per training epoch (from the ranks' own timing, data loading and
products excluded), bytes communicated per optimiser step (the packed Allreduce), memory per
pixel per rank (peak RSS difference between nside 128 and 64), and prints a projection for
nside 1024 x 35 channels.

Usage: ``python benchmarks/bench_mpi.py [--epochs 3] [--nsides 64 128]``
The worker mode (``--worker``) is what mpiexec runs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(catalog, nside, epochs, batch, out):
    import resource

    import numpy as np

    from galdecomp.parallel import world
    from galdecomp.pipeline import fit_catalog

    comm = world()
    t0 = time.perf_counter()
    res = fit_catalog(catalog, out, overrides={"nside": nside, "training": {"max_epochs": epochs, "batch_size": batch}},
                      overwrite=True)
    wall = time.perf_counter() - t0
    hist = res["state"].history
    rss = comm.allreduce_sum([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])[0] / comm.size
    n_params = res["state"].params.size
    if comm.rank == 0:
        epochs_s = [h["seconds"] for h in hist]
        steps = hist[-1]["step"] / len(hist)
        print("RESULT " + json.dumps(dict(
            ranks=comm.size, nside=nside, batch=batch, wall=wall, epoch_s=float(np.median(epochs_s)),
            steps_per_epoch=steps, allreduce_bytes=8 * (3 + n_params), rss_bytes=rss,
            n_params=n_params)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--nsides", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096],
                    help="global minibatch sizes (the work per step that the ranks share)")
    ap.add_argument("--worker", nargs=5, metavar=("CATALOG", "NSIDE", "EPOCHS", "BATCH", "OUT"))
    args = ap.parse_args()
    if args.worker:
        c, n, e, b, o = args.worker
        return worker(c, int(n), int(e), int(b), o)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    tmp = tempfile.mkdtemp(prefix="bench_mpi_")
    sky = os.path.join(tmp, "sky")
    subprocess.run([sys.executable, "-m", "galdecomp", "simulate", "--nside", str(max(args.nsides)),
                    "--out", sky, "--no-plot"], check=True, env=env, capture_output=True)
    rows = []
    for nside, batch, k in [(n, b, k) for n in args.nsides for b in args.batch_sizes for k in (1, 2)]:
        cmd = [mpiexec, "-n", str(k), sys.executable, os.path.abspath(__file__), "--worker",
               os.path.join(sky, "catalog.yaml"), str(nside), str(args.epochs), str(batch),
               os.path.join(tmp, f"run{nside}_{batch}_{k}")]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"worker failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
        rows.append(json.loads(line[0][7:]))
        r = rows[-1]
        print(f"nside {nside:4d}  batch {batch:5d}  ranks {k}  epoch {r['epoch_s']:7.2f} s  ({r['steps_per_epoch']:.0f} steps)  "
              f"whole job {r['wall']:6.1f} s  peak RSS/rank {r['rss_bytes'] / 2**20:7.1f} MiB", flush=True)
    by = {(r["nside"], r["batch"], r["ranks"]): r for r in rows}
    print("\n| nside | batch | epoch 1 rank [s] | epoch 2 ranks [s] | speed-up (goal >= 1.8) |")
    print("|---|---|---|---|---|")
    for nside in args.nsides:
        for batch in args.batch_sizes:
            a, b = by[(nside, batch, 1)], by[(nside, batch, 2)]
            print(f"| {nside} | {batch} | {a['epoch_s']:.2f} | {b['epoch_s']:.2f} | {a['epoch_s'] / b['epoch_s']:.2f} |")
    r = rows[0]
    print(f"\nbytes per optimiser step (one packed Allreduce of value, 2 terms and {r['n_params']} "
          f"gradients, float64): {r['allreduce_bytes']} B per rank")
    if len(args.nsides) >= 2:
        lo, hi = min(args.nsides), max(args.nsides)
        bs = args.batch_sizes[-1]
        a, b = by[(lo, bs, 1)], by[(hi, bs, 1)]
        per_pix = (b["rss_bytes"] - a["rss_bytes"]) / (12 * (hi ** 2 - lo ** 2))
        t_pix = b["epoch_s"] / (12 * hi ** 2)
        print(f"memory per pixel per rank (peak RSS, nside {hi} minus {lo}, 1 rank): {per_pix:.0f} B")
        print(f"training time per pixel per epoch (1 rank, nside {hi}): {t_pix * 1e6:.2f} us")
        npix = 12 * 1024 ** 2
        for ranks in (16, 64, 256):
            mem = per_pix * npix / ranks + a["rss_bytes"]
            print(f"projection nside 1024 x 35 channels, {ranks:3d} ranks: ~{mem / 2**30:.1f} GiB per rank, "
                  f"~{t_pix * npix / ranks:.0f} s per epoch (compute only, perfect scaling), "
                  f"{r['allreduce_bytes'] / 1024:.0f} KiB Allreduce per step")
    print(f"\noutputs in {tmp}")


if __name__ == "__main__":
    main()
