"""Shared fixtures: small HEALPix maps and catalogs written on the fly, and the real-sky data."""
import inspect
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


# -- markers: slow, mpi, realdata (pyproject.toml [tool.pytest.ini_options]; `make test-fast`) -----

#: Tests that took 5 s or more (with their fixtures' set-up) on a 2-core machine
#: (``pytest --durations=60``), by module and function (every parametrisation; ``*``: the whole
#: module); ``make test-fast`` leaves them out.
SLOW = {
    ("test_mpi", "*"), ("test_fit_quality", "*"),
    ("test_fashion", "test_fit_data_fashion_mnist_preset_writes_tables_and_image_grids"),
    ("test_docs", "test_manual_builds_without_warnings"),
    ("test_beams", "test_fit_stores_the_target_and_resume_reconstruct_anomaly_use_it"),
    ("test_workers", "test_mgvi_on_two_cores_takes_the_rows_in_two_shares"),
    ("test_workers", "test_fit_with_two_threads_is_bitwise_the_one_thread_fit"),
    ("test_mgvi", "test_block_solver_agrees_with_nifty_conjugate_gradients"),
    ("test_mgvi", "test_mgvi_from_the_command_line_on_a_trained_run"),
    ("test_reconstruct", "test_pit_calibration_corrects_heavy_tailed_noise"),
    ("test_generate", "test_transform_refits_and_sample_needs_one"),
    ("test_packaging", "test_versions_recorded_in_config_and_model_and_ignored_on_resume"),
    ("test_report", "test_features_beyond_the_sky_s_components_are_marked_unused"),
    ("test_report", "test_report_files_and_columns"),
    ("test_faults", "test_four_plus_four_epochs_equal_eight"),
    ("test_faults", "test_full_disk_and_read_only_file_system"),
    ("test_trained_model", "test_fit_in_python_is_the_command_line_fit"),
    ("test_fit", "test_interrupted_run_resumes_to_the_same_end"),
    ("test_cluster", "test_a_file_system_without_locks_is_named_and_no_lock_runs_anyway"),
}


def _source(obj):
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _reaching(module, needle):
    """Names of the module's functions (fixtures and helpers) whose source calls ``needle`` or one
    of these functions."""
    sources = {n: _source(o) for n, o in vars(module).items() if callable(o) and not isinstance(o, type)}
    found, grown = set(), True
    while grown:
        calls = [needle] + [f"{n}(" for n in found]
        new = {n for n, src in sources.items() if n not in found and any(c in src for c in calls)}
        found |= new
        grown = bool(new)
    return found


def pytest_collection_modifyitems(config, items):
    """Mark ``mpi`` the tests that start ``mpiexec``, ``realdata`` those that read ../shared's real
    maps (directly or through a fixture or helper), ``slow`` those in :data:`SLOW`."""
    real = {}
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module not in real:
            real[module] = _reaching(item.module, "realsky(")
        own = _source(item.function)
        if module == "test_mpi" or "mpiexec" in own:
            item.add_marker(pytest.mark.mpi)
        if item.function.__name__ in real[module] or real[module] & set(item.fixturenames):
            item.add_marker(pytest.mark.realdata)
        if (module, item.function.__name__) in SLOW or (module, "*") in SLOW:
            item.add_marker(pytest.mark.slow)
