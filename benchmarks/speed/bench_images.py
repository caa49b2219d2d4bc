"""One Fashion-MNIST training epoch against the PyTorch peer's, side by side on every core.

In ONE run, round-robin over the variants, each a fresh subprocess, best of ``--repeat``:

- ``default``: galdecomp's fit (``benchmarks.science.bench_fashion.train_model``: the preset
  ``galdecomp.datasets.fashion_mnist.PRESET``, L = 10, diagonal posterior, every core) for one
  epoch of ``--images`` standardised logit images (1 % of them validated); the epoch's seconds
  from the fit's history;
- ``one-core``: the same with ``training.threads: 1``;
- ``before``: ``default`` with the package of another source tree first on ``PYTHONPATH``
  (``--before DIR``, e.g. a ``git worktree`` of the previous commit);
- ``torch``: the PyTorch VAE of the same widths, batch and float32
  (``bench_fashion.torch_epoch``), ``torch.set_num_threads`` = the cores given, over the same
  training rows.

Usage::

    python -m benchmarks.speed.bench_images                          # 30,000 images, 3 rounds
    python -m benchmarks.speed.bench_images --variants before,default,torch --before /tmp/old-tree
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

VARIANTS = ("default", "one-core", "before", "torch")


def images(n):
    """The first ``n`` Fashion-MNIST training images as standardised logit rows (as bench_fashion)."""
    from galdecomp.datasets.fashion_mnist import image_preprocessor, load_fashion_mnist

    X = load_fashion_mnist("train")[0][:n]
    return image_preprocessor(X).forward(X.T).T


def worker(variant, n, threads):
    """The subprocess of one variant: prints the epoch's seconds as JSON."""
    D = images(n)
    if variant == "torch":
        import copy

        import torch

        from benchmarks.science.bench_fashion import torch_epoch
        from galdecomp.datasets.fashion_mnist import PRESET
        from galdecomp.inference.config import resolve_config

        torch.set_num_threads(threads)
        cfg = resolve_config(copy.deepcopy(PRESET), {"latent_dim": 10})
        seconds, _ = torch_epoch(torch, D[:int(round(n * 0.99))], 10, cfg)
    else:
        from benchmarks.science import bench_fashion
        from galdecomp.datasets import fashion_mnist

        fashion_mnist.PRESET["training"]["threads"] = 1 if variant == "one-core" else threads
        *_, state, _ = bench_fashion.train_model(D, 10, "diagonal", 1, validation_fraction=0.01)
        seconds = state.history[-1]["seconds"]
    print(json.dumps(dict(seconds=seconds)))


def run(variant, n, threads, before=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--images", str(n), "--threads", str(threads)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    first = [os.path.abspath(before)] if variant == "before" else []  # that tree's galdecomp (and benchmarks)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(first + [root, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{variant} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default,one-core,torch")
    ap.add_argument("--images", type=int, default=30000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--before", metavar="DIR", help="source tree of the variant 'before'")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.images, a.threads)
    names = a.variants.split(",")
    if any(v not in VARIANTS for v in names):
        ap.error(f"variants are {', '.join(VARIANTS)}")
    if "before" in names and not (a.before and os.path.isdir(os.path.join(a.before, "galdecomp"))):
        ap.error("the variant 'before' needs --before DIR, a source tree with galdecomp/ in it")
    best = {}
    for r in range(a.repeat):
        for v in names:
            s = run(v, a.images, a.threads, a.before)
            best[v] = min(best.get(v, np.inf), s)
            print(f"round {r + 1} {v}: {s:.2f} s ({os.getloadavg()[0]:.2f} load)", flush=True)
    peer = best.get("torch")
    print(f"\none epoch of {a.images} Fashion-MNIST images (L = 10, diagonal), {a.threads} cores, best of "
          f"{a.repeat} rounds, round-robin\n")
    print("| variant | epoch s | vs peer |\n|---|---|---|")
    for v in names:
        print(f"| {v} | {best[v]:.2f} | {best[v] / peer:.2f}x |" if peer else f"| {v} | {best[v]:.2f} | - |")


if __name__ == "__main__":
    main()
