"""Sphinx configuration of the groupmorph_pyro documentation (build: ``sphinx-build -W -b html docs docs/_build``)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "groupmorph_pyro"
author = "groupmorph_pyro developers"
copyright = "groupmorph_pyro developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "groupmorph_pyro"
html_static_path = ["_static"]

# Every cross-reference into the package must resolve (a renamed or removed object fails the strict
# build); names outside it (torch, numpy, pathlib) and the docstrings' short relative names are not checked.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!groupmorph_pyro\.).*")]
