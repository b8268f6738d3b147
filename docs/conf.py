"""Sphinx configuration of the Flowrra documentation site.

Build it (warnings are errors, as in CI's ``tests/test_docs.py``)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs build/docs    # build/ is git-ignored

New pages are reStructuredText; the Markdown pages (architecture, protocol, operations,
security, benchmarks) are included as they are through MyST, so they stay readable on their
own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# The packages documented by autodoc and sphinx-click (normally installed editable anyway).
sys.path.insert(0, str(ROOT))

import flowrra  # noqa: E402

project = "Flowrra"
author = "the Flowrra authors"
copyright = "the Flowrra authors"
version = release = flowrra.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_click",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
suppress_warnings: list[str] = []

# docs/benchmarks.md is written separately; until it exists the site builds without it
# instead of failing on the toctree entry that names it.
if not (DOCS / "benchmarks.md").exists():
    suppress_warnings.append("toc.not_readable")

# --------------------------------------------------------------------------- MyST (Markdown)

# Anchors for "#1-sockets"-style links inside the Markdown pages (GitHub's slugs).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# --------------------------------------------------------------------------- sphinx-click


def _real_context(ctx: click.Context) -> click.Context:
    """The context ``--help`` would see for ``ctx``'s command.

    sphinx-click builds bare contexts, without the commands' ``context_settings``
    (``show_default``, ``auto_envvar_prefix``); build them the way click does.
    """
    chain = []
    current: click.Context | None = ctx
    while current is not None:
        chain.append(current)
        current = current.parent
    real: click.Context | None = None
    for level in reversed(chain):
        real = level.command.make_context(level.info_name, [], parent=real, resilient_parsing=True)
    assert real is not None
    return real


def _option_details(app: Any, ctx: click.Context, lines: list[str]) -> None:
    """Add what ``--help`` shows (default, range) and the environment variable to each
    option that sphinx-click formatted, as one line under its description."""
    real = _real_context(ctx)
    options = [
        param
        for param in ctx.command.params
        if isinstance(param, click.Option) and not param.hidden
    ]
    starts = [i for i, line in enumerate(lines) if line.startswith(".. option:: ")]
    if len(starts) != len(options):
        raise RuntimeError(f"{ctx.command_path}: cannot match the options sphinx-click wrote")
    result = lines[: starts[0]] if starts else list(lines)
    for index, (start, option) in enumerate(zip(starts, options, strict=True)):
        end = starts[index + 1] if index + 1 < len(starts) else len(lines)
        # sphinx-click's own fields (":default:", ":options:") are replaced by the line below.
        block = [line for line in lines[start:end] if not line.startswith("    :")]
        while block and not block[-1].strip():
            block.pop()
        # click >= 8.2 says what --help shows; older ones only get the environment variable.
        help_extra = getattr(option, "get_help_extra", None)
        extra = help_extra(real) if help_extra is not None else {}
        details = []
        if isinstance(option.type, click.Choice):
            choices = " | ".join(f"``{choice}``" for choice in option.type.choices)
            details.append(f"one of {choices}")
        if "default" in extra:
            details.append(f"default ``{extra['default']}``")
        if "range" in extra:
            details.append(f"range ``{extra['range']}``")
        if option.allow_from_autoenv and option.envvar is None and real.auto_envvar_prefix:
            envvar = f"{real.auto_envvar_prefix}_{(option.name or '').upper()}"
            details.append(f"env ``{envvar}``")
        if details:
            block.extend(["", "    " + "; ".join(details)])
        result.extend([*block, ""])
    lines[:] = result


def setup(app: Any) -> None:
    app.connect("sphinx-click-process-options", _option_details)


# --------------------------------------------------------------------------- autodoc

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
# Signatures stay readable; types go into the parameter descriptions.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# --------------------------------------------------------------------------- HTML

html_theme = "furo"
html_title = f"Flowrra {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
pygments_style = "sphinx"
# Keep "--option" as two hyphens in text (no en dashes), but curl the quotes.
smartquotes_action = "qe"
