"""Fits on 1, 2 and 4 MPI ranks against the spread of seeds (full default length).

The ranks add their partial sums in another order than one process does; over a full fit the
rounding grows into another optimum. This measures whether that optimum is as good: the best
validation ELBO and the report's held-out R^2 of every truth template from the features, for
one process with seeds 0, 1, 2 and for 2 and 4 ranks with seed 0. Writes
``benchmarks/out/ranks/summary.md``.

Usage::

    python -m benchmarks.science.bench_ranks [--nside 32] [--ranks 2,4] [--seeds 0,1,2]
"""
import argparse
import csv
import os
import subprocess
import sys

import numpy as np

from benchmarks.common import galdecomp_command, out_dir, simulate


def galdecomp(args, ranks=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = galdecomp_command(args, ranks, module=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")


def result(run, truth):
    hist = np.genfromtxt(os.path.join(run, "history.csv"), delimiter=",", names=True)
    if not os.path.isfile(os.path.join(run, "report", "summary.csv")):
        galdecomp(["report", run, "--templates", truth])
    with open(os.path.join(run, "report", "summary.csv")) as f:
        r2 = {r["template"]: float(r["r2_all_features"]) for r in csv.DictReader(f) if r["method"] == "galdecomp"}
    return float(np.max(hist["validation_elbo"])), r2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nside", type=int, default=32)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=out_dir("ranks"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    sky = os.path.join(args.out, "sky")
    if not os.path.isfile(os.path.join(sky, "catalog.yaml")):
        simulate(sky, args.nside)
    truth = os.path.join(sky, "truth", "catalog.yaml")
    runs = {f"1 rank, seed {s}": (1, int(s)) for s in args.seeds.split(",")}
    runs.update({f"{k} ranks, seed 0": (int(k), 0) for k in args.ranks.split(",")})
    res = {}
    for name, (k, seed) in runs.items():
        run = os.path.join(args.out, f"k{k}-s{seed}")
        if not os.path.isfile(os.path.join(run, "model.npz")):
            galdecomp(["fit", os.path.join(sky, "catalog.yaml"), "--out", run, "--overwrite", "--seed", str(seed)],
                      ranks=k)
        res[name] = result(run, truth)
        print(name, res[name][0], flush=True)
    templates = sorted(next(iter(res.values()))[1])
    lines = ["| fit | best validation ELBO | " + " | ".join(f"R^2 {t}" for t in templates) + " |",
             "|---|---|" + "---|" * len(templates)]
    for name, (elbo, r2) in res.items():
        lines.append(f"| {name} | {elbo:.3f} | " + " | ".join(f"{r2[t]:.3f}" for t in templates) + " |")
    seeds = [v for n, v in res.items() if n.startswith("1 rank")]
    el = [e for e, _ in seeds]
    lines.append(f"| seed spread (1 rank) | {max(el) - min(el):.3f} | " + " | ".join(
        f"{max(r[t] for _, r in seeds) - min(r[t] for _, r in seeds):.3f}" for t in templates) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
