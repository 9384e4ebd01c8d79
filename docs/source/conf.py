"""Sphinx configuration of the diffusers-psld documentation.

Build (offline, warnings are errors; the same command runs in CI)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -n -b html docs/source docs/_build/html

Pages are MyST Markdown. The API reference is generated from the docstrings (autodoc + napoleon for the
Google/diffusers "Args:" style). Cross-references to Python, PyTorch, NumPy, Pillow and Diffusers go through
intersphinx with inventories written from the installed packages (``_ext/offline_inventory.py``), because the
build must not download anything; ``-n`` (nitpicky) makes every unresolved reference an error.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, also without an install
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import diffusers_psld  # noqa: E402
from offline_inventory import write_inventories  # noqa: E402

project = "diffusers-psld"
author = "diffusers-psld contributors"
copyright = "diffusers-psld contributors"  # noqa: A001
release = diffusers_psld.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "psld_refs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints"]
nitpicky = True

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False  # diffusers' base-class docstrings are written for its own doc builder
autoclass_content = "both"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: dataclass fields are documented once, by autodoc

intersphinx_mapping = write_inventories(ROOT / "docs" / "_build" / "inventories")
intersphinx_timeout = 1

# Names that autodoc writes into signatures but no project documents under that name.
nitpick_ignore_regex = [
    (r"py:class", r"(torch\.)?_?[A-Z]\w*Var"),  # typing TypeVars of torch / diffusers
]

html_theme = "furo"
html_title = f"diffusers-psld {release}"
html_static_path: list[str] = []

# Pages that other parts of the project add (schedules, samplers, the diffusers bridge, reliability, training
# notes): listed in this order in the "Topics" toctree of index.md when the file exists, so a page that has not
# landed yet neither breaks the build nor needs an edit here when it does.
OPTIONAL_TOPICS = ["schedules", "samplers", "bridge", "training", "reliability"]
TOPICS_MARKER = "<!-- topics: pages found at build time -->"


def _fill_topics(app, docname, source):
    if docname != "index":
        return
    found = [name for name in OPTIONAL_TOPICS if (HERE / f"{name}.md").exists()]
    toctree = "```{toctree}\n:maxdepth: 1\n:caption: Topics\n\n" + "\n".join(found) + "\n```\n"
    source[0] = source[0].replace(TOPICS_MARKER, toctree if found else "")


def setup(app):
    app.connect("source-read", _fill_topics)
