"""What `galdecomp inspect` shows: per-channel statistics, the chosen transform, warnings."""
import numpy as np

__all__ = ["summarise", "COLUMNS"]

COLUMNS = ["name", "frequency_hz", "unit", "kind", "nside", "fwhm_arcmin", "frame", "coverage", "min", "median",
           "max", "transform", "warnings"]


def summarise(dataset, preprocessor, duplicate_threshold=0.995):
    """Per-channel summary rows of a sky data set.

    Parameters
    ----------
    dataset : SkyDataSet
    preprocessor : Preprocessor
        Fitted on ``dataset``.
    duplicate_threshold : float
        ``|Pearson r|`` of the transformed channels above which two channels are flagged as
        near-duplicates (they add little information, and can drive a learned noise to 0).

    Returns
    -------
    list of dict
        One row per channel with the keys of ``COLUMNS``: ``fwhm_arcmin`` is the declared beam
        (empty where not declared), ``frame`` the frame the map's COORDSYS names (``-`` without
        one: taken to be the catalog's); statistics are of the maps as loaded (rotated to the
        catalog's frame, smoothed to the target resolution if any).
    """
    y = preprocessor.forward(dataset.values)
    obs = dataset.observed
    # correlation over pixels observed in both channels, all pairs at once
    yz = np.where(obs, y, 0.0)
    n = obs.astype(float) @ obs.T.astype(float)
    s1 = yz @ obs.T.astype(float)
    sxy = yz @ yz.T
    sxx = (yz ** 2) @ obs.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy / n - (s1 / n) * (s1.T / n)
        var_i = sxx / n - (s1 / n) ** 2
        corr = cov / np.sqrt(var_i * var_i.T)
    poisson = preprocessor.poisson_noise()
    rows = []
    for i, name in enumerate(dataset.names):
        v = dataset.values[i][obs[i]]
        warn = []
        dups = [dataset.names[j] for j in range(len(dataset.names))
                if j != i and abs(corr[i, j]) > duplicate_threshold]
        if dups:
            warn.append("near-duplicate of " + ", ".join(dups))
        if obs[i].mean() < 1:
            warn.append(f"{(~obs[i]).sum()} missing pixels")
        if dataset.native_nside and dataset.native_nside[i] != dataset.nside:
            warn.append(f"regraded from nside {dataset.native_nside[i]}")
        own = dataset.frames[i] if dataset.frames else None
        if own is not None and own != dataset.coord:
            warn.append(f"rotated from frame {own} to {dataset.coord}")
        beam = dataset.fwhm_arcmin[i] if dataset.fwhm_arcmin else None
        if dataset.target_fwhm_arcmin is not None and beam is not None and beam < dataset.target_fwhm_arcmin:
            warn.append(f"smoothed to fwhm {dataset.target_fwhm_arcmin:g} arcmin")
        elif dataset.target_fwhm_arcmin is not None and beam is None:
            warn.append("no fwhm_arcmin: not smoothed")
        if dataset.kinds[i] == "counts" and np.mean(v == 0) > 0.5:
            warn.append(f"{np.mean(v == 0):.0%} zero counts")
        tr = preprocessor.transforms[i]
        if poisson[i] > 1:  # the fit's known noise (noise.poisson_floor)
            warn.append(f"Poisson noise {poisson[i]:.1f}x the map's spread")
        rows.append(dict(name=name, frequency_hz=float(dataset.frequencies_hz[i]), unit=dataset.units[i],
                         kind=dataset.kinds[i], nside=dataset.native_nside[i] if dataset.native_nside else dataset.nside,
                         fwhm_arcmin="" if beam is None else float(beam), frame=own or "-",
                         coverage=f"{obs[i].mean():.4f}", min=float(v.min()), median=float(np.median(v)),
                         max=float(v.max()),
                         transform=tr.kind + (f"(scale={tr.scale:.3g})" if tr.kind == "asinh" else ""),
                         warnings="; ".join(warn)))
    return rows
