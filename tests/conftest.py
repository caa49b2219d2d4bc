"""Shared fixtures: small HEALPix maps and catalogs written on the fly, and the real-sky data."""
import os
import warnings

import healpy as hp
import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("GALDECOMP_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def realsky(nside):
    """Path of the real-sky catalog at ``nside`` (from ../shared or $GALDECOMP_SHARED)."""
    path = os.path.join(SHARED, "data", f"realsky{nside}", "catalog.yaml")
    if not os.path.isfile(path):
        if os.environ.get("CI"):
            pytest.fail(f"real-sky data missing in CI: {path}")
        pytest.skip(f"real-sky data not found: {path} (set GALDECOMP_SHARED)")
    return path


def write_map(path, m, nest=False, partial=False, columns=None, header=None):
    """Write a test map (or several columns) with healpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp.write_map(str(path), m, nest=nest, partial=partial, overwrite=True, column_names=columns,
                     extra_header=header or [])
    return str(path)


def write_catalog(folder, entries, nside=None):
    """Write catalog.yaml in ``folder`` from a list of entry dicts; returns its path."""
    doc = {"maps": entries}
    if nside is not None:
        doc["nside"] = nside
    path = os.path.join(str(folder), "catalog.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def simulated_sky(folder, nside=8):
    """Simulate the default sky at ``nside`` into ``folder``/sim (no plot); returns its catalog path."""
    from galdecomp.cli import main

    out = os.path.join(str(folder), "sim")
    assert main(["simulate", "--nside", str(nside), "--out", out, "--no-plot"]) == 0
    return os.path.join(out, "catalog.yaml")


def config_file(folder, settings):
    """Write configuration ``settings`` as ``folder``/config.yaml; returns its path."""
    path = os.path.join(str(folder), "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return path


@pytest.fixture
def small_catalog(tmp_path):
    """Three positive nside-8 maps in RING, a catalog for them, and the arrays."""
    rng = np.random.default_rng(1)
    npix = hp.nside2npix(8)
    maps = [np.exp(rng.normal(size=npix)) * (i + 1) for i in range(3)]
    entries = []
    for i, m in enumerate(maps):
        write_map(tmp_path / f"m{i}.fits", m)
        entries.append(dict(name=f"m{i}", file=f"m{i}.fits", frequency_hz=1e9 * (i + 1), unit="K_RJ"))
    return write_catalog(tmp_path, entries), maps, entries


def gaussian_kl(m0, S0, m1, S1):
    """``KL[N(m0, S0) || N(m1, S1)]`` per row, by dense linear algebra; means (B, L), covariances (B, L, L)."""
    S1inv = np.linalg.inv(S1)
    r = m1 - m0
    return 0.5 * (np.einsum("bij,bji->b", S1inv, S0) + np.einsum("bi,bij,bj->b", r, S1inv, r) - m0.shape[-1]
                  + np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1])


def fit_small_sky(root, *fit_options):
    """Simulate the nside-8 sky into ROOT/sky and fit it into ROOT/run with ``fit_options``; returns ROOT."""
    from galdecomp.cli import main

    assert main(["simulate", "--nside", "8", "--out", str(root / "sky"), "--no-plot"]) == 0
    assert main(["fit", str(root / "sky" / "catalog.yaml"), "--out", str(root / "run"), *fit_options]) == 0
    return root
