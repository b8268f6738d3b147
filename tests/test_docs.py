"""The documentation site builds with warnings as errors, and the guide's Python compiles.

The guide's examples are run for real in ``tests/integration/test_guide_examples.py``; here
every ``.. code-block:: python`` of ``docs/tasks-guide.rst`` must at least be valid Python
(top-level ``await`` and ``async with`` allowed, as the guide shows excerpts of coroutines).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDE = DOCS / "tasks-guide.rst"

_CODE_BLOCK = re.compile(r"^(?P<indent> *)\.\. code-block:: python\s*$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, source)`` of every ``.. code-block:: python`` in an rst file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _CODE_BLOCK.match(lines[i])
        i += 1
        if match is None:
            continue
        directive_indent = len(match["indent"])
        start = i
        body: list[str] = []
        while i < len(lines):
            line = lines[i]
            if line.strip() and len(line) - len(line.lstrip()) <= directive_indent:
                break  # dedented: the block is over
            body.append(line)
            i += 1
        # Directive options (":linenos:" ...) come first, before the blank line.
        while body and body[0].strip().startswith(":"):
            body.pop(0)
        source = textwrap.dedent("\n".join(body)).strip("\n")
        blocks.append((start, source))
    return blocks


GUIDE_BLOCKS = python_blocks(GUIDE)


def test_the_guide_has_python_examples() -> None:
    # Guards the parser above: it finds every block, and there are many.
    assert len(GUIDE_BLOCKS) == GUIDE.read_text(encoding="utf-8").count("code-block:: python")
    assert len(GUIDE_BLOCKS) >= 15
    assert all(source for _, source in GUIDE_BLOCKS)


@pytest.mark.parametrize(
    "source", [source for _, source in GUIDE_BLOCKS], ids=[f"line{n}" for n, _ in GUIDE_BLOCKS]
)
def test_guide_python_block_compiles(source: str) -> None:
    compile(source, str(GUIDE), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.timeout(60)
def test_sphinx_build_is_clean(tmp_path: Path) -> None:
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("sphinx is not installed (pip install -e '.[docs]')")
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index", "quickstart", "tasks-guide", "deployment", "operations", "cli", "api"):
        assert (out / f"{page}.html").is_file(), page
    # Pages included from Markdown, when they exist (docs/benchmarks.md is written separately).
    for markdown in DOCS.glob("*.md"):
        assert (out / f"{markdown.stem}.html").is_file(), markdown.name
