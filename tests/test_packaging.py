"""The package as others install and cite it: pyproject.toml, CITATION.cff, LICENSE, every
third-party import declared, ``galdecomp --version``, and the versions recorded in a run."""
import ast
import json
import os
import re
import sys

import numpy as np
import pytest
import yaml

import galdecomp
from galdecomp.cli import main
from galdecomp.versions import differences, versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "galdecomp")
#: Import names that differ from their distribution's name.
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn"}


def pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def names(requirements):
    """Distribution names of PEP 508 requirement strings, normalised."""
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def third_party_imports():
    """Top-level module -> files, for every absolute import in galdecomp/ outside the standard library."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top != "galdecomp" and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return found


def test_pyproject_metadata():
    doc = pyproject()
    p = doc["project"]
    assert p["name"] == "galdecomp" and "version" in p["dynamic"] and "version" not in p
    assert doc["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "galdecomp.__version__"}
    assert p["license"] == "GPL-3.0-or-later" and p["license-files"] == ["LICENSE"]
    assert p["requires-python"] == ">=3.10" and p["readme"] == "README.md"
    assert p["scripts"] == {"galdecomp": "galdecomp.cli:main"}
    assert set(p["optional-dependencies"]) == {"mpi", "test", "bench", "docs"}
    assert names(p["optional-dependencies"]["docs"]) == {"sphinx", "myst-parser"}
    assert names(p["optional-dependencies"]["docs"]) <= names(p["optional-dependencies"]["test"])  # the docs test
    assert "Topic :: Scientific/Engineering :: Astronomy" in p["classifiers"]
    assert p["urls"] and all(u.startswith("https://") for u in p["urls"].values())
    assert doc["build-system"]["build-backend"] == "setuptools.build_meta"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "GNU GENERAL PUBLIC LICENSE" in f.readline() and "Version 3" in f.readline()
    assert os.path.isfile(os.path.join(PACKAGE, "data", "channels.yaml"))  # shipped in the wheel
    assert "data/*.yaml" in doc["tool"]["setuptools"]["package-data"]["galdecomp"]


def test_every_third_party_import_is_declared():
    p = pyproject()["project"]
    declared = names(p["dependencies"]) | {n for extra in p["optional-dependencies"].values() for n in names(extra)}
    imports = third_party_imports()
    assert {"numpy", "nifty8", "healpy", "astropy", "threadpoolctl"} <= set(imports)  # the scan sees them
    missing = {m: sorted(files) for m, files in imports.items() if DISTRIBUTION.get(m, m) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_citation_cff():
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        doc = yaml.safe_load(f)
    assert doc["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "abstract"):
        assert doc[key], key
    assert doc["type"] == "software" and doc["license"] == "GPL-3.0-or-later"
    assert str(doc["version"]) == galdecomp.__version__
    assert all("name" in a or "family-names" in a for a in doc["authors"])


def test_version_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"galdecomp {galdecomp.__version__}"


def test_versions_recorded_in_config_and_model_and_ignored_on_resume(tmp_path, capsys):
    from galdecomp import load
    from conftest import fit_small_sky

    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"latent_dim": 2, "decoder": {"hidden": [8]}, "encoder": {"hidden": [8]},
                                     "training": {"batch_size": 32, "schedule_epochs": 4}}))
    run = fit_small_sky(tmp_path, "--config", str(small), "--max-epochs", "2") / "run"
    now = versions()
    assert list(now) == ["galdecomp", "python", "numpy", "scipy", "nifty8", "healpy"]
    assert now["galdecomp"] == galdecomp.__version__ and now["numpy"] == np.__version__
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["versions"] == now
    with np.load(run / "model.npz") as f:
        assert json.loads(str(f["versions"])) == now
    assert load(str(run)).versions == now

    # a run's config.yaml is a --config file as it is (the record is ignored)
    sky = str(tmp_path / "sky" / "catalog.yaml")
    assert main(["fit", sky, "--out", str(tmp_path / "again"), "--config", str(run / "config.yaml")]) == 0

    # written under other versions: resumes, saying which differ, and records the current ones
    cfg["versions"]["numpy"] = "1.26.4"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["fit", sky, "--out", str(run), "--resume", "--max-epochs", "3"]) == 0
    assert f"other versions than the run was written with: numpy 1.26.4 -> {np.__version__}" \
        in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["versions"] == now

    # a run written before the versions were recorded: loads and resumes, without the line
    del cfg["versions"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with np.load(run / "model.npz") as f:
        arrays = {k: f[k] for k in f.files if k != "versions"}
    np.savez(run / "model.npz", **arrays)
    assert load(str(run)).versions is None
    capsys.readouterr()
    assert main(["fit", sky, "--out", str(run), "--resume", "--max-epochs", "4"]) == 0
    assert "other versions" not in capsys.readouterr().err


def test_version_differences():
    now = versions()
    assert differences(None) == [] and differences(now) == []
    assert differences({**now, "healpy": "0.1"}, now) == [f"healpy 0.1 -> {now['healpy']}"]
    assert differences({"numpy": now["numpy"]}, now) == []  # entries not recorded are not compared
