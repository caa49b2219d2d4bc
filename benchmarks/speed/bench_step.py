"""One training step of the package's autoencoder against PyTorch, and where the package's step goes.

A training step = value and gradient of the minibatch negative ELBO (encoder 70->128->128->20,
diagonal posterior, decoder 10->64->64->35, tanh, masked Gaussian likelihood with the adaptive
noise) with respect to all parameters, plus the Adam update, on ``--batch`` rows (default 1024
and 4096), side by side in ONE run, best of ``--repeat`` round-robin:

- ``package f64/f32``: ``ELBOObjective.value_and_gradient`` + ``Adam.step`` (what
  ``galdecomp.inference.training.train`` does per step), training dtype float64 / float32;
- its parts (private API, skipped if it changed): batch setup (``_energy``: copies of the rows,
  ``concat([d * m, m])``, casts), ``Autoencoder.position`` (MultiField of the parameters), the
  numpy kernel alone (``AmortisedELBO._run``), the rest of ``value_gradient_terms`` (gradient
  MultiField), ``Autoencoder.flatten``, ``Adam.step``;
- ``torch f32``: the same networks and loss in PyTorch, ``loss.backward()`` + ``Adam.step()``, with
  torch's default thread count and with 1 thread;
- validation: the negative ELBO of 4,915 rows without gradient (package ``ELBOObjective.value``,
  torch under ``no_grad``), as done once per epoch.

Rates count ``6 * B * (sum of n_in * n_out over both networks)`` flops per step (minus the
encoder's input gradient, which is not needed), i.e. ``6 * 34880 - 2 * 8960`` per row. Ratios are
against torch f32 at the same batch size. The data are random (timing does not depend on them).

Usage: ``python -m benchmarks.speed.bench_step [--batch 1024 4096] [--repeat 7] [--no-torch]``
"""
import argparse
import os
import sys

import numpy as np

from benchmarks.common import best_all, load_average, optional_torch, package_fingerprint, torch_vae

C, L = 35, 10
ENC, DEC = (2 * C, 128, 128, 2 * L), (L, 64, 64, C)
N_VALID = 4915


def macs_per_row():
    return sum(a * b for a, b in zip(ENC[:-1], ENC[1:])) + sum(a * b for a, b in zip(DEC[:-1], DEC[1:]))


def flops_per_row():
    return 6 * macs_per_row() - 2 * ENC[0] * ENC[1]


def package_entries(dt, B, data, rng):
    from galdecomp.inference.optimiser import Adam
    from galdecomp.model.autoencoder import Autoencoder
    from galdecomp.inference.objective import ELBOObjective
    from galdecomp.model.likelihood import GaussianLikelihood
    from galdecomp.model.settings import Architecture

    model = Autoencoder(C, L, Architecture(DEC[1:-1], ENC[1:-1], dtype=dt), GaussianLikelihood(0.01))
    obj = ELBOObjective(model, data, len(data))
    params = model.init_params(0)
    adam = Adam(params.size)
    rows = np.sort(rng.choice(len(data), B, replace=False))
    xi = rng.standard_normal((B, L))
    vrows = np.arange(N_VALID)
    vxi = rng.standard_normal((N_VALID, L))

    def step():
        v, g, _ = obj.value_and_gradient(params, rows, xi)
        adam.step(params, g, 1e-9)

    tag = f"package {dt}"
    out = {f"{tag} step": step,
           f"{tag} validation pass": lambda: obj.value(params, vrows, vxi)}
    try:                                                       # parts (private API)
        op = obj._energy(rows, xi)
        pos = model.position(params, op.domain)
        keys = op.domain.keys()
        vals = op._values(pos)
        _, grad, _ = op.value_gradient_terms(pos)
        out[f"{tag}  part: batch setup (_energy)"] = lambda: obj._energy(rows, xi)
        out[f"{tag}  part: position MultiField"] = lambda: model.position(params, op.domain)
        out[f"{tag}  part: numpy kernel (_run)"] = lambda: op._run(vals, op._batch, keys)
        out[f"{tag}  part: value_gradient_terms"] = lambda: op.value_gradient_terms(pos)
        out[f"{tag}  part: flatten gradient"] = lambda: model.flatten(grad)
        g = model.flatten(grad)
        out[f"{tag}  part: Adam.step"] = lambda: adam.step(params, g, 1e-9)
    except Exception as e:                                     # noqa: BLE001
        print(f"# package parts skipped ({type(e).__name__}: {e})")
    return out


