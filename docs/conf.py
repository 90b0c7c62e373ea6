"""Sphinx configuration: the documentation site (``.ci/docs`` builds it with ``-W -n``)."""

from __future__ import annotations

import loopdev

project = "loopdev"
author = "The loopdev developers"
copyright = "2026, The loopdev developers"
release = loopdev.__version__
version = release

extensions = ["sphinx.ext.autodoc", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

# The Markdown guides (BROKER.md, RELIABILITY.md) are included as they are:
# their "#" headings get anchors, their links to the source tree stay links.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

nitpicky = True
# The standard library's names (no intersphinx: the build needs no network).
nitpick_ignore_regex = [
    ("py:class", r"(os|types|typing|collections\.abc|socket|argparse)\..*"),
    ("py:class", r"(int|str|bytes|bool|float|object|None|Literal|TracebackType|PathLike)"),
    ("py:class", r"(OSError|Exception|BaseException|FileNotFoundError|PermissionError)"),
    # Names that exist for the type checker only (TYPE_CHECKING).
    ("py:class", r"(Backing|DirectIO|JsonValue|Callable|Self|AttachOptions|Lease|Unpack)"),
    # compat.LoopInfo is the binding's class, documented under its compat name.
    ("py:class", r"loopdev\._native\.LoopInfo"),
    ("py:mod", r"loopdev\._(native|engine)"),
    ("py:exc", r"(OSError|TimeoutError|RuntimeError|ValueError|FileNotFoundError)"),
]
