"""Cost of ``galdecomp fit`` as the work grows: time and peak memory against the number of pixels.

Runs the command a user runs, ``galdecomp fit CATALOG --out RUN --nside N --max-epochs E`` (default
settings otherwise: reading, training, products, latent transform, files and plots), each in its own
subprocess and one after the other, with one BLAS thread per process, at ``N`` = 32, 64, 128, 256
(``--nside`` regrades the maps upward), and on 2 ranks (``mpiexec -n 2``) at the largest ``N``.

Per run: training seconds per epoch (median over the epochs of the run's history.csv: minibatch
steps and validation),
end-to-end wall seconds of the command, peak resident memory (``ru_maxrss`` of the child from
``os.wait4``; on 2 ranks the largest rank's, from ``/usr/bin/time -f %M`` around each rank), and
each of them relative to linear scaling in pixels from the first row:
``(x / P) / (x_first / P_first)`` (1 = linear, < 1 better than linear). Also the seconds of the
stages of rank 0's log (start-up and reading, training, products, transform + files + plots) and
the stage during which the 1-rank process had its largest resident memory (from ``/proc/PID/status``
sampled every 0.1 s, matched against the log lines as they arrive).

Catalog: the 18 real maps of the fit-quality protocol (``realsky64`` without dust and HI, from
``$GALDECOMP_SHARED`` or ``../shared``), else ``--catalog``.

Usage: ``python -m benchmarks.scaling.bench_cost [--catalog CATALOG] [--nsides 32 64 128 256] [--epochs 3]
[--mpi-nside 256] [--ranks 2]``
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.common import galdecomp_command, load_average, package_fingerprint, prepare_real


def real_catalog(work):
    return prepare_real(work)[0]


def _rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_one(cmd, env, sample=True):
    """Run ``cmd``; wall seconds, ``ru_maxrss`` (kB), the log lines with their wall times, and the
    (time, RSS kB) samples of the process (``sample``)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, samples, done = [], [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    def poll():
        while not done.is_set():
            kb = _rss_kb(proc.pid)
            if kb is not None:
                samples.append((time.perf_counter() - t0, kb))
            done.wait(0.1)

    threads = [threading.Thread(target=read, daemon=True)] + ([threading.Thread(target=poll, daemon=True)]
                                                              if sample else [])
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print("\n".join(ln for _, ln in lines[-30:]), file=sys.stderr)
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return wall, usage.ru_maxrss, lines, samples


def stages(lines, wall):
    """Seconds of the stages, from the wall times at which rank 0's log lines arrived."""
    def first(pattern):
        return next((t for t, ln in lines if re.search(pattern, ln)), None)

    t_fit, t_done, t_post, t_tr = (first(p) for p in (r"\] fitting \d+ ", r"training done", r"posterior means",
                                                      r"latent transform"))
    return dict(reading=t_fit, training=t_done - t_fit, products=t_tr - t_post, end=wall - t_tr)


def training_per_epoch(run_dir):
    """Median seconds per epoch (minibatch steps and validation) from the run's history.csv."""
    import csv

    import numpy as np

    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return float(np.median([float(r["seconds"]) for r in csv.DictReader(f)]))


def peak_stage(lines, samples):
    """The log message current when the sampled RSS was largest, and that RSS (MB)."""
    if not samples:
        return "?", float("nan")
    t, kb = max(samples, key=lambda s: s[1])
    before = [ln for tl, ln in lines if tl <= t and ln.startswith("[galdecomp")]
    msg = re.sub(r"^\[galdecomp\s+[\d.]+s\] ", "", before[-1]) if before else "start-up"
    return msg[:48], kb / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog")
    ap.add_argument("--nsides", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mpi-nside", type=int, default=256, help="nside of the multi-rank run (0: none)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--fit-args", default="", help="extra fit arguments in one string")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_cost_")
    catalog = a.catalog or real_catalog(work)
    exe = os.path.dirname(sys.executable)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")  # log lines arrive when written: their arrival times date the stages
    print(f"# {package_fingerprint()}; catalog {catalog}; --max-epochs {a.epochs}; "
          f"load average before {load_average()}")
    jobs = [(n, 1) for n in a.nsides] + ([(a.mpi_nside, a.ranks)] if a.mpi_nside else [])
    rows = []
    for nside, ranks in jobs:
        out = os.path.join(work, f"run{nside}_{ranks}")
        fit = galdecomp_command(["fit", catalog, "--out", out, "--nside", str(nside),
                                 "--max-epochs", str(a.epochs), "--overwrite", *a.fit_args.split()])
        if ranks == 1:
            wall, maxrss, lines, samples = run_one(fit, env)
            where, _ = peak_stage(lines, samples)
        else:
            rss = os.path.join(work, f"rss{nside}")
            inner = " ".join(["/usr/bin/time", "-f", "%M", "-o", rss + ".$PMI_RANK"] + fit)
            cmd = [os.path.join(exe, "mpiexec"), "-n", str(ranks), "sh", "-c", inner]
            wall, _, lines, _ = run_one(cmd, env, sample=False)
            maxrss = max(int(open(f"{rss}.{r}").read().split()[-1]) for r in range(ranks))
            where = "(per rank)"
        pixels = 12 * nside ** 2
        row = dict(nside=nside, pixels=pixels, ranks=ranks, epoch=training_per_epoch(out), wall=wall,
                   rss=maxrss / 1024, where=where, **stages(lines, wall))
        rows.append(row)
        print(f"# nside {nside} x {ranks} rank(s): {row['epoch']:.2f} s/epoch, {wall:.1f} s, {row['rss']:.0f} MB "
              f"(peak during: {where}); load average {load_average()}", flush=True)
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    base = rows[0]

    def rel(r, k):
        return (r[k] / r["pixels"]) / (base[k] / base["pixels"])

    print(f"\nRelative to linear in pixels from nside {base['nside']}: (x / P) / (x_{base['nside']} / "
          f"P_{base['nside']}); 1 = linear, < 1 = better.\n")
    print("| nside | pixels | ranks | training s/epoch | rel. | end-to-end s | rel. | peak RSS MB | rel. "
          "| reading s | training s | products s | transform+files s | peak RSS during |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nside']} | {r['pixels']} | {r['ranks']} | {r['epoch']:.3f} | {rel(r, 'epoch'):.2f} | "
              f"{r['wall']:.1f} | {rel(r, 'wall'):.2f} | {r['rss']:.0f} | {rel(r, 'rss'):.2f} | "
              f"{r['reading']:.1f} | {r['training']:.1f} | {r['products']:.1f} | {r['end']:.1f} | {r['where']} |")
    if len(rows) > 2:
        r1, r2 = rows[-3] if rows[-1]["ranks"] > 1 else rows[-2], rows[-2] if rows[-1]["ranks"] > 1 else rows[-1]
        print(f"\nIncrements from nside {r1['nside']} to {r2['nside']} per extra pixel: "
              f"{1e6 * (r2['wall'] - r1['wall']) / (r2['pixels'] - r1['pixels']):.1f} us end to end, "
              f"{1024 * (r2['rss'] - r1['rss']) / (r2['pixels'] - r1['pixels']):.2f} kB peak RSS")
    if a.keep:
        print(f"\nrun folders in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
