"""How good is a Gaussian latent posterior q(z | d)? Importance sampling of the true p(z | d).

Given the trained decoder ``f`` and noise, ``p(z | d) = p~(z) / Z`` with
``p~(z) = p(d | z) N(z; 0, 1)`` (the likelihood family's ``nll_rows`` over the observed channels
and the prior). With ``K`` draws ``z_k ~ q`` and log weights ``log w_k = log p~(z_k) - log q(z_k)``:

- ``log Z ~ log mean_k w_k`` (a lower bound in expectation: biased low when q misses mass);
- ``KL(q || p) = E_q[log q - log p~] + log Z ~ log Z - mean_k log w_k`` (>= 0 by construction;
  underestimated when ``log Z`` is);
- ``ESS / K = (sum w)^2 / (K sum w^2)``: 1 for q = p; near 1/K when one draw dominates, and then
  the weighted moments below are unreliable;
- the weighted mean and standard deviation of ``p``: the mean shift ``(mean_p - mean_q) / std_q``
  and the std ratio ``std_q / std_p`` per latent dimension;
- coverage: the weighted mass of ``p`` inside q's 68 % Mahalanobis ellipsoid
  (``|Lq^-1 (z - mean_q)|^2 <= chi2_L quantile 0.68``); 0.68 for q = p, more for a too wide q.

Draws are vectorised over pixels in blocks of about ``block_rows`` decoded rows.
"""
import os

import numpy as np
from scipy import stats

from ..errors import InputError
from ..seeds import salted
from ..model.fisher import covariance, jacobian_forward, metric

__all__ = ["importance_check", "log_target", "metropolis", "q_candidates", "check_pixels", "summarise", "run_posterior_check",
           "COLUMNS", "SUMMARY_COLUMNS"]

_LOG2PI = np.log(2.0 * np.pi)

#: columns of posterior_check.csv
COLUMNS = ["pixel", "q", "source", "n_observed", "kl", "kl_pooled", "log_z", "ess_fraction", "shift_sigma_rms",
           "shift_sigma_max", "std_ratio", "std_ratio_min", "std_ratio_max", "coverage_68"]
#: columns of mcmc_check.csv (``--mcmc-steps``)
MCMC_COLUMNS = ["pixel", "q", "acceptance", "ess_fraction", "q_shift_vs_mcmc", "q_std_ratio_vs_mcmc",
                "is_shift_vs_mcmc", "is_std_ratio_vs_mcmc"]
#: columns of posterior_check_summary.csv (medians over pixels unless said)
SUMMARY_COLUMNS = ["q", "source", "pixels", "kl", "kl_pooled", "ess_fraction", "frac_ess_below_0.1",
                   "shift_sigma_rms", "std_ratio", "coverage_68"]