def torch_entries(torch, B, data, rng, threads):
    mask = np.isfinite(data)
    d0 = np.where(mask, data, 0.0)
    X = torch.tensor(np.concatenate([d0 * mask, mask], axis=1), dtype=torch.float32)
    D = torch.tensor(d0, dtype=torch.float32)
    M = torch.tensor(mask, dtype=torch.float32)
    floor2 = torch.full((C,), 1e-4)

    params, vae_neg_elbo, _ = torch_vae(torch, C, L, ENC[1:-1], DEC[1:-1], floor2, 0.5)
    opt = torch.optim.Adam(params, lr=1e-9)
    idx = torch.as_tensor(np.sort(rng.choice(len(data), B, replace=False)))
    xi = torch.randn((B, L))
    vidx = torch.arange(N_VALID)
    vxi = torch.randn((N_VALID, L))

    def neg_elbo(ix, x):
        return vae_neg_elbo(X[ix], D[ix], M[ix], x)

    def step():
        loss = neg_elbo(idx, xi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def valid():
        with torch.no_grad():
            return float(neg_elbo(vidx, vxi))

    tag = f"torch float32 {threads} thr"
    return {f"{tag} step": step, f"{tag} validation pass": valid}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeat", type=int, default=7, help="best of R (at least 3)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--train-rows", type=int, default=44237,
                    help="training rows per epoch for the per-epoch estimate (nside 64: 44237)")
    args = ap.parse_args()
    if args.repeat < 3:
        ap.error("--repeat must be at least 3")
    torch = optional_torch(args.no_torch)
    t_def = torch.get_num_threads() if torch else None
    rng = np.random.default_rng(0)
    data = rng.standard_normal((max(max(args.batch), N_VALID) * 2, C))
    fpr = flops_per_row()
    print(f"# bench_step: one training step (value+gradient of the minibatch -ELBO + Adam), encoder {list(ENC)}, "
          f"decoder {list(DEC)}, tanh, diagonal posterior; best of {args.repeat}, round-robin")
    print(f"# package galdecomp ({package_fingerprint()}); cpus {os.cpu_count()}, load average {load_average()}"
          + (f"; torch {torch.__version__}, default threads {t_def}" if torch else ""))
    print(f"# GFLOP/s counts {fpr} flop per row and step ({2 * macs_per_row()} per row for a validation pass)")
    for B in args.batch:
        ent = {}
        for dt in ("float64", "float32"):
            ent.update(package_entries(dt, B, data, np.random.default_rng(1)))
        tset = {}
        if torch is not None:
            for th in dict.fromkeys((t_def, 1)):
                for k, f in torch_entries(torch, B, data, np.random.default_rng(1), th).items():
                    tset[k] = th
                    ent[k] = f
        entries = {k: ((lambda th=tset[k]: torch.set_num_threads(th)) if k in tset else (lambda: None), f)
                   for k, f in ent.items()}
        times = best_all(entries, args.repeat)
        steps = max(1, args.train_rows // B)
        print(f"\n## batch {B} ({steps} steps per epoch of {args.train_rows} rows)")
        refs = {th: times.get(f"torch float32 {th} thr step") for th in dict.fromkeys((t_def, 1))} if torch else {}
        vrefs = {th: times.get(f"torch float32 {th} thr validation pass") for th in refs}
        hdr = f"  {'implementation':<48}{'ms':>9}{'GFLOP/s':>9}{'ms/epoch':>10}"
        for th in refs:
            hdr += f"{'x torch ' + str(th) + 't':>12}"
        print(hdr)
        for name, t in times.items():
            is_step = name.endswith(" step")
            is_val = name.endswith("validation pass")
            gf = fpr * B / t / 1e9 if is_step else (2 * macs_per_row() * N_VALID / t / 1e9 if is_val else float("nan"))
            ep = f"{t * steps * 1e3:10.0f}" if is_step or "part:" in name else f"{'':>10}"
            line = f"  {name:<48}{t * 1e3:9.2f}{gf:9.1f}" if not np.isnan(gf) else f"  {name:<48}{t * 1e3:9.2f}{'':>9}"
            line += ep
            for th, rt in refs.items():
                ref = vrefs[th] if is_val else rt
                line += f"{t / ref:12.2f}" if ref else ""
            print(line)
        print("  goal-style lines (per-step time ratio, package / torch f32):")
        for dt in ("float64", "float32"):
            t = times[f"package {dt} step"]
            print(f"    package {dt}: " + ", ".join(f"{t / rt:.2f}x torch {th} thread(s)" for th, rt in refs.items() if rt))
            kern = times.get(f"package {dt}  part: numpy kernel (_run)")
            if kern:
                print(f"      the numpy kernel is {kern / t:.0%} of the package step; the rest (batch setup, "
                      f"MultiFields, flatten, Adam) {1 - kern / t:.0%}")
        sys.stdout.flush()
    print(f"\n# load average at the end {load_average()}")


if __name__ == "__main__":
    main()
