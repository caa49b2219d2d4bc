"""The README and the reference manual: the manual builds without warnings, the README stays
short, and every image and relative link they hold points to a file of the repository."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
#: Markdown links and images: [text](target) and ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown_files():
    pages = sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))
    return [README, os.path.join(ROOT, "CHANGELOG.md")] + pages


def _local_targets(path):
    """The relative link targets of a Markdown file outside its code blocks, without anchors."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                                  # a URL, mailto:, or an anchor on the page
        yield target.split("#", 1)[0]


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= 250, f"README.md has {n} lines (at most 250; the rest belongs in docs/)"


def test_readme_images_exist():
    with open(README, encoding="utf-8") as f:
        images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", f.read())
    assert any(i.startswith("plots/") for i in images), "README.md shows no figure from plots/"
    missing = [i for i in images if not os.path.isfile(os.path.join(ROOT, i))]
    assert not missing, f"README.md: images not found: {missing}"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_exist(path):
    if not os.path.isfile(path):
        pytest.skip(f"{os.path.relpath(path, ROOT)} does not exist")
    here = os.path.dirname(path)
    broken = [t for t in _local_targets(path) if t and not os.path.exists(os.path.join(here, t))]
    assert not broken, f"{os.path.relpath(path, ROOT)}: broken links {broken}"


def test_configuration_page_lists_every_setting():
    from galdecomp.inference.config import DEFAULTS

    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    with open(os.path.join(DOCS, "configuration.md"), encoding="utf-8") as f:
        page = f.read()
    missing = [k for k in keys(DEFAULTS) if f"`{k}`" not in page]
    assert not missing, f"docs/configuration.md: settings without an entry: {missing}"


def test_manual_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e '.[docs]')")
    pytest.importorskip("myst_parser", reason="myst-parser is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           DOCS, str(tmp_path / "html")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "html" / "index.html").is_file()
