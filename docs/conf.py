"""Sphinx configuration of the galdecomp reference manual (``make docs``)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "galdecomp"
author = "the galdecomp developers"
copyright = "the galdecomp developers, GPL-3.0-or-later"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"description": "Bayesian decomposition of the multi-frequency sky"}

# numpydoc docstrings through napoleon
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "none"

myst_heading_anchors = 4
myst_enable_extensions = []
