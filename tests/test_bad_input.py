"""Every bad input of the foundation: one-line error naming the file or field, exit 2, nothing written."""
import os
import subprocess
import sys

import healpy as hp
import numpy as np
import pytest
import yaml

from conftest import write_catalog, write_map
from galdecomp.cli import main


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("galdecomp: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def entry(name="a", file="a.fits", **kw):
    e = dict(name=name, file=file, frequency_hz=1e9, unit="K_RJ")
    e.update(kw)
    return {k: v for k, v in e.items() if v is not None}


@pytest.fixture
def folder(tmp_path):
    write_map(tmp_path / "a.fits", np.linspace(1, 2, hp.nside2npix(4)))
    return tmp_path


def inspect(path, capsys):
    return run_cli(["inspect", str(path)], capsys)


def test_missing_catalog(tmp_path, capsys):
    assert_one_line_error(*inspect(tmp_path / "none.yaml", capsys), "none.yaml", "not found")


def test_missing_map_file(folder, capsys):
    cat = write_catalog(folder, [entry(file="gone.fits")])
    assert_one_line_error(*inspect(cat, capsys), "map 'a'", "gone.fits", "not found")


@pytest.mark.parametrize("text", ["- just\n- a list\n", "maps: 3\n", "a: [unclosed\n", "maps: []\n"])
def test_yaml_that_is_not_a_catalog(folder, capsys, text):
    path = folder / "catalog.yaml"
    path.write_text(text)
    code, err = inspect(path, capsys)
    assert_one_line_error(code, err, "catalog.yaml")
    assert "not a catalog" in err or "not valid YAML" in err


def test_duplicate_names(folder, capsys):
    cat = write_catalog(folder, [entry(), entry()])
    assert_one_line_error(*inspect(cat, capsys), "map 'a'", "duplicate name")


@pytest.mark.parametrize("freq,needle", [(None, "missing frequency_hz"), (0, "must be positive"),
                                         (-1e9, "must be positive"), ("high", "must be a number")])
def test_missing_or_nonpositive_frequency(folder, capsys, freq, needle):
    e = entry()
    e.pop("frequency_hz")
    if freq is not None:
        e["frequency_hz"] = freq
    cat = write_catalog(folder, [e])
    assert_one_line_error(*inspect(cat, capsys), "map 'a'", needle)


def test_fits_that_is_not_a_healpix_map(folder, capsys):
    from astropy.io import fits

    fits.PrimaryHDU(np.zeros((10, 10))).writeto(folder / "image.fits")
    (folder / "text.fits").write_text("not a fits file at all\n")
    fits.BinTableHDU.from_columns([fits.Column(name="X", format="D", array=np.arange(7.0))]).writeto(
        folder / "table.fits")
    for f in ["image.fits", "text.fits", "table.fits"]:
        cat = write_catalog(folder, [entry(file=f)])
        code, err = inspect(cat, capsys)
        assert_one_line_error(code, err, "map 'a'", f)
        assert "HEALPix" in err or "FITS" in err


def test_field_that_does_not_exist(folder, capsys):
    cat = write_catalog(folder, [entry(field=3)])
    assert_one_line_error(*inspect(cat, capsys), "map 'a'", "field 3 does not exist")


def test_map_with_no_valid_pixel(folder, capsys):
    write_map(folder / "empty.fits", np.full(hp.nside2npix(4), hp.UNSEEN))
    cat = write_catalog(folder, [entry(), entry("e", "empty.fits")])
    assert_one_line_error(*inspect(cat, capsys), "map 'e'", "no valid pixel")


def test_forced_log_on_nonpositive_map(folder, capsys):
    write_map(folder / "neg.fits", np.linspace(-1, 1, hp.nside2npix(4)))
    cat = write_catalog(folder, [entry("neg", "neg.fits", transform="log")])
    assert_one_line_error(*inspect(cat, capsys), "map 'neg'", "log")


@pytest.mark.parametrize("scale", ["wide", -1.0, 0])
def test_bad_asinh_scale(folder, capsys, scale):
    cat = write_catalog(folder, [entry(asinh_scale=scale)])
    assert_one_line_error(*inspect(cat, capsys), "map 'a'", "asinh_scale")


def test_nside_not_a_power_of_two(folder, capsys, tmp_path):
    cat = write_catalog(folder, [entry()], nside=12)
    assert_one_line_error(*inspect(cat, capsys), "nside", "not a power of two")
    cat = write_catalog(folder, [entry()])
    assert_one_line_error(*run_cli(["inspect", cat, "--nside", "3"], capsys), "not a power of two")
    out = tmp_path / "sim"
    assert_one_line_error(*run_cli(["simulate", "--nside", "3", "--out", str(out)], capsys),
                          "not a power of two")
    assert not out.exists()


def test_existing_output_folder_without_overwrite(tmp_path, capsys):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_line_error(*run_cli(["simulate", "--nside", "4", "--out", str(out)], capsys),
                          str(out), "exists", "--overwrite")
    assert os.listdir(out) == ["keep.txt"]


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(*run_cli(["simulate", "--nside", "4", "--out", str(blocker / "sim")], capsys),
                          str(blocker), "not a folder")
    # not writable even for root
    assert_one_line_error(*run_cli(["simulate", "--nside", "4", "--out", "/proc/galdecomp-sim"], capsys),
                          "/proc", "not writable")


def test_no_traceback_from_the_installed_command(tmp_path):
    """The console entry point itself: stderr is one line, exit code 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"maps": [{"name": "x"}]}))
    p = subprocess.run([sys.executable, "-m", "galdecomp", "inspect", str(bad)], capture_output=True,
                       text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "map 'x'" in p.stderr