def importance_check(model, params, data, mask, q_mean, q_cov, draws, rng, block_rows=65536, prior=None):
    """Importance sampling of ``p(z | d)`` with the Gaussian ``q`` of each row as proposal.

    Parameters
    ----------
    model : Autoencoder
        Decoder and likelihood family.
    params : ndarray
        Trained parameters.
    data, mask : ndarray, shape (P, C)
        Standardised data and observed entries.
    q_mean : ndarray, shape (P, L)
    q_cov : ndarray, shape (P, L, L)
        Positive definite.
    draws : int
        Draws per row.
    rng : numpy.random.Generator
    block_rows : int
        Decoded rows (pixels x draws) per block.
    prior : LatentPrior, optional
        Default the model's prior N(0, 1).

    Returns
    -------
    dict of ndarray
        Shape (P,): ``log_z``, ``elbo`` (``mean_k log w_k``), ``kl``, ``ess_fraction``,
        ``shift_sigma_rms``, ``shift_sigma_max`` (largest absolute shift), ``std_ratio``
        (geometric mean over dimensions), ``std_ratio_min``, ``std_ratio_max``, ``coverage_68``;
        shape (P, L): ``mean_p``, ``std_p`` (importance-weighted moments).
    """
    prior = model.prior if prior is None else prior
    data, mask = np.asarray(data, float), np.asarray(mask, bool)
    q_mean, q_cov = np.asarray(q_mean, float), np.asarray(q_cov, float)
    P, L = q_mean.shape
    K = int(draws)
    chol = np.linalg.cholesky(q_cov)
    logdet = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    std_q = np.sqrt(np.diagonal(q_cov, axis1=1, axis2=2))
    r68 = stats.chi2.ppf(0.68, L)
    s = params[model.slices["noise"]]
    keys = ("log_z", "elbo", "ess_fraction", "coverage_68")
    out = {k: np.empty(P) for k in keys}
    out.update(mean_p=np.empty((P, L)), std_p=np.empty((P, L)))
    nb = max(1, int(block_rows) // K)
    for a in range(0, P, nb):
        b = slice(a, min(a + nb, P))
        n = b.stop - b.start
        eps = rng.standard_normal((n, K, L))
        z = q_mean[b, None, :] + np.einsum("pij,pkj->pki", chol[b], eps)
        maha = (eps * eps).sum(axis=2)
        log_q = -0.5 * (maha + L * _LOG2PI + logdet[b, None])
        zf = z.reshape(n * K, L)
        nll = model.likelihood.nll_rows(np.repeat(data[b], K, axis=0), np.repeat(mask[b], K, axis=0),
                                        model.decode(params, zf), s).reshape(n, K)
        logw = prior.log_density(zf).reshape(n, K) - nll - log_q
        top = logw.max(axis=1, keepdims=True)
        w = np.exp(logw - top)
        wsum = w.sum(axis=1)
        wn = w / wsum[:, None]
        out["log_z"][b] = top[:, 0] + np.log(wsum) - np.log(K)
        out["elbo"][b] = logw.mean(axis=1)
        out["ess_fraction"][b] = 1.0 / (wn * wn).sum(axis=1) / K
        out["coverage_68"][b] = (wn * (maha <= r68)).sum(axis=1)
        mp = np.einsum("pk,pkl->pl", wn, z)
        out["mean_p"][b] = mp
        out["std_p"][b] = np.sqrt(np.einsum("pk,pkl->pl", wn, (z - mp[:, None, :]) ** 2))
    out["kl"] = out["log_z"] - out["elbo"]
    shift = (out["mean_p"] - q_mean) / std_q
    out["shift_sigma_rms"] = np.sqrt((shift * shift).mean(axis=1))
    out["shift_sigma_max"] = np.abs(shift).max(axis=1)
    with np.errstate(divide="ignore"):
        lr = np.log(std_q) - np.log(out["std_p"])  # +inf where all weight is on one draw
    out["std_ratio"] = np.exp(lr.mean(axis=1))
    out["std_ratio_min"], out["std_ratio_max"] = np.exp(lr.min(axis=1)), np.exp(lr.max(axis=1))
    return out


def log_target(model, params, data, mask, z, prior=None):
    """``log p~(z) = log p(d | z) + log p(z)`` per row (unnormalised log posterior); z (P, L)."""
    prior = model.prior if prior is None else prior
    s = params[model.slices["noise"]]
    return prior.log_density(z) - model.likelihood.nll_rows(data, mask, model.decode(params, z), s)


def metropolis(model, params, data, mask, start, cov, steps, rng, burn=0.25, prior=None):
    """Random-walk Metropolis of ``p(z | d)`` for every row at once (an independent cross-check).

    Proposal ``z' = z + (2.38 / sqrt(L)) Lc eps`` with ``cov = Lc Lc^T`` per row (e.g. the Laplace
    covariance); one chain per row, all rows stepped together.

    Parameters
    ----------
    model, params, data, mask
        As for :func:`importance_check`.
    start : ndarray, shape (P, L)
    cov : ndarray, shape (P, L, L)
    steps : int
    rng : numpy.random.Generator
    burn : float
        Fraction of the steps discarded.
    prior : LatentPrior, optional

    Returns
    -------
    dict of ndarray
        ``mean``, ``std`` (P, L) of the kept states; ``acceptance`` (P,).
    """
    z = np.array(start, dtype=float)
    P, L = z.shape
    chol = (2.38 / np.sqrt(L)) * np.linalg.cholesky(cov)
    lp = log_target(model, params, data, mask, z, prior)
    n0 = int(burn * steps)
    s1, s2, acc = np.zeros((P, L)), np.zeros((P, L)), np.zeros(P)
    for t in range(int(steps)):  # over steps; every row moves at once
        prop = z + np.einsum("pij,pj->pi", chol, rng.standard_normal((P, L)))
        lq = log_target(model, params, data, mask, prop, prior)
        ok = np.log(rng.uniform(size=P)) < lq - lp
        z[ok], lp[ok] = prop[ok], lq[ok]
        if t >= n0:
            s1 += z
            s2 += z * z
            acc += ok
    n = int(steps) - n0
    mean = s1 / n
    return dict(mean=mean, std=np.sqrt(np.maximum(s2 / n - mean * mean, 0.0)), acceptance=acc / n)


def q_candidates(trained, data, mask):
    """The Gaussian posteriors to check, from one trained model.

    The run's own encoder; the other covariance type from the same decoder (for a diagonal run:
    the Fisher covariance ``M(mean)^-1`` at the encoder's mean; for a Fisher run: the diagonal of
    the encoder's Fisher covariance); the Laplace approximation ``N(z_MAP, M(z_MAP)^-1)`` of
    :meth:`~galdecomp.inference.trained.TrainedModel.condition`.

    Parameters
    ----------
    trained : TrainedModel
    data, mask : ndarray, shape (P, C)
        Standardised data and observed entries.

    Returns
    -------
    dict
        ``name -> (source, mean (P, L), cov (P, L, L))`` for ``name`` in the run's type, the
        other type, ``"laplace"``.
    """
    am = trained.model
    mean, cov = trained.encode(data, mask, standardised=True, full_cov=True)
    own = am.posterior.name
    out = {own: ("encoder", mean, cov)}
    if own == "diagonal":
        _, J, _ = jacobian_forward(am.split(trained.params)[1], am.decoder.sizes, am.decoder.activation, mean)
        out["fisher"] = ("fisher_at_encoder_mean", mean, covariance(metric(J, mask / trained.sigma ** 2))[0])
    else:
        var = np.diagonal(cov, axis1=1, axis2=2)
        out["diagonal"] = ("diagonal_of_encoder_fisher", mean, var[:, :, None] * np.eye(mean.shape[1]))
    lap = trained.condition(data, mask, standardised=True)
    out["laplace"] = ("laplace_at_map", lap["mean"], lap["cov"])
    return out


def check_pixels(trained, data, mask, draws=2000, seed=0, pixels=None, progress=None, mcmc_steps=0):
    """Importance check of every q candidate for the given rows.

    Parameters
    ----------
    trained : TrainedModel
    data, mask : ndarray, shape (P, C)
        Standardised data and observed entries of the rows to check.
    draws : int
    seed : int
    pixels : ndarray of int, shape (P,), optional
        Pixel index of each row (for the table; default 0..P-1).
    progress : callable, optional
    mcmc_steps : int
        If > 0, also run :func:`metropolis` (started at the Laplace MAP, its covariance as the
        proposal shape) for every row and compare each q and each importance estimate with it.

    Returns
    -------
    rows : list of dict
        One row per pixel and q (:data:`COLUMNS`); ``kl_pooled`` uses the largest ``log Z``
        estimate of the pixel over all q (each is a lower bound in expectation, so the largest
        is the least biased).
    mcmc_rows : list of dict
        With ``mcmc_steps``: one row per pixel and q (:data:`MCMC_COLUMNS`): the Metropolis
        acceptance rate, the q's and the importance estimate's mean shift (RMS over latents, in
        the chain's std) and std ratio (geometric mean) against the chain. Else empty.
    """
    pixels = np.arange(len(data)) if pixels is None else np.asarray(pixels)
    qs = q_candidates(trained, data, mask)
    res = {}
    for i, (name, (source, mean, cov)) in enumerate(qs.items()):
        if progress:
            progress(f"importance sampling with q = {name} ({source}): {len(data)} pixels x {draws} draws")
        res[name] = importance_check(trained.model, trained.params, data, mask, mean, cov, draws,
                                     salted(seed, "posterior_check/importance", i), prior=trained.prior)
    best = np.max([r["log_z"] for r in res.values()], axis=0)
    n_obs = mask.sum(axis=1)
    mcmc_rows = []
    if mcmc_steps > 0:
        if progress:
            progress(f"Metropolis cross-check: {len(data)} chains x {mcmc_steps} steps")
        ch = metropolis(trained.model, trained.params, data, mask, qs["laplace"][1], qs["laplace"][2],
                        mcmc_steps, salted(seed, "posterior_check/metropolis"), prior=trained.prior)

        def versus(mean, std):  # inf where a chain never moved (std 0): too few steps
            with np.errstate(divide="ignore", invalid="ignore"):
                shift = (mean - ch["mean"]) / ch["std"]
                return np.sqrt((shift * shift).mean(axis=1)), np.exp(np.log(std / ch["std"]).mean(axis=1))

        for name, r in res.items():
            q_std = np.sqrt(np.diagonal(qs[name][2], axis1=1, axis2=2))
            cols = versus(qs[name][1], q_std) + versus(r["mean_p"], r["std_p"])
            mcmc_rows += [dict(pixel=int(pixels[p]), q=name, acceptance=float(ch["acceptance"][p]),
                               ess_fraction=float(r["ess_fraction"][p]),
                               **{k: float(v[p]) for k, v in zip(MCMC_COLUMNS[4:], cols)})
                          for p in range(len(data))]
    rows = []
    for name, r in res.items():
        r["kl_pooled"] = best - r["elbo"]
        for p in range(len(data)):  # table rows only (the computation above is vectorised)
            row = dict(pixel=int(pixels[p]), q=name, source=qs[name][0], n_observed=int(n_obs[p]))
            row.update({k: float(r[k][p]) for k in COLUMNS[4:]})
            rows.append(row)
    return rows, mcmc_rows


def summarise(rows):
    """Medians per q type of :func:`check_pixels` rows (:data:`SUMMARY_COLUMNS`)."""
    out = []
    for q in dict.fromkeys(r["q"] for r in rows):
        sel = [r for r in rows if r["q"] == q]
        col = {k: np.array([r[k] for r in sel], float) for k in COLUMNS[4:]}
        s = dict(q=q, source=sel[0]["source"], pixels=len(sel))
        s.update({k: float(np.median(col[k])) for k in SUMMARY_COLUMNS if k in col})
        s["frac_ess_below_0.1"] = float(np.mean(col["ess_fraction"] < 0.1))
        out.append(s)
    return out


def plot_check(rows, path):
    """Histograms of KL(q || p) and of the std ratio per q type (one PNG)."""
    from ..figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    qs = list(dict.fromkeys(r["q"] for r in rows))
    kl = {q: np.array([r["kl"] for r in rows if r["q"] == q]) for q in qs}
    ratio = {q: np.array([r["std_ratio"] for r in rows if r["q"] == q]) for q in qs}
    lo = max(min(np.nanmin(v[v > 0]) if np.any(v > 0) else 1e-4 for v in kl.values()), 1e-6)
    hi = max(max(np.nanmax(v) for v in kl.values()), lo * 10)
    kb = np.logspace(np.log10(lo), np.log10(hi), 30)
    fin = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in ratio.values()])
    rb = np.logspace(np.log10(fin.min()) - 0.01, np.log10(fin.max()) + 0.01, 30) if fin.size else 30
    for q in qs:
        ax[0].hist(np.clip(kl[q], lo, None), bins=kb, histtype="step", lw=1.5, label=q)
        ax[1].hist(ratio[q][np.isfinite(ratio[q])], bins=rb, histtype="step", lw=1.5, label=q)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("KL(q || p) [nats], importance sampling")
    ax[1].set_xscale("log")
    ax[1].axvline(1.0, color="grey", lw=0.8)
    ax[1].set_xlabel("std_q / std_p (geometric mean over latents)")
    for a in ax:
        a.set_ylabel("pixels")
        a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def run_posterior_check(run_dir, out, n_pixels, draws=2000, seed=0, overwrite=False, progress=print,
                        mcmc_steps=0):
    """``galdecomp posterior-check``: check q(z|d) on random pixels of a run's data; write ``out``.

    Parameters
    ----------
    run_dir : str
        Run folder of ``galdecomp fit``.
    out : str
        Output folder (built under a temporary name, renamed when complete).
    n_pixels : int
        Random pixels (with at least one observed channel), at most all.
    draws : int
        Importance draws per pixel and q.
    seed : int
    overwrite : bool
    progress : callable
    mcmc_steps : int
        If > 0, the Metropolis cross-check of :func:`check_pixels`, written to ``mcmc_check.csv``.

    Returns
    -------
    dict
        ``rows``, ``summary``, ``mcmc_rows``, ``text`` (the printed summary), ``paths``.

    Raises
    ------
    InputError
        A missing or unfinished run, its catalog unreadable, an output folder that exists.
    """
    from ..fileio import atomic_output_dir, check_output_dir, write_text
    from ..run import RunFolder
    from .anomaly import load_rows
    from .tables import format_table

    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: run folder not found")
    check_output_dir(out, overwrite)
    trained = RunFolder(run_dir).trained_model()
    values = load_rows(trained, None)[0]
    y = trained.standardise(values)
    m = np.isfinite(y)
    ok = np.flatnonzero(m.any(axis=1))
    rng = salted(seed, "posterior_check/pixels")
    pix = np.sort(rng.choice(ok, size=min(int(n_pixels), len(ok)), replace=False))
    rows, mrows = check_pixels(trained, np.where(m[pix], y[pix], 0.0), m[pix], draws, seed, pix, progress,
                               mcmc_steps)
    summary = summarise(rows)
    text = (f"q(z|d) against p(z|d) by importance sampling: {len(pix)} pixels, {draws} draws, "
            f"{trained.latent_dim} latents, run covariance {trained.model.posterior.name} (medians)\n"
            + format_table(summary, SUMMARY_COLUMNS, "text"))
    if mrows:
        med = [dict(q=q, **{k: float(np.median([r[k] for r in mrows if r["q"] == q])) for k in MCMC_COLUMNS[2:]})
               for q in summary_q(summary)]
        text += (f"against a Metropolis chain per pixel ({mcmc_steps} steps, medians; shift in the chain's "
                 f"sigma, std ratio = std / chain std):\n" + format_table(med, MCMC_COLUMNS[1:], "text"))
    with atomic_output_dir(out, overwrite) as tmp:
        write_text(os.path.join(tmp, "posterior_check.csv"), format_table(rows, COLUMNS, "csv"))
        write_text(os.path.join(tmp, "posterior_check_summary.csv"), format_table(summary, SUMMARY_COLUMNS, "csv"))
        plot_check(rows, os.path.join(tmp, "posterior_check.png"))
        if mrows:
            write_text(os.path.join(tmp, "mcmc_check.csv"), format_table(mrows, MCMC_COLUMNS, "csv"))
    out = os.path.abspath(out)
    paths = {k: os.path.join(out, k) for k in ("posterior_check.csv", "posterior_check_summary.csv",
                                                "posterior_check.png")}
    if mrows:
        paths["mcmc_check.csv"] = os.path.join(out, "mcmc_check.csv")
    return dict(rows=rows, summary=summary, mcmc_rows=mrows, text=text, paths=paths)


def summary_q(summary):
    """The q names of a summary, in order."""
    return [s["q"] for s in summary]
