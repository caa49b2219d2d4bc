"""Wall time of a default fit against the PyTorch peer a user would write, side by side, on real maps.

In ONE run, round-robin over the variants (each in a fresh subprocess), best of ``--repeat``:

- ``galdecomp`` variants: ``galdecomp fit CATALOG --out RUN --config VARIANT.yaml`` exactly as a
  user runs it; ``training`` is the training time the fit logs ("training done after N epochs in
  X s"), ``end to end`` the wall time of the whole command (reading, training, products, plots).
  ``default`` is the released default (float32 kernels, every core); ``f32-1t`` the same on one
  core; ``2-ranks`` the default under ``mpiexec -n 2`` (one thread per rank); ``previous`` the
  defaults before (float64 kernels, one core, blocks of 1024 rows);
- ``torch``: the peer of bench_quality (``benchmarks.common.fit_torch_peer``: PyTorch VAE, encoder and decoder 2x128 tanh,
  Adam 2e-3 with cosine annealing, batch 1024, float32) on the same preprocessed rows (complete
  rows), with ``torch.set_num_threads`` = the cores given (``--threads``, default all);
  ``training`` is its training loop, ``end to end`` the subprocess (imports, data, training);
- ``before``: the default of another source tree of the package (``--before DIR``, e.g. a
  ``git worktree`` of the previous commit), run as ``python -m galdecomp`` with that tree first
  on ``PYTHONPATH``: a change's before and after side by side in one run.

Data sets (``--datasets``): ``real`` (the 18 maps of realsky64 that are neither dust nor HI,
nside 64: 49,152 pixels), ``real32`` (the same at nside 32), ``realmorph`` (the real-morphology
simulated sky of ``runs/realmorph.yaml``, 35 channels), ``demo`` (``runs/demo.yaml``).

Usage::

    python -m benchmarks.speed.bench_speed                          # real maps, 200 epochs, 3 rounds
    python -m benchmarks.speed.bench_speed --epochs 20 --repeat 2   # quick look
    python -m benchmarks.speed.bench_speed --variants default,torch --datasets real,realmorph
    python -m benchmarks.speed.bench_speed --variants before,default,torch --before /tmp/old-tree
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

from benchmarks.common import Data, fit_torch_peer, galdecomp_command, prepare

VARIANTS = {
    "default": {},
    "f32-1t": {"training": {"threads": 1}},
    "2-ranks": {},  # mpiexec -n 2, one thread per rank
    "previous": {"training": {"dtype": "float64", "block_rows": 1024, "threads": 1}},
    "before": {},  # the default of the tree given by --before
}
RANKS = {"2-ranks": 2}



def peer_worker(inputs, templates, seed, epochs, threads):
    """The peer's subprocess (``--peer``): data, training; prints its seconds as JSON."""
    import json

    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = Data(inputs, templates)
    X = data.data[data.complete]
    res = fit_torch_peer(X, seed, 10, epochs=epochs)
    print(json.dumps(dict(training=res["seconds"], setup=time.perf_counter() - t0 - res["seconds"])))


def run_package(catalog, settings, epochs, seed, work, ranks=1, tree=None):
    """``galdecomp fit`` of ``catalog`` with ``settings`` in a subprocess (``tree``: the package of
    that source tree); returns its training seconds (from its log), wall seconds and threads."""
    cfg = os.path.join(work, "variant.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(settings, f)
    out = os.path.join(work, "run")
    cmd = galdecomp_command(["fit", catalog, "--out", out, "--overwrite", "--config", cfg, "--max-epochs", str(epochs),
                             "--seed", str(seed)], ranks, module=ranks > 1 or tree is not None)
    env = None
    if tree is not None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(tree)]
                                                          + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    t0 = time.perf_counter()
    # python -m puts the working directory first on sys.path: run the other tree's from there
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"training done after \d+ epochs in ([0-9.]+) s", p.stderr)
    threads = re.search(r"; (\d+) thread", p.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return dict(training=float(m.group(1)), wall=wall,
                threads=f"{ranks} x {threads.group(1)}" if threads else None)


def run_peer(inputs, templates, epochs, seed, threads):
    cmd = [sys.executable, "-m", __spec__.name, "--peer", inputs, templates, str(seed), str(epochs), str(threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"the PyTorch peer failed (pip install -e '.[bench]'):\n{p.stderr[-2000:]}")
    import json

    res = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(training=res["training"], wall=wall, threads=f"1 x {threads}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="real")
    ap.add_argument("--variants", default="default,f32-1t,2-ranks,previous,torch")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="cores of the peer (default: all, as the package's default)")
    ap.add_argument("--before", metavar="DIR", help="source tree of the variant 'before' (a git worktree)")
    ap.add_argument("--peer", nargs=5, metavar=("INPUTS", "TEMPLATES", "SEED", "EPOCHS", "THREADS"),
                    help=argparse.SUPPRESS)  # the peer's subprocess
    args = ap.parse_args(argv)
    if args.peer:
        inputs, templates, seed, epochs, threads = args.peer
        return peer_worker(inputs, templates, int(seed), int(epochs), int(threads))
    names = args.variants.split(",")
    if "before" in names and not (args.before and os.path.isdir(os.path.join(args.before, "galdecomp"))):
        ap.error("the variant 'before' needs --before DIR, a source tree with galdecomp/ in it")
    work = tempfile.mkdtemp(prefix="bench_speed_")
    rows = []
    try:
        for ds in args.datasets.split(","):
            inputs, templates = prepare(ds, work)
            best = {}
            for r in range(args.repeat):
                for name in names:
                    if name == "torch":
                        res = run_peer(inputs, templates, args.epochs, args.seed, args.threads)
                    else:
                        res = run_package(inputs, VARIANTS[name], args.epochs, args.seed, work, RANKS.get(name, 1),
                                          args.before if name == "before" else None)
                    print(f"{ds} round {r + 1} {name}: training {res['training']:.1f} s, end to end "
                          f"{res['wall']:.1f} s ({os.getloadavg()[0]:.2f} load)", flush=True)
                    b = best.setdefault(name, dict(res))
                    b["training"], b["wall"] = min(b["training"], res["training"]), min(b["wall"], res["wall"])
            peer = best.get("torch")
            for name in names:
                b = best[name]
                ratio = f"{b['training'] / peer['training']:.2f}x" if peer else "-"
                rows.append(f"| {ds} | {name} | {b['threads']} | {b['training']:.1f} | {b['wall']:.1f} | {ratio} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.epochs} epochs, best of {args.repeat} rounds, round-robin\n")
    print("| data | variant | processes x threads | training s | end to end s | training vs peer |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
