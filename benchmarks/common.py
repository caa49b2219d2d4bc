"""Shared helpers of the benchmark scripts (timing, provenance); imported as ``benchutil``."""
import hashlib
import os
import subprocess
import time

import numpy as np


def best_all(entries, repeat):
    """Best wall time of each entry ``name -> (setup, fn)``.

    Runs round-robin (every entry once per round, ``repeat`` rounds, after one untimed warm-up
    round) so that load from other jobs on a shared machine hits all entries alike; ``setup()``
    runs before every call and is not timed.
    """
    ts = {k: [] for k in entries}
    for setup, fn in entries.values():
        setup()
        fn()
    for _ in range(repeat):
        for k, (setup, fn) in entries.items():
            setup()
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in ts.items()}


def package_dir():
    import importlib.util

    return list(importlib.util.find_spec("galdecomp").submodule_search_locations)[0]


def package_fingerprint(pkg_dir=None):
    """``sources sha256 <12 hex>, git HEAD <rev>`` of the galdecomp sources (read-only git call).

    The hash covers every ``.py`` file of the package, so runs on an edited working tree can be
    told apart from runs on the commit.
    """
    pkg_dir = pkg_dir or package_dir()
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(pkg_dir)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for fn in sorted(files):
            if fn.endswith(".py"):
                with open(os.path.join(root, fn), "rb") as f:
                    h.update(fn.encode() + f.read())
    try:
        head = subprocess.run(["git", "-C", os.path.dirname(pkg_dir), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        head = "?"
    return f"sources sha256 {h.hexdigest()[:12]}, git HEAD {head}"


def load_average():
    return tuple(round(x, 2) for x in os.getloadavg())


def optional_torch(disabled=False, hint=""):
    """``torch`` if it is installed and not ``disabled``, else None (with a printed note)."""
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        print(f"# torch not installed: torch rows skipped{hint}")
        return None
    return torch


def torch_mlp(torch, sizes):
    """``torch.nn.Sequential`` of Linear layers of widths ``sizes`` with tanh between them."""
    nn = torch.nn
    mods = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def torch_vae(torch, n_features, latent_dim, encoder_hidden, decoder_hidden, floor2, sigma0, beta=1.0):
    """The reference PyTorch f32 VAE of the benchmarks (tanh MLPs, learned per-channel noise).

    Encoder ``2C -> encoder_hidden -> 2L`` over ``[d * m, m]`` giving (mu, log sigma), decoder
    ``L -> decoder_hidden -> C``, Gaussian likelihood over the observed channels with variance
    ``floor2 + exp(2 log_sigma)``, analytic KL to N(0, 1); PyTorch's default initialisation.

    Returns
    -------
    params : list of torch.nn.Parameter
        Encoder, decoder and ``log_sigma`` parameters (for the optimiser).
    neg_elbo : callable
        ``neg_elbo(X, D, M, xi) -> scalar``: mean negative ELBO of rows with inputs ``X = [d * m, m]``,
        data ``D`` (missing set to 0), mask ``M`` (float) and draws ``xi``.
    modules : tuple
        ``(encoder, decoder, log_sigma)``.
    """
    nn = torch.nn
    L = latent_dim

    def mlp(sizes):
        return torch_mlp(torch, sizes)

    enc = mlp([2 * n_features, *encoder_hidden, 2 * L])
    dec = mlp([L, *decoder_hidden, n_features])
    log_sigma = nn.Parameter(torch.full((n_features,), float(np.log(sigma0))))
    log2pi = float(np.log(2.0 * np.pi))

    def neg_elbo(X, D, M, xi):
        e = enc(X)
        mu, ls = e[:, :L], e[:, L:]
        sd = torch.exp(ls)
        y = dec(mu + sd * xi)
        var = floor2 + torch.exp(2.0 * log_sigma)
        r = (D - y) * M
        nll = 0.5 * ((r * r) / var + M * (log2pi + torch.log(var))).sum(dim=1)
        kl = 0.5 * (mu * mu + sd * sd - 1.0 - 2.0 * ls).sum(dim=1)
        return (nll + beta * kl).mean()

    return [*enc.parameters(), *dec.parameters(), log_sigma], neg_elbo, (enc, dec, log_sigma)
